"""Means of predictions over many spots, with their uncertainty: slide pseudo-bulk and spatial smoothing.

The variance of a mean of per-spot predictive distributions
------------------------------------------------------------
Each spot ``i`` of a slide (``n`` spots) has an ensemble predictive distribution for the count ``Y_i`` a
spatial assay would measure there: the mixture over the ``M`` members of NB(μ_mi, θ_mi). The
prediction file stores its mean μ̄_i = mean_m μ_mi, the aleatoric variance A_i = mean_m (μ_mi +
μ_mi²/θ_mi) and the epistemic variance E_i = var_m μ_mi (:mod:`stimage_nb.ensemble`). A weighted mean
over spots, ``B = Σ_i w_i Y_i`` with Σ w_i = 1 (the pseudo-bulk: w_i = 1/n; smoothing: a neighbourhood's
weights), has

    E[B]   = Σ_i w_i μ̄_i
    Var[B] = E_m Var(B | m) + Var_m E(B | m)                      (law of total variance over members)
           = Σ_i w_i² A_i  +  Σ_i Σ_j w_i w_j Cov_m(μ_mi, μ_mj)

assuming one member (one model) holds for the whole slide and, given the member, the counts of
different spots are independent (separate captures: the counting noise of one spot says nothing about
another's). The first term is exact under that assumption. The second needs the members' means
jointly, which the per-spot file does not keep; from the E_i alone it is bounded:

- ``epistemic="independent"``: members' errors uncorrelated between spots, Cov = 0 for i ≠ j, giving
  Σ_i w_i² E_i. It shrinks like 1/n, so a slide of 10,000 grid points would look almost certain;
- ``epistemic="correlated"`` (the default): members' errors perfectly correlated between spots (a member
  that reads the slide's stain or tissue differently is off everywhere), giving (Σ_i w_i √E_i)², the
  largest value the E_i allow (Cauchy–Schwarz). It does not shrink with n.

The truth lies between the two; ``correlated`` is the conservative choice and the one that matches how
ensemble members differ (their weights apply to every spot). The aleatoric term shrinks like 1/n under
its (physical) independence assumption, so for a whole slide the pseudo-bulk's uncertainty is
essentially epistemic. For comparison with *bulk RNA-seq* (not a spatial assay's spot counts) use the
epistemic part alone: the aleatoric variance is the spot assay's counting noise. Checked against a
Monte-Carlo simulation of members and counts in ``tests/cohort/test_pseudobulk.py``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import _keys as K
from ..errors import StimageInputError

EPISTEMIC_MODES = ("correlated", "independent")


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def weighted_mean_var(W, mean, aleatoric, epistemic, *, epistemic_mode: str = "correlated"):
    """Weighted means of per-spot predictive distributions and their variance components.

    Parameters
    ----------
    W
        (k, n) weights, each row summing to 1 (dense or scipy sparse): k means over n spots.
    mean, aleatoric, epistemic
        (n, genes) predictive mean and the two variances (counts, counts²).
    epistemic_mode
        ``"correlated"`` or ``"independent"`` (module docstring).

    Returns
    -------
    (mean, var_aleatoric, var_epistemic), each (k, genes) float64.
    """
    import scipy.sparse as sp

    if epistemic_mode not in EPISTEMIC_MODES:
        raise StimageInputError(f"epistemic must be one of {EPISTEMIC_MODES}, not {epistemic_mode!r}")
    W = sp.csr_matrix(W, dtype=np.float64)
    W2 = W.multiply(W).tocsr()
    mu, A, E = _dense(mean), _dense(aleatoric), _dense(epistemic)
    m = np.asarray(W @ mu)
    va = np.asarray(W2 @ A)
    ve = np.asarray(W @ np.sqrt(np.clip(E, 0, None))) ** 2 if epistemic_mode == "correlated" else np.asarray(W2 @ E)
    return m, va, ve


@dataclass(frozen=True)
class PseudoBulk:
    """Mean predicted expression of a slide's spots (over the tissue or a region), with its uncertainty.

    Attributes
    ----------
    slide, region
        Which slide, and ``"tissue"`` or the region pattern used.
    genes
        Gene names.
    n_spots
        Spots averaged (0: the region is empty, the arrays are NaN).
    mean
        (genes,) expected counts per spot.
    var_aleatoric, var_epistemic
        (genes,) variance components of the mean (counts²); see the module docstring.
    epistemic_mode
        How the epistemic term was bounded.
    """

    slide: str
    region: str
    genes: tuple[str, ...]
    n_spots: int
    mean: np.ndarray
    var_aleatoric: np.ndarray
    var_epistemic: np.ndarray
    epistemic_mode: str = "correlated"
    params: dict = field(default_factory=dict)

    @property
    def sd(self) -> np.ndarray:
        """Standard deviation of the pseudo-bulk (both components)."""
        return np.sqrt(self.var_aleatoric + self.var_epistemic)

    def to_frame(self) -> pd.DataFrame:
        """One row per gene: slide, region, gene, n_spots, mean, sd, var_aleatoric, var_epistemic."""
        return pd.DataFrame({"slide_id": self.slide, "region": self.region, "gene": list(self.genes),
                             "n_spots": self.n_spots, "mean": self.mean, "sd": self.sd,
                             "var_aleatoric": self.var_aleatoric, "var_epistemic": self.var_epistemic,
                             "epistemic_mode": self.epistemic_mode})

    def to_json(self) -> str:
        return self.to_frame().to_json(orient="records")


def region_mask(pred, region: str | None) -> np.ndarray:
    """Which observations lie in ``region`` (shell pattern on ``obs["region"]``, case-insensitive;
    ``None``: all). A prediction without region labels has no observation in any region."""
    if region is None:
        return np.ones(pred.n_obs, bool)
    if K.REGION not in pred.obs:
        return np.zeros(pred.n_obs, bool)
    lab = pred.obs[K.REGION].astype(str).str.lower().to_numpy()
    pat = region.lower()
    return np.array([bool(v) and v != "nan" and fnmatch.fnmatchcase(v, pat) for v in lab])


def pseudobulk(pred, *, region: str | None = None, genes=None, epistemic: str = "correlated",
               slide: str | None = None) -> PseudoBulk:
    """The pseudo-bulk of one prediction: mean predicted expression over its spots, with uncertainty.

    Parameters
    ----------
    pred
        A prediction AnnData (``stimage-nb predict``) or its ``.h5ad`` path.
    region
        Average only the observations whose ``obs["region"]`` (QuPath annotation class or name) matches
        this shell pattern, e.g. ``"Tumo*r"``; ``None``: the whole tissue.
    genes
        Restrict to these genes (names the prediction lacks raise an error).
    epistemic
        ``"correlated"`` (default, conservative) or ``"independent"``; see the module docstring.

    Returns
    -------
    :class:`PseudoBulk` (NaN values and ``n_spots=0`` when no observation is in the region).
    """
    from ..io.prediction import read_prediction

    a = read_prediction(pred)
    name = slide or str((a.uns.get(K.UNS) or {}).get("section", ""))
    if genes is not None:
        missing = [g for g in genes if g not in set(a.var_names)]
        if missing:
            raise StimageInputError(f"{name}: genes not in the prediction: {missing[:10]}")
        a = a[:, list(genes)]
    keep = region_mask(a, region)
    n = int(keep.sum())
    g = tuple(str(v) for v in a.var_names)
    if n == 0:
        nan = np.full(len(g), np.nan)
        return PseudoBulk(name, region or "tissue", g, 0, nan, nan.copy(), nan.copy(), epistemic)
    W = np.full((1, n), 1.0 / n)
    sub = a[keep]
    m, va, ve = weighted_mean_var(W, sub.X, sub.layers[K.ALEATORIC], sub.layers[K.EPISTEMIC],
                                  epistemic_mode=epistemic)
    return PseudoBulk(name, region or "tissue", g, n, m[0], va[0], ve[0], epistemic)


@contextlib.contextmanager
def quiet_squidpy():
    """Silence the INFO line squidpy's graph functions print for every call (through spatialdata's logger), and
    numpy's warning when a neighbourhood-enrichment permutation has no spread (its z-score is then NaN)."""
    import warnings

    lg = logging.getLogger("spatialdata._logging")
    level = lg.level
    lg.setLevel(max(level, logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "invalid value encountered in divide", RuntimeWarning)
            yield
    finally:
        lg.setLevel(level)


def neighbour_radius(xy: np.ndarray, factor: float = 1.5) -> float:
    """``factor`` x the median nearest-neighbour distance of points ``xy`` (px): on a square grid 1.5
    reaches the 8 neighbours, on a hexagonal (Visium) or legacy-ST lattice the 6 nearest."""
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) < 2:
        return 1.0
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(factor * np.median(d[:, 1]))


def spatial_graph(pred, *, radius_px: float | None = None):
    """squidpy's spatial neighbour graph of a prediction: points within ``radius_px`` (default
    :func:`neighbour_radius`). Returns (connectivities CSR (n, n), radius used)."""
    import anndata as ad
    import squidpy as sq

    xy = np.asarray(pred.obsm[K.SPATIAL], dtype=np.float64)
    r = float(radius_px) if radius_px is not None else neighbour_radius(xy)
    g = ad.AnnData(obs=pd.DataFrame(index=pred.obs_names.copy()))
    g.obsm["spatial"] = xy
    with quiet_squidpy():
        sq.gr.spatial_neighbors(g, coord_type="generic", radius=r, delaunay=False)
    return g.obsp["spatial_connectivities"].tocsr(), r


def smooth(pred, *, radius_um: float | None = None, epistemic: str = "correlated"):
    """Neighbourhood smoothing of any prediction: each spot's mean over itself and its neighbours.

    Works for every model's predictions (spots, cells or a slide grid): neighbours come from
    squidpy's ``spatial_neighbors`` (points within ``radius_um``; default 1.5 x the median spacing,
    i.e. the 8 grid neighbours or 6 lattice neighbours), every point of a neighbourhood weighs the same,
    and the variances are propagated as in :func:`weighted_mean_var` (aleatoric independent between
    spots, epistemic ``epistemic``).

    Returns a new prediction AnnData (same obs, var, obsm), with ``uns["stimage_nb"]["smoothing"]``
    recording the radius and the number of neighbours.
    """
    import scipy.sparse as sp

    from ..io.prediction import read_prediction

    a = read_prediction(pred).copy()
    um = (a.uns.get(K.UNS) or {}).get("um_per_px")
    r_px = None
    if radius_um is not None:
        if not um:
            raise StimageInputError("smoothing by a radius in µm needs uns['stimage_nb']['um_per_px'].")
        r_px = float(radius_um) / float(um)
    C, r = spatial_graph(a, radius_px=r_px)
    W = (C + sp.identity(a.n_obs, format="csr")).tocsr()
    W.data[:] = 1.0
    W = sp.diags(1.0 / np.asarray(W.sum(1)).ravel()) @ W
    m, va, ve = weighted_mean_var(W, a.X, a.layers[K.ALEATORIC], a.layers[K.EPISTEMIC], epistemic_mode=epistemic)
    a.X = m.astype(np.float32)
    a.layers[K.ALEATORIC] = va.astype(np.float32)
    a.layers[K.EPISTEMIC] = ve.astype(np.float32)
    u = dict(a.uns.get(K.UNS) or {})
    u["smoothing"] = {"radius_px": r, "radius_um": r * float(um) if um else None, "epistemic": epistemic,
                      "mean_neighbours": float(np.asarray(C.sum(1)).mean())}
    a.uns[K.UNS] = u
    return a
