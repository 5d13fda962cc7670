"""10x Visium (Space Ranger 1-3) and Visium HD (binned outputs) as Sections.

- :func:`read_visium`: a Space Ranger ``outs/`` folder of a Visium slide: 55 µm spots
  (``platform="visium"``). Positions from any of the three files Space Ranger has written
  (:func:`stimage_nb.io.tenx.read_tissue_positions`); µm/px from ``spot_diameter_fullres``, which
  Space Ranger defines as the pixels spanning a *theoretical 65 µm spot* (10x, "Space Ranger spatial
  outputs"), not the 55 µm capture spot: 65 / ``spot_diameter_fullres``. Checked on the real fixture
  against the array's geometry (spots 100 µm apart centre to centre; 55 µm would make them 85 µm).
- :func:`read_visium_hd`: Visium HD binned outputs, ``binned_outputs/square_002um|008um|016um/``
  (``platform="visium_hd"``): square bins, positions only in ``spatial/tissue_positions.parquet``, µm/px
  from ``microns_per_pixel`` in the scale factors (else ``bin_size_um / spot_diameter_fullres``).
  A 2 µm HD slide has millions of bins: read 8 or 16 µm bins, or aggregate them into pseudo-spots
  (:func:`stimage_nb.io.pseudospots.aggregate_pseudospots`).

Both take ``image`` = the full-resolution H&E given to Space Ranger (positions are in its pixels).
Without it the hires PNG is used (the lowres one when the hires is a blank placeholder) and the
positions are scaled into its frame; ``uns["stimage_nb"]["image_scale"]`` records the factor.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import _keys as K
from ..errors import StimageInputError
from . import platforms as P
from .section import Section, check_counts, make_section_adata, read_celltype_targets, select_genes
from .tenx import not_blank, read_10x_counts, read_scalefactors, read_tissue_positions

log = logging.getLogger(__name__)

VISIUM_SPOT_UM = 55.0            # the capture spot's diameter
VISIUM_SPOT_FULLRES_UM = 65.0    # what scalefactors' spot_diameter_fullres spans (10x's "theoretical spot")
HD_BIN_SIZES_UM = (2, 8, 16)
HD_DEFAULT_BIN_UM = 8


def _pick_image(sp_dirs: Sequence[Path], sf: dict, where: Path) -> tuple[Path, float]:
    """The hires (else lowres) PNG of the first ``spatial/`` folder that has a non-blank one, and its scale."""
    for key, fname in (("tissue_hires_scalef", "tissue_hires_image.png"), ("tissue_lowres_scalef", "tissue_lowres_image.png")):
        for d in sp_dirs:
            p = d / fname
            if p.is_file() and key in sf and not_blank(p):
                return p, float(sf[key])
    raise StimageInputError(f"{where}: no usable H&E image (tissue_hires_image.png / tissue_lowres_image.png missing "
                            "or blank); pass image= the full-resolution H&E (manifest column image).")


def _section(name: str, counts, pos, pos_path: Path, image: Path, scale: float, um_per_px: float, diameter_um,
             platform: str, uns: dict, in_tissue_only: bool, genes, drop_missing_genes: bool, source: Path,
             celltypes=None) -> Section:
    at = pos.index.get_indexer(counts.obs_names)  # one hash join (millions of bins), positional from here on
    rows = np.flatnonzero(at >= 0)
    if len(rows) == 0:
        raise StimageInputError(f"{pos_path}: none of the {counts.n_obs} barcodes of {source} is in the positions "
                                f"(e.g. {list(counts.obs_names[:2])} vs {list(pos.index[:2])}).")
    if in_tissue_only:
        rows = rows[pos["in_tissue"].to_numpy()[at[rows]] == 1]
        if len(rows) == 0:
            raise StimageInputError(f"{pos_path}: no barcode of {source} is flagged in_tissue.")
    keep = pos.iloc[at[rows]]
    X = counts.X[rows]
    check_counts(X, source)
    xy = keep[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64) * scale
    ct, labels = read_celltype_targets(celltypes, keep.index) if celltypes is not None else (None, None)
    obs = keep[["in_tissue", "array_row", "array_col"]].reset_index(drop=True)
    if labels is not None:
        obs[K.CELLTYPE_LABEL] = labels.to_numpy()
    adata = make_section_adata(keep.index, xy, diameter_um, counts=X, genes=list(counts.var_names), celltypes=ct,
                               obs=obs, uns={"section": name, "image": str(image), "image_scale": scale,
                                             "um_per_px": um_per_px, K.OBS_UNIT: P.obs_unit(platform), **uns})
    adata.var["gene_ids"] = counts.var["gene_ids"].to_numpy() if "gene_ids" in counts.var else np.asarray(counts.var_names)
    s = Section(name, adata, Path(image), um_per_px, None, {"image_scale": scale}, platform=platform)
    s, dropped = select_genes(s, genes, drop_missing=drop_missing_genes, source=source)
    if dropped:
        s.adata.uns[K.UNS]["dropped_genes"] = dropped
    return s


def read_visium(outs: str | os.PathLike, *, image: str | os.PathLike | None = None, name: str | None = None,
                genes: Sequence[str] | None = None, drop_missing_genes: bool = False, in_tissue_only: bool = True,
                celltypes: str | os.PathLike | None = None) -> Section:
    """A 10x Visium Space Ranger ``outs/`` folder (Space Ranger 1-3) as a Section of 55 µm spots.

    Parameters
    ----------
    outs
        The folder holding ``filtered_feature_bc_matrix.h5`` and ``spatial/`` (scale factors, one of
        the three tissue-position files, the PNGs). A Visium HD ``outs/`` is handed to
        :func:`read_visium_hd` (8 µm bins).
    image
        The full-resolution H&E used by Space Ranger; default: the hires (or lowres) PNG.
    celltypes
        Optional CSV/TSV keyed by barcode: one column of labels, or columns of proportions.

    Returns
    -------
    Section with ``platform="visium"``; obs ``in_tissue, array_row, array_col``; ``obsm["spatial"]`` in
    pixels of the image used; µm/px = 65 / ``spot_diameter_fullres`` / image scale (module docstring).

    Raises
    ------
    StimageInputError
        A missing matrix, scale factors, positions or image, naming the file.
    """
    outs = Path(outs)
    if not outs.is_dir():
        raise StimageInputError(f"{outs}: Visium outs/ folder not found.")
    if P.detect_platform(outs) == P.VISIUM_HD:
        log.info("%s is a Visium HD layout; reading its %d µm bins", outs, HD_DEFAULT_BIN_UM)
        return read_visium_hd(outs, image=image, name=name, genes=genes, drop_missing_genes=drop_missing_genes,
                              in_tissue_only=in_tissue_only, celltypes=celltypes)
    h5 = outs / "filtered_feature_bc_matrix.h5"
    if not h5.is_file():
        raise StimageInputError(f"{outs}: no filtered_feature_bc_matrix.h5; is this a Space Ranger outs/ folder?")
    counts = read_10x_counts(h5, "Visium")
    sp_dir = outs / "spatial"
    sf = read_scalefactors(sp_dir / "scalefactors_json.json", need=("spot_diameter_fullres",))
    pos, pos_path = read_tissue_positions(sp_dir)
    um_full = VISIUM_SPOT_FULLRES_UM / float(sf["spot_diameter_fullres"])
    if image is None:
        image, scale = _pick_image([sp_dir], sf, sp_dir)
    else:
        image, scale = Path(image), 1.0
    return _section(name or outs.name, counts, pos, pos_path, image, scale, um_full / scale, VISIUM_SPOT_UM,
                    P.VISIUM, {"positions": pos_path.name}, in_tissue_only, genes, drop_missing_genes, h5, celltypes)


def hd_bin_dir(path: str | os.PathLike, bin_um: int | None = None) -> Path:
    """The ``square_NNNum`` folder for ``bin_um`` under a Visium HD ``outs/`` (or ``binned_outputs/``).

    ``path`` may already be a ``square_NNNum`` folder (then ``bin_um``, if given, must match it).
    Default bin: 8 µm when present, else the only one.
    """
    p = Path(path)
    if p.name.startswith("square_"):
        if bin_um is not None and p.name != f"square_{int(bin_um):03d}um":
            raise StimageInputError(f"{p}: this is the {p.name} bin folder, not square_{int(bin_um):03d}um.")
        return p
    base = p / "binned_outputs" if (p / "binned_outputs").is_dir() else p
    have = sorted(d.name for d in base.glob("square_*um") if d.is_dir())
    if not have:
        raise StimageInputError(f"{p}: not a Visium HD output: no binned_outputs/square_NNNum folder "
                                "(square_002um, square_008um, square_016um).")
    if bin_um is None:
        want = f"square_{HD_DEFAULT_BIN_UM:03d}um"
        if want in have:
            return base / want
        if len(have) == 1:
            return base / have[0]
        raise StimageInputError(f"{p}: several Visium HD bin sizes ({have}); choose one (bin_um=, manifest column bin_um).")
    want = f"square_{int(bin_um):03d}um"
    if want not in have:
        raise StimageInputError(f"{base}: no Visium HD {want} folder (have {have}).")
    return base / want


def read_visium_hd(path: str | os.PathLike, *, bin_um: int | None = None, image: str | os.PathLike | None = None,
                   name: str | None = None, genes: Sequence[str] | None = None, drop_missing_genes: bool = False,
                   in_tissue_only: bool = True, celltypes: str | os.PathLike | None = None) -> Section:
    """Visium HD binned outputs as a Section of square bins (``platform="visium_hd"``).

    Parameters
    ----------
    path
        A Visium HD ``outs/``, its ``binned_outputs/``, or one ``square_NNNum`` folder. The bin folder
        holds ``filtered_feature_bc_matrix.h5`` and ``spatial/`` with ``tissue_positions.parquet`` and
        ``scalefactors_json.json`` (``microns_per_pixel``, ``bin_size_um``, ``spot_diameter_fullres``
        = bin side in full-resolution pixels, hires/lowres scale factors).
    bin_um
        2, 8 or 16 (default 8 when present).
    image
        The full-resolution microscope image (positions are in its pixels); default: the hires
        (else lowres) PNG of the bin folder's or ``outs/spatial/``.

    Returns
    -------
    Section; ``obs`` ``in_tissue, array_row, array_col``; ``obs["diameter_um"]`` = the bin side (µm);
    ``uns["stimage_nb"]["bin_um"]``; µm/px of the image used.

    Raises
    ------
    StimageInputError
        Naming Visium HD and the missing piece: bin folder, ``tissue_positions.parquet``, the matrix,
        ``microns_per_pixel``/``bin_size_um``, or an image.

    Notes
    -----
    Read with pandas/pyarrow against the documented layout (10x, "Visium HD binned outputs"):
    ``spatialdata_io.visium_hd`` needs the ``feature_slice.h5`` of a complete ``outs/``.
    """
    p = Path(path)
    if not p.exists():
        raise StimageInputError(f"{p}: Visium HD output folder not found.")
    bdir = hd_bin_dir(p, bin_um)
    h5 = bdir / "filtered_feature_bc_matrix.h5"
    if not h5.is_file():
        raise StimageInputError(f"{bdir}: Visium HD bin folder without filtered_feature_bc_matrix.h5.")
    sp_dir = bdir / "spatial"
    sf = read_scalefactors(sp_dir / "scalefactors_json.json", what="Visium HD")
    size = sf.get("bin_size_um")
    if size is None:
        size = float(bdir.name[len("square_"):-2])
    size = float(size)
    if "microns_per_pixel" in sf:
        um_full = float(sf["microns_per_pixel"])
    elif "spot_diameter_fullres" in sf:
        um_full = size / float(sf["spot_diameter_fullres"])
    else:
        raise StimageInputError(f"{sp_dir / 'scalefactors_json.json'}: the Visium HD scale factors give neither "
                                "microns_per_pixel nor spot_diameter_fullres, so µm/px is unknown.")
    pos, pos_path = read_tissue_positions(sp_dir, what="Visium HD")
    counts = read_10x_counts(h5, "Visium HD")
    outs = bdir.parent.parent if bdir.parent.name == "binned_outputs" else bdir.parent
    if image is None:
        image, scale = _pick_image([sp_dir, outs / "spatial"], sf, sp_dir)
    else:
        image, scale = Path(image), 1.0
    nm = name or (outs.name if outs.name != "outs" else outs.parent.name) or bdir.name
    return _section(nm, counts, pos, pos_path, image, scale, um_full / scale, size, P.VISIUM_HD,
                    {"bin_um": size, "positions": pos_path.name}, in_tissue_only, genes, drop_missing_genes, h5,
                    celltypes)
