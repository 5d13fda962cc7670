"""The pixel size (µm/px) of an image, from every standard place a file records it.

Each reader returns a :class:`Resolution`: the value (or ``None``) and where it came from. The
places, in the order they are trusted:

1. NGFF ``coordinateTransformations`` (``scale`` of the first dataset, converted from the axis'
   ``unit``): OME-Zarr 0.4/0.5;
2. the OME-XML ``Pixels`` element (``PhysicalSizeX`` in ``PhysicalSizeXUnit``, µm when absent): OME-TIFF
   as Bio-Formats, QuPath and tifffile write it, and bioformats2raw's ``OME/METADATA.ome.xml``;
3. vendor properties, as OpenSlide and tiffslide parse them (``openslide.mpp-x``, ``tiffslide.mpp-x``,
   Aperio ``MPP``, Hamamatsu resolution, MIRAX ``MICROMETER_PER_PIXEL_X``, Philips
   ``DICOM_PIXEL_SPACING`` in mm);
4. TIFF ``XResolution`` with its ``ResolutionUnit`` (inch or centimetre), and PNG ``pHYs`` / JPEG
   ``JFIF`` densities.

A value outside the plausible range of a microscope (0.05–50 µm/px) is not a pixel size but a
screen or print default (72, 96 or 300 dpi = 353, 265 or 85 µm/px) and is ignored, said so in the
error. :func:`missing` builds the one-line error that names every place looked at.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from ..errors import StimageInputError
from .ngff import MAX_UM_PER_PX, MIN_UM_PER_PX

#: Length units (NGFF names, OME-XML symbols) in micrometres.
UNIT_UM = {
    "angstrom": 1e-4, "Å": 1e-4, "picometer": 1e-6, "pm": 1e-6, "nanometer": 1e-3, "nm": 1e-3,
    "micrometer": 1.0, "micron": 1.0, "µm": 1.0, "μm": 1.0, "um": 1.0, "millimeter": 1e3, "mm": 1e3,
    "centimeter": 1e4, "cm": 1e4, "decimeter": 1e5, "dm": 1e5, "meter": 1e6, "m": 1e6, "inch": 25400.0,
    "in": 25400.0, "foot": 304800.0, "ft": 304800.0,
}

PLACES = ("NGFF coordinateTransformations (OME-Zarr)", "OME-XML PhysicalSizeX (OME-TIFF)",
          "vendor properties (Aperio MPP, Hamamatsu, MIRAX, Philips, Leica, Ventana via OpenSlide/tiffslide)",
          "TIFF XResolution + ResolutionUnit", "PNG pHYs / JPEG density")


@dataclass(frozen=True)
class Resolution:
    """A pixel size of level 0 and where it was read (``um_per_px`` is ``None`` when no place had one)."""

    um_per_px: float | None
    place: str = ""
    ignored: tuple[str, ...] = ()

    @classmethod
    def first(cls, *candidates: "Resolution") -> "Resolution":
        """The first candidate with a plausible value; implausible ones are kept as notes."""
        notes: list[str] = []
        for c in candidates:
            notes.extend(c.ignored)
            if c.um_per_px is None:
                continue
            if MIN_UM_PER_PX <= c.um_per_px <= MAX_UM_PER_PX:
                return cls(c.um_per_px, c.place, tuple(notes))
            notes.append(f"{c.place} says {c.um_per_px:.4g} µm/px (not a microscope's pixel size: a screen/print "
                         "default?)")
        return cls(None, "", tuple(notes))


def unit_to_um(unit: str | None, default: float | None = 1.0) -> float | None:
    """Micrometres per ``unit`` (NGFF name or OME symbol); ``default`` when no unit is given, ``None`` if unknown."""
    if unit is None or str(unit).strip() == "":
        return default
    return UNIT_UM.get(str(unit).strip(), UNIT_UM.get(str(unit).strip().lower()))


def from_ome_xml(xml: str | None, image_index: int = 0) -> Resolution:
    """``PhysicalSizeX`` (with ``PhysicalSizeXUnit``; µm when absent) of the ``image_index``-th OME Image."""
    place = "OME-XML PhysicalSizeX"
    if not xml:
        return Resolution(None, place)
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return Resolution(None, place, ("OME-XML present but not parseable",))
    images = [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Image"]
    if not images:
        return Resolution(None, place)
    img = images[min(image_index, len(images) - 1)]
    pixels = next((el for el in img if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return Resolution(None, place)
    f = unit_to_um(pixels.get("PhysicalSizeXUnit"))
    if f is None:
        return Resolution(None, place, (f"OME-XML PhysicalSizeXUnit {pixels.get('PhysicalSizeXUnit')!r} unknown",))
    try:
        return Resolution(float(pixels.get("PhysicalSizeX")) * f, f"{place} ({pixels.get('PhysicalSizeXUnit') or 'µm'})")
    except ValueError:
        return Resolution(None, place, (f"OME-XML PhysicalSizeX {pixels.get('PhysicalSizeX')!r} is not a number",))


def from_properties(props) -> Resolution:
    """Vendor properties as OpenSlide/tiffslide expose them (a mapping of strings)."""
    if not props:
        return Resolution(None, "vendor properties")
    for key in ("openslide.mpp-x", "tiffslide.mpp-x", "aperio.MPP",
                "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X"):
        v = _number(props.get(key))
        if v is not None:
            return Resolution(v, f"vendor property {key}")
    v = props.get("philips.DICOM_PIXEL_SPACING")  # '"0.000243" "0.000243"' in mm
    if v:
        nums = re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", str(v))
        if nums:
            return Resolution(float(nums[0]) * 1e3, "vendor property philips.DICOM_PIXEL_SPACING (mm)")
    return Resolution(None, "vendor properties")


def from_tiff_tags(page) -> Resolution:
    """``XResolution`` (pixels per unit) with ``ResolutionUnit`` 2 (inch) or 3 (cm) of a tifffile page."""
    place = "TIFF XResolution/ResolutionUnit"
    tags = getattr(page, "tags", None)
    if tags is None or "XResolution" not in tags:
        return Resolution(None, place)
    unit = int(getattr(tags.get("ResolutionUnit"), "value", 2) or 1)
    num = tags["XResolution"].value
    try:
        ppu = float(num[0]) / float(num[1]) if isinstance(num, tuple) else float(num)
    except (TypeError, ValueError, ZeroDivisionError):
        return Resolution(None, place)
    if not math.isfinite(ppu) or ppu <= 0 or unit not in (2, 3):
        return Resolution(None, place)  # unit NONE: an aspect ratio, not a size
    um = (25400.0 if unit == 2 else 10000.0) / ppu
    return Resolution(um, f"{place} ({'inch' if unit == 2 else 'centimeter'})")


def from_pil_info(info: dict) -> Resolution:
    """PNG ``pHYs`` / JPEG JFIF / TIFF density as Pillow reports it (``info["dpi"]``)."""
    dpi = info.get("dpi") if info else None
    if not dpi:
        return Resolution(None, "PNG pHYs / JPEG density")
    try:
        d = float(dpi[0])
    except (TypeError, ValueError, IndexError):
        return Resolution(None, "PNG pHYs / JPEG density")
    if not math.isfinite(d) or d <= 1:  # 1 dpi: "unit unknown", an aspect ratio
        return Resolution(None, "PNG pHYs / JPEG density")
    return Resolution(25400.0 / d, f"image density {d:g} dpi")


def _number(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def missing(source, res: Resolution | None = None) -> StimageInputError:
    """The error for an image whose pixel size no standard place records (names them all and the fix)."""
    notes = f" ({'; '.join(res.ignored)})" if res is not None and res.ignored else ""
    return StimageInputError(
        f"{source}: the pixel size (µm/px) is missing: none of the standard places records it ({'; '.join(PLACES)})"
        f"{notes}. Give it explicitly: --um-per-px 0.5 with `stimage-nb predict --image`, the manifest's um_per_px "
        "column, or um_per_px=0.5 in Python; typical H&E scans are 0.25 (40x) to 1.0 µm/px.")
