"""Readers that turn files on disk into :class:`~stimage_nb.io.section.Section` objects.

- :func:`read_manifest`: a CSV with one row per section. Paths are relative to the CSV. Columns:

  - ``section`` (unique name), optional ``patient``, optional ``platform`` (``st``, ``visium``,
    ``visium_hd``, ``xenium``, ``cosmx``, ``merscope``; :mod:`stimage_nb.io.platforms`);
  - **her2st layout** (legacy ST; ``platform`` defaults to ``st``): ``image,counts,spots,um_per_px``;
    optional ``celltypes`` and ``spot_diameter_um`` (default: the platform's, 100 µm for ST);
  - **a platform's output**: ``outs`` names a Space Ranger ``outs/`` (Visium, Space Ranger 1-3), a Visium
    HD ``outs/`` or ``binned_outputs/square_NNNum`` folder (``bin_um``: 2, 8 or 16, default 8), a Xenium
    ``outs/`` (``image`` = the post-Xenium H&E, ``alignment`` = its Xenium Explorer alignment CSV, or
    ``um_per_px`` when the H&E is registered to the Xenium frame), or an ``.h5ad`` of spots or cells
    (``platform`` and ``image`` required; ``um_per_px``; ``xy_columns`` = the two ``obs`` columns holding
    each point's image x (column) and y (row), in that order, default ``obsm["spatial"]``;
    ``spot_diameter_um``). The platform of a folder is detected from its layout and must agree with
    the ``platform`` column. ``visium`` is the older name of ``outs`` for Space Ranger folders.
    ``image`` is optional for Visium/HD (default: the hires PNG); ``celltypes`` is a CSV/TSV keyed by
    barcode/cell id (one label column, or proportions);
  - **pseudo-spots**: ``pseudospot_um`` aggregates the row's cells or bins into pseudo-spots of that
    diameter (``pseudospot_lattice``: ``hex``, the default, or ``square``;
    :func:`stimage_nb.io.pseudospots.aggregate_pseudospots`);
  - ``annotations``: a QuPath GeoJSON; only observations inside its annotations are kept and
    ``obs["region"]`` names them (:func:`stimage_nb.qupath.restrict_to_regions`).

  Rows without counts are valid (prediction only); rows of every kind mix in one manifest.
- :func:`read_section_files`: one section in the her2st layout.
- :func:`read_visium`, :func:`read_visium_hd` (:mod:`stimage_nb.io.visium`), :func:`read_xenium`
  (:mod:`stimage_nb.io.xenium`).
- :func:`read_anndata`: an AnnData with centres in ``obsm`` or two ``obs`` columns, plus an image.
- :func:`read_wsi`: a whole-slide image (SVS/TIFF/OME-Zarr) with points on a regular grid over tissue.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from .. import _keys as K
from ..errors import StimageInputError
from . import platforms as P
from .image import open_image
from .ngff import check_um_per_px
from .platforms import check_platform
from .pseudospots import aggregate_pseudospots
from .section import Section, check_counts, make_section_adata, read_celltype_targets, select_genes
from .visium import VISIUM_SPOT_UM, read_visium, read_visium_hd  # noqa: F401 (re-exported)
from .xenium import read_xenium

log = logging.getLogger(__name__)

LEGACY_ST_SPOT_UM = 100.0  # legacy Spatial Transcriptomics spot diameter
MANIFEST_COLUMNS = ("section", "image", "spots", "um_per_px")
OUTS_COLUMNS = ("outs", "visium")  # a platform's output folder (or .h5ad); "visium": the older name


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
                       drop_missing_genes: bool = False, platform: str = P.ST) -> Section:
    """One section from an image, a spots table and (optionally) a counts table and cell-type proportions.

    The her2st layout (legacy ST, ``platform="st"`` unless told): spots table with ``x, y, pixel_x,
    pixel_y`` (and ``selected``), counts indexed ``"{x}x{y}"``, proportions keyed the same way.
    """
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
        if n_c or n_s:  # a few unmatched rows are normal (her2st's selections); many suggest the wrong files
            lvl = logging.INFO if len(common) >= 0.9 * max(len(cdf), len(spots_df)) else logging.WARNING
            log.log(lvl, "%s: %d count rows have no spot and %d selected spots have no counts; using the %d "
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
                                    "counts": str(counts) if counts else None, "um_per_px": um_per_px,
                                    K.OBS_UNIT: P.obs_unit(platform)})
    s = Section(name, adata, Path(image), um_per_px, patient, platform=platform)
    s, dropped = select_genes(s, genes, drop_missing=drop_missing_genes, source=counts)
    if dropped:
        s.adata.uns[K.UNS]["dropped_genes"] = dropped
    return s


def _cell(row, col: str) -> str | None:
    """A manifest cell as a stripped string, or None when the column is absent or the cell empty."""
    if col not in row.index:
        return None
    v = row.get(col)
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    v = str(v).strip()
    return None if v in ("", "nan", "NaN", "None") else v


def _float_cell(path: Path, name: str, row, col: str) -> float | None:
    v = _cell(row, col)
    if v is None:
        return None
    try:
        f = float(v)
    except ValueError:
        f = float("nan")
    if not np.isfinite(f) or f <= 0:
        raise StimageInputError(f"{path}: section {name}, column {col}: {v!r} is not a positive number.")
    return f


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

    Returns
    -------
    list of :class:`Section`, each with its ``platform`` set (``st`` for rows in the her2st layout).

    Raises
    ------
    StimageInputError
        A missing or unreadable file, column or value, naming the manifest, the section and the file.
    """
    path = Path(path).expanduser()
    m = read_manifest_table(path)
    out_cols = [c for c in OUTS_COLUMNS if c in m.columns]
    required = ("section",) if out_cols else MANIFEST_COLUMNS
    missing_cols = [c for c in required if c not in m.columns]
    if missing_cols:
        raise StimageInputError(f"{path}: manifest lacks columns {missing_cols}; expected at least "
                                f"{list(MANIFEST_COLUMNS)} (plus optional counts, patient, celltypes, spot_diameter_um), "
                                "or section + outs (a Visium/Visium HD/Xenium output or an .h5ad) + platform.")
    base = path.parent
    if m["section"].isna().any() or m["section"].duplicated().any():
        dup = m["section"][m["section"].duplicated()].tolist()
        raise StimageInputError(f"{path}: every row needs a unique section name (empty or repeated: {dup or ['<empty>']}).")
    m = m.set_index("section", drop=False)
    if sections is not None:
        sections = [s for s in sections]
        unknown = [s for s in sections if s not in m.index]
        if unknown:
            raise StimageInputError(f"{path}: unknown sections {unknown}; the manifest has {list(m.index)}.")
        m = m.loc[sections]
    out = []
    for name, row in m.iterrows():
        name = str(name)
        plat = _cell(row, "platform")
        plat = check_platform(plat, f"{path} (section {name}, column platform)") if plat is not None else None
        given = [(c, _resolve(base, _cell(row, c))) for c in out_cols if _cell(row, c) is not None]
        if len(given) > 1:
            raise StimageInputError(f"{path}: section {name} names both {given[0][0]} and {given[1][0]}; use one.")
        if given:
            sec = _manifest_outs_row(path, base, name, row, given[0][0], given[0][1], plat, genes, drop_missing_genes,
                                     check_images)
        else:
            sec = _manifest_files_row(path, base, m.columns, name, row, genes, drop_missing_genes, check_images,
                                      celltype_level, out_cols[0] if out_cols else "visium", plat or P.ST)
        patient = _cell(row, "patient")
        if patient is not None:
            sec.patient = patient
            sec.adata.uns.setdefault(K.UNS, {})["patient"] = patient
        d = _float_cell(path, name, row, "pseudospot_um")
        if d is not None:
            lat = _cell(row, "pseudospot_lattice") or "hex"
            if lat not in ("hex", "square"):
                raise StimageInputError(f"{path}: section {name}, column pseudospot_lattice: {lat!r} is not hex or square.")
            sec = aggregate_pseudospots(sec, d, lattice=lat)
        ann = _resolve(base, row.get("annotations")) if "annotations" in m.columns else None
        if ann is not None:  # QuPath annotations: keep the spots inside them (Ignore*/exclude dropped)
            from ..qupath import restrict_to_regions

            sec = restrict_to_regions(sec, ann)
        out.append(sec)
    return out


def read_manifest_table(path: str | os.PathLike) -> pd.DataFrame:
    """The manifest CSV as strings (one row per section), nothing else read.

    Raises
    ------
    StimageInputError
        The file is missing or is not a readable CSV.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise StimageInputError(f"{path}: manifest not found.")
    try:
        return pd.read_csv(path, dtype=str)
    except Exception as e:  # noqa: BLE001 - any reader error is a bad file for the user
        raise StimageInputError(f"{path}: cannot read the manifest CSV ({e}).") from e


def manifest_platforms(path: str | os.PathLike) -> dict[str, str]:
    """``{section: platform}`` of a manifest without reading any counts or image (for planning splits).

    The ``platform`` column where given; else the layout of the ``outs``/``visium`` folder; else ``st``
    (her2st-layout rows). Raises :class:`StimageInputError` for an unknown platform or an ``.h5ad`` row
    without one, as :func:`read_manifest` would.
    """
    path = Path(path).expanduser()
    m = read_manifest_table(path)
    if "section" not in m.columns:
        raise StimageInputError(f"{path}: manifest lacks the column section.")
    out = {}
    for _, row in m.iterrows():
        name = str(row["section"])
        plat = _cell(row, "platform")
        if plat is not None:
            out[name] = check_platform(plat, f"{path} (section {name}, column platform)")
            continue
        src = next((_resolve(path.parent, _cell(row, c)) for c in OUTS_COLUMNS if _cell(row, c) is not None), None)
        if src is None:
            out[name] = P.ST
        elif src.suffix == ".h5ad":
            raise StimageInputError(f"{path}: section {name} is an AnnData ({src.name}); say which platform it comes from "
                                    f"in the column platform (one of {sorted(P.PLATFORMS)}).")
        else:
            out[name] = P.detect_platform(src) or P.UNKNOWN
    return out


def _manifest_files_row(path: Path, base: Path, columns, name: str, row, genes, drop_missing_genes: bool,
                        check_images: bool, celltype_level: str, outs_col: str, platform: str) -> Section:
    """One manifest row in the her2st layout (image, spots, counts, µm/px files)."""
    missing = [c for c in MANIFEST_COLUMNS if c not in columns]
    if missing:
        raise StimageInputError(f"{path}: section {name} has no {outs_col} folder, so it needs the columns {missing}.")
    um = check_um_per_px(row.get("um_per_px"), f"{path} (section {name}, column um_per_px)")
    image = _resolve(base, row["image"])
    if image is None:
        raise StimageInputError(f"{path}: section {name} has no image.")
    if check_images and not image.exists():
        raise StimageInputError(f"{image}: image of section {name} not found (manifest {path}).")
    ct = _resolve(base, row.get("celltypes")) if "celltypes" in columns else _default_celltypes(base, name, celltype_level)
    diam = _float_cell(path, name, row, "spot_diameter_um")
    if diam is None:
        if P.obs_unit(platform) in ("cell", "bin"):
            raise StimageInputError(f"{path}: section {name} ({platform}) in the spots-table layout: give the cell/bin "
                                    "diameter in the column spot_diameter_um.")
        diam = P.PLATFORMS[platform].diameter_um or LEGACY_ST_SPOT_UM
    return read_section_files(
        name, image=image, spots=_resolve(base, row["spots"]), counts=_resolve(base, row.get("counts")),
        um_per_px=um, patient=row.get("patient") if "patient" in columns else None, celltypes=ct,
        spot_diameter_um=diam, genes=genes, drop_missing_genes=drop_missing_genes, platform=platform)


def _manifest_outs_row(path: Path, base: Path, name: str, row, col: str, src: Path, platform: str | None, genes,
                       drop_missing_genes: bool, check_images: bool) -> Section:
    """One manifest row naming a platform's output (column ``outs``, or ``visium`` for Space Ranger)."""
    where = f"manifest {path}, section {name}"
    if not src.exists():
        what = "Visium outs/ folder" if col == "visium" else "platform output (column outs)"
        raise StimageInputError(f"{src}: {what} of section {name} not found (manifest {path}).")
    image = _resolve(base, _cell(row, "image"))
    if image is not None and check_images and not image.exists():
        raise StimageInputError(f"{image}: image of section {name} not found (manifest {path}).")
    celltypes = _resolve(base, _cell(row, "celltypes"))
    um = _float_cell(path, name, row, "um_per_px")
    if src.is_file():
        if src.suffix != ".h5ad":
            raise StimageInputError(f"{src}: column {col} of section {name} must name an output folder (Space Ranger / "
                                    f"Visium HD / Xenium outs/) or an .h5ad file ({where}).")
        if platform is None:
            raise StimageInputError(f"{path}: section {name} is an AnnData ({src.name}); say which platform it comes from "
                                    f"in the column platform (one of {sorted(P.PLATFORMS)}).")
        if image is None:
            raise StimageInputError(f"{path}: section {name} is an AnnData ({src.name}) and needs its H&E in the column image.")
        xy_cols = _cell(row, "xy_columns")
        xy_cols = [c.strip() for c in xy_cols.split(",")] if xy_cols else None
        diam = _float_cell(path, name, row, "spot_diameter_um") or P.PLATFORMS[platform].diameter_um
        if diam is None:
            raise StimageInputError(f"{path}: section {name} ({platform}): give the cell/spot diameter in the column "
                                    "spot_diameter_um.")
        return read_anndata(src, image, um_per_px=um, name=name, diameter_um=diam, xy_columns=xy_cols,
                            platform=platform, celltypes=celltypes, genes=genes, drop_missing_genes=drop_missing_genes)
    layout = P.detect_platform(src)
    if layout is None:
        raise StimageInputError(f"{src}: section {name}: not a Space Ranger (Visium), Visium HD or Xenium output folder "
                                f"({where}).")
    if col == "visium" and layout not in (P.VISIUM, P.VISIUM_HD):
        raise StimageInputError(f"{src}: section {name}: the column visium names a {layout} folder; use the column outs.")
    platform = platform or layout
    if platform != layout:
        raise StimageInputError(f"{src}: section {name}: the column platform says {platform!r}, but the folder is a "
                                f"{layout} output ({where}).")
    if platform == P.VISIUM:
        return read_visium(src, image=image, name=name, genes=genes, drop_missing_genes=drop_missing_genes,
                           celltypes=celltypes)
    if platform == P.VISIUM_HD:
        b = _float_cell(path, name, row, "bin_um")
        return read_visium_hd(src, bin_um=int(b) if b else None, image=image, name=name, genes=genes,
                              drop_missing_genes=drop_missing_genes, celltypes=celltypes)
    return read_xenium(src, image=image, alignment=_resolve(base, _cell(row, "alignment")), um_per_px=um, name=name,
                       genes=genes, drop_missing_genes=drop_missing_genes, celltypes=celltypes)


def read_anndata(adata, image: str | os.PathLike, *, um_per_px: float | None = None, name: str | None = None,
                 spatial_key: str = "spatial", xy_columns: Sequence[str] | None = None,
                 diameter_um: float = VISIUM_SPOT_UM, celltype_key: str | None = None,
                 celltypes: str | os.PathLike | None = None, platform: str | None = None, genes=None,
                 drop_missing_genes: bool = False) -> Section:
    """An AnnData (object or ``.h5ad`` path) of spots or cells plus its image.

    Parameters
    ----------
    adata
        The AnnData or its ``.h5ad``. Counts from ``layers["counts"]`` when present, else ``X``.
    image, um_per_px
        The H&E the coordinates refer to, and its µm/px (default: the image's own metadata).
    spatial_key
        ``obsm`` key of the (n, 2) centres, x (image column) then y (image row), in level-0 px.
    xy_columns
        Instead of ``obsm``: the two ``obs`` columns holding x (column) and y (row), **in that order**.
        Conventions differ: HEST/DeepSpot-style Xenium files store ``x_pixel`` = image *row* and
        ``y_pixel`` = image *column*, so they need ``xy_columns=("y_pixel", "x_pixel")``.
    diameter_um
        Spot or cell diameter (µm), unless ``obs["diameter_um"]`` has it.
    celltype_key, celltypes
        An ``obsm`` DataFrame of proportions or an ``obs`` column of labels; or a CSV/TSV keyed by
        observation id (:func:`stimage_nb.io.section.read_celltype_targets`).
    platform
        Where the observations come from (:mod:`stimage_nb.io.platforms`); default: the AnnData's
        ``uns["stimage_nb"]["platform"]``, else ``"unknown"``.

    Raises
    ------
    StimageInputError
        A missing/unreadable file, missing coordinates (naming what the AnnData has), bad counts.
    """
    import anndata as ad

    src = str(adata) if not isinstance(adata, ad.AnnData) else (name or "AnnData")
    if not isinstance(adata, ad.AnnData):
        p = Path(adata)
        if not p.is_file():
            raise StimageInputError(f"{p}: AnnData file not found.")
        try:
            adata = ad.read_h5ad(p)
        except Exception as e:  # noqa: BLE001
            raise StimageInputError(f"{p}: not a readable .h5ad ({type(e).__name__}: {e}).") from e
    if xy_columns is not None:
        xy_columns = list(xy_columns)
        if len(xy_columns) != 2:
            raise StimageInputError(f"{src}: xy_columns must name two obs columns (x = image column, y = image row), "
                                    f"got {xy_columns}.")
        missing = [c for c in xy_columns if c not in adata.obs]
        if missing:
            raise StimageInputError(f"{src}: no obs columns {missing} for the centres (obs has {list(adata.obs.columns)}).")
        try:
            xy = adata.obs[xy_columns].to_numpy(dtype=np.float64)
        except ValueError as e:
            raise StimageInputError(f"{src}: obs columns {xy_columns} must be numeric pixel coordinates ({e}).") from e
    else:
        if spatial_key not in adata.obsm:
            raise StimageInputError(f"{src}: no obsm[{spatial_key!r}] with spot/cell centres (have obsm "
                                    f"{list(adata.obsm)}, obs {list(adata.obs.columns)}); name the obs columns with "
                                    "xy_columns (manifest column xy_columns).")
        xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
    if not np.all(np.isfinite(xy)):
        raise StimageInputError(f"{src}: {int((~np.isfinite(xy)).any(axis=1).sum())} observations have no coordinates.")
    if um_per_px is not None:
        um_per_px = check_um_per_px(um_per_px, f"{src} (um_per_px of {image})")
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
    elif celltypes is not None:
        ct, labels = read_celltype_targets(celltypes, adata.obs_names)
        if labels is not None:
            obs = pd.DataFrame({K.CELLTYPE_LABEL: labels.to_numpy()})
    if platform is None:
        uns_in = adata.uns.get(K.UNS)
        platform = uns_in.get(K.PLATFORM) if isinstance(uns_in, dict) else None
    platform = platform or P.UNKNOWN
    diam = adata.obs[K.DIAMETER_UM].to_numpy() if K.DIAMETER_UM in adata.obs else diameter_um
    nm = name or Path(str(src)).stem
    coords = f"obs[{xy_columns[0]!r}], obs[{xy_columns[1]!r}]" if xy_columns else f"obsm[{spatial_key!r}]"
    new = make_section_adata(adata.obs_names, xy, diam, counts=X, genes=list(adata.var_names), celltypes=ct, obs=obs,
                             uns={"section": nm, "image": str(image), "um_per_px": um_per_px,
                                  K.OBS_UNIT: P.obs_unit(platform), "coordinates": coords})
    s = Section(nm, new, Path(image), um_per_px, platform=platform)
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
    adata = make_section_adata(ids, xy, diameter_um, uns={"section": nm, "image": str(path), "um_per_px": img.um_per_px,
                                                          K.OBS_UNIT: P.obs_unit(P.IMAGE)})
    s = Section(nm, adata, Path(path), img.um_per_px, platform=P.IMAGE)
    s.image = img
    return s
