"""10x Genomics file formats shared by the Visium, Visium HD and Xenium readers.

- :func:`read_10x_counts`: a feature-barcode matrix (HDF5, formats v2 and v3) through
  :func:`scanpy.read_10x_h5` (gene-expression features only; Xenium's negative-control probes and
  unassigned codewords are dropped, as spatialdata-io's ``gex_only`` does).
- :func:`read_tissue_positions`: the positions of spots or bins, in the three forms Space Ranger has
  written (10x, "Spatial outputs"): ``tissue_positions_list.csv`` without a header (Space Ranger 1.x),
  ``tissue_positions.csv`` with a header (2.0+), ``tissue_positions.parquet`` (3.0+, Visium HD bins;
  the only place HD writes them). Columns: ``barcode, in_tissue, array_row, array_col,
  pxl_row_in_fullres, pxl_col_in_fullres`` (pixels of the full-resolution image; row = y, col = x).
- :func:`read_scalefactors`: ``scalefactors_json.json``.

Why not squidpy's / spatialdata-io's Visium readers: neither reads ``tissue_positions.parquet``;
``squidpy.read.visium`` returns no positions unless it also loads both PNGs, and
``spatialdata_io.visium_hd`` needs the ``feature_slice.h5`` of a complete HD ``outs/`` (absent from a
copied ``binned_outputs/square_NNNum`` folder). The tests check these functions against
``squidpy.read.visium`` on the layouts it reads.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import StimageInputError

log = logging.getLogger(__name__)

POSITION_COLUMNS = ["in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
POSITION_FILES = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")


def read_10x_counts(path: str | os.PathLike, what: str = "10x"):
    """A 10x feature-barcode matrix (``.h5``) as an AnnData of raw counts (float32 CSR).

    ``var_names`` are gene symbols (made unique), ``var["gene_ids"]`` the feature ids; only
    "Gene Expression" features are kept. Raises :class:`StimageInputError` naming the file when it is
    missing or not a 10x matrix. Reads through :func:`scanpy.read_10x_h5`.
    """
    import scanpy as sc

    p = Path(path)
    if not p.is_file():
        raise StimageInputError(f"{p}: {what} feature-barcode matrix not found.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Variable names are not unique": made unique below
            a = sc.read_10x_h5(p, gex_only=True)
    except Exception as e:  # noqa: BLE001
        raise StimageInputError(f"{p}: not a readable 10x feature-barcode matrix ({type(e).__name__}: {e}).") from e
    a.X = a.X.astype(np.float32)
    if a.var_names.has_duplicates:
        a.var_names_make_unique()
    a.obs_names = a.obs_names.astype(str)
    return a


def read_tissue_positions(spatial_dir: str | os.PathLike, *, what: str = "Visium") -> tuple[pd.DataFrame, Path]:
    """Spot or bin positions of a Space Ranger ``spatial/`` folder, and the file they came from.

    Returns a DataFrame indexed by barcode with :data:`POSITION_COLUMNS` (``in_tissue`` as int,
    pixel columns as float64, full-resolution pixels). Tries ``tissue_positions.parquet``,
    ``tissue_positions.csv`` then ``tissue_positions_list.csv``; a CSV's header is detected from its
    first cell (``barcode``), as squidpy does.
    """
    d = Path(spatial_dir)
    path = next((d / f for f in POSITION_FILES if (d / f).is_file()), None)
    if path is None:
        if what == "Visium HD":
            raise StimageInputError(
                f"{d}: Visium HD bins need spatial/tissue_positions.parquet (Space Ranger 3+ writes the bins' "
                "positions only there), and it is missing. Copy the whole binned_outputs/square_NNNum folder.")
        raise StimageInputError(f"{d}: no tissue positions file; Space Ranger writes one of {list(POSITION_FILES)} "
                                "(parquet: 3.0+ and Visium HD; csv with header: 2.0+; _list.csv: 1.x).")
    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
            if "barcode" not in df.columns:
                raise StimageInputError(f"{path}: parquet tissue positions lack a 'barcode' column "
                                        f"(have {list(df.columns)}).")
            df = df.set_index("barcode")
        else:
            with open(path) as f:
                first = f.readline().split(",")[0].strip().strip('"').lower()
            df = pd.read_csv(path, header=0 if first == "barcode" else None, index_col=0)
            if first != "barcode":
                if df.shape[1] != len(POSITION_COLUMNS):
                    raise StimageInputError(f"{path}: a header-less positions file needs {len(POSITION_COLUMNS) + 1} "
                                            f"columns (barcode, {', '.join(POSITION_COLUMNS)}), has {df.shape[1] + 1}.")
                df.columns = POSITION_COLUMNS
    except StimageInputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise StimageInputError(f"{path}: cannot read the tissue positions ({type(e).__name__}: {e}).") from e
    missing = [c for c in POSITION_COLUMNS if c not in df.columns]
    if missing:
        raise StimageInputError(f"{path}: tissue positions lack columns {missing} (have {list(df.columns)}).")
    df = df[POSITION_COLUMNS].copy()
    df.index = df.index.astype(str)
    df.index.name = "barcode"
    px = df[["pxl_row_in_fullres", "pxl_col_in_fullres"]]
    if px.isna().any().any():
        raise StimageInputError(f"{path}: {int(px.isna().any(axis=1).sum())} positions have no pixel coordinates.")
    df["in_tissue"] = df["in_tissue"].astype(int)
    df[["pxl_row_in_fullres", "pxl_col_in_fullres"]] = px.astype(np.float64)
    return df, path


def read_scalefactors(path: str | os.PathLike, *, need: tuple[str, ...] = (), what: str = "Visium") -> dict:
    """``scalefactors_json.json`` as a dict; ``need`` names keys that must be present (error names them)."""
    p = Path(path)
    if not p.is_file():
        raise StimageInputError(f"{p}: {what} scale factors (scalefactors_json.json) not found.")
    try:
        sf = json.loads(p.read_text())
    except Exception as e:  # noqa: BLE001
        raise StimageInputError(f"{p}: cannot read the {what} scale factors ({type(e).__name__}: {e}).") from e
    missing = [k for k in need if k not in sf]
    if missing:
        raise StimageInputError(f"{p}: the {what} scale factors lack {missing} (have {sorted(sf)}).")
    return sf


def not_blank(path: Path) -> bool:
    """Whether a PNG has any content (Space Ranger fixtures sometimes ship a black placeholder)."""
    from PIL import Image

    with Image.open(path) as im:
        im.thumbnail((64, 64))
        a = np.asarray(im.convert("L"))
    return bool(a.std() > 1.0)
