"""10x Xenium as a Section of cells on their H&E (``platform="xenium"``).

A Xenium ``outs/`` holds the cells (``cells.parquet``, or ``cells.csv.gz`` in Xenium Onboard Analysis
1.x: ``cell_id, x_centroid, y_centroid`` in µm, ``cell_area`` in µm²), their counts
(``cell_feature_matrix.h5``) and ``experiment.xenium`` (``pixel_size``: µm per pixel of the morphology
image). Its own images are DAPI/fluorescence; the H&E comes afterwards as a separate image (the
"post-Xenium H&E") with a 3x3 alignment matrix exported by Xenium Explorer that maps H&E pixels to
morphology-image pixels (10x Knowledge Base, "How can I convert coordinates between H&E image and
Xenium data"; the same convention as ``spatialdata_io.xenium_aligned_image``). A cell's H&E position
is therefore ``inv(A) @ [x_um / pixel_size, y_um / pixel_size, 1]`` and the H&E's µm/px is
``pixel_size * sqrt(|det A[:2, :2]|)``. Without a matrix the H&E is taken to be registered to the
Xenium frame (origin shared; positions = µm / the H&E's µm/px), as HEST's resampled images are.

The cell table is read through ``spatialdata_io.xenium`` (images, labels, boundaries and transcripts
switched off) when the layout has what that reader needs (``experiment.xenium``, ``cells.parquet``,
``cell_feature_matrix.h5``, and ``cells.zarr.zip`` for Xenium Onboard Analysis 2.0+); otherwise (e.g.
only ``cells.csv.gz``, a trimmed copy) with pandas and :func:`scanpy.read_10x_h5` against the same
documented columns. ``uns["stimage_nb"]["reader"]`` records which.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .. import _keys as K
from ..errors import StimageInputError
from . import platforms as P
from .ngff import check_um_per_px
from .section import Section, check_counts, make_section_adata, read_celltype_targets, select_genes
from .tenx import read_10x_counts

log = logging.getLogger(__name__)

CELL_COLUMNS = ("cell_id", "x_centroid", "y_centroid")
DEFAULT_CELL_UM = 10.0  # diameter when the cell table has no cell_area


def read_experiment(outs: Path) -> dict:
    """``experiment.xenium`` (JSON) of an ``outs/``; needs ``pixel_size`` (µm/px of the morphology image)."""
    p = outs / "experiment.xenium"
    if not p.is_file():
        raise StimageInputError(f"{outs}: no experiment.xenium; a Xenium outs/ folder has it (it gives pixel_size, "
                                "the µm per pixel of the morphology image).")
    try:
        spec = json.loads(p.read_text())
    except Exception as e:  # noqa: BLE001
        raise StimageInputError(f"{p}: cannot read the Xenium experiment file ({type(e).__name__}: {e}).") from e
    try:
        px = float(spec["pixel_size"])
        if not np.isfinite(px) or px <= 0:
            raise ValueError(px)
    except (KeyError, TypeError, ValueError):
        raise StimageInputError(f"{p}: no valid pixel_size (µm/px of the morphology image) in experiment.xenium.") from None
    spec["pixel_size"] = px
    return spec


def xoa_version(spec: dict) -> tuple[int, ...] | None:
    """Xenium Onboard Analysis (or Xenium Ranger, when re-segmented) version of an experiment file."""
    s = (spec.get("xenium_ranger") or {}).get("version") or spec.get("analysis_sw_version") or ""
    m = re.search(r"[xX]enium-(\d+)\.(\d+)\.(\d+)", str(s))
    return tuple(int(g) for g in m.groups()) if m else None


def read_alignment(path: str | os.PathLike) -> np.ndarray:
    """A Xenium Explorer alignment CSV (3x3, no header; H&E pixels -> morphology pixels)."""
    p = Path(path)
    if not p.is_file():
        raise StimageInputError(f"{p}: Xenium H&E alignment matrix not found.")
    try:
        A = pd.read_csv(p, header=None).to_numpy(dtype=np.float64)
    except Exception as e:  # noqa: BLE001
        raise StimageInputError(f"{p}: cannot read the alignment matrix ({type(e).__name__}: {e}).") from e
    if A.shape != (3, 3) or not np.all(np.isfinite(A)) or abs(np.linalg.det(A[:2, :2])) < 1e-12:
        raise StimageInputError(f"{p}: the alignment must be an invertible 3x3 matrix (Xenium Explorer's "
                                f"*_imagealignment.csv), got shape {A.shape}.")
    return A


def _cells_spatialdata(outs: Path):
    """(counts AnnData, cell table DataFrame) through ``spatialdata_io.xenium``, cells only."""
    import spatialdata_io

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = spatialdata_io.xenium(
            outs, cells_boundaries=False, nucleus_boundaries=False, cells_as_circles=False, cells_labels=False,
            nucleus_labels=False, transcripts=False, morphology_mip=False, morphology_focus=False,
            aligned_images=False, cells_table=True, gex_only=True)
    t = sdata.tables["table"]
    cells = t.obs.copy()
    cells["x_centroid"] = np.asarray(t.obsm["spatial"])[:, 0]
    cells["y_centroid"] = np.asarray(t.obsm["spatial"])[:, 1]
    cells.index = cells["cell_id"].astype(str).to_numpy()
    counts = t[:, :].copy()
    counts.obs_names = cells.index
    counts.X = counts.X.astype(np.float32)
    if "gene_ids" not in counts.var:
        counts.var["gene_ids"] = np.asarray(counts.var_names)
    if counts.var_names.has_duplicates:
        counts.var_names_make_unique()
    return counts, cells


def _cells_pandas(outs: Path):
    """(counts AnnData, cell table DataFrame) with pandas + scanpy (documented XOA columns)."""
    path = next((outs / f for f in ("cells.parquet", "cells.csv.gz", "cells.csv") if (outs / f).is_file()), None)
    if path is None:
        raise StimageInputError(f"{outs}: no Xenium cell table (cells.parquet or cells.csv.gz).")
    try:
        cells = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as e:  # noqa: BLE001
        raise StimageInputError(f"{path}: cannot read the Xenium cell table ({type(e).__name__}: {e}).") from e
    missing = [c for c in CELL_COLUMNS if c not in cells.columns]
    if missing:
        raise StimageInputError(f"{path}: the Xenium cell table lacks columns {missing} (have {list(cells.columns)}).")
    ids = cells["cell_id"]
    if len(ids) and isinstance(ids.iloc[0], bytes):
        ids = ids.map(lambda b: b.decode())
    cells.index = ids.astype(str).to_numpy()
    counts = read_10x_counts(outs / "cell_feature_matrix.h5", "Xenium")
    return counts, cells


def _spatialdata_can_read(outs: Path, spec: dict) -> bool:
    if not ((outs / "cells.parquet").is_file() and (outs / "cell_feature_matrix.h5").is_file()):
        return False
    v = xoa_version(spec)
    return v is None or v < (2, 0, 0) or (outs / "cells.zarr.zip").is_file()


def _find_he(outs: Path) -> tuple[Path | None, Path | None]:
    """An aligned H&E in ``outs/`` (``*he_image.ome.tif``) and its ``*he_imagealignment.csv``, if any."""
    for img in sorted(outs.glob("*he_image.ome.tif")):
        al = img.with_name(img.name[: -len(".ome.tif")] + "alignment.csv")
        return img, (al if al.is_file() else None)
    return None, None


def read_xenium(outs: str | os.PathLike, *, image: str | os.PathLike | None = None,
                alignment: str | os.PathLike | None = None, um_per_px: float | None = None, name: str | None = None,
                genes: Sequence[str] | None = None, drop_missing_genes: bool = False,
                celltypes: str | os.PathLike | None = None, reader: str = "auto") -> Section:
    """A Xenium ``outs/`` folder and its H&E as a Section of cells (module docstring for the geometry).

    Parameters
    ----------
    outs
        The Xenium output folder (``experiment.xenium``, ``cells.parquet``/``cells.csv.gz``,
        ``cell_feature_matrix.h5``).
    image
        The post-Xenium H&E; default: ``*he_image.ome.tif`` in ``outs/``.
    alignment
        Its Xenium Explorer alignment CSV (H&E px -> morphology px); default: ``*he_imagealignment.csv``
        beside the image in ``outs/``. Without one the H&E must be registered to the Xenium frame and
        ``um_per_px`` (or the image's own metadata) gives its µm/px.
    um_per_px
        µm/px of the H&E. With an alignment it is derived from it; a given value must agree (2%).
    celltypes
        Optional CSV/TSV keyed by ``cell_id``: a label column (Xenium Explorer's cell groups) or proportions.
    reader
        ``"auto"`` (spatialdata-io when the layout allows, module docstring), ``"spatialdata"`` or ``"pandas"``.

    Returns
    -------
    Section (``platform="xenium"``): obs names = ``cell_id``; ``obsm["spatial"]`` = H&E pixels;
    ``obs["x_um"], obs["y_um"]`` the Xenium µm; ``obs["diameter_um"]`` from ``cell_area`` (2 sqrt(area/π));
    ``X`` gene-expression counts (controls dropped).

    Raises
    ------
    StimageInputError
        A missing folder, experiment file, cell table, matrix, H&E or µm/px, naming the file.
    """
    outs = Path(outs)
    if not outs.is_dir():
        raise StimageInputError(f"{outs}: Xenium outs/ folder not found.")
    spec = read_experiment(outs)
    if reader not in ("auto", "spatialdata", "pandas"):
        raise ValueError(f"reader must be 'auto', 'spatialdata' or 'pandas', not {reader!r}")
    use_sd = reader == "spatialdata" or (reader == "auto" and _spatialdata_can_read(outs, spec))
    if use_sd:
        if not _spatialdata_can_read(outs, spec):
            raise StimageInputError(f"{outs}: spatialdata-io's Xenium reader needs cells.parquet, cell_feature_matrix.h5 "
                                    "(and cells.zarr.zip for Xenium Onboard Analysis 2.0+).")
        try:
            counts, cells = _cells_spatialdata(outs)
        except Exception as e:  # noqa: BLE001 - the library's assertions and KeyErrors become one clear line
            raise StimageInputError(f"{outs}: spatialdata-io's Xenium reader failed ({type(e).__name__}: {e}); "
                                    "check cells.parquet against cell_feature_matrix.h5 (same cell_id, same order).") from e
    else:
        counts, cells = _cells_pandas(outs)
    common = counts.obs_names[counts.obs_names.isin(cells.index)]
    if len(common) == 0:
        raise StimageInputError(f"{outs}: no cell_id of the cell table is in cell_feature_matrix.h5 "
                                f"(e.g. {list(cells.index[:2])} vs {list(counts.obs_names[:2])}).")
    if len(common) < counts.n_obs:
        log.warning("%s: %d cells of the matrix have no row in the cell table; dropped", outs, counts.n_obs - len(common))
    cells = cells.loc[common]
    X = counts[common].X
    check_counts(X, outs / "cell_feature_matrix.h5")
    xy_um = cells[["x_centroid", "y_centroid"]].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(xy_um)):
        raise StimageInputError(f"{outs}: {int((~np.isfinite(xy_um)).any(1).sum())} cells have no centroid.")
    pixel_size = spec["pixel_size"]

    if image is None:
        image, found_al = _find_he(outs)
        if image is None:
            raise StimageInputError(
                f"{outs}: no H&E for these Xenium cells (Xenium's morphology images are DAPI/fluorescence). Give the "
                "post-Xenium H&E (image=, manifest column image) and its Xenium Explorer alignment CSV (alignment=, "
                "manifest column alignment).")
        alignment = alignment if alignment is not None else found_al
    image = Path(image)
    if alignment is not None:
        A = read_alignment(alignment)
        morph = np.c_[xy_um / pixel_size, np.ones(len(xy_um))]
        he = np.linalg.solve(A, morph.T).T
        xy = he[:, :2] / he[:, 2:3]
        um_al = pixel_size * float(np.sqrt(abs(np.linalg.det(A[:2, :2]))))
        if um_per_px is not None and abs(float(um_per_px) - um_al) > 0.02 * um_al:
            raise StimageInputError(f"{alignment}: the alignment implies {um_al:.4g} µm/px for the H&E {image.name}, "
                                    f"but um_per_px={um_per_px} was given; which is right?")
        um = um_al
    else:
        um = um_per_px
        if um is None:
            from .image import open_image

            um = open_image(image).um_per_px  # the image's own metadata, else a clear error naming the places
        xy = xy_um / float(um)
    um = check_um_per_px(um, f"{image} (H&E of Xenium {outs})")
    if "cell_area" in cells.columns:
        diam = 2.0 * np.sqrt(cells["cell_area"].to_numpy(dtype=np.float64) / np.pi)
        diam = np.where(np.isfinite(diam) & (diam > 0), diam, DEFAULT_CELL_UM)
    else:
        diam = DEFAULT_CELL_UM
    obs = pd.DataFrame({"x_um": xy_um[:, 0], "y_um": xy_um[:, 1]})
    for c in ("cell_area", "nucleus_area", "transcript_counts", "total_counts"):
        if c in cells.columns:
            obs[c] = cells[c].to_numpy()
    ct = labels = None
    if celltypes is not None:
        ct, labels = read_celltype_targets(celltypes, common)
        if labels is not None:
            obs[K.CELLTYPE_LABEL] = labels.to_numpy()
    nm = name or (outs.name if outs.name != "outs" else outs.parent.name)
    adata = make_section_adata(common, xy, diam, counts=X, genes=list(counts.var_names), celltypes=ct, obs=obs,
                               uns={"section": nm, "image": str(image), "um_per_px": float(um),
                                    "xenium_pixel_size": pixel_size, "alignment": str(alignment) if alignment else "",
                                    "reader": "spatialdata_io.xenium" if use_sd else "pandas",
                                    K.OBS_UNIT: "cell"})
    adata.var["gene_ids"] = counts.var["gene_ids"].to_numpy() if "gene_ids" in counts.var else np.asarray(counts.var_names)
    s = Section(nm, adata, image, float(um), None, platform=P.XENIUM)
    s, dropped = select_genes(s, genes, drop_missing=drop_missing_genes, source=outs / "cell_feature_matrix.h5")
    if dropped:
        s.adata.uns[K.UNS]["dropped_genes"] = dropped
    return s
