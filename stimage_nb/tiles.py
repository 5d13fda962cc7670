"""Tiles by physical size and the on-disk tile cache.

A tile is a square of ``tile_um`` micrometres centred on a spot or cell, read from the pyramid level
closest to the target resolution and resampled to ``out_px`` pixels. Two scans of the same tissue at
0.25 and 0.5 µm/px therefore give tiles with the same content.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ._settings import cache_dir
from .atomic import write_atomic
from .io.image import SlideImage

log = logging.getLogger(__name__)


def default_tile_um(diameter_um: float, context: float = 1.5) -> float:
    """Tile side from the spot diameter: the spot plus some context (1.5x by default)."""
    return float(diameter_um) * context


def _cache_path(image: SlideImage, xy: np.ndarray, tile_um: float, out_px: int) -> Path:
    h = hashlib.sha1()
    h.update(image.fingerprint.encode())  # path, size and mtime: a changed file is read again
    h.update(f"{image.um_per_px:.6f}|{tile_um:.4f}|{out_px}".encode())
    h.update(np.ascontiguousarray(xy, dtype=np.float64).tobytes())
    return cache_dir() / "tiles" / f"{h.hexdigest()[:20]}.npy"


def _rows(boxes: np.ndarray, idx: np.ndarray, reach: int, max_width: int, n: int) -> list[np.ndarray]:
    """Split tiles ``idx`` into bands (top edges within ``reach`` of the band's first, by y) and each band
    into windows left to right, at most ``max_width`` pixels wide."""
    order = idx[np.argsort(boxes[idx, 1], kind="stable")]
    groups = []
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and boxes[order[end], 1] - boxes[order[start], 1] <= reach:
            end += 1
        band = order[start:end]
        band = band[np.argsort(boxes[band, 0], kind="stable")]
        w0 = 0
        for k in range(1, len(band) + 1):
            if k == len(band) or boxes[band[k], 0] + n - boxes[band[w0], 0] > max_width:
                groups.append(band[w0:k])
                w0 = k
        start = end
    return groups


def _dense(boxes, g, n, max_overread) -> bool:
    x0, y0 = boxes[g].min(0)
    x1, y1 = boxes[g].max(0) + n
    return len(g) > 1 and (x1 - x0) * (y1 - y0) <= max_overread * len(g) * n * n


def _read_groups(boxes: np.ndarray, n: int, max_overread: float = 3.0, max_width: int = 8192,
                 max_height: int = 1024) -> list[np.ndarray]:
    """Group tile boxes (top-left x, y of n x n boxes, one level) into regions read at once.

    Tiles are sorted into bands of rows (top edges within ``max_height - n`` of the band's first) cut
    into windows at most ``max_width`` pixels wide; a window is read as one region when its bounding
    box is at most ``max_overread`` times the tiles' own area (grids over tissue, dense spot grids),
    else its rows (top edges within n/2) are tried the same way, and sparse tiles are read one by one.
    Each chunk of the slide is then decoded about once instead of once per tile, and a region is at
    most ``max_width`` x ``max_height`` pixels (25 MB), whatever the slide's size.
    """
    if len(boxes) == 0:
        return []
    out = []
    for band in _rows(boxes, np.arange(len(boxes)), max(n // 2, max_height - n), max_width, n):
        if _dense(boxes, band, n, max_overread):
            out.append(band)
            continue
        for row in _rows(boxes, band, n // 2, max_width, n):
            if _dense(boxes, row, n, max_overread):
                out.append(row)
            else:
                out.extend(np.array([i]) for i in row)
    return out


def extract_tiles(image: SlideImage, xy: np.ndarray, tile_um: float, out_px: int, *, cache: bool = True,
                  workers: int | None = None, progress: bool = False) -> np.ndarray:
    """Tiles around level-0 centres ``xy`` as an (n, out_px, out_px, 3) uint8 array.

    Each tile equals ``image.read_physical(x, y, tile_um, out_px)``; neighbouring tiles are read as
    one region (:func:`_read_groups`) on a thread pool. Tiles are cached on disk (keyed by the image's
    file, size and mtime, the centres and the size; least-recently-used eviction under the cache's size
    limit, :mod:`stimage_nb.io.cache`), so training epochs, ensemble members and re-runs do not re-read
    the slide.
    """
    from .io import cache as _cache

    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    path = _cache_path(image, xy, tile_um, out_px)
    if cache and path.exists():
        try:
            arr = np.load(path, mmap_mode=None)
            if arr.shape == (len(xy), out_px, out_px, 3):
                _cache.touch(path)
                return arr
        except Exception:  # noqa: BLE001 - a corrupt cache entry is rebuilt
            log.warning("tile cache %s unreadable; rebuilding", path)
    out = np.empty((len(xy), out_px, out_px, 3), dtype=np.uint8)
    if len(xy):
        level, _, _, n = image.tile_box(xy[0, 0], xy[0, 1], tile_um, out_px)
        boxes = np.array([image.tile_box(x, y, tile_um, out_px)[1:3] for x, y in xy], dtype=np.int64)
        groups = _read_groups(boxes, n)

        def read(g):
            x0, y0 = boxes[g].min(0)
            x1, y1 = boxes[g].max(0) + n
            region = image.read_region(int(x0), int(y0), int(x1 - x0), int(y1 - y0), level=level)
            for i in g:
                bx, by = boxes[i] - (x0, y0)
                out[i] = image.resample(region[by:by + n, bx:bx + n], out_px)
            return len(g)

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(xy), desc="tiles", leave=False)
        with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 2) * 2)) as ex:
            for k in ex.map(read, groups):
                if bar is not None:
                    bar.update(k)
        if bar is not None:
            bar.close()
    if cache:
        write_atomic(path, lambda tmp: np.save(tmp, out))
        _cache.enforce_limit(keep=[path])
    return out


def section_tiles(section, tile_um: float | None = None, out_px: int = 112, **kw) -> np.ndarray:
    """Tiles for every observation of a :class:`~stimage_nb.io.section.Section`."""
    tile_um = tile_um or default_tile_um(section.diameter_um)
    return extract_tiles(section.image, section.xy, tile_um, out_px, **kw)
