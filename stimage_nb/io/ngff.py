"""NGFF 0.4 primitives shared by every OME-Zarr writer: pixel-size checks, ``multiscales`` and ``omero``
metadata, Zarr v2 arrays with the package's chunking and compression, atomic stores and the RGB
pyramid writer.

:mod:`stimage_nb.io.image` (reading, conversion cache), :mod:`stimage_nb.io.ome_zarr` (prediction
stores: labels, heatmaps) and :mod:`stimage_nb.omero.pull` (server pulls) all build on these, so a
store written by any of them has the same layout.
"""

from __future__ import annotations

import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import StimageInputError

MIN_UM_PER_PX = 0.05   # beyond any optical scanner (40x is ~0.25)
MAX_UM_PER_PX = 50.0   # a thumbnail, not a slide


def check_um_per_px(value, source: str | os.PathLike) -> float:
    """Validate a µm/px value, raising a message that names ``source`` and the fix."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not math.isfinite(v):
        raise StimageInputError(
            f"{source}: the pixel size (µm/px) is missing. Give it explicitly (um_per_px=0.5 in Python, the "
            "manifest's um_per_px column, or --um-per-px 0.5 with `stimage-nb predict --image`); typical H&E scans are 0.25 (40x) to 1.0 µm/px.")
    if not (MIN_UM_PER_PX <= v <= MAX_UM_PER_PX):
        raise StimageInputError(
            f"{source}: pixel size {v} µm/px is outside the plausible range [{MIN_UM_PER_PX}, {MAX_UM_PER_PX}]. "
            "Check the unit (µm per pixel, not pixels per µm or mm).")
    return v


NGFF_VERSION = "0.4"
CHUNK = 512


# ---------------------------------------------------------------------- metadata
def multiscales_metadata(n_levels: int, um_per_px: float, name: str = "image", axes: Sequence[str] = "cyx", *,
                         downscale_type: str = "mean", method: str = "2x2 area mean") -> dict:
    """NGFF 0.4 ``multiscales`` entry for a pyramid with factor-2 levels.

    Parameters
    ----------
    n_levels
        Number of levels (level ``i`` is ``2**i`` times coarser than level 0).
    um_per_px
        Pixel size of level 0 in µm.
    name
        The multiscale's name.
    axes
        Axis names in array order; ``c`` is a channel axis, ``y``/``x`` are space axes in µm.
    downscale_type, method
        How the levels were made (``type`` and ``metadata.method``).
    """
    ax = []
    for a in axes:
        ax.append({"name": a, "type": "channel"} if a == "c" else {"name": a, "type": "space", "unit": "micrometer"})
    datasets = []
    for i in range(n_levels):
        s = float(um_per_px) * 2 ** i
        datasets.append({"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0 if a == "c" else s for a in axes]}]})
    return {"version": NGFF_VERSION, "name": name, "axes": ax, "datasets": datasets,
            "type": downscale_type, "metadata": {"method": method, "software": "stimage_nb"}}


def omero_rgb_metadata(name: str = "image") -> dict:
    """The ``omero`` rendering block for an RGB brightfield image (as omero-cli-zarr writes it)."""
    colours = ["FF0000", "00FF00", "0000FF"]
    return {"name": name, "version": NGFF_VERSION, "rdefs": {"model": "color"}, "channels": [
        {"label": lab, "color": col, "active": True, "window": {"min": 0, "max": 255, "start": 0, "end": 255}}
        for lab, col in zip(["R", "G", "B"], colours)]}


# ---------------------------------------------------------------------- low-level helpers
def compressor():
    import numcodecs

    return numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)


def create_array(group, path: str, shape, chunks, dtype, fill_value=0):
    return group.create_array(path, shape=tuple(int(s) for s in shape), chunks=tuple(int(c) for c in chunks),
                              dtype=dtype, compressors=compressor(), fill_value=fill_value,
                              chunk_key_encoding={"name": "v2", "separator": "/"})


@contextmanager
def atomic_store(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(path.name + f".old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def downsample(a: np.ndarray, factor: int) -> np.ndarray:
    """Shrink a (h, w, c) uint8 image by an integer factor with area averaging (rounded; edges cropped
    to a multiple of the factor, at least one pixel kept)."""
    f = int(factor)
    if f == 1:
        return a
    h, w = a.shape[0] // f * f, a.shape[1] // f * f
    if h == 0 or w == 0:
        return a[:1, :1]
    # the f x f strided views summed one by one: the same numbers as a reshape-and-sum, several times faster
    acc = np.zeros((h // f, w // f, a.shape[2]), dtype=np.uint16 if f * f * 255 + f * f < 65536 else np.uint32)
    for dy in range(f):
        for dx in range(f):
            acc += a[dy:h:f, dx:w:f]
    return ((acc + f * f // 2) // (f * f)).astype(np.uint8)


def downsample2(a: np.ndarray) -> np.ndarray:
    """Halve a (h, w, c) uint8 image by 2x2 area averaging (one pyramid level)."""
    return downsample(a, 2)


def jsonable(v):
    """Plain JSON value (NaN/inf become None, numpy scalars become Python numbers)."""
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    return v


# ---------------------------------------------------------------------- image writers
def write_ome_zarr(rgb: np.ndarray, path: str | os.PathLike, um_per_px: float, *, name: str = "image",
                   min_size: int = 512, chunk: int = CHUNK) -> Path:
    """Write an (h, w, 3) uint8 image as an NGFF 0.4 (Zarr v2) pyramid, atomically.

    The store is written beside ``path`` and renamed into place, so a crash never leaves a half
    store under the final name.
    """
    import zarr


    path = Path(path)
    um_per_px = check_um_per_px(um_per_px, path)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise StimageInputError(f"{path}: expected an (h, w, 3) RGB image, got shape {rgb.shape}.")
    rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    with atomic_store(path) as tmp:
        g = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        level, cur = 0, rgb
        while True:
            h, w = cur.shape[:2]
            arr = create_array(g, str(level), (3, h, w), (3, min(chunk, h), min(chunk, w)), "uint8")
            arr[:] = np.transpose(cur, (2, 0, 1))
            level += 1
            if max(h, w) <= min_size:
                break
            cur = downsample2(cur)
        g.attrs["multiscales"] = [multiscales_metadata(level, um_per_px, name=name)]
        g.attrs["omero"] = omero_rgb_metadata(name)
    return path
