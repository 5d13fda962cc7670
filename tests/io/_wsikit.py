"""Slides for the image-layer tests, written tile by tile from the real bundled H&E (her2st C3).

:func:`write_slide` writes a tiled pyramidal TIFF with tifffile from an iterator of tiles (levels as
pages or in SubIFDs, JPEG or lossless, optional OME-XML, any level factors), the way scanners and
converters lay them out; :func:`tissue` is a real crop of C3 to fill them with.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=None)
def _c3() -> np.ndarray:
    from PIL import Image

    from stimage_nb._settings import data_dir

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(data_dir() / "her2st" / "images" / "C3.jpg") as im:
        a = np.asarray(im.convert("RGB"))
    a.setflags(write=False)
    return a


def tissue(h: int, w: int, y: int = 1000, x: int = 800) -> np.ndarray:
    """A real (h, w, 3) uint8 crop of her2st C3 (0.69 µm/px) with its top-left at (x, y)."""
    return np.ascontiguousarray(_c3()[y:y + h, x:x + w])


def shrink(a: np.ndarray, f: int) -> np.ndarray:
    """Area-mean downsample by an integer factor (edges cropped)."""
    from stimage_nb.io.ngff import downsample

    return downsample(a, f)


def _tiles(a, t):
    for y in range(0, a.shape[0], t):
        for x in range(0, a.shape[1], t):
            yield a[y:y + t, x:x + t]


def write_slide(path, levels, um_per_px: float | None, *, tile: int = 256, compression="jpeg", subifds=False,
                ome=False, description=None, resolutionunit="CENTIMETER", photometric="rgb", extrasamples=None):
    """Write ``levels`` as a tiled pyramidal TIFF, tile by tile.

    ``levels``: arrays (finest first) or ``(shape, tile iterator)`` pairs of uint8 RGB. Levels go in SubIFDs
    with ``subifds`` (always for ``ome``, as Bio-Formats writes them), else as pages; the pixel size goes
    into the OME-XML (``ome``) or the resolution tags (``resolutionunit`` CENTIMETER/INCH, None: none).
    """
    import tifffile

    shapes = [lev[0] if isinstance(lev, tuple) else lev.shape for lev in levels]
    subifds = subifds or ome
    meta = None
    if ome:
        meta = {"axes": "YXS" if len(shapes[0]) == 3 else "YX"}
        if um_per_px is not None:
            meta.update({"PhysicalSizeX": um_per_px, "PhysicalSizeY": um_per_px})
    with tifffile.TiffWriter(str(path), bigtiff=True, ome=ome) as tw:
        for i, lev in enumerate(levels):
            shape = shapes[i]
            data, dtype = (lev[1], np.uint8) if isinstance(lev, tuple) else (_tiles(lev, tile), lev.dtype)
            f = shapes[0][1] / shape[1]
            kw = {}
            if um_per_px is not None and not ome and resolutionunit is not None:
                per = 1e4 if resolutionunit == "CENTIMETER" else 25400.0
                kw.update(resolution=(per / (um_per_px * f), per / (um_per_px * f)), resolutionunit=resolutionunit)
            tw.write(data, shape=shape, dtype=dtype, tile=(tile, tile), compression=compression,
                     photometric=photometric, extrasamples=extrasamples,
                     subifds=(len(levels) - 1) if (subifds and i == 0) else None,
                     subfiletype=0 if i == 0 else 1, description=description if i == 0 else None,
                     metadata=meta if i == 0 else None, **kw)
    return path
