"""Reading and writing prediction AnnData files (``PRED_DIR/<section>.h5ad``), the one place that knows
the prediction contract (see :mod:`stimage_nb._keys`): obs names = observation ids, ``X`` = predictive
mean, ``layers`` = the two variances, ``obsm["spatial"]`` = centres in level-0 pixels, provenance in
``uns["stimage_nb"]``.

Everything that consumes predictions (evaluation, QuPath and OME-Zarr export, the OMERO push, the
viewer) reads them through :func:`read_prediction`, so a file that is not a prediction gets the same
clear message everywhere. Needs no torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import _keys as K
from ..atomic import write_atomic
from ..errors import StimageInputError
from ..names import name_of_file

#: ``uns`` flag of a file whose HDF5 keys were percent-encoded by :func:`write_h5ad` (see :mod:`stimage_nb.names`).
H5_NAMES = "stimage_nb_h5_names"


def _recode(d, fn):
    """A copy of a (nested) mapping with ``fn`` applied to every key."""
    if isinstance(d, dict):
        return {fn(k): _recode(v, fn) for k, v in d.items()}
    return d


def _frames(adata):
    """The DataFrames whose column names become HDF5 keys: obs, var and the DataFrames in obsm/varm."""
    import pandas as pd

    yield adata.obs
    yield adata.var
    for m in (adata.obsm, adata.varm):
        for k in list(m.keys()):
            if isinstance(m[k], pd.DataFrame):
                yield m[k]


def _unsafe(name) -> bool:
    from ..names import is_safe

    return isinstance(name, str) and name != "" and not is_safe(name, "h5_key")


def write_h5ad(adata, path: str | os.PathLike) -> Path:
    """Write an AnnData atomically (temporary file beside it + rename); returns the path.

    Column names and ``uns`` keys are data (cell types like ``NK/T cells``, genes like ``HLA-DRB1/3``) but
    HDF5 makes them link names, where ``/`` nests groups (anndata warns that it will refuse them). Such
    names are written percent-encoded (:func:`stimage_nb.names.safe_name`, ``"h5_key"``), the file is
    flagged (``uns["stimage_nb_h5_names"]``) and :func:`read_prediction` restores them; ``adata`` itself
    is left as it was.
    """
    from ..names import safe_name

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = list(_frames(adata))
    flat_uns = []

    def keys(d):
        if isinstance(d, dict):
            for k, v in d.items():
                flat_uns.append(k)
                keys(v)
    keys(dict(adata.uns))
    encode = any(_unsafe(c) for f in frames for c in f.columns) or any(_unsafe(k) for k in flat_uns)
    saved = [(f, f.columns) for f in frames]
    uns = adata.uns
    try:
        if encode:
            def enc(c):
                return safe_name(c, "h5_key") if isinstance(c, str) and c else c
            for f in frames:
                f.columns = [enc(c) for c in f.columns]
            adata.uns = {**_recode(dict(uns), enc), H5_NAMES: "percent-encoded"}
        write_atomic(path, adata.write_h5ad)
    finally:
        for f, cols in saved:
            f.columns = cols
        adata.uns = uns
    return path


def _decode_names(adata) -> None:
    """Undo :func:`write_h5ad`'s key encoding in place (files it flagged only)."""
    from ..names import original_name

    if adata.uns.pop(H5_NAMES, None) is None:
        return
    for f in _frames(adata):
        f.columns = [original_name(c) if isinstance(c, str) else c for c in f.columns]
    adata.uns = _recode(dict(adata.uns), lambda k: original_name(k) if isinstance(k, str) else k)


def read_prediction(pred, *, strict: bool = False):
    """A prediction AnnData from an object or an ``.h5ad`` path, checked against the contract.

    Parameters
    ----------
    pred
        An AnnData or the path of an ``.h5ad`` written by ``stimage-nb predict``.
    strict
        Also require ``obs`` pixel centres and diameters, ``uns["stimage_nb"]["um_per_px"]`` and at
        least one observation (what drawing shapes in physical units needs, e.g. the OMERO push).

    Returns
    -------
    The AnnData; when read from a file, ``uns["stimage_nb"]["section"]`` defaults to the file's stem.
    """
    import anndata as ad

    src = None
    if isinstance(pred, (str, os.PathLike)):
        src = Path(pred)
        if not src.is_file():
            raise StimageInputError(f"{src}: prediction file not found (expected PRED_DIR/<section>.h5ad, "
                                    "written by `stimage-nb predict`).")
        try:
            pred = ad.read_h5ad(src)
        except Exception as e:  # noqa: BLE001
            raise StimageInputError(f"{src}: not a readable .h5ad prediction ({type(e).__name__}: {e}).") from e
        _decode_names(pred)
    if not isinstance(pred, ad.AnnData):
        raise StimageInputError(f"expected a prediction AnnData or an .h5ad path, got {type(pred).__name__}.")
    where = str(src) if src is not None else "prediction AnnData"
    missing = [] if K.SPATIAL in pred.obsm else [f"obsm[{K.SPATIAL!r}]"]
    prov = pred.uns.get(K.UNS)
    if strict:
        missing += [f"obs[{k!r}]" for k in (K.PIXEL_X, K.PIXEL_Y, K.DIAMETER_UM) if k not in pred.obs]
        if not isinstance(prov, dict):
            missing.append(f"uns[{K.UNS!r}]")
        elif prov.get("um_per_px") is None:
            missing.append(f"uns[{K.UNS!r}]['um_per_px']")
    if missing:
        raise StimageInputError(f"{where}: not a stimage_nb prediction: missing {missing}. Use the files written "
                                "by `stimage-nb predict` (PRED_DIR/<section>.h5ad).")
    if strict and pred.n_obs == 0:
        raise StimageInputError(f"{where}: the prediction has no observations.")
    if src is not None:
        if not isinstance(pred.uns.get(K.UNS), dict):
            pred.uns[K.UNS] = {}
        pred.uns[K.UNS].setdefault("section", name_of_file(src, ".h5ad") if src.name.endswith(".h5ad") else src.stem)
    return pred


#: The per-observation results a model hands the writer, and where each goes in the AnnData.
_MATRICES = {"mean": "X", "aleatoric_var": f"layers/{K.ALEATORIC}", "epistemic_var": f"layers/{K.EPISTEMIC}"}


class PredictionWriter:
    """Writes one prediction ``.h5ad`` as the results come, block of rows by block of rows (bounded memory).

    ``X`` and both variance layers, the (n, genes) matrices, are HDF5 datasets filled in place by
    :meth:`write`; only the small per-observation arrays (cell types, domain distance: n x cell types)
    are kept until :meth:`close` writes ``obs``, ``var``, ``obsm`` and ``uns`` (through
    ``anndata.io.write_elem``, so the file is what ``AnnData.write_h5ad`` writes and
    :func:`read_prediction` reads). The file is written beside ``path`` and renamed into place by
    :meth:`close`; an exception inside ``with`` leaves nothing behind.

    Parameters
    ----------
    path
        The ``.h5ad`` to write.
    obs
        The observations (index = ids; pixel centres, diameters...), in row order.
    genes, celltypes
        The ``var`` names and the cell-type columns of ``obsm["celltype_mean"/"celltype_std"]``.
    spatial
        (n, 2) centres in level-0 pixels (``obsm["spatial"]``).
    domain
        Whether results carry ``domain_distance``.
    aleatoric
        Whether to write ``layers["aleatoric_var"]`` (a model of point predictions has none).
    """

    def __init__(self, path: str | os.PathLike, *, obs, genes, celltypes, spatial, domain: bool = False,
                 aleatoric: bool = True):
        import h5py
        import numpy as np

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.stem}.tmp-{os.getpid()}.h5ad")
        self.obs, self.genes, self.celltypes = obs, [str(g) for g in genes], [str(c) for c in celltypes]
        self.spatial = np.asarray(spatial, dtype=np.float64)
        n, G, C = len(obs), len(self.genes), len(self.celltypes)
        self.n = n
        self._f = h5py.File(self._tmp, "w")
        self._f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        lay = self._f.create_group("layers")
        lay.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        self._d = {}
        for key, where in _MATRICES.items():
            if key == "aleatoric_var" and not aleatoric:
                continue
            ds = self._f.create_dataset(where, shape=(n, G), dtype="float32")
            ds.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
            self._d[key] = ds
        self.small = {"celltype_mean": np.full((n, C), np.nan, np.float32),
                      "celltype_std": np.full((n, C), np.nan, np.float32)}
        if domain:
            self.small["domain_distance"] = np.full(n, np.nan, np.float32)
        self.written = np.zeros(n, dtype=bool)
        self._depth_sum = 0.0  # sum over rows of the predicted counts per row (sum over genes of the mean)

    def write(self, idx, values: dict) -> None:
        """Rows ``idx`` (any order) of each result (``mean``, ``aleatoric_var``, ``epistemic_var``: (k, genes);
        ``celltype_mean``, ``celltype_std``: (k, cell types); ``domain_distance``: (k,))."""
        import numpy as np

        idx = np.asarray(idx, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        runs = np.split(np.arange(len(sidx)), np.flatnonzero(np.diff(sidx) != 1) + 1) if len(sidx) else []
        self._depth_sum += float(np.asarray(values["mean"], dtype=np.float64).sum())
        for key, ds in self._d.items():
            v = np.asarray(values[key], dtype=np.float32)[order]
            for r in runs:  # contiguous runs as slices: HDF5 writes them in one go
                ds[int(sidx[r[0]]):int(sidx[r[-1]]) + 1] = v[r]
        for key, arr in self.small.items():
            arr[idx] = values[key]
        self.written[idx] = True

    def rescale_to_depth(self, depth: float, block: int = 4096) -> float:
        """Rescale the rows written so far to a mean of ``depth`` predicted counts per row, in place, block by
        block (:func:`stimage_nb.uncertainty.scale_prediction`, the formulas of
        :func:`~stimage_nb.ensemble.rescale_to_depth`); returns the factor ``f``. Call once, after every row is
        written."""

        from ..errors import StimageInputError

        if not depth > 0:
            raise StimageInputError(f"a section's depth must be positive counts per spot, not {depth!r}")
        now = self._depth_sum / self.n if self.n else 0.0
        f = float(depth) / now if now > 0 else 1.0
        from ..uncertainty import scale_prediction

        for a in range(0, self.n, block):
            b = min(self.n, a + block)
            scaled = scale_prediction({k: ds[a:b] for k, ds in self._d.items()}, f)
            for k, ds in self._d.items():
                ds[a:b] = scaled[k]
        self._depth_sum *= f
        return f

    def close(self, uns: dict, obs_extra: dict | None = None) -> Path:
        """Write the remaining elements and move the file into place; returns the path."""
        import anndata as ad
        import pandas as pd

        if not self.written.all():
            raise RuntimeError(f"{self.path}: {int((~self.written).sum())} of {self.n} rows were never written.")
        obs = self.obs.copy()
        if "domain_distance" in self.small:
            obs[K.DOMAIN_DISTANCE] = self.small["domain_distance"]
        for k, v in (obs_extra or {}).items():
            obs[k] = v
        f = self._f
        write = ad.io.write_elem
        write(f, "obs", obs)
        write(f, "var", pd.DataFrame(index=pd.Index(self.genes)))
        write(f, "obsm", {K.CELLTYPE_MEAN: pd.DataFrame(self.small["celltype_mean"], index=obs.index,
                                                         columns=self.celltypes),
                          K.CELLTYPE_STD: pd.DataFrame(self.small["celltype_std"], index=obs.index,
                                                        columns=self.celltypes),
                          K.SPATIAL: self.spatial})
        for key in ("varm", "obsp", "varp"):
            write(f, key, {})
        write(f, "uns", {K.UNS: uns})
        f.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the half-written file."""
        try:
            self._f.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "PredictionWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()
