"""Backends of :class:`~stimage_nb.io.image.SlideImage`: read a box of one pyramid level as 8-bit RGB.

Each backend opens a file or store **in place** and reads only the boxes asked for:

- :class:`NgffLevels`: an OME-Zarr (NGFF 0.1–0.5, bioformats2raw layout, 5-D t,c,z,y,x, any length
  unit), found through ome-zarr-py (:func:`stimage_nb.io.ngff.read_ngff_metadata`), read through zarr;
- :class:`TiffLevels`: tifffile's zarr view of a TIFF's pyramid (``TiffPageSeries.aszarr(level=i)``):
  OME-TIFF (sub-resolutions in SubIFDs), Aperio SVS, and generic tiled pyramidal TIFF (levels as
  pages or SubIFDs), any bit depth, planar or interleaved, with palette, alpha or MINISWHITE;
- :class:`OpenSlideLevels`: OpenSlide (PyPI wheels ``openslide-python`` + ``openslide-bin``) for the
  vendor formats it knows (Hamamatsu NDPI/VMS, MIRAX MRXS, Leica SCN, Ventana BIF, Philips TIFF,
  Sakura, DICOM): transparent (unscanned) areas become white.

:func:`open_levels` picks the backend. A format none of them reads raises a
:class:`~stimage_nb.errors.SlideReadError` that names the format and the conversion that fixes it; so
does a truncated file (at open, naming the first tile beyond the end of the file) and a tile that fails
to decode (naming its level and position).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from ..errors import SlideReadError, StimageInputError
from . import _resolution as R
from ._pixels import IntensityRange, intensity_range, to_rgb8
from .ngff import read_ngff_metadata

log = logging.getLogger(__name__)

#: Pillow rasters: decoded whole, converted once (:func:`stimage_nb.io.image.open_image`).
RASTER_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".jp2", ".j2k"}
TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".qptiff", ".btf", ".tf8", ".tf2", ".ptif"}
#: Formats that neither tifffile nor OpenSlide reads, with what they are.
NOT_LAZY = {".czi": "Zeiss CZI", ".vsi": "Olympus/Evident VSI", ".lif": "Leica LIF", ".nd2": "Nikon ND2",
            ".isyntax": "Philips iSyntax", ".kfb": "KFBio KFB", ".sdpc": "SQRAY SDPC", ".mdsx": "Motic MDSX",
            ".tmap": "3DHistech/UNIC TMAP", ".ims": "Imaris IMS", ".oir": "Olympus OIR", ".zvi": "Zeiss ZVI"}
#: OpenSlide vendors that tifffile's zarr view reads as well (and faster, from several threads).
_TIFFFILE_VENDORS = {None, "generic-tiff", "aperio"}


def not_lazy_error(path: Path, what: str, detail: str = "") -> SlideReadError:
    return SlideReadError(
        f"{path}: {what} slides cannot be read lazily here{detail} (tifffile reads TIFF/SVS/OME-TIFF, OpenSlide "
        "reads NDPI/MRXS/SCN/BIF/VMS/DICOM, zarr reads OME-Zarr). Convert it once with Bio-Formats: "
        f"`bioformats2raw {path.name} {path.stem}.ome.zarr` (OME-Zarr) or `bfconvert -pyramid-resolutions 6 "
        f"-tilex 512 -tiley 512 {path.name} {path.stem}.ome.tif` (OME-TIFF), or export an OME-TIFF from QuPath, "
        "and open that.", source=str(path))


def _read_error(source, level: int, box, e: Exception) -> SlideReadError:
    x0, y0, x1, y1 = (int(v) for v in box)
    return SlideReadError(
        f"{source}: the tile at level {level}, x {x0}-{x1}, y {y0}-{y1} (level pixels) cannot be decoded "
        f"({type(e).__name__}: {e}); the file is truncated or corrupt. Copy or download it again (compare its "
        "size or checksum with the original).", source=str(source), level=level, box=(x0, y0, x1, y1))


class LevelReader:
    """Reads boxes of one level of a multiscale image as (h, w, 3) uint8 RGB.

    Attributes: ``path`` (the file or store, opened in place), ``kind`` (reader and format, for
    messages), ``level_shapes`` ((height, width) per level, finest first), ``resolution`` (the
    recorded µm/px of level 0 and where it came from), ``omero`` (NGFF rendering metadata or None).
    """

    kind = "image"
    omero: dict | None = None

    def __init__(self, path: Path):
        self.path = Path(path)
        self.level_shapes: list[tuple[int, int]] = []
        self.resolution = R.Resolution(None)

    def read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass

    def fingerprint(self) -> str:
        """Identifies the content for caches: path, size and modification time of the file (or root metadata)."""
        p = self.path
        for name in ("zarr.json", ".zattrs", ".zgroup"):
            if (p / name).is_file():
                p = p / name
                break
        st = p.stat()
        return f"{self.path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


# ---------------------------------------------------------------------- OME-Zarr
class NgffLevels(LevelReader):
    """An OME-Zarr image (see the module docstring); extra axes (t, z) are read at index 0."""

    def __init__(self, path: str | os.PathLike, source: str | None = None):
        import zarr

        super().__init__(Path(path))
        where = source or str(path)
        meta = read_ngff_metadata(path)
        self.meta = meta
        self.kind = f"OME-Zarr {meta.version}" + (f" ({meta.layout} layout)" if meta.layout != "image" else "")
        try:
            group = zarr.open_group(str(meta.path), mode="r")
            self._arrays = [group[d] for d in meta.datasets]
        except Exception as e:  # noqa: BLE001
            raise StimageInputError(f"{where}: not a readable OME-Zarr image ({type(e).__name__}: {e}).") from e
        self.axes = list(meta.axes)
        yi, xi = self.axes.index("y"), self.axes.index("x")
        self.level_shapes = [(int(a.shape[yi]), int(a.shape[xi])) for a in self._arrays]
        self._c = self.axes.index("c") if "c" in self.axes else None
        n_c = int(self._arrays[0].shape[self._c]) if self._c is not None else 1
        if n_c > 4:
            raise StimageInputError(f"{where}: {n_c} channels; stimage_nb reads brightfield H&E (RGB, RGBA or grey). "
                                    "Export the H&E/brightfield channels as an RGB image.")
        self.omero = meta.omero
        self.range = self._intensity_range()
        # µm/px: the first dataset's x scale in its unit, else bioformats2raw's OME-XML
        res = R.Resolution(None, "NGFF coordinateTransformations")
        if meta.scales and meta.scales[0] is not None:
            f = R.unit_to_um(meta.units.get("x"))
            if f is None:
                res = R.Resolution(None, "NGFF coordinateTransformations",
                                   (f"NGFF axis unit {meta.units.get('x')!r} is not a length unit",))
            else:
                unit = meta.units.get("x") or "unitless, taken as micrometer"
                res = R.Resolution(meta.scales[0][xi] * f, f"NGFF coordinateTransformations ({unit})")
        self.resolution = R.Resolution.first(res, R.from_ome_xml(meta.ome_xml))

    def _intensity_range(self) -> IntensityRange:
        a = self._arrays[-1]
        if a.dtype == np.uint8:
            return IntensityRange()
        return intensity_range(a.dtype, self._raw(len(self._arrays) - 1, 0, 0, *self.level_shapes[-1][::-1]))

    def _raw(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        arr = self._arrays[level]
        sl = []
        for ax in self.axes:
            sl.append(slice(y0, y1) if ax == "y" else slice(x0, x1) if ax == "x" else slice(None) if ax == "c" else 0)
        data = np.asarray(arr[tuple(sl)])
        kept = [a for a in self.axes if a in ("c", "y", "x")]
        if "c" not in kept:
            return data[..., None] if kept.index("y") < kept.index("x") else data.T[..., None]
        return np.transpose(data, [kept.index("y"), kept.index("x"), kept.index("c")])

    def read(self, level, x0, y0, x1, y1):
        try:
            raw = self._raw(level, x0, y0, x1, y1)
        except Exception as e:  # noqa: BLE001 - a chunk that fails to decode
            raise _read_error(self.path, level, (x0, y0, x1, y1), e) from e
        n_c = raw.shape[2]
        return to_rgb8(raw[..., :4], self.range, photometric="rgb" if n_c >= 3 else "minisblack",
                       source=str(self.path))


# ---------------------------------------------------------------------- TIFF (tifffile's zarr view)
class TiffLevels(LevelReader):
    """A TIFF's first image series and its pyramid levels through tifffile's zarr view."""

    def __init__(self, path: Path, tif=None):
        import tifffile
        import zarr

        super().__init__(path)
        self._tif = tif if tif is not None else tifffile.TiffFile(str(path))
        tif = self._tif
        series = tif.series[0]
        self._series = series
        kf = series.keyframe
        self.kind = "OME-TIFF (tifffile)" if tif.is_ome else ("Aperio SVS (tifffile)" if tif.is_svs
                                                              else "TIFF (tifffile)")
        self._check_complete()
        fill = 255 if kf.dtype == np.uint8 else 0
        self._arrays = [zarr.open_array(series.aszarr(level=i, fillvalue=fill), mode="r")
                        for i in range(len(series.levels))]
        axes = series.axes.upper()
        self._axes = axes
        yi, xi = axes.index("Y"), axes.index("X")
        self.level_shapes = [(int(a.shape[yi]), int(a.shape[xi])) for a in self._arrays]
        # the channel axis: interleaved samples (S) when more than one, else C
        self._ch = next((a for a in ("S", "C") if a in axes and series.shape[axes.index(a)] > 1), None)
        if self._ch is not None and series.shape[axes.index(self._ch)] > 4:
            raise StimageInputError(f"{path}: {series.shape[axes.index(self._ch)]} channels; stimage_nb reads "
                                    "brightfield H&E (RGB, RGBA or grey). Export the brightfield channels as RGB.")
        photometric = getattr(kf.photometric, "name", str(kf.photometric)).lower()
        self._palette = None
        if photometric == "palette" and kf.colormap is not None:
            cmap = np.asarray(kf.colormap)
            self._palette = (cmap.T / (257.0 if cmap.max() > 255 else 1.0)).round().astype(np.uint8)
            photometric = "rgb"
        self._photometric = photometric
        extras = tuple(int(e) for e in (kf.extrasamples or ()))
        self._premultiplied = bool(extras and extras[0] == 1)
        self.range = IntensityRange() if (kf.dtype == np.uint8 or self._palette is not None) else \
            intensity_range(kf.dtype, self._raw(len(self._arrays) - 1, 0, 0, *self.level_shapes[-1][::-1]))
        vendor = {}
        if tif.is_svs:
            from tifffile.tifffile import svs_description_metadata

            try:
                mpp = svs_description_metadata(tif.pages[0].description).get("MPP")
            except (ValueError, AttributeError, IndexError):
                mpp = None
            if mpp:
                vendor["aperio.MPP"] = mpp
        self.resolution = R.Resolution.first(R.from_ome_xml(tif.ome_metadata if tif.is_ome else None),
                                             R.from_properties(vendor), R.from_tiff_tags(tif.pages[0]))

    def _check_complete(self) -> None:
        """Fail now, not half-way through a slide, when the file ends before its tiles do."""
        size = os.path.getsize(self.path)
        for li, page in enumerate(self._series.levels):
            page = page.keyframe if hasattr(page, "keyframe") else page
            for pg in (page,):
                offs = np.asarray(pg.dataoffsets, dtype=np.int64)
                ends = offs + np.asarray(pg.databytecounts, dtype=np.int64)
                bad = np.flatnonzero((ends > size) & (offs > 0))
                if bad.size:
                    i = int(bad[0])
                    box = _chunk_box(pg, i)
                    raise SlideReadError(
                        f"{self.path}: truncated: the file has {size:,} bytes but the tile at level {li}, x {box[0]}-"
                        f"{box[2]}, y {box[1]}-{box[3]} (level pixels) lies at bytes {int(offs[i]):,}-{int(ends[i]):,}. "
                        "Copy or download it again (compare its size or checksum with the original).",
                        source=str(self.path), level=li, box=box)

    def _raw(self, level, x0, y0, x1, y1) -> np.ndarray:
        arr = self._arrays[level]
        sl = []
        for ax in self._axes:
            sl.append(slice(y0, y1) if ax == "Y" else slice(x0, x1) if ax == "X" else
                      slice(None) if ax == self._ch else 0)
        data = np.asarray(arr[tuple(sl)])
        kept = [a for a in self._axes if a in ("Y", "X") or a == self._ch]
        if self._ch is None:
            return data[..., None]
        return np.transpose(data, [kept.index("Y"), kept.index("X"), kept.index(self._ch)])

    def read(self, level, x0, y0, x1, y1):
        try:
            raw = self._raw(level, x0, y0, x1, y1)
        except Exception as e:  # noqa: BLE001 - imagecodecs/tifffile decode errors of a damaged tile
            raise _read_error(self.path, level, (x0, y0, x1, y1), e) from e
        if self._palette is not None:
            return self._palette[raw[..., 0]]
        return to_rgb8(raw, self.range, photometric=self._photometric, premultiplied=self._premultiplied,
                       source=str(self.path))

    def close(self) -> None:
        self._tif.close()


def _chunk_box(page, i: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the i-th tile or strip of a tifffile page, in its pixels."""
    h, w = int(page.imagelength), int(page.imagewidth)
    if page.is_tiled:
        th, tw = int(page.tilelength), int(page.tilewidth)
        per_row = -(-w // tw)
        per_plane = per_row * -(-h // th)
        r, c = divmod(i % per_plane, per_row)
        return c * tw, r * th, min(w, (c + 1) * tw), min(h, (r + 1) * th)
    rps = int(page.rowsperstrip or h)
    r = i % max(1, -(-h // rps))
    return 0, r * rps, w, min(h, (r + 1) * rps)


# ---------------------------------------------------------------------- OpenSlide
class OpenSlideLevels(LevelReader):
    """A vendor slide through OpenSlide (its own tile cache; thread-safe)."""

    def __init__(self, path: Path, vendor: str):
        import openslide

        super().__init__(path)
        try:
            self._slide = openslide.OpenSlide(str(path))
        except Exception as e:  # noqa: BLE001
            raise SlideReadError(f"{path}: OpenSlide cannot open this {vendor} slide ({type(e).__name__}: {e}); the "
                                 "file is incomplete or damaged (MRXS/VMS: is its data folder beside it?).",
                                 source=str(path)) from e
        self.kind = f"{vendor} (OpenSlide {openslide.__library_version__})"
        self.level_shapes = [(int(h), int(w)) for w, h in self._slide.level_dimensions]
        self._ds = [float(d) for d in self._slide.level_downsamples]
        self.range = IntensityRange()
        props = dict(self._slide.properties)
        tiff = R.Resolution(None, "TIFF XResolution/ResolutionUnit")
        unit = {"inch": 25400.0, "centimeter": 1e4}.get(str(props.get("tiff.ResolutionUnit", "")).lower())
        if unit and props.get("tiff.XResolution"):
            try:
                tiff = R.Resolution(unit / float(props["tiff.XResolution"]),
                                    f"TIFF XResolution/ResolutionUnit ({props['tiff.ResolutionUnit']})")
            except (ValueError, ZeroDivisionError):
                pass
        self.resolution = R.Resolution.first(R.from_properties(props), tiff)

    def read(self, level, x0, y0, x1, y1):
        ds = self._ds[level]
        loc = (math.ceil(x0 * ds - 1e-6), math.ceil(y0 * ds - 1e-6))
        try:
            rgba = np.asarray(self._slide.read_region(loc, level, (int(x1 - x0), int(y1 - y0))))
        except Exception as e:  # noqa: BLE001 - OpenSlideError: a tile failed to decode
            raise _read_error(self.path, level, (x0, y0, x1, y1), e) from e
        return to_rgb8(rgba, self.range, source=str(self.path))

    def close(self) -> None:
        self._slide.close()


# ---------------------------------------------------------------------- choosing a backend
def open_levels(path: Path) -> LevelReader:
    """The backend for a slide file or OME-Zarr store (module docstring); raises SlideReadError for the rest."""
    from .ngff import is_ome_zarr

    path = Path(path)
    if is_ome_zarr(path):
        return NgffLevels(path)
    if path.is_dir():  # a folder that is not an OME-Zarr store (an MRXS's data folder, a Visium outs/, ...)
        raise SlideReadError(f"{path}: a folder, not an image, and not an OME-Zarr store (no .zattrs/zarr.json with "
                             "'multiscales'); give the slide file itself (for MIRAX, the .mrxs beside its folder) or "
                             "the OME-Zarr store's root.", source=str(path))
    suffix = path.suffix.lower()
    if suffix in NOT_LAZY:
        vendor = _openslide_vendor(path)
        if vendor is not None:
            return OpenSlideLevels(path, vendor)
        raise not_lazy_error(path, NOT_LAZY[suffix])
    vendor = _openslide_vendor(path)
    if suffix in TIFF_SUFFIXES or _is_tiff(path):
        import tifffile

        try:
            tif = tifffile.TiffFile(str(path))
        except Exception as e:  # noqa: BLE001
            if vendor is not None:
                return OpenSlideLevels(path, vendor)
            raise SlideReadError(f"{path}: not a readable TIFF ({type(e).__name__}: {e}); the file is truncated, "
                                 "damaged or not a TIFF. Copy or download it again.", source=str(path)) from e
        if tif.is_ome or vendor in _TIFFFILE_VENDORS:
            try:
                if not tif.series or not tif.pages:
                    raise SlideReadError(f"{path}: not a readable TIFF (it holds no image); the file is truncated, "
                                         "damaged or not a slide. Copy or download it again.", source=str(path))
                return TiffLevels(path, tif)
            except StimageInputError:
                tif.close()
                raise
            except Exception as e:  # noqa: BLE001 - tifffile on a damaged structure
                tif.close()
                raise SlideReadError(f"{path}: not a readable TIFF ({type(e).__name__}: {e}); the file is truncated, "
                                     "damaged or not a slide. Copy or download it again.", source=str(path)) from e
        tif.close()
    if vendor is not None:
        return OpenSlideLevels(path, vendor)
    raise not_lazy_error(path, f"{suffix} files" if suffix else "files without a suffix",
                         " (not a format a slide reader recognises)")


def _openslide_vendor(path: Path) -> str | None:
    try:
        import openslide

        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001 - no OpenSlide library: only tifffile and zarr
        return None


def _is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
