"""NGFF primitives: pixel-size checks, ``multiscales`` and ``omero`` metadata, Zarr v2 arrays with the
package's chunking and compression, atomic stores and the in-memory RGB pyramid writer (NGFF 0.4, what
every viewer reads), and the reading side: :func:`read_ngff_metadata` finds the image in any layout a
converter or OMERO produces (NGFF 0.4 and 0.5, the bioformats2raw layout's root, plates) through
ome-zarr-py and returns its axes, per-level scales and units.

:mod:`stimage_nb.io.image` (reading, conversion cache), :mod:`stimage_nb.io.convert` (streamed copies),
:mod:`stimage_nb.io.ome_zarr` (prediction stores: labels, heatmaps) and :mod:`stimage_nb.omero.pull`
(server pulls) all build on these, so a store written by any of them has the same layout.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import StimageInputError

MIN_UM_PER_PX = 0.05   # beyond any optical scanner (40x is ~0.25)
MAX_UM_PER_PX = 50.0   # a thumbnail, not a slide


def check_um_per_px(value, source: str | os.PathLike, *, missing: StimageInputError | None = None) -> float:
    """Validate a µm/px value, raising a message that names ``source`` and the fix (``missing``: the error
    to raise when there is no value, e.g. one naming every place a reader looked)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not math.isfinite(v):
        if missing is not None:
            raise missing
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
                         downscale_type: str = "mean", method: str = "2x2 area mean",
                         downsamples: Sequence[float] | None = None) -> dict:
    """NGFF 0.4 ``multiscales`` entry for a pyramid (factor-2 levels unless ``downsamples`` says otherwise).

    Parameters
    ----------
    n_levels
        Number of levels (level ``i`` is ``2**i`` times coarser than level 0, or ``downsamples[i]``).
    um_per_px
        Pixel size of level 0 in µm.
    name
        The multiscale's name.
    axes
        Axis names in array order; ``c`` is a channel axis, ``y``/``x`` are space axes in µm.
    downscale_type, method
        How the levels were made (``type`` and ``metadata.method``).
    downsamples
        Each level's downsample factor from level 0 (a slide's own pyramid: e.g. 1, 4, 16).
    """
    ax = []
    for a in axes:
        ax.append({"name": a, "type": "channel"} if a == "c" else {"name": a, "type": "space", "unit": "micrometer"})
    datasets = []
    for i in range(n_levels):
        s = float(um_per_px) * (float(downsamples[i]) if downsamples is not None else 2 ** i)
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


# ---------------------------------------------------------------------- reading
@dataclass(frozen=True)
class NgffMetadata:
    """Where and what the image of an OME-Zarr store is (any NGFF version, any layout).

    ``path`` is the group holding ``multiscales`` (the store itself, or ``0/`` of a bioformats2raw
    root, or a plate's first field); ``axes`` the axis names in array order; ``scales[i]`` the
    ``scale`` of dataset ``i`` (``None`` when absent); ``units`` the unit of each space axis;
    ``ome_xml`` bioformats2raw's ``OME/METADATA.ome.xml`` when there is one.
    """

    path: Path
    version: str
    axes: tuple[str, ...]
    units: dict
    datasets: tuple[str, ...]
    scales: tuple
    name: str | None = None
    omero: dict | None = None
    layout: str = "image"
    ome_xml: str | None = None


def is_ome_zarr(path: str | os.PathLike) -> bool:
    """A folder with Zarr v2 (``.zattrs``/``.zgroup``) or v3 (``zarr.json``) group metadata."""
    p = Path(path)
    return p.is_dir() and any((p / f).exists() for f in (".zattrs", ".zgroup", "zarr.json"))


def read_ngff_metadata(path: str | os.PathLike, *, series: int = 0) -> NgffMetadata:
    """Find the multiscale image of an OME-Zarr store through ome-zarr-py and read its metadata.

    Handles NGFF 0.1–0.5 (0.5: Zarr v3, metadata under ``attributes["ome"]``), the bioformats2raw
    layout (root with ``bioformats2raw.layout``; image ``series`` under ``<series>/``), and plates (the
    first field of the first well).

    Raises
    ------
    StimageInputError
        The folder holds no OME-Zarr image (names what it found).
    """
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader
    from ome_zarr.utils import find_multiscales

    root = Path(path)
    where = str(root)
    try:
        found = find_multiscales(root)
    except Exception:  # noqa: BLE001 - ome-zarr-py prints and gives up on odd layouts; we try the plain one
        found = None
    layout, ome_xml = "image", None
    attrs = _root_attrs(root)
    if attrs.get("bioformats2raw.layout") is not None:
        layout = "bioformats2raw"
        xml = root / "OME" / "METADATA.ome.xml"
        ome_xml = xml.read_text(errors="replace") if xml.is_file() else None
        if not found:  # no METADATA.ome.xml: the spec's numbered series
            found = [[root / str(series)]]
    elif "plate" in attrs:
        layout = "plate"
    if not found:
        raise StimageInputError(f"{where}: not a readable OME-Zarr image (no NGFF 'multiscales' image in the store, "
                                f"nor a bioformats2raw or plate layout; root attributes: {sorted(attrs)[:8]}).")
    img_path = Path(found[min(series, len(found) - 1)][0])
    quiet = logging.getLogger("ome_zarr")  # it logs every dataset at INFO: keep a CLI run's log readable
    level = quiet.level
    if not logging.getLogger(__name__).isEnabledFor(logging.DEBUG):
        quiet.setLevel(logging.WARNING)
    try:
        loc = parse_url(str(img_path), fmt=_declared_format(img_path))
        node = next(iter(Reader(loc)()), None) if loc is not None else None
        ms = node.load(Multiscales) if node is not None else None
    except Exception as e:  # noqa: BLE001 - ome-zarr-py's own validation (axes, versions)
        raise StimageInputError(f"{where}: not a readable OME-Zarr image ({type(e).__name__}: {e}).") from e
    finally:
        quiet.setLevel(level)
    if ms is None:
        raise StimageInputError(f"{where}: not a readable OME-Zarr image (no 'multiscales' at {img_path}).")
    md = node.metadata
    raw_axes = md.get("axes") or ["t", "c", "z", "y", "x"][-len(node.data[0].shape):]
    axes = tuple(a["name"] if isinstance(a, dict) else str(a) for a in raw_axes)
    units = {a["name"]: a.get("unit") for a in raw_axes if isinstance(a, dict) and a.get("type", "space") == "space"}
    scales = []
    for tr in md.get("coordinateTransformations") or [None] * len(ms.datasets):
        s = next((t.get("scale") for t in (tr or []) if t.get("type") == "scale"), None)
        scales.append(tuple(float(v) for v in s) if s is not None else None)
    if "y" not in axes or "x" not in axes:
        raise StimageInputError(f"{where}: the OME-Zarr image has axes {list(axes)}, without y and x.")
    omero = loc.root_attrs.get("omero") if loc is not None else None
    return NgffMetadata(img_path, str(loc.version), axes, units, tuple(ms.datasets), tuple(scales),
                        md.get("name"), omero, layout, ome_xml)


def _declared_format(img_path: Path):
    """The ome-zarr-py Format of the version the image declares (so it reads it without a mismatch warning)."""
    from ome_zarr.format import CurrentFormat, format_from_version

    attrs = _root_attrs(img_path)
    ms = attrs.get("multiscales") or [{}]
    version = attrs.get("version") or (ms[0].get("version") if isinstance(ms[0], dict) else None)
    try:
        return format_from_version(str(version)) if version else CurrentFormat()
    except ValueError:
        return CurrentFormat()


def _root_attrs(root: Path) -> dict:
    import json

    for name, key in ((".zattrs", None), ("zarr.json", "attributes")):
        f = root / name
        if f.is_file():
            try:
                d = json.loads(f.read_text())
            except ValueError:
                return {}
            d = d.get(key, {}) if key else d
            return d.get("ome", d) if isinstance(d, dict) else {}
    return {}
