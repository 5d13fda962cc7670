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
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.h5ad")
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
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        for f, cols in saved:
            f.columns = cols
        adata.uns = uns
        tmp.unlink(missing_ok=True)
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
