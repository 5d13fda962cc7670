"""OMERO.tables of predictions, shaped for the ~500-column practical limit.

OMERO.tables (HDF5 behind the server) fail at about 960–1,000 columns and omero-metadata warns above
512, so a prediction over hundreds of genes is split: one table per quantity (predictive mean,
aleatoric variance, epistemic variance) and per block of at most ``max_columns`` columns, each with the
same key columns so the tables join row for row:

``Image`` (ImageColumn), ``Roi`` (RoiColumn, when ROIs were pushed: OMERO.web links rows to shapes),
``spot`` (StringColumn: the observation id), ``x``, ``y`` (DoubleColumn, full-resolution px),
then one DoubleColumn per gene (named by the gene). Cell-type probabilities and their standard
deviations go in one more table (``P(<type>)``, ``SD(<type>)``), and the domain-shift score
(:mod:`stimage_nb.domain`) in another (``domain_distance``, ``domain_percentile``). Rows are sent in batches of at most
``max_bytes`` per ``addData`` call (Ice messages are limited in size).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .. import _keys as K

log = logging.getLogger(__name__)

MAX_COLUMNS = 500
KEY_COLUMNS = ("Image", "Roi", "spot", "x", "y")
QUANTITIES = (("mean", None), ("aleatoric_var", K.ALEATORIC), ("epistemic_var", K.EPISTEMIC))


@dataclass
class TableSpec:
    """One table to write: its name, what it holds and how to build its columns for a row range."""

    name: str
    quantity: str
    columns: list[str]                 # value columns (genes or P()/SD() names), key columns excluded
    n_rows: int
    values: Callable[[int, int], np.ndarray] = field(repr=False)  # (start, stop) -> (rows, len(columns)) float64
    with_roi: bool = False

    @property
    def n_columns(self) -> int:
        return len(self.columns) + len(KEY_COLUMNS) - (0 if self.with_roi else 1)


def _dense_cols(M, cols: np.ndarray):
    M = M.tocsr() if hasattr(M, "tocsr") else M

    def get(a: int, b: int) -> np.ndarray:
        block = M[a:b][:, cols]
        block = block.toarray() if hasattr(block, "toarray") else np.asarray(block)
        return block.astype(np.float64)
    return get


def table_prefix(run_id: str, image_id: int | None = None) -> str:
    """Start of the names of a run's tables (the OriginalFile name; with the image when pushed)."""
    return f"stimage_nb {run_id} " + (f"image{int(image_id)} " if image_id is not None else "")


def plan_tables(pred, *, run_id: str, max_columns: int = MAX_COLUMNS, with_roi: bool = False,
                celltypes: bool = True, image_id: int | None = None) -> list[TableSpec]:
    """The tables a prediction becomes (no server needed); each has at most ``max_columns`` columns.

    Table names are ``"stimage_nb <run> [image<id> ]<quantity> <k>of<n>"``: the run and the image
    make a table findable by its file name alone, even before it is linked to the image.
    """
    prefix = table_prefix(run_id, image_id)
    n_key = len(KEY_COLUMNS) - (0 if with_roi else 1)
    per = int(max_columns) - n_key
    if per < 1:
        raise ValueError(f"max_columns={max_columns} leaves no room beside the {n_key} key columns")
    genes = [str(g) for g in pred.var_names]
    specs: list[TableSpec] = []
    n_parts = max(1, -(-len(genes) // per))
    for qname, layer in QUANTITIES:
        M = pred.X if layer is None else pred.layers.get(layer)
        if M is None:
            log.info("prediction has no layers[%r]; no %s table", layer, qname)
            continue
        for p in range(n_parts):
            idx = np.arange(p * per, min(len(genes), (p + 1) * per))
            if idx.size == 0:
                continue
            specs.append(TableSpec(f"{prefix}{qname} {p + 1}of{n_parts}", qname,
                                   [genes[i] for i in idx], pred.n_obs, _dense_cols(M, idx), with_roi))
    if celltypes and K.CELLTYPE_MEAN in pred.obsm and pred.obsm[K.CELLTYPE_MEAN].shape[1]:  # none: no empty table
        mean = pred.obsm[K.CELLTYPE_MEAN]
        names = [str(c) for c in mean.columns]
        std = pred.obsm.get(K.CELLTYPE_STD)
        arr = np.asarray(mean, dtype=np.float64)
        cols = [f"P({c})" for c in names]
        if std is not None:
            arr = np.concatenate([arr, np.asarray(std.reindex(columns=mean.columns), dtype=np.float64)], axis=1)
            cols += [f"SD({c})" for c in names]
        if len(cols) + n_key > max_columns:
            raise ValueError(f"{len(names)} cell types need {len(cols) + n_key} columns > max_columns={max_columns}")
        specs.append(TableSpec(f"{prefix}celltype 1of1", "celltype", cols, pred.n_obs,
                               lambda a, b, arr=arr: arr[a:b], with_roi))
    dcols = [c for c in (K.DOMAIN_DISTANCE, K.DOMAIN_PERCENTILE) if c in pred.obs]
    if dcols:
        darr = pred.obs[dcols].to_numpy(np.float64)
        specs.append(TableSpec(f"{prefix}domain 1of1", "domain", dcols, pred.n_obs,
                               lambda a, b, arr=darr: arr[a:b], with_roi))
    return specs


def rows_per_batch(n_columns: int, max_bytes: int = 8 << 20) -> int:
    """Rows per ``addData`` call so one call stays under ``max_bytes`` (8 bytes per double)."""
    return max(1, int(max_bytes // (8 * max(1, n_columns) + 64)))


def build_columns(spec: TableSpec, *, image_id: int, spot_ids: Sequence[str], xy_full: np.ndarray,
                  roi_ids: np.ndarray | None, start: int, stop: int, empty: bool = False) -> list:
    """omero.grid columns for rows [start, stop) (``empty=True``: headers only, for ``initialize``)."""
    from omero.grid import DoubleColumn, ImageColumn, RoiColumn, StringColumn

    width = max(1, max((len(s.encode("utf-8")) for s in spot_ids), default=1))
    def vals(a):
        return [] if empty else a

    cols = [ImageColumn("Image", "OMERO image", vals([int(image_id)] * (stop - start)))]
    if spec.with_roi:
        if roi_ids is None:
            raise ValueError("a table with a Roi column needs the ROI ids")
        cols.append(RoiColumn("Roi", "OMERO ROI of the observation", vals([int(r) for r in roi_ids[start:stop]])))
    cols.append(StringColumn("spot", "observation id", width, vals([str(s) for s in spot_ids[start:stop]])))
    cols.append(DoubleColumn("x", "centre x (full-resolution px)", vals(xy_full[start:stop, 0].astype(float).tolist())))
    cols.append(DoubleColumn("y", "centre y (full-resolution px)", vals(xy_full[start:stop, 1].astype(float).tolist())))
    block = None if empty else spec.values(start, stop)
    for j, name in enumerate(spec.columns):
        v = [] if empty else block[:, j].astype(float).tolist()
        cols.append(DoubleColumn(name, spec.quantity, v))
    return cols


def write_table(gateway, spec: TableSpec, *, image_id: int, spot_ids, xy_full, roi_ids, ctx,
                on_created: Callable[[int], None] | None = None, max_bytes: int = 8 << 20) -> int:
    """Create an OMERO.table and fill it in row batches; returns its OriginalFile id.

    ``on_created(file_id)`` runs right after the table exists (before any row is sent), so the caller
    can link it to the image at once and a dropped connection never leaves an untraceable file.
    """
    from .connection import OmeroError

    res = gateway.c.sf.sharedResources()
    repos = res.repositories()
    if not repos.descriptions:
        raise OmeroError("the OMERO server offers no repository for OMERO.tables")
    repo_id = repos.descriptions[0].getId().getValue()
    table = res.newTable(repo_id, spec.name, ctx)
    if table is None:
        raise OmeroError("OMERO.tables is not enabled on this server (newTable returned None); ask the "
                         "administrator to start the Tables service, or push with tables=False.")
    try:
        table.initialize(build_columns(spec, image_id=image_id, spot_ids=spot_ids, xy_full=xy_full,
                                       roi_ids=roi_ids, start=0, stop=0, empty=True))
        fid = int(table.getOriginalFile().getId().getValue())
        if on_created is not None:
            on_created(fid)
        step = rows_per_batch(spec.n_columns, max_bytes)
        for a in range(0, spec.n_rows, step):
            b = min(spec.n_rows, a + step)
            table.addData(build_columns(spec, image_id=image_id, spot_ids=spot_ids, xy_full=xy_full,
                                        roi_ids=roi_ids, start=a, stop=b))
    finally:
        try:
            table.close()
        except Exception:  # noqa: BLE001
            pass
    return fid
