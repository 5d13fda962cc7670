"""Pixels of any bit depth and colour mode as 8-bit RGB: the one conversion every image reader uses.

Readers hand back what the file holds: 8-, 10-, 12-, 14- or 16-bit integers, 32-bit integers, floats,
one grey channel, grey + alpha, RGB, RGBA or CMYK. The model sees (h, w, 3) uint8 RGB, so

- **intensities** are scaled linearly from the image's range to 0–255 (:class:`IntensityRange`): the
  full range of 8-bit data; for wider integers the smallest standard bit depth (8, 10, 12, 14, 16, 24,
  32 bits) that holds the image's values, measured once per image on its coarsest level (a 12-bit
  scan stored in 16-bit words is scaled by 4095, not 65535); floats in [0, 1], else [0, 255], else
  [0, 65535], else their measured min–max. Never clipped to white;
- **grey** becomes three equal channels (``MINISWHITE`` grey is inverted first);
- **alpha** is composited onto white (transparent = glass, where no tissue was scanned), straight or
  premultiplied (TIFF ``ExtraSamples`` 2 or 1; PNG and OpenSlide are straight);
- **CMYK** becomes RGB by the naive formula Pillow also uses (R = 255 − min(255, C + K), ...).

Pillow images (flat JPEG/PNG/...) go through :func:`pil_to_rgb8`, which lets Pillow expand palettes and
its own colour spaces and sends numeric modes (``I;16``, ``I``, ``F``) through the same scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import StimageInputError

_BIT_DEPTHS = (8, 10, 12, 14, 16, 24, 32)


@dataclass(frozen=True)
class IntensityRange:
    """A linear map of stored values ``[lo, hi]`` onto 0–255 (rounded, clipped)."""

    lo: float = 0.0
    hi: float = 255.0
    why: str = "8-bit"

    @property
    def identity(self) -> bool:
        return self.lo == 0.0 and self.hi == 255.0

    def to_uint8(self, a: np.ndarray) -> np.ndarray:
        if a.dtype == np.uint8 and self.identity:
            return a
        if a.dtype == np.bool_:
            return np.where(a, 255, 0).astype(np.uint8)
        f = (a.astype(np.float32) - np.float32(self.lo)) * np.float32(255.0 / max(self.hi - self.lo, 1e-12))
        return np.clip(np.rint(f), 0, 255).astype(np.uint8)


def intensity_range(dtype, sample: np.ndarray | None = None) -> IntensityRange:
    """The :class:`IntensityRange` of an image with values of ``dtype``; ``sample`` is what it holds (its
    coarsest level), used to tell a 12-bit scan in 16-bit words from a 16-bit one, and the scale of floats."""
    dt = np.dtype(dtype)
    if dt == np.uint8:
        return IntensityRange()
    if dt == np.bool_:
        return IntensityRange(0.0, 1.0, "1-bit")
    vmax = float(np.nanmax(sample)) if sample is not None and sample.size else None
    if np.issubdtype(dt, np.integer):
        bits = 8 * dt.itemsize - (1 if np.issubdtype(dt, np.signedinteger) else 0)
        if vmax is None:
            return IntensityRange(0.0, float(2 ** bits - 1), f"{bits}-bit ({dt})")
        for b in _BIT_DEPTHS:
            if b <= bits and vmax <= 2 ** b - 1:
                return IntensityRange(0.0, float(2 ** b - 1), f"{b}-bit values in {dt}")
        return IntensityRange(0.0, float(2 ** bits - 1), f"{bits}-bit ({dt})")
    if np.issubdtype(dt, np.floating):
        if vmax is None or vmax <= 1.0 + 1e-6:
            return IntensityRange(0.0, 1.0, "float in [0, 1]")
        for hi in (255.0, 65535.0):
            if vmax <= hi:
                return IntensityRange(0.0, hi, f"float in [0, {hi:g}]")
        lo = float(np.nanmin(sample))
        return IntensityRange(lo, vmax, "float min-max")
    raise StimageInputError(f"pixels of type {dt} cannot be shown as RGB (complex or structured data).")


def composite_on_white(rgb: np.ndarray, alpha: np.ndarray, *, premultiplied: bool = False) -> np.ndarray:
    """(h, w, 3) uint8 colour over white through (h, w) uint8 alpha (255 = opaque)."""
    a = alpha.astype(np.float32)[..., None] / 255.0
    c = rgb.astype(np.float32)
    out = c + 255.0 * (1.0 - a) if premultiplied else c * a + 255.0 * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_rgb8(a: np.ndarray, rng: IntensityRange, *, photometric: str = "rgb",
            premultiplied: bool = False, source: str = "image") -> np.ndarray:
    """(h, w[, s]) samples of any type as (h, w, 3) uint8 RGB.

    Parameters
    ----------
    a
        Samples last: 1 (grey), 2 (grey + alpha), 3 (RGB), 4 (RGBA, or CMYK when ``photometric`` is
        ``"separated"``/``"cmyk"``), or no sample axis (grey).
    rng
        How stored values map to 0–255 (:func:`intensity_range`).
    photometric
        ``"rgb"``, ``"minisblack"``, ``"miniswhite"`` (grey inverted), ``"separated"``/``"cmyk"``.
    premultiplied
        Alpha is associated (premultiplied) rather than straight.

    Raises
    ------
    StimageInputError
        More than 4 samples per pixel (a multi-channel fluorescence image, not brightfield H&E).
    """
    if a.ndim == 2:
        a = a[..., None]
    s = a.shape[-1]
    if s > 4:
        raise StimageInputError(
            f"{source}: {s} channels per pixel; stimage_nb reads brightfield H&E (RGB, RGBA or grey). A "
            "multi-channel fluorescence image cannot be predicted from; export its brightfield/H&E channel as RGB.")
    v = rng.to_uint8(a)
    photometric = str(photometric).lower()
    if photometric in ("separated", "cmyk") and s == 4:
        k = v[..., 3:4].astype(np.int32)
        return (255 - np.minimum(255, v[..., :3].astype(np.int32) + k)).astype(np.uint8)
    if s in (1, 2):
        grey = 255 - v[..., 0] if photometric == "miniswhite" else v[..., 0]
        rgb = np.repeat(grey[..., None], 3, axis=2)
        return composite_on_white(rgb, v[..., 1], premultiplied=premultiplied) if s == 2 else rgb
    if s == 4:
        return composite_on_white(v[..., :3], v[..., 3], premultiplied=premultiplied)
    return np.ascontiguousarray(v)


def pil_to_rgb8(im, source: str = "image") -> np.ndarray:
    """A decoded Pillow image of any mode as (h, w, 3) uint8 RGB (see the module docstring)."""
    mode = im.mode
    if mode in ("RGB", "L"):
        a = np.asarray(im)
        return to_rgb8(a, IntensityRange(), source=source)
    if mode in ("RGBA", "LA"):
        return to_rgb8(np.asarray(im), IntensityRange(), source=source)
    if mode in ("P", "PA"):  # palette, perhaps with a transparent index: Pillow expands it to RGBA
        return to_rgb8(np.asarray(im.convert("RGBA")), IntensityRange(), source=source)
    if mode == "1":
        return to_rgb8(np.asarray(im.convert("L")), IntensityRange(), source=source)
    if mode == "RGBa":  # premultiplied
        return to_rgb8(np.asarray(im), IntensityRange(), premultiplied=True, source=source)
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im)
        if a.dtype.byteorder not in ("=", "|"):
            a = a.astype(a.dtype.newbyteorder("="))
        return to_rgb8(a, intensity_range(a.dtype, a), source=source)
    # CMYK, YCbCr, LAB, HSV, ...: Pillow's own conversion to RGB
    return np.asarray(im.convert("RGB"))
