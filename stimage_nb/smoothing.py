"""Neighbourhood smoothing of predicted expression (Path2Space's optional post-processing), for any model.

:func:`smooth_prediction` replaces each observation's predicted values by the mean over the observations
within ``radius_um`` of it (itself included), optionally up-weighting the centre, as Path2Space's
``smooth_genes_kdtree`` does (Shulman et al., Cell 2026; ``ge_model/path2space/smoothing.py``): with
``K`` neighbours (self included) and a centre weight ``w``,

    smoothed_i = (K * mean_{j in N(i)} x_j + (w - 1) * x_i) / (K + w - 1)      (w = 1: the plain mean).

Path2Space smooths in grid units with radius 2 (two tile sides); here the radius is in µm, measured
between the observations' centres (``obsm["spatial"]`` in level-0 pixels times ``uns["stimage_nb"]
["um_per_px"]``), and its default is two tile sides (``2 * uns["stimage_nb"]["tile_um"]``), so spots
and grid points of any model and scan resolution are smoothed alike. The neighbourhood graph is
squidpy's radius graph (:func:`squidpy.gr.spatial_neighbors`, ``coord_type="generic"``).

The predictive variances are propagated as those of a weighted mean of per-spot predictive distributions
(:func:`stimage_nb.uncertainty.weighted_mean_var`: aleatoric independent between spots, epistemic
``"correlated"`` (conservative) or ``"independent"``), so the intervals of a smoothed map stay honest.

A pure function of a prediction AnnData; the command line (``stimage-nb smooth``) writes the files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from . import _keys as K
from .errors import StimageInputError

log = logging.getLogger(__name__)

#: Path2Space's radius: two grid steps of one tile side each.
DEFAULT_RADIUS_TILES = 2.0


def neighbourhood_graph(pred, radius_um: float):
    """Sparse (n, n) 0/1 matrix of the observations within ``radius_um`` of each other (diagonal set)."""
    import scipy.sparse as sp

    um = (pred.uns.get(K.UNS) or {}).get("um_per_px")
    if um is None or not float(um) > 0:
        raise StimageInputError(f"prediction: uns['{K.UNS}']['um_per_px'] is missing; a radius in µm needs it.")
    if not radius_um > 0:
        raise StimageInputError(f"smoothing radius must be > 0 µm, not {radius_um}")
    import anndata as ad
    import squidpy as sq

    tmp = ad.AnnData(obs=pred.obs[[]].copy(), obsm={K.SPATIAL: np.asarray(pred.obsm[K.SPATIAL], np.float64)[:, :2]
                                                    * float(um)})
    # half a pixel of tolerance: centres rounded to pixels must not fall off an exact grid step
    r = float(radius_um) + 0.5 * float(um)
    conn, _ = sq.gr.spatial_neighbors(tmp, coord_type="generic", radius=r, set_diag=True, copy=True)
    return (sp.csr_matrix(conn) > 0).astype(np.float64)


def smooth_prediction(pred, *, radius_um: float | None = None, centre_weight: float = 1.0,
                      epistemic: str = "correlated", copy: bool = True):
    """Neighbourhood mean of the predicted expression ``X`` (module docstring).

    Parameters
    ----------
    pred
        A prediction AnnData (``stimage-nb predict``): ``X`` (n, genes), ``obsm["spatial"]`` (level-0 px),
        ``uns["stimage_nb"]["um_per_px"]`` (and ``["tile_um"]`` for the default radius).
    radius_um
        Neighbourhood radius in µm (centre to centre, inclusive, plus half a pixel for centres rounded to
        pixels); default: 2 tile sides (Path2Space's).
    centre_weight
        Path2Space's ``weights``: 1 = the plain mean over the neighbourhood; ``w > 1`` up-weights the
        observation itself.
    epistemic
        How the epistemic variance of a neighbourhood mean is bounded: ``"correlated"`` (members' errors
        shared by neighbours; conservative, the default) or ``"independent"`` (:mod:`stimage_nb.uncertainty`).
    copy
        Return a new AnnData (``False``: change ``pred`` in place and return it).

    Returns
    -------
    The AnnData with ``X`` smoothed and the variance layers (``aleatoric_var``, ``epistemic_var``, where
    present) propagated to the smoothed mean; the unsmoothed values in ``layers["unsmoothed_mean"]`` and the
    parameters in ``uns["stimage_nb"]["smoothing"]``.

    Raises
    ------
    StimageInputError
        Missing µm/px or tile size, a non-positive radius or centre weight, an unknown ``epistemic``.
    """
    import scipy.sparse as sp

    from .uncertainty import EPISTEMIC_MODES, weighted_mean_var

    if epistemic not in EPISTEMIC_MODES:
        raise StimageInputError(f"epistemic must be one of {EPISTEMIC_MODES}, not {epistemic!r}")
    if not centre_weight > 0:
        raise StimageInputError(f"centre_weight must be > 0, not {centre_weight}")
    uns = pred.uns.get(K.UNS) or {}
    if radius_um is None:
        if uns.get("tile_um") is None:
            raise StimageInputError(f"prediction: uns['{K.UNS}']['tile_um'] is missing; give radius_um.")
        radius_um = DEFAULT_RADIUS_TILES * float(uns["tile_um"])
    A = neighbourhood_graph(pred, float(radius_um))
    X = pred.X.toarray() if sp.issparse(pred.X) else np.asarray(pred.X)
    X = X.astype(np.float64)
    k = np.asarray(A.sum(1)).ravel()
    w = float(centre_weight)
    # row-normalised weights: 1 for each neighbour, w for the observation itself (Path2Space's formula)
    Wm = (A + (w - 1.0) * sp.identity(A.shape[0], format="csr")).tocsr()
    Wm = sp.diags(1.0 / (k + w - 1.0)) @ Wm
    zeros = np.zeros_like(X)
    layers = {key: np.asarray(pred.layers[key], dtype=np.float64) if key in pred.layers else None
              for key in (K.ALEATORIC, K.EPISTEMIC)}
    smoothed, va, ve = weighted_mean_var(Wm, X, zeros if layers[K.ALEATORIC] is None else layers[K.ALEATORIC],
                                         zeros if layers[K.EPISTEMIC] is None else layers[K.EPISTEMIC],
                                         epistemic_mode=epistemic)
    out = pred.copy() if copy else pred
    out.layers[K.UNSMOOTHED] = X.astype(np.float32)
    out.X = smoothed.astype(np.float32)
    if layers[K.ALEATORIC] is not None:
        out.layers[K.ALEATORIC] = va.astype(np.float32)
    if layers[K.EPISTEMIC] is not None:
        out.layers[K.EPISTEMIC] = ve.astype(np.float32)
    out.uns.setdefault(K.UNS, {})
    out.uns[K.UNS][K.UNS_SMOOTHING] = {
        "method": "neighbourhood mean within radius_um (self included), centre weight as Path2Space's "
                  "smooth_genes_kdtree", "radius_um": float(radius_um), "centre_weight": w,
        "median_neighbours": float(np.median(k)) if len(k) else 0.0,
        "mean_neighbours": float(np.mean(k)) if len(k) else 0.0, "epistemic": epistemic}
    return out


def smooth_dir(pred_dir: str | os.PathLike, out: str | os.PathLike, *, radius_um: float | None = None,
               centre_weight: float = 1.0) -> list[Path]:
    """Smooth every ``PRED_DIR/<section>.h5ad`` into ``OUT/<section>.h5ad`` (atomic writes)."""
    from .io.prediction import read_prediction, write_h5ad

    pred_dir, out = Path(pred_dir), Path(out)
    files = sorted(p for p in pred_dir.glob("*.h5ad") if not p.name.startswith("."))
    if not files:
        raise StimageInputError(f"{pred_dir}: no <section>.h5ad predictions to smooth.")
    if out.resolve() == pred_dir.resolve():
        raise StimageInputError("give another --out than --pred: the unsmoothed predictions are kept")
    paths = []
    for f in files:
        p = smooth_prediction(read_prediction(f), radius_um=radius_um, centre_weight=centre_weight)
        paths.append(write_h5ad(p, out / f.name))
    return paths


def add_cli(sub) -> None:
    p = sub.add_parser("smooth", help="neighbourhood smoothing of predictions (Path2Space's post-processing)")
    p.add_argument("--pred", required=True, type=Path, help="folder of <section>.h5ad predictions")
    p.add_argument("--out", required=True, type=Path, help="folder for the smoothed predictions")
    p.add_argument("--radius-um", type=float, default=None, help="radius in µm (default: 2 tile sides)")
    p.add_argument("--centre-weight", type=float, default=1.0,
                   help="weight of the observation itself (1: plain neighbourhood mean)")
    p.set_defaults(func=_cmd)


def _cmd(a) -> int:
    for p in smooth_dir(a.pred, a.out, radius_um=a.radius_um, centre_weight=a.centre_weight):
        print(p)
    return 0
