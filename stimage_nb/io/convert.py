"""Copies of slides as OME-Zarr, only when asked: streamed tile by tile, never through a whole-level array.

Slides are read in place (:mod:`stimage_nb.io.image`); a copy is made for ``stimage-nb export --format
ome-zarr`` (the prediction store holds the image pyramid, :mod:`stimage_nb.io.ome_zarr`), for viewers
and servers that need OME-Zarr, or on request (``stimage-nb convert``, ``open_image(..., convert=True)``).

:func:`write_pyramid` copies a :class:`~stimage_nb.io.image.SlideImage`'s own levels, one
``chunk`` x ``chunk`` block at a time on a thread pool (each block is one Zarr chunk, so writers never
share a chunk), and then, while the coarsest level is larger than ``min_size``, adds levels by 2x2 area
averaging of the level just written (read back block by block). Memory is a few blocks per thread,
whatever the slide's size. The levels keep their downsample factors (an SVS's 1, 4, 16), recorded as
NGFF 0.4 ``scale`` transforms, so tiles read from the copy equal tiles read from the slide (same level,
same pixels, same resampling).

CLI::

    stimage-nb convert SLIDE [SLIDE ...] [--out DIR] [--um-per-px 0.25]   # DIR/<name>.ome.zarr, or the cache
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import StimageInputError
from .ngff import CHUNK, atomic_store, create_array, downsample2, is_ome_zarr, multiscales_metadata, omero_rgb_metadata

log = logging.getLogger(__name__)

MIN_SIZE = 512


def pyramid_plan(image, base_level: int = 0, min_size: int = MIN_SIZE) -> tuple[list[tuple[int, int]], list[float]]:
    """The (height, width) and downsample (from the copy's level 0) of each level :func:`write_pyramid` writes."""
    if not 0 <= base_level < image.n_levels:
        raise StimageInputError(f"{image.source}: base_level {base_level} does not exist "
                                f"(the image has {image.n_levels} levels, 0–{image.n_levels - 1}).")
    d0 = image.downsamples[base_level]
    shapes = [tuple(image.level_shapes[i]) for i in range(base_level, image.n_levels)]
    ds = [image.downsamples[i] / d0 for i in range(base_level, image.n_levels)]
    while max(shapes[-1]) > min_size and min(shapes[-1]) >= 2:
        h, w = shapes[-1]
        shapes.append((h // 2, w // 2))
        ds.append(ds[-1] * 2.0)
    return shapes, ds


def write_pyramid(image, group, *, base_level: int = 0, name: str = "image", chunk: int = CHUNK,
                  min_size: int = MIN_SIZE, progress: bool = False, workers: int | None = None
                  ) -> tuple[list[tuple[int, int]], list[float]]:
    """Write levels ``base_level``… of ``image`` (and 2x area-mean levels below) into a Zarr v2 ``group``.

    Parameters
    ----------
    image
        A :class:`~stimage_nb.io.image.SlideImage` (any backend).
    group
        An open, writable Zarr v2 group; arrays ``"0"``, ``"1"``, … (c, y, x) uint8 and the NGFF 0.4
        ``multiscales`` and ``omero`` attributes are written into it.
    base_level
        The source level that becomes the copy's level 0 (its µm/px is recorded accordingly).
    chunk
        Block (and Zarr chunk) side in pixels.
    min_size
        Add 2x levels until the long side is at most this.
    progress
        A progress bar over the blocks.
    workers
        Reading/writing threads (default: 2 per CPU, at most 8).

    Returns
    -------
    (shapes, downsamples)
        (height, width) of each written level and its downsample from the copy's level 0.

    Raises
    ------
    SlideReadError
        A tile of the source fails to decode (names its level and position); nothing is left half-written
        when the group is inside :func:`stimage_nb.io.ngff.atomic_store`.
    """
    from tqdm.auto import tqdm

    shapes, ds = pyramid_plan(image, base_level, min_size)
    n_src = image.n_levels - base_level
    arrays = [create_array(group, str(i), (3, h, w), (3, min(chunk, h), min(chunk, w)), "uint8")
              for i, (h, w) in enumerate(shapes)]
    blocks = [[(y0, min(h, y0 + chunk), x0, min(w, x0 + chunk)) for y0 in range(0, h, chunk) for x0 in range(0, w, chunk)]
              for h, w in shapes]
    bar = tqdm(total=sum(map(len, blocks)), desc=f"OME-Zarr {name}", unit="block", disable=not progress, leave=False)

    def copy(i, b):
        y0, y1, x0, x1 = b
        arrays[i][:, y0:y1, x0:x1] = np.transpose(image._read_level(base_level + i, x0, y0, x1, y1), (2, 0, 1))

    def shrink(i, b):
        y0, y1, x0, x1 = b
        prev = np.transpose(np.asarray(arrays[i - 1][:, 2 * y0:2 * y1, 2 * x0:2 * x1]), (1, 2, 0))
        arrays[i][:, y0:y1, x0:x1] = np.transpose(downsample2(prev), (2, 0, 1))

    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 2) * 2)) as ex:
        for i in range(len(shapes)):
            fn = copy if i < n_src else shrink
            for _ in ex.map(lambda b, i=i, fn=fn: fn(i, b), blocks[i]):
                bar.update(1)
    bar.close()
    um = image.um_per_px * image.downsamples[base_level]
    meth = "the source's own levels, then 2x2 area mean" if len(shapes) > n_src else "the source's own levels"
    group.attrs["multiscales"] = [multiscales_metadata(len(shapes), um, name=name, downsamples=ds, method=meth)]
    group.attrs["omero"] = omero_rgb_metadata(name)
    return shapes, ds


def convert_to_ome_zarr(image, out: str | os.PathLike, *, um_per_px: float | None = None, reuse: bool = True,
                        progress: bool = True, chunk: int = CHUNK) -> Path:
    """Copy a slide into an NGFF 0.4 OME-Zarr at ``out`` (streamed, atomic); returns ``out``.

    Parameters
    ----------
    image
        A :class:`~stimage_nb.io.image.SlideImage` or a path :func:`~stimage_nb.io.image.open_image` opens.
    out
        The store to write (replaced atomically; a crash leaves no half store under this name).
    um_per_px
        The slide's pixel size when the file records none.
    reuse
        Keep an existing complete store at ``out`` instead of writing it again.
    """
    import zarr

    from . import cache as _cache
    from .image import SlideImage, open_image

    out = Path(out).expanduser()
    if reuse and is_ome_zarr(out) and (out / "source.json").is_file():
        _cache.touch(out)
        return out
    img = image if isinstance(image, SlideImage) else open_image(image, um_per_px=um_per_px)
    name = Path(str(img.source)).name.split(".")[0]
    log.info("copying %s (%s) to OME-Zarr at %s", img.source, img.backend, out)
    with atomic_store(out) as tmp:
        g = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        shapes, ds = write_pyramid(img, g, name=name, chunk=chunk, progress=progress)
        (tmp / "source.json").write_text(json.dumps({"source": str(img.source), "um_per_px": img.um_per_px,
                                                     "backend": img.backend, "levels": [list(s) for s in shapes]}))
    _cache.enforce_limit(keep=[out])
    if img is not image:
        img.close()
    return out


# ---------------------------------------------------------------------- CLI
def _cmd_convert(a) -> int:
    from .._settings import cache_dir
    from .image import _cache_key, open_image

    for src in a.images:
        img = open_image(src, um_per_px=a.um_per_px)
        with img:
            if a.out is not None:
                target = Path(a.out) / f"{Path(src).name.split('.')[0]}.ome.zarr"
            else:
                target = cache_dir() / "images" / _cache_key(Path(src), a.um_per_px)
            print(convert_to_ome_zarr(img, target, reuse=not a.force, progress=not a.no_progress))
    return 0


def add_cli(subparsers) -> None:
    """Register ``stimage-nb convert`` on the sub-command parser."""
    p = subparsers.add_parser("convert", help="copy slides into OME-Zarr (streamed tile by tile; slides are "
                                              "otherwise read in place)")
    p.add_argument("images", nargs="+", type=Path, help="slides (SVS/TIFF/OME-TIFF/NDPI/MRXS/...) or images")
    p.add_argument("--out", type=Path, default=None, help="write OUT/<name>.ome.zarr (default: into the cache)")
    p.add_argument("--um-per-px", type=float, default=None, help="the scan's µm per pixel when the file records none")
    p.add_argument("--force", action="store_true", help="write again even when the store exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_convert)
