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


def write_h5ad(adata, path: str | os.PathLike) -> Path:
    """Write an AnnData atomically (temporary file beside it + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.h5ad")
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
        pred.uns[K.UNS].setdefault("section", src.name[: -len(".h5ad")] if src.name.endswith(".h5ad") else src.stem)
    return pred
