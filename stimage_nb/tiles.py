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
from .io.image import SlideImage

log = logging.getLogger(__name__)


def default_tile_um(diameter_um: float, context: float = 1.5) -> float:
    """Tile side from the spot diameter: the spot plus some context (1.5x by default)."""
    return float(diameter_um) * context


def _cache_path(image: SlideImage, xy: np.ndarray, tile_um: float, out_px: int) -> Path:
    h = hashlib.sha1()
    h.update(str(Path(image.path).resolve()).encode())
    h.update(f"{image.um_per_px:.6f}|{tile_um:.4f}|{out_px}".encode())
    h.update(np.ascontiguousarray(xy, dtype=np.float64).tobytes())
    return cache_dir() / "tiles" / f"{h.hexdigest()[:20]}.npy"


def _read_groups(boxes: np.ndarray, n: int, max_overread: float = 3.0, max_width: int = 8192) -> list[np.ndarray]:
    """Group tile boxes (top-left x, y of n x n boxes, one level) into rows read as one region.

    Tiles are sorted into rows (top edges within n/2 of the row's first), rows are cut where the
    region would exceed ``max_width`` pixels, and a row is only read whole when its bounding box is at
    most ``max_overread`` times the tiles' own area (dense spot grids); sparse rows fall back to one
    read per tile. Each chunk of the slide is then decoded about once instead of once per tile.
    """
    order = np.lexsort((boxes[:, 0], boxes[:, 1]))
    groups, row = [], [order[0]] if len(order) else []
    for i in order[1:]:
        if boxes[i, 1] - boxes[row[0], 1] <= n // 2 and boxes[i, 0] + n - boxes[row[0], 0] <= max_width:
            row.append(i)
        else:
            groups.append(np.array(row))
            row = [i]
    if row:
        groups.append(np.array(row))
    out = []
    for g in groups:
        x0, y0 = boxes[g].min(0)
        x1, y1 = boxes[g].max(0) + n
        if len(g) > 1 and (x1 - x0) * (y1 - y0) <= max_overread * len(g) * n * n:
            out.append(g)
        else:
            out.extend(np.array([i]) for i in g)
    return out


def extract_tiles(image: SlideImage, xy: np.ndarray, tile_um: float, out_px: int, *, cache: bool = True,
                  workers: int | None = None, progress: bool = False) -> np.ndarray:
    """Tiles around level-0 centres ``xy`` as an (n, out_px, out_px, 3) uint8 array.

    Each tile equals ``image.read_physical(x, y, tile_um, out_px)``; neighbouring tiles are read as
    one region (:func:`_read_groups`) on a thread pool. Tiles are cached on disk (keyed by image,
    centres, size), so training epochs, ensemble members and re-runs do not re-read the slide.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    path = _cache_path(image, xy, tile_um, out_px)
    if cache and path.exists():
        try:
            arr = np.load(path, mmap_mode=None)
            if arr.shape == (len(xy), out_px, out_px, 3):
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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npy")
        np.save(tmp, out)
        os.replace(tmp, path)
    return out


def section_tiles(section, tile_um: float | None = None, out_px: int = 112, **kw) -> np.ndarray:
    """Tiles for every observation of a :class:`~stimage_nb.io.section.Section`."""
    tile_um = tile_um or default_tile_um(section.diameter_um)
    return extract_tiles(section.image, section.xy, tile_um, out_px, **kw)
