"""One image interface for every source: :class:`SlideImage`, a lazily read RGB multiscale image.

A slide is read **in place**, a box at a time, through the backend that fits it
(:mod:`stimage_nb.io._levels`): OME-Zarr through zarr (NGFF 0.1–0.5, any layout ome-zarr-py finds);
TIFF, OME-TIFF and Aperio SVS through tifffile's zarr view; NDPI, MRXS, SCN, BIF, VMS and DICOM through
OpenSlide. Every backend hands back 8-bit RGB whatever the file holds (bit depths, grey, alpha
composited onto white: :mod:`stimage_nb.io._pixels`), and the pixel size comes from the standard
places (:mod:`stimage_nb.io._resolution`), so the rest of the package sees one interface:
``read_region``, ``read_physical``, ``tile_box``, ``thumbnail``, ``level_shapes``, ``downsamples``,
``um_per_px``.

Tiles are read from the level nearest to (not coarser than) the resolution asked for; the thumbnail
(tissue detection) from a low level; nothing reads level 0 whole. Flat JPEG/PNG files have no pyramid
and cannot be decoded in parts, so :func:`open_image` converts them once into an OME-Zarr pyramid in the
cache (keyed by path, size and mtime, least-recently-used eviction: :mod:`stimage_nb.io.cache`). Other
copies are made only when asked (:mod:`stimage_nb.io.convert`).

Coordinates are always full-resolution (level 0) pixels, ``x`` to the right and ``y`` down.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from collections import Counter
from pathlib import Path

import numpy as np

from .._settings import cache_dir
from ..errors import SlideReadError, StimageInputError
from . import _resolution as R
from ._levels import RASTER_SUFFIXES, LevelReader, NgffLevels, open_levels
from ._pixels import pil_to_rgb8
from .ngff import check_um_per_px, downsample, is_ome_zarr, write_ome_zarr

__all__ = ["SlideImage", "open_image", "is_ome_zarr", "check_um_per_px"]

log = logging.getLogger(__name__)

#: Pixels of a level read whole for a thumbnail; a larger level is read in strips, each shrunk at once.
THUMBNAIL_READ_PX = 4096 * 4096


class SlideImage:
    """A lazily read RGB multiscale image (one interface over OME-Zarr, TIFF and OpenSlide backends).

    Parameters
    ----------
    path
        An OME-Zarr store (opened in place). Other files: use :func:`open_image`.
    um_per_px
        Overrides the level-0 pixel size the file records.
    source
        What messages call the image (default: the path).
    levels
        An open backend (:class:`~stimage_nb.io._levels.LevelReader`) instead of ``path``.

    Attributes
    ----------
    level_shapes
        (height, width) in pixels per level, finest first.
    downsamples
        Level-0 pixels per level pixel (width ratio) per level.
    um_per_px
        Level-0 pixel size in µm; ``um_per_px_source`` says where it was read.
    read_stats
        ``Counter`` of ``("regions", level)`` and ``("pixels", level)``: what was read from the file.

    Raises
    ------
    StimageInputError
        Not a readable image, or no pixel size anywhere (the message names every place looked at).
    """

    def __init__(self, path: str | os.PathLike | None = None, um_per_px: float | None = None,
                 source: str | None = None, *, levels: LevelReader | None = None):
        if levels is None:
            if path is None:
                raise TypeError("SlideImage needs a path or levels=")
            levels = NgffLevels(path, source=source)
        self._levels = levels
        self.path = Path(levels.path)
        self.source = source or str(self.path)
        self.level_shapes = [tuple(int(v) for v in s) for s in levels.level_shapes]
        self.downsamples = [self.level_shapes[0][1] / s[1] for s in self.level_shapes]
        rec = levels.resolution
        if um_per_px is not None:
            self.um_per_px_source = "given"
        else:
            self.um_per_px_source = rec.place
        try:
            self.um_per_px = check_um_per_px(um_per_px if um_per_px is not None else rec.um_per_px, self.source,
                                             missing=R.missing(self.source, rec))
        except StimageInputError:
            levels.close()  # a refused slide leaves no open file behind (cohorts open thousands)
            raise
        self.omero = levels.omero
        self.read_stats: Counter = Counter()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ properties
    @property
    def width(self) -> int:
        return self.level_shapes[0][1]

    @property
    def height(self) -> int:
        return self.level_shapes[0][0]

    @property
    def n_levels(self) -> int:
        return len(self.level_shapes)

    @property
    def backend(self) -> str:
        """Which reader reads the image, and the format (e.g. ``"OME-Zarr 0.5"``, ``"TIFF (tifffile)"``)."""
        return self._levels.kind

    @property
    def datasets(self) -> list[str] | None:
        """The NGFF dataset paths (level 0 first) of an OME-Zarr image, relative to its multiscale group; None
        for other backends."""
        meta = getattr(self._levels, "meta", None)
        return list(meta.datasets) if meta is not None else None

    @property
    def axes(self) -> list[str] | None:
        """The NGFF axis names in array order of an OME-Zarr image; None for other backends."""
        meta = getattr(self._levels, "meta", None)
        return list(meta.axes) if meta is not None else None

    @property
    def fingerprint(self) -> str:
        """Path, size and mtime of what is read: changes when the file does (tile cache keys)."""
        return self._levels.fingerprint()

    def close(self) -> None:
        """Close the file handles (a cohort opens thousands of slides)."""
        self._levels.close()

    def __enter__(self) -> "SlideImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SlideImage({self.source!r}, {self.width}x{self.height} px, {self.um_per_px:g} µm/px, "
                f"{self.n_levels} levels, {self.backend})")

    # ------------------------------------------------------------------ reading
    def _read_level(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Read the in-bounds box [x0,x1)×[y0,y1) of a level as (h, w, 3) uint8.

        Raises
        ------
        SlideReadError
            A tile of the box fails to decode (names the level and the box).
        """
        with self._lock:
            self.read_stats["regions", level] += 1
            self.read_stats["pixels", level] += (x1 - x0) * (y1 - y0)
        out = self._levels.read(level, x0, y0, x1, y1)
        if out.shape != (y1 - y0, x1 - x0, 3):
            raise SlideReadError(f"{self.source}: level {level} box x {x0}-{x1}, y {y0}-{y1} read as {out.shape}; "
                                 "the file's level sizes are inconsistent.", source=self.source, level=level,
                                 box=(x0, y0, x1, y1))
        return out

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
        """The whole image at most ``max_px`` on its long side; returns (rgb, downsample factor to level 0).

        Read from the finest level at most ``2 * max_px`` on its long side (else the coarsest); a level
        of more than :data:`THUMBNAIL_READ_PX` pixels (a slide without a pyramid) is read in strips,
        each shrunk by area averaging as it comes, so memory stays bounded.
        """
        from PIL import Image

        level = len(self.level_shapes) - 1
        for i, (h, w) in enumerate(self.level_shapes):
            if max(h, w) <= max_px * 2:
                level = i
                break
        h, w = self.level_shapes[level]
        pre = 1
        if h * w > THUMBNAIL_READ_PX:
            pre = max(1, int(max(h, w) // (2 * max_px)))
            rows = max(pre, (THUMBNAIL_READ_PX // max(w, 1)) // pre * pre)
            strips = [downsample(self.read_region(0, y0, w, min(rows, h - y0), level=level), pre)
                      for y0 in range(0, h - h % pre if h >= pre else h, rows)]
            img = np.concatenate(strips, axis=0)
        else:
            img = self.read_region(0, 0, w, h, level=level)
        hh, ww = img.shape[:2]
        f = max(hh, ww) / max_px
        if f > 1:
            img = np.asarray(Image.fromarray(img).resize((max(1, round(ww / f)), max(1, round(hh / f))),
                                                         Image.Resampling.BOX))
        else:
            f = 1.0
        return img, self.downsamples[level] * pre * f


# ---------------------------------------------------------------------- opening files
def _cache_key(path: Path, um_per_px: float | None) -> str:
    st = path.stat()
    h = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}|{um_per_px}".encode()).hexdigest()[:16]
    return f"{path.stem}-{h}.ome.zarr"


def _read_raster(path: Path) -> tuple[np.ndarray, R.Resolution]:
    """A flat JPEG/PNG/... decoded whole as RGB, with its recorded density (refused when it cannot fit memory)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            _check_fits_memory(path, im.size, im.format or path.suffix)
            im.load()
            return pil_to_rgb8(im, str(path)), R.from_pil_info(im.info)
    except StimageInputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise StimageInputError(f"{path}: cannot decode the image ({type(e).__name__}: {e}). "
                                "Is the file complete and a JPEG/PNG/TIFF?") from e


def _check_fits_memory(path: Path, size: tuple[int, int], fmt: str) -> None:
    """A flat raster is decoded whole (and its pyramid built from it): refuse one that would not fit."""
    try:
        import psutil

        avail = psutil.virtual_memory().available
    except Exception:  # noqa: BLE001
        return
    need = int(size[0]) * int(size[1]) * 3 * 3  # decoded RGB, its copy, the pyramid below it
    if need > 0.8 * avail:
        raise SlideReadError(
            f"{path}: a flat {fmt} of {size[0]}x{size[1]} px cannot be read lazily and needs about {need / 2**30:.1f} GB "
            f"to convert, more than the {avail / 2**30:.1f} GB available. Convert it once to a tiled pyramidal TIFF "
            f"(`vips tiffsave {path.name} {path.stem}.tif --tile --pyramid --compression jpeg --tile-width 512 "
            f"--tile-height 512`) or OME-Zarr (`bioformats2raw {path.name} {path.stem}.ome.zarr`) and open that.",
            source=str(path))


def open_image(path: str | os.PathLike, um_per_px: float | None = None, *, cache: bool = True,
               convert: bool = False) -> SlideImage:
    """Open any supported image as a :class:`SlideImage`.

    Parameters
    ----------
    path
        An OME-Zarr store, a slide (TIFF, OME-TIFF, SVS, NDPI, MRXS, SCN, BIF, VMS, DICOM: read in place,
        lazily) or a flat JPEG/PNG/BMP/WebP (converted once into the cache).
    um_per_px
        Level-0 pixel size in µm; needed when the file records none (most JPEG/PNG). Overrides the file.
    cache
        Reuse an earlier conversion of the same file (same path, size and mtime).
    convert
        Also copy a slide into an OME-Zarr in the cache (streamed tile by tile,
        :func:`stimage_nb.io.convert.convert_to_ome_zarr`) and read the copy.

    Raises
    ------
    StimageInputError
        Missing file, unknown type, no pixel size anywhere, undecodable raster.
    SlideReadError
        A slide format no lazy reader handles (names the format and the conversion that fixes it), a
        truncated slide, a flat raster too large to convert in memory.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise StimageInputError(f"{p}: image not found. Check the path (relative paths in a manifest are "
                                "relative to the manifest's folder).")
    if is_ome_zarr(p):
        return SlideImage(levels=NgffLevels(p), um_per_px=um_per_px)
    if p.suffix.lower() not in RASTER_SUFFIXES:
        img = SlideImage(levels=open_levels(p), um_per_px=um_per_px, source=str(p))
        if not convert:
            return img
        from .convert import convert_to_ome_zarr

        with img:
            out = convert_to_ome_zarr(img, cache_dir() / "images" / _cache_key(p, um_per_px), reuse=cache)
            place = img.um_per_px_source
        copy = SlideImage(out, um_per_px=um_per_px, source=str(p))
        copy.um_per_px_source = place
        return copy
    from . import cache as _cache

    out = cache_dir() / "images" / _cache_key(p, um_per_px)
    if cache and out.exists():
        _cache.touch(out)
        return _converted(out, um_per_px, p)
    rgb, res = _read_raster(p)
    um = check_um_per_px(um_per_px if um_per_px is not None else res.um_per_px, p, missing=R.missing(p, res))
    log.info("converting %s to OME-Zarr at %s", p, out)
    try:
        write_ome_zarr(rgb, out, um, name=p.stem)
    except OSError:
        # Another process finished the same conversion first (the rename found the target taken).
        if not is_ome_zarr(out):
            raise
    try:
        (out / "source.json").write_text(json.dumps({"source": str(p.resolve()), "um_per_px": um,
                                                     "um_per_px_source": "given" if um_per_px is not None
                                                     else res.place}))
    except OSError:  # read-only or concurrently replaced cache: the provenance note is optional
        pass
    _cache.enforce_limit(keep=[out])
    return _converted(out, um_per_px, p)


def _converted(store: Path, um_per_px: float | None, src: Path) -> SlideImage:
    """The converted copy of ``src``, saying where its µm/px came from (recorded at conversion)."""
    img = SlideImage(store, um_per_px=um_per_px, source=str(src))
    if um_per_px is None:
        try:
            img.um_per_px_source = json.loads((store / "source.json").read_text()).get("um_per_px_source",
                                                                                      img.um_per_px_source)
        except (OSError, ValueError):
            pass
    return img
