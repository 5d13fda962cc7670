"""Simulated acquisition shifts: a section as another scanner or another lab would have produced it.

A model is used on slides from scanners and staining protocols that were not in its training data. The
bundled data cannot hold those slides, so robustness is checked by re-making a held-out section's image
the way a different acquisition would, keeping its spots and counts, and predicting it again:

- **another scan resolution** (``scale``): the image downsampled by an integer factor with area
  averaging (what a lower-magnification scan records), with the pixel size multiplied by the same
  factor and the spot centres divided by it, so tiles of the same physical size are asked for;
- **defocus** (``blur_um``): a Gaussian blur of the given standard deviation in µm, at the original
  resolution;
- **another staining** (``hematoxylin``, ``eosin``): stain concentrations scaled in the fixed
  Ruifrok-Johnston colour deconvolution (:data:`stimage_nb.stain.RUIFROK_HED`): ``1.3`` = 30% more
  dye where there is dye (negative concentrations, where the fixed vectors misfit, are kept). The
  DAB/residual channel is kept, so factors of 1 give the image back (to rounding);
- **compression** (``jpeg_quality``): JPEG re-encoding of the whole image, as slide scanners store it.

The transforms work in horizontal strips (bounded float memory) and write the shifted image as an
OME-Zarr pyramid (atomically; an existing store of the same shift is reused), so the shifted section goes
through exactly the path a real slide would. :data:`STANDARD_SHIFTS` are the shifts reported by
``benchmarks/shift_her2st.py``.

Example::

    from stimage_nb.shifts import Shift, shift_section
    coarse = shift_section(section, Shift("scan_2x", scale=2), "shifted/")
    pred = predict_section(ensemble, coarse)      # same spot ids, compare with section's counts
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import _keys as K
from .errors import StimageInputError
from .io.ngff import check_um_per_px, downsample, write_ome_zarr
from .io.section import Section, make_section_adata
from .names import file_stem

log = logging.getLogger(__name__)


def _hed() -> tuple[np.ndarray, np.ndarray]:
    """The Ruifrok-Johnston matrix and its inverse (imported on use: :mod:`stimage_nb.stain` imports torch,
    which would make every ``stimage-nb`` command start seconds slower)."""
    from .stain import RUIFROK_HED

    return RUIFROK_HED.astype(np.float32), np.linalg.inv(RUIFROK_HED).astype(np.float32)


STRIP_ROWS = 1024


@dataclass(frozen=True)
class Shift:
    """One simulated acquisition (see the module docstring); the defaults change nothing."""

    name: str
    scale: int = 1
    blur_um: float = 0.0
    hematoxylin: float = 1.0
    eosin: float = 1.0
    jpeg_quality: int | None = None

    def __post_init__(self):
        if not self.name or any(c in self.name for c in "/\\ "):
            raise StimageInputError(f"shift name {self.name!r} must be non-empty, without spaces or slashes.")
        if int(self.scale) != self.scale or self.scale < 1:
            raise StimageInputError(f"shift {self.name}: scale must be a whole number >= 1, not {self.scale}.")
        if self.blur_um < 0 or self.hematoxylin <= 0 or self.eosin <= 0:
            raise StimageInputError(f"shift {self.name}: blur_um must be >= 0 and stain factors > 0.")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 100:
            raise StimageInputError(f"shift {self.name}: jpeg_quality must be in 1..100.")

    @property
    def is_identity(self) -> bool:
        return (self.scale == 1 and self.blur_um == 0 and self.hematoxylin == 1 and self.eosin == 1
                and self.jpeg_quality is None)

    def to_dict(self) -> dict:
        return asdict(self)


#: The shifts of the robustness benchmark: two coarser scans (0.69 µm/px of the bundle -> 1.38 and
#: 2.76 µm/px), a defocused scan, a hematoxylin-heavy (H x1.3, E x0.8) and an eosin-heavy (H x0.8, E x1.3) staining,
#: and strong JPEG compression (quality 30).
STANDARD_SHIFTS: tuple[Shift, ...] = (
    Shift("reference"),
    Shift("scan_2x", scale=2),
    Shift("scan_4x", scale=4),
    Shift("defocus_1.5um", blur_um=1.5),
    Shift("stain_H1.3_E0.8", hematoxylin=1.3, eosin=0.8),
    Shift("stain_H0.8_E1.3", hematoxylin=0.8, eosin=1.3),
    Shift("jpeg_q30", jpeg_quality=30),
)


# ----------------------------------------------------------------------------- pixel transforms
def restain(rgb: np.ndarray, hematoxylin: float = 1.0, eosin: float = 1.0) -> np.ndarray:
    """Scale the hematoxylin and eosin concentrations of an (h, w, 3) uint8 image (Ruifrok-Johnston)."""
    if hematoxylin == 1 and eosin == 1:
        return rgb
    hed, hed_inv = _hed()
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    conc = od @ hed_inv
    # scale the dye actually present: negative concentrations (the fixed vectors do not fit this slide's
    # dyes exactly) are left alone, otherwise scaling them shifts the hue (e.g. green nuclei)
    conc[..., 0] += (hematoxylin - 1.0) * np.maximum(conc[..., 0], 0)
    conc[..., 1] += (eosin - 1.0) * np.maximum(conc[..., 1], 0)
    out = 256.0 * np.exp(-(conc @ hed)) - 1.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def blur(rgb: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of each channel (``sigma_px`` in pixels); 0 returns the image."""
    if sigma_px <= 0:
        return rgb
    from scipy.ndimage import gaussian_filter

    return np.clip(np.rint(gaussian_filter(rgb.astype(np.float32), sigma=(sigma_px, sigma_px, 0), mode="nearest")),
                   0, 255).astype(np.uint8)


def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode as JPEG (4:2:0, like most scanners) at ``quality``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def apply_shift(image, shift: Shift, um_per_px: float | None = None) -> tuple[np.ndarray, float]:
    """The shifted (h, w, 3) uint8 image and its pixel size.

    ``image`` is a :class:`~stimage_nb.io.image.SlideImage` (read in strips of :data:`STRIP_ROWS` rows
    with a margin for the blur) or an (h, w, 3) uint8 array with ``um_per_px``. Order: blur, restain at
    the original resolution, then downsample (area mean), then JPEG.
    """
    if isinstance(image, np.ndarray):
        um = check_um_per_px(um_per_px, "apply_shift")
        H, W = image.shape[:2]

        def read(y0, y1):
            return image[y0:y1, :, :3]
    else:
        um = image.um_per_px
        H, W = image.height, image.width

        def read(y0, y1):
            return image.read_region(0, y0, W, y1 - y0)
    f = int(shift.scale)
    sigma = shift.blur_um / um
    halo = int(np.ceil(4 * sigma)) if sigma > 0 else 0
    step = max(16 * f, STRIP_ROWS // (16 * f) * 16 * f)
    Hc, Wc = H // f * f, W // f * f
    if Hc == 0 or Wc == 0:
        raise StimageInputError(f"shift {shift.name}: a {W}x{H} image is smaller than the scale factor {f}.")
    out = np.empty((Hc // f, Wc // f, 3), dtype=np.uint8)
    for y0 in range(0, Hc, step):
        y1 = min(y0 + step, Hc)
        a0, a1 = max(0, y0 - halo), min(H, y1 + halo)
        strip = blur(np.ascontiguousarray(read(a0, a1)), sigma)[y0 - a0:y0 - a0 + (y1 - y0), :Wc]
        strip = restain(strip, shift.hematoxylin, shift.eosin)
        strip = downsample(strip, f)
        if shift.jpeg_quality is not None:  # strips of a multiple of 16 rows: the 4:2:0 blocks of one image
            strip = jpeg(strip, shift.jpeg_quality)
        out[y0 // f:y1 // f] = strip
    return out, um * f


# ----------------------------------------------------------------------------- sections
def shift_section(section: Section, shift: Shift, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Section:
    """``section`` as acquired under ``shift``: same spot ids, counts and cell types, a new image.

    The image is written to ``out_dir/<section>__<shift>.ome.zarr`` (reused when it exists unless
    ``overwrite``); the returned section is named ``<section>__<shift>``, its spot centres are in the
    new image's pixels and ``meta["shift"]`` records the shift. The identity shift returns a renamed copy
    that reads the original image.
    """
    name = f"{section.name}__{shift.name}"
    meta = {**section.meta, "shift": shift.to_dict(), "shift_of": section.name}
    if shift.is_identity:
        return Section(name, section.adata.copy(), section.image_path, section.um_per_px, section.patient, meta,
                       section._image)
    img = section.image
    path = _write_shifted(img, shift, Path(out_dir) / f"{file_stem(name)}.ome.zarr", name, overwrite)
    a = section.adata
    obs = a.obs.drop(columns=[c for c in (K.PIXEL_X, K.PIXEL_Y, K.DIAMETER_UM) if c in a.obs.columns])
    ct = a.obsm.get(K.CELLTYPE_PROPORTIONS)
    new = make_section_adata(list(a.obs_names), section.xy / shift.scale, a.obs[K.DIAMETER_UM].to_numpy(),
                             counts=a.X if a.n_vars else None, genes=list(a.var_names) if a.n_vars else None,
                             celltypes=ct if isinstance(ct, pd.DataFrame) else None, obs=obs,
                             uns=dict(a.uns.get(K.UNS, {})))
    return Section(name, new, path, img.um_per_px * shift.scale, section.patient, meta)


def _write_shifted(img, shift: Shift, path: Path, name: str, overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        return path
    rgb, um = apply_shift(img, shift)
    log.info("%s: writing %s (%dx%d px, %g µm/px)", name, path, rgb.shape[1], rgb.shape[0], um)
    return write_ome_zarr(rgb, path, um, name=name)


def _write_text_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def shift_manifest(manifest: str | os.PathLike, sections: Sequence[str], shifts: Sequence[Shift],
                   out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``out_dir/manifest.csv``: every row of ``manifest`` plus one row per (section, shift).

    The added rows are named ``<section>__<shift>``; they point to the shifted image
    (``out_dir/<section>__<shift>.ome.zarr``), a spots table with the centres in its pixels
    (``out_dir/<section>__<shift>_spots.tsv``), the section's own counts and cell-type tables, and the
    shifted µm/px. All paths are absolute, so the original rows (e.g. the training sections a baseline is
    fitted on) still resolve. Feed it to ``stimage-nb predict --sections C6__scan_2x,...`` and
    ``stimage-nb evaluate``: a shifted section is scored against its own counts like any other.
    Shifted images that exist are reused unless ``overwrite``.
    """
    from .io.readers import _default_celltypes, _resolve, read_manifest

    manifest = Path(manifest).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()  # the manifest's paths are absolute: it may be read from anywhere
    out.mkdir(parents=True, exist_ok=True)
    read_manifest(manifest, list(sections))  # validates the rows and every file named in them
    m = pd.read_csv(manifest, dtype=str).set_index("section", drop=False)
    base = manifest.parent
    if "celltypes" not in m.columns:
        m["celltypes"] = [str(_default_celltypes(base, s) or "") for s in m.index]
    for col in ("image", "counts", "spots", "celltypes", "annotations"):
        if col in m.columns:
            m[col] = [str(_resolve(base, v) or "") for v in m[col]]
    names = [f"{s}__{sh.name}" for s in sections for sh in shifts]
    clash = sorted(set(names) & set(m.index))
    if clash:
        raise StimageInputError(f"{manifest}: rows {clash} exist already; name the shifts differently.")
    rows = []
    for s in sections:
        row = m.loc[s]
        if "annotations" in m.columns and row["annotations"] and any(sh.scale != 1 for sh in shifts):
            raise StimageInputError(
                f"{manifest}: section {s} restricts spots with QuPath annotations in level-0 pixels; rescaled "
                "shifts cannot reuse them. Drop the annotations column for the robustness check.")
        img = None
        for sh in shifts:
            name = f"{s}__{sh.name}"
            r = row.copy()
            r["section"] = name
            if not sh.is_identity:
                if img is None:
                    (sec,) = read_manifest(manifest, [s])
                    img = sec.image
                r["image"] = str(_write_shifted(img, sh, out / f"{file_stem(name)}.ome.zarr", name, overwrite))
                spots = pd.read_csv(row["spots"], sep="\t")
                spots["pixel_x"] = spots["pixel_x"].astype(float) / sh.scale
                spots["pixel_y"] = spots["pixel_y"].astype(float) / sh.scale
                r["spots"] = str(_write_text_atomic(out / f"{file_stem(name)}_spots.tsv",
                                                                spots.to_csv(sep="\t", index=False)))
                r["um_per_px"] = repr(float(row["um_per_px"]) * sh.scale)
            rows.append(r)
    full = pd.concat([m, pd.DataFrame(rows)], ignore_index=True)
    dest = _write_text_atomic(out / "manifest.csv", full.to_csv(index=False))
    _write_text_atomic(out / "shifts.json", json.dumps({"source": str(manifest.resolve()), "sections": list(sections),
                                                        "shifts": [sh.to_dict() for sh in shifts]}, indent=1))
    return dest


def parse_shifts(spec: str | None) -> list[Shift]:
    """``"standard"`` / ``None`` -> :data:`STANDARD_SHIFTS`; else comma-separated names of them."""
    if spec is None or spec.strip() in ("", "standard"):
        return list(STANDARD_SHIFTS)
    known = {s.name: s for s in STANDARD_SHIFTS}
    names = [v.strip() for v in spec.split(",") if v.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise StimageInputError(f"unknown shifts {bad}; choose from {list(known)} (or 'standard' for all).")
    return [known[n] for n in names]


def add_cli(sub) -> None:
    """``stimage-nb shift``: write shifted copies of manifest sections for a robustness check."""
    p = sub.add_parser("shift", help="simulate other scan resolutions, focus, staining and compression for sections")
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--sections", required=True, help="comma-separated sections to shift (e.g. held-out ones)")
    p.add_argument("--shifts", default="standard",
                   help="comma-separated from " + ",".join(s.name for s in STANDARD_SHIFTS) + " (default: all)")
    p.add_argument("--out", required=True, type=Path, help="folder for the shifted images and manifest.csv")
    p.add_argument("--overwrite", action="store_true", help="re-make shifted images that exist")
    p.set_defaults(func=_cmd_shift)


def _cmd_shift(a) -> int:
    secs = [v.strip() for v in a.sections.split(",") if v.strip()]
    shifts = parse_shifts(a.shifts)
    dest = shift_manifest(a.manifest, secs, shifts, a.out, overwrite=a.overwrite)
    names = ",".join(f"{s}__{sh.name}" for s in secs for sh in shifts)
    print(dest)
    print(f"next: stimage-nb predict --model RUN --manifest {dest} --sections {names} --out PRED && "
          f"stimage-nb evaluate --pred PRED --manifest {dest}")
    return 0
