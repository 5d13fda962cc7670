"""One image interface for every source: an OME-Zarr (NGFF 0.4) multiscale pyramid.

OMERO exports OME-Zarr, QuPath 0.6+ and napari read it, and a whole-slide image converts to it once.
:func:`open_image` therefore turns any supported file (JPEG/PNG/TIFF/SVS/NDPI, or an existing
``.ome.zarr``) into a :class:`SlideImage` backed by an OME-Zarr pyramid: existing stores are opened in
place, other files are converted once into the cache (keyed by path, size and mtime) and reused.

Coordinates are always full-resolution (level 0) pixels, ``x`` to the right and ``y`` down.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from .._settings import cache_dir
from ..errors import StimageInputError
from .ngff import check_um_per_px, write_ome_zarr

log = logging.getLogger(__name__)

_RASTER = {".jpg", ".jpeg", ".png", ".bmp"}
_TIFF = {".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".qptiff"}


class SlideImage:
    """A lazily read RGB multiscale image stored as OME-Zarr (NGFF 0.4).

    Parameters
    ----------
    path
        The OME-Zarr group (the folder holding ``.zattrs`` with ``multiscales``).
    um_per_px
        Overrides the level-0 pixel size recorded in the store.
    """

    def __init__(self, path: str | os.PathLike, um_per_px: float | None = None, source: str | None = None):
        import zarr

        self.path = Path(path)
        self.source = source or str(self.path)
        try:
            self._group = zarr.open_group(str(self.path), mode="r")
            ms = self._group.attrs["multiscales"][0]
        except Exception as e:  # noqa: BLE001 - any failure here means "not an OME-Zarr image"
            raise StimageInputError(f"{self.source}: not a readable OME-Zarr image ({e}).") from e
        self.axes = [a["name"] if isinstance(a, dict) else a for a in ms.get("axes", ["c", "y", "x"])]
        self.datasets = [d["path"] for d in ms["datasets"]]
        self._arrays = [self._group[p] for p in self.datasets]
        scales = []
        for d in ms["datasets"]:
            s = next((t["scale"] for t in d.get("coordinateTransformations", []) if t["type"] == "scale"), None)
            scales.append(s)
        yi, xi = self.axes.index("y"), self.axes.index("x")
        self.level_shapes = [(int(a.shape[yi]), int(a.shape[xi])) for a in self._arrays]
        self.downsamples = [self.level_shapes[0][1] / s[1] for s in self.level_shapes]
        recorded = scales[0][xi] if scales[0] is not None else None
        unit = next((a.get("unit") for a in ms.get("axes", []) if isinstance(a, dict) and a.get("name") == "x"), None)
        if recorded is not None and unit not in (None, "micrometer"):
            recorded = float(recorded) * {"nanometer": 1e-3, "millimeter": 1e3, "meter": 1e6}.get(unit, float("nan"))
        self.um_per_px = check_um_per_px(um_per_px if um_per_px is not None else recorded, self.source)
        self.omero = self._group.attrs.get("omero")

    # ------------------------------------------------------------------ properties
    @property
    def width(self) -> int:
        return self.level_shapes[0][1]

    @property
    def height(self) -> int:
        return self.level_shapes[0][0]

    @property
    def n_levels(self) -> int:
        return len(self._arrays)

    def __repr__(self) -> str:
        return (f"SlideImage({self.source!r}, {self.width}x{self.height} px, {self.um_per_px:g} µm/px, "
                f"{self.n_levels} levels)")

    # ------------------------------------------------------------------ reading
    def _read_level(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Read the in-bounds box [x0,x1)×[y0,y1) of a level as (h, w, 3) uint8."""
        arr = self._arrays[level]
        sl = []
        for ax, n in zip(self.axes, arr.shape):
            if ax == "y":
                sl.append(slice(y0, y1))
            elif ax == "x":
                sl.append(slice(x0, x1))
            elif ax == "c":
                sl.append(slice(0, min(n, 3)))
            else:
                sl.append(0)
        data = np.asarray(arr[tuple(sl)])
        kept = [a for a in self.axes if a in ("c", "y", "x")]
        if "c" not in kept:
            data = data[None]
            kept = ["c"] + kept
        data = np.transpose(data, [kept.index("y"), kept.index("x"), kept.index("c")])
        if data.shape[2] == 1:
            data = np.repeat(data, 3, axis=2)
        if data.dtype != np.uint8:
            hi = float(np.iinfo(data.dtype).max) if np.issubdtype(data.dtype, np.integer) else 1.0
            data = np.clip(data.astype(np.float32) / hi * 255.0, 0, 255).astype(np.uint8)
        return data

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0, fill: int = 255) -> np.ndarray:
        """Read a (h, w, 3) uint8 box whose top-left is (x, y) in *that level's* pixels.

        Parts outside the image are filled with ``fill`` (white, like glass).
        """
        H, W = self.level_shapes[level]
        out = np.full((h, w, 3), fill, dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._read_level(level, x0, y0, x1, y1)
        return out

    def best_level(self, um_per_px_wanted: float) -> int:
        """The coarsest level whose pixels are still at least as fine as ``um_per_px_wanted``."""
        best = 0
        for i, d in enumerate(self.downsamples):
            if self.um_per_px * d <= um_per_px_wanted * 1.0001:
                best = i
        return best

    def tile_box(self, cx: float, cy: float, size_um: float, out_px: int) -> tuple[int, int, int, int]:
        """Where :meth:`read_physical` reads: ``(level, x, y, n)``, an n x n box at (x, y) of that level.

        The level is the coarsest whose pixels are still at least as fine as ``size_um / out_px``.
        """
        level = self.best_level(size_um / out_px)
        ds = self.downsamples[level]
        side = size_um / self.um_per_px / ds  # tile side in that level's pixels
        return level, int(round(cx / ds - side / 2)), int(round(cy / ds - side / 2)), int(math.ceil(side))

    @staticmethod
    def resample(region: np.ndarray, out_px: int) -> np.ndarray:
        """Resize a square (n, n, 3) box to (out_px, out_px, 3): area average down, bilinear up."""
        from PIL import Image

        n = region.shape[0]
        if n == out_px:
            return region
        return np.asarray(Image.fromarray(region).resize((out_px, out_px), Image.Resampling.BILINEAR
                                                         if n < out_px else Image.Resampling.BOX))

    def read_physical(self, cx: float, cy: float, size_um: float, out_px: int) -> np.ndarray:
        """A square tile of side ``size_um`` centred on level-0 pixel (cx, cy), resampled to ``out_px``.

        Reads from the pyramid level closest to (not coarser than) the target resolution, so a tile
        has the same physical content whatever the scan resolution.
        """
        level, x, y, n = self.tile_box(cx, cy, size_um, out_px)
        return self.resample(self.read_region(x, y, n, n, level=level), out_px)

    def thumbnail(self, max_px: int = 1024) -> tuple[np.ndarray, float]:
        """The whole image at most ``max_px`` on its long side; returns (rgb, downsample factor)."""
        from PIL import Image

        level = len(self.level_shapes) - 1
        for i, (h, w) in enumerate(self.level_shapes):
            if max(h, w) <= max_px * 2:
                level = i
                break
        h, w = self.level_shapes[level]
        img = self.read_region(0, 0, w, h, level=level)
        f = max(h, w) / max_px
        if f > 1:
            img = np.asarray(Image.fromarray(img).resize((max(1, round(w / f)), max(1, round(h / f))),
                                                         Image.Resampling.BOX))
        else:
            f = 1.0
        return img, self.downsamples[level] * f


def _cache_key(path: Path, um_per_px: float | None) -> str:
    st = path.stat()
    h = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}|{um_per_px}".encode()).hexdigest()[:16]
    return f"{path.stem}-{h}.ome.zarr"


def _read_raster(path: Path) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001
        raise StimageInputError(f"{path}: cannot decode the image ({type(e).__name__}: {e}). "
                                "Is the file complete and a JPEG/PNG/TIFF?") from e


def _read_tiff(path: Path) -> tuple[np.ndarray, float | None]:
    try:
        import tiffslide

        with tiffslide.TiffSlide(str(path)) as s:
            w, h = s.dimensions
            mpp = s.properties.get("tiffslide.mpp-x")
            rgb = np.asarray(s.read_region((0, 0), 0, (w, h), as_array=True))[..., :3]
            return rgb, (float(mpp) if mpp else None)
    except Exception as e:  # noqa: BLE001
        raise StimageInputError(f"{path}: cannot read the slide ({type(e).__name__}: {e}). "
                                "Is it a complete SVS/TIFF file?") from e


def is_ome_zarr(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / ".zattrs").exists() or (p / "zarr.json").exists())


def open_image(path: str | os.PathLike, um_per_px: float | None = None, *, cache: bool = True) -> SlideImage:
    """Open any supported image as a :class:`SlideImage` (OME-Zarr backed).

    Parameters
    ----------
    path
        ``.ome.zarr`` folder, or a JPEG/PNG/TIFF/SVS file (converted once into the cache).
    um_per_px
        Level-0 pixel size; required when the file does not record one (JPEG, PNG).
    cache
        Reuse an earlier conversion of the same file (same path, size and mtime).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise StimageInputError(f"{p}: image not found. Check the path (relative paths in a manifest are "
                                "relative to the manifest's folder).")
    if is_ome_zarr(p):
        return SlideImage(p, um_per_px=um_per_px)
    suffix = p.suffix.lower()
    if suffix not in _RASTER | _TIFF:
        raise StimageInputError(f"{p}: unsupported image type {suffix!r}; use JPEG, PNG, TIFF/SVS or OME-Zarr.")
    out = cache_dir() / "images" / _cache_key(p, um_per_px)
    if cache and out.exists():
        return SlideImage(out, um_per_px=um_per_px, source=str(p))
    if suffix in _TIFF:
        rgb, mpp = _read_tiff(p)
        um = um_per_px if um_per_px is not None else mpp
    else:
        rgb, um = _read_raster(p), um_per_px
    um = check_um_per_px(um, p)
    log.info("converting %s to OME-Zarr at %s", p, out)
    try:
        write_ome_zarr(rgb, out, um, name=p.stem)
    except OSError:
        # Another process finished the same conversion first (the rename found the target taken).
        if not is_ome_zarr(out):
            raise
    try:
        (out / "source.json").write_text(json.dumps({"source": str(p.resolve()), "um_per_px": um}))
    except OSError:  # read-only or concurrently replaced cache: the provenance note is optional
        pass
    return SlideImage(out, um_per_px=um_per_px, source=str(p))
