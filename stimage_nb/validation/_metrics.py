"""Statistics of the validation harness that :mod:`stimage_nb.evaluate` does not already have.

Gene correlations, calibration, the uncertainty ranking and cell-type metrics come from
:mod:`stimage_nb.evaluate` (one home for each metric). Added here, each through the field's library:

- :func:`lees_l`: agreement of the predicted and observed *maps* of each gene: Lee's L (Lee 2001), the
  bivariate spatial association of two variables, from :class:`esda.lee.Spatial_Pearson` (PySAL) with
  row-standardised k-nearest-neighbour weights (self included) from :mod:`libpysal`. L is a
  spatially smoothed Pearson correlation: with the identity as weights it is Pearson's r.
- :func:`map_ssim`: the structural similarity (Wang et al. 2004, :func:`skimage.metrics.structural_similarity`)
  of the two maps rasterised on the spot grid, each min-max scaled to [0, 1], averaged over the grid
  cells that hold a spot.
- :func:`paired_test`: a Wilcoxon signed-rank test across genes of two models' per-gene correlations
  (:func:`scipy.stats.wilcoxon`).
- :func:`bootstrap_mean_r_difference`: a percentile bootstrap over spots (:func:`scipy.stats.bootstrap`)
  of the difference in mean per-gene Pearson r between two predictions of the same spots.
"""

from __future__ import annotations

import numpy as np

from ..baseline import per_gene_pearson

LEE_K = 6          # neighbours of a spot in the Lee's L weights (a legacy ST or Visium spot has 4-6)
SSIM_WINDOW = 3    # SSIM window, in grid cells (spot grids are ~30 x 30 cells)


def spatial_weights(xy: np.ndarray, k: int = LEE_K):
    """Row-standardised k-nearest-neighbour weights with each spot its own neighbour too (libpysal), as a
    scipy sparse matrix: the spatial smoother of Lee's L."""
    import scipy.sparse as sp
    from libpysal.weights import KNN

    xy = np.asarray(xy, np.float64)
    n = len(xy)
    k = int(min(k, n - 1))
    if k < 1:
        return sp.identity(n, format="csr")
    w = KNN.from_array(xy, k=k, silence_warnings=True)
    W = w.sparse.tocsr() + sp.identity(n, format="csr")
    d = np.asarray(W.sum(1)).ravel()
    return sp.diags(1.0 / d) @ W


def lees_l(pred: np.ndarray, obs: np.ndarray, weights, *, chunk: int = 64) -> np.ndarray:
    """Lee's L between the columns of ``pred`` and ``obs`` (spots x genes, same scale), one per gene.

    ``weights`` is a sparse (n, n) matrix (:func:`spatial_weights`). Computed by
    :class:`esda.lee.Spatial_Pearson` on ``chunk`` genes at a time (its association matrix of the stacked
    columns; the predicted-vs-observed entries of each gene are read off). A column that is constant
    gives 0.
    """
    from esda.lee import Spatial_Pearson

    pred = np.asarray(pred, np.float64)
    obs = np.asarray(obs, np.float64)
    if pred.shape != obs.shape:
        raise ValueError(f"shape mismatch: {pred.shape} vs {obs.shape}")
    g = pred.shape[1]
    out = np.zeros(g)
    for a in range(0, g, chunk):
        b = min(a + chunk, g)
        sp_ = Spatial_Pearson(connectivity=weights, permutations=0).fit(pred[:, a:b], obs[:, a:b])
        c = b - a
        out[a:b] = np.diag(sp_.association_[:c, c:])
    return out


def spot_grid(xy: np.ndarray, obs=None) -> tuple[np.ndarray, tuple[int, int]]:
    """Integer grid cells (row, col) of spots, and the grid's shape.

    The array coordinates when ``obs`` (a DataFrame of the spots) has them and they are one spot per cell:
    legacy ST ``array_x``/``array_y``; Visium ``array_row``/``array_col`` (a hexagonal grid: every other
    column of a row is used, so ``array_col // 2``). Otherwise the centres ``xy`` binned at the median
    nearest-neighbour distance (cells, bins of a Visium HD or Xenium section).
    """
    from scipy.spatial import cKDTree

    if obs is not None:
        for rc, cc, half in (("array_y", "array_x", False), ("array_row", "array_col", True)):
            if rc in obs and cc in obs:
                r = np.asarray(obs[rc], dtype=np.int64)
                c = np.asarray(obs[cc], dtype=np.int64) // (2 if half else 1)
                cells = np.stack([r - r.min(), c - c.min()], 1)
                if len({(a, b) for a, b in cells}) == len(cells):
                    return cells, (int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1)
    xy = np.asarray(xy, np.float64)
    if len(xy) < 2:
        return np.zeros((len(xy), 2), int), (1, 1)
    d, _ = cKDTree(xy).query(xy, k=2)
    pitch = float(np.median(d[:, 1])) or 1.0
    cells = np.floor((xy - xy.min(0)) / pitch + 0.5).astype(int)
    shape = (int(cells[:, 1].max()) + 1, int(cells[:, 0].max()) + 1)
    return np.stack([cells[:, 1], cells[:, 0]], 1), shape


def _raster(values: np.ndarray, cells: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Mean value per grid cell (NaN where no spot)."""
    s = np.zeros(shape + values.shape[1:])
    c = np.zeros(shape)
    np.add.at(s, (cells[:, 0], cells[:, 1]), values)
    np.add.at(c, (cells[:, 0], cells[:, 1]), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return s / (c[..., None] if values.ndim > 1 else c)


def map_ssim(pred: np.ndarray, obs: np.ndarray, xy: np.ndarray, *, spots=None,
             win_size: int = SSIM_WINDOW) -> np.ndarray:
    """SSIM of the predicted and observed map of each gene (spots x genes, same scale; centres ``xy``).

    Each map is rasterised on the spot grid (:func:`spot_grid`; ``spots``: the spots' ``obs`` table, whose
    array coordinates are used when it has them), min-max scaled to [0, 1] over its spots
    (a constant map is 0), empty cells set to 0, and compared with :func:`skimage.metrics.
    structural_similarity` (``win_size`` cells, ``data_range=1``); the SSIM image is averaged over the
    cells that hold a spot. 1 = the same map.
    """
    from skimage.metrics import structural_similarity

    pred = np.asarray(pred, np.float64)
    obs = np.asarray(obs, np.float64)
    cells, shape = spot_grid(xy, spots)
    w = min(win_size, *shape)
    w = w if w % 2 else w - 1
    out = np.full(pred.shape[1], np.nan)
    if w < 3:
        return out
    A, B = _raster(pred, cells, shape), _raster(obs, cells, shape)
    occupied = np.isfinite(A[..., 0])

    def scale(m):
        lo, hi = np.nanmin(m, axis=(0, 1)), np.nanmax(m, axis=(0, 1))
        r = np.where(hi - lo > 1e-12, hi - lo, 1.0)
        return np.nan_to_num((m - lo) / r, nan=0.0) * (hi - lo > 1e-12)

    A, B = scale(A), scale(B)
    for j in range(pred.shape[1]):
        _, S = structural_similarity(A[..., j], B[..., j], win_size=w, data_range=1.0, full=True)
        out[j] = float(S[occupied].mean())
    return out


def paired_test(a: np.ndarray, b: np.ndarray) -> dict:
    """Wilcoxon signed-rank test across genes of paired per-gene scores ``a`` vs ``b`` (NaN counts as 0, the
    convention of :func:`stimage_nb.evaluate.summarize`).

    Returns ``mean_difference`` (a - b), ``median_difference``, ``n`` (genes), ``p_two_sided`` and
    ``p_greater`` (the one-sided p that a > b), and ``statistic``; p-values are ``None`` when every pair ties.
    """
    from scipy.stats import wilcoxon

    a = np.nan_to_num(np.asarray(a, np.float64), nan=0.0)
    b = np.nan_to_num(np.asarray(b, np.float64), nan=0.0)
    d = a - b
    out = {"mean_difference": float(d.mean()) if d.size else None,
           "median_difference": float(np.median(d)) if d.size else None, "n": int(d.size),
           "statistic": None, "p_two_sided": None, "p_greater": None}
    if d.size == 0 or not np.any(np.abs(d) > 0):
        return out
    two = wilcoxon(a, b, alternative="two-sided")
    out["statistic"] = float(two.statistic)
    out["p_two_sided"] = float(two.pvalue)
    out["p_greater"] = float(wilcoxon(a, b, alternative="greater").pvalue)
    return out


def bootstrap_mean_r_difference(pred_a: np.ndarray, pred_b: np.ndarray, obs: np.ndarray, *, n_resamples: int = 200,
                                confidence: float = 0.95, seed: int = 0) -> dict:
    """Difference in mean per-gene Pearson r, ``a`` minus ``b`` (spots x genes on the scored scale), with a
    percentile bootstrap confidence interval over spots (:func:`scipy.stats.bootstrap`, the spots resampled
    with replacement, both predictions scored on the same resample; genes constant in a resample count as
    r = 0, :func:`stimage_nb.baseline.per_gene_pearson`).

    Returns ``difference``, ``ci_low``, ``ci_high``, ``confidence`` and ``n_resamples``.
    """
    from scipy.stats import bootstrap

    pa, pb, o = (np.asarray(v, np.float64) for v in (pred_a, pred_b, obs))

    def stat(idx):
        idx = np.asarray(idx, int)
        return float(per_gene_pearson(pa[idx], o[idx]).mean() - per_gene_pearson(pb[idx], o[idx]).mean())

    full = stat(np.arange(len(o)))
    out = {"difference": full, "ci_low": None, "ci_high": None, "confidence": confidence,
           "n_resamples": int(n_resamples)}
    if len(o) < 4 or n_resamples < 10:
        return out
    res = bootstrap((np.arange(len(o)),), stat, n_resamples=int(n_resamples), confidence_level=confidence,
                    method="percentile", vectorized=False, rng=np.random.default_rng(seed))
    out["ci_low"], out["ci_high"] = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return out
