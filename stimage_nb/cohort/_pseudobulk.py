"""Slide pseudo-bulk: the mean prediction over a slide's spots (tissue or a region), with its uncertainty.

The variance of a mean of per-spot predictive distributions, its assumptions and the two bounds of the
epistemic term are derived in :mod:`stimage_nb.uncertainty` (and ``docs/cohort.md``).
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
from ..uncertainty import EPISTEMIC_MODES, weighted_mean_var  # noqa: F401 - re-exported


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
