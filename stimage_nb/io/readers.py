"""Readers that turn files on disk into :class:`~stimage_nb.io.section.Section` objects.

- :func:`read_manifest`: a CSV with one row per section (the her2st bundle's ``sections.csv`` layout:
  ``section,patient,image,counts,spots,um_per_px``; optional ``celltypes``, ``spot_diameter_um`` and
  ``annotations`` (a QuPath GeoJSON: only spots inside its annotations are kept, ``obs["region"]`` names
  them; see :func:`stimage_nb.qupath.restrict_to_regions`) columns; paths relative to the CSV). Rows
  without counts are valid (prediction only). A row whose optional ``visium`` column names a Space
  Ranger ``outs/`` folder is read by :func:`read_visium` (``image``: the full-resolution H&E, optional;
  ``spots``, ``counts`` and ``um_per_px`` are then left empty), so Visium sections train and predict
  through the same manifest and command line.
- :func:`read_visium`: a 10x Space Ranger ``outs/`` folder.
- :func:`read_anndata`: an AnnData with ``obsm["spatial"]`` plus an image.
- :func:`read_wsi`: a whole-slide image (SVS/TIFF/OME-Zarr) with points on a regular grid over tissue.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from .. import _keys as K
from ..errors import StimageInputError
from .image import open_image
from .ngff import check_um_per_px
from .section import Section, check_counts, make_section_adata, select_genes

log = logging.getLogger(__name__)

LEGACY_ST_SPOT_UM = 100.0  # legacy Spatial Transcriptomics spot diameter
VISIUM_SPOT_UM = 55.0
MANIFEST_COLUMNS = ("section", "image", "spots", "um_per_px")


def read_gene_list(path: str | os.PathLike) -> list[str]:
    """A gene list: one symbol per line (blank lines and ``#`` comments ignored)."""
    p = Path(path)
    if not p.is_file():
        raise StimageInputError(f"{p}: gene list not found.")
    genes = [ln.split()[0] for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not genes:
        raise StimageInputError(f"{p}: the gene list is empty.")
    if len(set(genes)) != len(genes):
        dup = pd.Index(genes)[pd.Index(genes).duplicated()].tolist()[:5]
        raise StimageInputError(f"{p}: duplicate genes in the list: {dup}")
    return genes


def _read_table(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise StimageInputError(f"{path}: {what} file not found.")
    try:
        return pd.read_csv(path, sep="\t", index_col=0)
    except Exception as e:  # noqa: BLE001
        raise StimageInputError(f"{path}: cannot read the {what} table ({type(e).__name__}: {e}).") from e


def _read_spots(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise StimageInputError(f"{path}: spots file not found.")
    try:
        df = pd.read_csv(path, sep="\t")
    except Exception as e:  # noqa: BLE001
        raise StimageInputError(f"{path}: cannot read the spots table ({e}).") from e
    need = {"x", "y", "pixel_x", "pixel_y"}
    if not need <= set(df.columns):
        raise StimageInputError(f"{path}: the spots table needs columns {sorted(need)}, has {list(df.columns)}.")
    if "selected" in df.columns:
        df = df[df["selected"].astype(int) == 1]
    df.index = [f"{int(a)}x{int(b)}" for a, b in zip(df["x"], df["y"])]
    if df[["pixel_x", "pixel_y"]].isna().any().any():
        raise StimageInputError(f"{path}: some spots have no pixel coordinates.")
    return df


def _resolve(base: Path, value) -> Path | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
        return None
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else base / p


def _default_celltypes(base: Path, section: str, level: str = "major") -> Path | None:
    p = base / "celltypes" / level / f"{section}-proportion.tsv"
    return p if p.is_file() else None


def read_section_files(name: str, *, image, spots, counts=None, um_per_px=None, patient=None, celltypes=None,
                       spot_diameter_um: float = LEGACY_ST_SPOT_UM, genes: Sequence[str] | None = None,
                       drop_missing_genes: bool = False) -> Section:
    """One section from an image, a spots table and (optionally) a counts table and cell-type proportions."""
    spots_df = _read_spots(Path(spots))
    X = gene_names = None
    ids = spots_df.index
    if counts is not None:
        counts = Path(counts)
        cdf = _read_table(counts, "counts")
        cdf.index = cdf.index.astype(str)
        common = cdf.index.intersection(spots_df.index)
        if len(common) == 0:
            raise StimageInputError(
                f"{counts}: none of its {len(cdf)} spot ids (e.g. {list(cdf.index[:3])}) match the spots file "
                f"{spots} (e.g. {list(spots_df.index[:3])}). Counts rows must be indexed '{{x}}x{{y}}' by the "
                "array coordinates of the spots file.")
        n_c, n_s = len(cdf) - len(common), len(spots_df) - len(common)
        if n_c or n_s:
            log.warning("%s: %d count rows have no spot and %d selected spots have no counts; using the %d "
                        "that match", name, n_c, n_s, len(common))
        ids = pd.Index([i for i in spots_df.index if i in set(common)])
        cdf = cdf.loc[ids]
        try:
            X = cdf.to_numpy(dtype=np.float32)
        except ValueError as e:
            raise StimageInputError(f"{counts}: counts must be numeric ({e}).") from e
        check_counts(X, counts)
        gene_names = [str(g) for g in cdf.columns]
    sp = spots_df.loc[ids]
    ct = None
    if celltypes is not None:
        ct = _read_table(Path(celltypes), "cell-type proportion")
        ct.index = ct.index.astype(str)
        missing = ids.difference(ct.index)
        if len(missing):
            log.warning("%s: %d spots have no cell-type proportions (NaN targets)", name, len(missing))
    adata = make_section_adata(ids, sp[["pixel_x", "pixel_y"]].to_numpy(), spot_diameter_um, counts=X,
                               genes=gene_names, celltypes=ct,
                               obs=pd.DataFrame({"array_x": sp["x"].to_numpy(), "array_y": sp["y"].to_numpy()}),
                               uns={"section": name, "patient": patient, "image": str(image),
                                    "counts": str(counts) if counts else None, "um_per_px": um_per_px})
    s = Section(name, adata, Path(image), um_per_px, patient)
    s, dropped = select_genes(s, genes, drop_missing=drop_missing_genes, source=counts)
    if dropped:
        s.adata.uns[K.UNS]["dropped_genes"] = dropped
    return s


def read_manifest(path: str | os.PathLike, sections: Iterable[str] | None = None, *,
                  genes: Sequence[str] | None = None, drop_missing_genes: bool = False,
                  celltype_level: str = "major", check_images: bool = True) -> list[Section]:
    """Read the sections of a manifest CSV (see module docstring).

    Parameters
    ----------
    path
        The manifest; relative paths in it are relative to its folder.
    sections
        Names to keep (in this order); all rows when ``None``.
    genes
        Restrict counts to these genes; genes missing from a section's counts raise an error
        naming them unless ``drop_missing_genes``.
    celltype_level
        Which proportion tables to use when the manifest has no ``celltypes`` column
        (``celltypes/{level}/{section}-proportion.tsv`` beside the manifest).
    check_images
        Fail now (not mid-training) when an image file is missing.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise StimageInputError(f"{path}: manifest not found.")
    try:
        m = pd.read_csv(path, dtype=str)
    except Exception as e:  # noqa: BLE001
        raise StimageInputError(f"{path}: cannot read the manifest CSV ({e}).") from e
    required = ("section",) if "visium" in m.columns else MANIFEST_COLUMNS
    missing_cols = [c for c in required if c not in m.columns]
    if missing_cols:
        raise StimageInputError(f"{path}: manifest lacks columns {missing_cols}; expected at least "
                                f"{list(MANIFEST_COLUMNS)} (plus optional counts, patient, celltypes, spot_diameter_um).")
    base = path.parent
    m = m.set_index("section", drop=False)
    if sections is not None:
        sections = [s for s in sections]
        unknown = [s for s in sections if s not in m.index]
        if unknown:
            raise StimageInputError(f"{path}: unknown sections {unknown}; the manifest has {list(m.index)}.")
        m = m.loc[sections]
    out = []
    for name, row in m.iterrows():
        outs = _resolve(base, row.get("visium")) if "visium" in m.columns else None
        if outs is not None:
            sec = _manifest_visium_row(path, base, str(name), row, outs, genes, drop_missing_genes, check_images)
        else:
            sec = _manifest_files_row(path, base, m.columns, str(name), row, genes, drop_missing_genes, check_images,
                                      celltype_level)
        ann = _resolve(base, row.get("annotations")) if "annotations" in m.columns else None
        if ann is not None:  # QuPath annotations: keep the spots inside them (Ignore*/exclude dropped)
            from ..qupath import restrict_to_regions

            sec = restrict_to_regions(sec, ann)
        out.append(sec)
    return out


def _manifest_files_row(path: Path, base: Path, columns, name: str, row, genes, drop_missing_genes: bool,
                        check_images: bool, celltype_level: str) -> Section:
    """One manifest row in the her2st layout (image, spots, counts, µm/px files)."""
    missing = [c for c in MANIFEST_COLUMNS if c not in columns]
    if missing:
        raise StimageInputError(f"{path}: section {name} has no visium folder, so it needs the columns {missing}.")
    um = check_um_per_px(row.get("um_per_px"), f"{path} (section {name}, column um_per_px)")
    image = _resolve(base, row["image"])
    if image is None:
        raise StimageInputError(f"{path}: section {name} has no image.")
    if check_images and not image.exists():
        raise StimageInputError(f"{image}: image of section {name} not found (manifest {path}).")
    ct = _resolve(base, row.get("celltypes")) if "celltypes" in columns else _default_celltypes(base, name, celltype_level)
    diam = row.get("spot_diameter_um")
    diam = float(diam) if diam is not None and str(diam) not in ("", "nan") else LEGACY_ST_SPOT_UM
    return read_section_files(
        name, image=image, spots=_resolve(base, row["spots"]), counts=_resolve(base, row.get("counts")),
        um_per_px=um, patient=row.get("patient") if "patient" in columns else None, celltypes=ct,
        spot_diameter_um=diam, genes=genes, drop_missing_genes=drop_missing_genes)


def _manifest_visium_row(path: Path, base: Path, name: str, row, outs: Path, genes, drop_missing_genes: bool,
                         check_images: bool) -> Section:
    """One manifest row that names a Space Ranger ``outs/`` folder (column ``visium``)."""
    if not outs.is_dir():
        raise StimageInputError(f"{outs}: Visium outs/ folder of section {name} not found (manifest {path}).")
    image = _resolve(base, row.get("image")) if "image" in row.index else None
    if image is not None and check_images and not image.exists():
        raise StimageInputError(f"{image}: image of section {name} not found (manifest {path}).")
    s = read_visium(outs, image=image, name=name, genes=genes, drop_missing_genes=drop_missing_genes)
    patient = row.get("patient") if "patient" in row.index else None
    if patient is not None and str(patient) not in ("", "nan"):
        s.patient = str(patient)
        s.adata.uns.setdefault(K.UNS, {})["patient"] = str(patient)
    return s


def _read_10x_h5(path: Path):
    import h5py
    import scipy.sparse as sp

    try:
        with h5py.File(path, "r") as f:
            g = f["matrix"]
            shape = tuple(g["shape"][:])
            M = sp.csc_matrix((g["data"][:], g["indices"][:], g["indptr"][:]), shape=shape)
            barcodes = [b.decode() for b in g["barcodes"][:]]
            names = [b.decode() for b in g["features"]["name"][:]]
            ids = [b.decode() for b in g["features"]["id"][:]]
    except Exception as e:  # noqa: BLE001
        raise StimageInputError(f"{path}: not a readable 10x feature-barcode matrix ({e}).") from e
    return M.T.tocsr().astype(np.float32), barcodes, names, ids


def read_visium(outs: str | os.PathLike, *, image: str | os.PathLike | None = None, name: str | None = None,
                genes: Sequence[str] | None = None, drop_missing_genes: bool = False,
                in_tissue_only: bool = True) -> Section:
    """A 10x Visium Space Ranger ``outs/`` folder as a Section.

    ``image`` is the full-resolution H&E used for Space Ranger; without it the ``tissue_hires_image.png``
    (or lowres, if hires is blank) is used and spot coordinates are scaled into its pixel frame
    (``uns["stimage_nb"]["image_scale"]`` records the factor to full resolution). µm/px follows from the
    55 µm spot diameter and ``spot_diameter_fullres``.
    """
    outs = Path(outs)
    sp_dir = outs / "spatial"
    h5 = outs / "filtered_feature_bc_matrix.h5"
    if not h5.is_file():
        raise StimageInputError(f"{outs}: no filtered_feature_bc_matrix.h5; is this a Space Ranger outs/ folder?")
    X, barcodes, names, feat_ids = _read_10x_h5(h5)
    check_counts(X, h5)
    sf_path = sp_dir / "scalefactors_json.json"
    try:
        sf = json.loads(sf_path.read_text())
    except Exception as e:  # noqa: BLE001
        raise StimageInputError(f"{sf_path}: cannot read the scale factors ({e}).") from e
    pos_path = next((p for p in (sp_dir / "tissue_positions.csv", sp_dir / "tissue_positions_list.csv") if p.is_file()), None)
    if pos_path is None:
        raise StimageInputError(f"{sp_dir}: no tissue_positions(.csv|_list.csv).")
    header = pos_path.read_text().split("\n", 1)[0].startswith("barcode")
    pos = pd.read_csv(pos_path, header=0 if header else None)
    pos.columns = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    pos = pos.set_index("barcode")
    um_full = VISIUM_SPOT_UM / float(sf["spot_diameter_fullres"])
    scale = 1.0
    if image is None:
        scale, image = None, None
        for key, fname in (("tissue_hires_scalef", "tissue_hires_image.png"), ("tissue_lowres_scalef", "tissue_lowres_image.png")):
            p = sp_dir / fname
            if p.is_file() and _not_blank(p):
                scale, image = float(sf[key]), p
                break
        if image is None:
            raise StimageInputError(f"{sp_dir}: no usable H&E image (hires/lowres PNGs missing or blank); "
                                    "pass image= the full-resolution H&E.")
    bc = [b for b in barcodes if b in pos.index]
    if len(bc) == 0:
        raise StimageInputError(f"{pos_path}: no barcode of {h5} is in the tissue positions.")
    keep = pos.loc[bc]
    sel = keep["in_tissue"].astype(int).to_numpy() == 1 if in_tissue_only else np.ones(len(bc), bool)
    rows = np.array([barcodes.index(b) for b in bc])[sel]
    keep = keep[sel]
    xy = keep[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64) * scale
    adata = make_section_adata(keep.index, xy, VISIUM_SPOT_UM, counts=X[rows], genes=names,
                               obs=keep[["in_tissue", "array_row", "array_col"]].reset_index(drop=True),
                               uns={"section": name or outs.name, "image": str(image), "image_scale": scale,
                                    "um_per_px": um_full / scale, "platform": "visium"})
    adata.var["gene_ids"] = np.asarray(feat_ids)
    if adata.var_names.has_duplicates:
        adata.var_names_make_unique()
    s = Section(name or outs.name, adata, Path(image), um_full / scale, None, {"image_scale": scale})
    s, dropped = select_genes(s, genes, drop_missing=drop_missing_genes, source=h5)
    return s


def _not_blank(p: Path) -> bool:
    from PIL import Image

    with Image.open(p) as im:
        im.thumbnail((64, 64))
        a = np.asarray(im.convert("L"))
    return bool(a.std() > 1.0)


def read_anndata(adata, image: str | os.PathLike, *, um_per_px: float | None = None, name: str | None = None,
                 spatial_key: str = "spatial", diameter_um: float = VISIUM_SPOT_UM,
                 celltype_key: str | None = None, genes=None, drop_missing_genes: bool = False) -> Section:
    """An AnnData (object or ``.h5ad`` path) with centres in ``obsm[spatial_key]`` plus its image.

    Counts are taken from ``layers["counts"]`` when present, else ``X``. ``celltype_key`` names an
    ``obsm`` DataFrame of proportions or an ``obs`` column of per-cell labels.
    """
    import anndata as ad

    src = str(adata) if not isinstance(adata, ad.AnnData) else (name or "AnnData")
    if not isinstance(adata, ad.AnnData):
        p = Path(adata)
        if not p.is_file():
            raise StimageInputError(f"{p}: AnnData file not found.")
        adata = ad.read_h5ad(p)
    if spatial_key not in adata.obsm:
        raise StimageInputError(f"{src}: no obsm[{spatial_key!r}] with spot/cell centres (have {list(adata.obsm)}).")
    X = adata.layers["counts"] if "counts" in adata.layers else adata.X
    check_counts(X, src)
    ct = None
    obs = None
    if celltype_key is not None:
        if celltype_key in adata.obsm:
            ct = pd.DataFrame(adata.obsm[celltype_key], index=adata.obs_names)
        elif celltype_key in adata.obs:
            labels = adata.obs[celltype_key].astype("category")
            ct = pd.get_dummies(labels).astype(np.float32)
            ct.index = adata.obs_names
            obs = pd.DataFrame({K.CELLTYPE_LABEL: labels.to_numpy()})
        else:
            raise StimageInputError(f"{src}: celltype_key {celltype_key!r} is neither in obsm nor obs.")
    diam = adata.obs[K.DIAMETER_UM].to_numpy() if K.DIAMETER_UM in adata.obs else diameter_um
    new = make_section_adata(adata.obs_names, np.asarray(adata.obsm[spatial_key])[:, :2], diam, counts=X,
                             genes=list(adata.var_names), celltypes=ct, obs=obs,
                             uns={"section": name or Path(str(src)).stem, "image": str(image), "um_per_px": um_per_px})
    s = Section(name or Path(str(src)).stem, new, Path(image), um_per_px)
    s, _ = select_genes(s, genes, drop_missing=drop_missing_genes, source=src)
    return s


def read_wsi(path: str | os.PathLike, *, um_per_px: float | None = None, spacing_um: float = 100.0,
             diameter_um: float = 100.0, name: str | None = None, tissue_only: bool = True) -> Section:
    """A whole-slide image with observation points on a regular grid (``spacing_um`` apart) over tissue.

    Use it to predict on slides that have no spatial transcriptomics.
    """
    from .tissue import grid_points

    img = open_image(path, um_per_px=um_per_px)
    xy = grid_points(img, spacing_um=spacing_um, tissue_only=tissue_only)
    ids = [f"{int(round(x))}_{int(round(y))}" for x, y in xy]
    nm = name or Path(path).name.split(".")[0]
    adata = make_section_adata(ids, xy, diameter_um, uns={"section": nm, "image": str(path), "um_per_px": img.um_per_px})
    s = Section(nm, adata, Path(path), img.um_per_px)
    s.image = img
    return s
