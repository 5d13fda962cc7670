"""The spatial-transcriptomics platforms a :class:`~stimage_nb.io.section.Section` can come from.

Every reader sets ``Section.platform`` (also recorded in ``adata.uns["stimage_nb"]["platform"]`` and
carried into the prediction AnnData's provenance), so analyses can ask "trained on which platform,
tested on which" (the cross-platform protocol) without guessing from file names.

========== ========================================================== ====================================
platform   what an observation is                                     reader
========== ========================================================== ====================================
st         legacy Spatial Transcriptomics spot: 100 µm disc, 200 µm   :func:`~stimage_nb.io.readers.read_section_files`
           pitch (Ståhl et al. 2016; the her2st bundle)               (manifest rows in the her2st layout)
visium     10x Visium spot: 55 µm disc, 100 µm pitch (hexagonal)      :func:`~stimage_nb.io.visium.read_visium`
visium_hd  10x Visium HD square bin of 2, 8 or 16 µm                  :func:`~stimage_nb.io.visium.read_visium_hd`
xenium     10x Xenium cell (segmented; diameter from its area)        :func:`~stimage_nb.io.xenium.read_xenium`
cosmx      NanoString CosMx cell                                      :func:`~stimage_nb.io.readers.read_anndata`
merscope   Vizgen MERSCOPE cell                                       :func:`~stimage_nb.io.readers.read_anndata`
image      no transcriptomics: a point on a grid over an H&E slide    :func:`~stimage_nb.io.readers.read_wsi`
unknown    not recorded (a Section built by hand, an OMERO image      --
           without a ``platform`` map annotation)
========== ========================================================== ====================================

Cells and bins can be aggregated into pseudo-spots of a chosen diameter
(:func:`~stimage_nb.io.pseudospots.aggregate_pseudospots`); a pseudo-spot section keeps its source
platform and records ``uns["stimage_nb"]["obs_unit"] == "pseudospot"``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import StimageInputError

ST = "st"
VISIUM = "visium"
VISIUM_HD = "visium_hd"
XENIUM = "xenium"
COSMX = "cosmx"
MERSCOPE = "merscope"
IMAGE = "image"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Platform:
    """One platform: its name, what an observation is, and its default observation diameter (µm)."""

    name: str
    obs_unit: str          # "spot" | "bin" | "cell" | "grid point"
    diameter_um: float | None
    description: str


PLATFORMS: dict[str, Platform] = {p.name: p for p in (
    Platform(ST, "spot", 100.0, "legacy Spatial Transcriptomics (100 µm spots, 200 µm pitch)"),
    Platform(VISIUM, "spot", 55.0, "10x Visium (55 µm spots, 100 µm pitch)"),
    Platform(VISIUM_HD, "bin", None, "10x Visium HD (2/8/16 µm square bins)"),
    Platform(XENIUM, "cell", None, "10x Xenium (cells)"),
    Platform(COSMX, "cell", None, "NanoString CosMx (cells)"),
    Platform(MERSCOPE, "cell", None, "Vizgen MERSCOPE (cells)"),
    Platform(IMAGE, "grid point", None, "an H&E slide without transcriptomics (grid points over the tissue)"),
    Platform(UNKNOWN, "spot", None, "not recorded"),
)}

#: platforms whose observations are single cells
CELL_PLATFORMS = tuple(n for n, p in PLATFORMS.items() if p.obs_unit == "cell")


def check_platform(value, where: str) -> str:
    """A platform name from user input (a manifest cell, an argument), lower-cased and validated.

    Raises :class:`~stimage_nb.errors.StimageInputError` naming ``where`` and the known platforms.
    """
    v = str(value).strip().lower().replace("-", "_").replace(" ", "_")
    if v not in PLATFORMS:
        raise StimageInputError(f"{where}: unknown platform {value!r}; use one of {sorted(PLATFORMS)}.")
    return v


def obs_unit(platform: str | None) -> str:
    """What an observation of ``platform`` is ("spot", "bin", "cell", "grid point")."""
    p = PLATFORMS.get(str(platform))
    return p.obs_unit if p is not None else "spot"


def detect_platform(path: str | Path) -> str | None:
    """The platform whose output layout ``path`` is, or ``None`` when it is none of the 10x layouts.

    - a Xenium ``outs/``: ``experiment.xenium`` or ``cell_feature_matrix.h5``/``cells.parquet``;
    - Visium HD: a ``binned_outputs/`` folder, a ``square_NNNum`` folder, or scale factors with
      ``bin_size_um``;
    - Visium (Space Ranger 1-3): ``filtered_feature_bc_matrix.h5`` with ``spatial/``.
    An ``.h5ad`` file (any platform) returns ``None``: its platform must be stated.
    """
    p = Path(path)
    if not p.is_dir():
        return None
    if (p / "experiment.xenium").is_file() or (p / "cell_feature_matrix.h5").is_file() \
            or (p / "cells.parquet").is_file() or (p / "cells.csv.gz").is_file():
        return XENIUM
    if (p / "binned_outputs").is_dir() or (p.name.startswith("square_") and p.name.endswith("um")):
        return VISIUM_HD
    sf = p / "spatial" / "scalefactors_json.json"
    if sf.is_file():
        try:
            if "bin_size_um" in json.loads(sf.read_text()):
                return VISIUM_HD
        except (OSError, ValueError):
            pass
    if (p / "filtered_feature_bc_matrix.h5").is_file() or (p / "raw_feature_bc_matrix.h5").is_file() \
            or (p / "spatial").is_dir():
        return VISIUM
    return None
