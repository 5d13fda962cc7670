"""Evaluate predictions against observed counts: correlations, calibration, cell types, a baseline.

:func:`evaluate` reads every ``PRED_DIR/<section>.h5ad`` written by :func:`stimage_nb.predict.predict_manifest`,
matches it to the section's observed counts in a manifest, and writes ``metrics.json`` (summaries),
``metrics_per_gene.csv`` (one row per section x model x target x gene) and figures.

Protocol (recorded in ``metrics.json["protocol"]``)
---------------------------------------------------
Gene expression, per gene and held-out section, across the section's spots:

- ``log1p_counts`` (**the STimage protocol**): Pearson and Spearman correlation of
  ``log1p(predicted mean)`` with ``log1p(observed counts)``. Both sides are on the same scale; the
  prediction is the predictive mean (expected counts, ``X``), so a model that predicts the counts
  exactly scores r = 1. This metric is dominated by spot depth (cellularity): spots with more nuclei
  have more UMIs for nearly every gene.
- ``log1p_cp10k`` (gene-specific, depth-normalised): the same correlations after scaling every spot to
  10,000 counts *over the evaluated gene panel*, for both the observed counts and the predicted means
  (``log1p(1e4 * y / sum_panel(y))`` vs ``log1p(1e4 * mu / sum_panel(mu))``). The panel (not the whole
  transcriptome) is used on both sides because the prediction has no genes outside it; it removes what
  a per-spot depth explains and keeps the gene-specific part.

Summaries per section and target: mean and median correlation over genes, and the number of genes with
r > 0.3. A gene constant in the observed or the predicted values has no correlation: it is NaN in
``metrics_per_gene.csv``, counts as r = 0 in the summaries (as in :mod:`stimage_nb.baseline`, so all
methods are averaged over the same genes) and is counted in ``n_undefined``.

Calibration of the predictive distribution of counts: each spot x gene is given a negative binomial
**moment-matched** to mean ``m = X`` and variance ``v = aleatoric_var + epistemic_var`` (size
``r = m^2 / (v - m)``; a Poisson with mean ``m`` when ``v <= m``). Reported:

- ``coverage_50`` / ``coverage_90``: the fraction of observed counts inside the central 50% / 90%
  prediction interval, measured with the randomised probability integral transform of
  Czado, Gneiting & Held (2009) (taken in expectation, so it is deterministic). For discrete counts this
  is the version that equals the nominal level when the predictive distribution is right; the naive
  quantile interval ``[F^-1(0.25), F^-1(0.75)]`` over-covers low counts. That naive number is also
  reported as ``interval_coverage_50/90``.
- ``nll``: mean negative log-likelihood per spot and gene (nats).
- ``curve``: empirical vs nominal coverage at levels 0.1 ... 0.99.
- the same with the aleatoric variance only (``aleatoric_only``), to show what the epistemic part adds.
- ``depth``: median per-spot counts over the panel, observed and predicted. Calibration is judged on
  raw counts, so a section sequenced at another depth than the training sections (her2st patient B has
  ~15x fewer UMIs per spot than patient C) is miscalibrated however good the relative prediction is.

Uncertainty ranking (``uncertainty_ranking``): calibration is an average; a user also wants to know
*which* predictions to trust. Per section: across genes, the Spearman correlation of a gene's relative
predictive SD with its Pearson r (negative = the uncertain genes are the worse-predicted ones), and the
mean r of the half of the genes the model is most certain of, beside the half with the highest
predicted expression (the obvious proxy, a baseline the uncertainty has to beat to be worth more than
expression level); across spots, for every gene, the mean |log1p error| of the 80% of spots with the
smallest log-scale SD relative to all spots (1 = a random choice, the oracle ranks by the error itself;
the baseline keeps the spots with the most predicted counts).

Cell types (when the prediction has ``obsm["celltype_mean"]`` and the section has proportions):
Pearson per type across spots, mean absolute error over spots and types, mean Jensen-Shannon divergence
per spot (base 2, in [0, 1]) and the agreement of the dominant type.

Baseline (``baseline=True``): a ridge regression on handcrafted colour/texture features of the same
tiles (:mod:`stimage_nb.baseline`), trained in the same run on the prediction's training sections
(``uns["stimage_nb"]["train_sections"]``) from the same manifest, with the same tile size in µm and
pixels, and scored with the same metrics on the same held-out spots. It regresses ``log1p`` counts, so
its own ``log1p`` output is scored for ``log1p_counts`` (the numbers equal
:func:`stimage_nb.baseline.evaluate_baseline`'s) and ``expm1`` of it (floored at 0) is its expected count
for ``log1p_cp10k``. It has no predictive distribution, so it gets correlations (and cell-type metrics)
but no calibration.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from . import _keys as K
from .atomic import save_figure, write_csv, write_json
from .errors import StimageInputError
from .names import name_of_file

log = logging.getLogger(__name__)

TARGETS = ("log1p_counts", "log1p_cp10k")
R_THRESHOLD = 0.3
COVERAGE_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
RETAINED_FRACTIONS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)  # sparsification curves
_EPS = 1e-8

__all__ = [
    "evaluate", "transform", "correlations", "summarize", "nb_logpmf", "nb_cdf", "pit_coverage", "pit_histogram",
    "calibration", "uncertainty_ranking", "celltype_metrics", "score_genes", "TARGETS",
]


# ----------------------------------------------------------------------------- gene correlations
def transform(mean_counts: np.ndarray, target: str) -> np.ndarray:
    """Map a spots x genes matrix of (expected) counts to the scale a target is scored on.

    Parameters
    ----------
    mean_counts
        Observed counts or predicted means (spots x genes, non-negative).
    target
        ``"log1p_counts"`` or ``"log1p_cp10k"`` (see the module docstring).
    """
    Y = np.clip(np.asarray(mean_counts, dtype=np.float64), 0, None)
    if target == "log1p_counts":
        return np.log1p(Y)
    if target == "log1p_cp10k":
        tot = Y.sum(axis=1, keepdims=True)
        return np.log1p(np.divide(1e4 * Y, tot, out=np.zeros_like(Y), where=tot > 0))
    raise ValueError(f"unknown target {target!r}; use one of {TARGETS}")


def _colwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # a column that is constant (to rounding, relative to its magnitude) has no correlation
    const_a = np.ptp(a, axis=0) <= 1e-9 * np.maximum(1.0, np.abs(a).max(axis=0))
    const_b = np.ptp(b, axis=0) <= 1e-9 * np.maximum(1.0, np.abs(b).max(axis=0))
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    num = (a * b).sum(axis=0)
    den = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    ok = (den > 0) & ~const_a & ~const_b
    r = np.full(a.shape[1], np.nan)
    r[ok] = np.clip(num[ok] / den[ok], -1.0, 1.0)
    return r


def correlations(pred: np.ndarray, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column Pearson and Spearman correlation of two spots x genes matrices.

    Returns two arrays of length n_genes; NaN where either column is constant.
    """
    from scipy.stats import rankdata

    pred = np.asarray(pred, dtype=np.float64)
    obs = np.asarray(obs, dtype=np.float64)
    if pred.shape != obs.shape:
        raise ValueError(f"shape mismatch: predicted {pred.shape} vs observed {obs.shape}")
    if pred.shape[0] < 3:
        n = pred.shape[1]
        return np.full(n, np.nan), np.full(n, np.nan)
    pearson = _colwise_pearson(pred, obs)
    spearman = _colwise_pearson(rankdata(pred, axis=0), rankdata(obs, axis=0))
    return pearson, spearman


def summarize(r: np.ndarray, threshold: float = R_THRESHOLD) -> dict:
    """Mean, median and count above ``threshold`` of per-gene correlations.

    Undefined correlations (NaN: a gene constant in the observed or the predicted values) count as
    r = 0, the convention of :func:`stimage_nb.baseline.per_gene_pearson`, so every method is averaged
    over the same genes and a constant prediction is not rewarded by being left out. Their number is
    reported as ``n_undefined``.
    """
    r = np.asarray(r, dtype=np.float64)
    ok = np.isfinite(r)
    v = np.where(ok, r, 0.0)
    return {
        "mean": float(v.mean()) if v.size else None,
        "median": float(np.median(v)) if v.size else None,
        f"n_r_gt_{threshold:g}": int((v > threshold).sum()),
        "n_genes": int(r.size),
        "n_undefined": int((~ok).sum()),
    }


def score_genes(pred_mean: np.ndarray, counts: np.ndarray, genes: Sequence[str], *,
                pred_on_scale: dict | None = None) -> tuple[pd.DataFrame, dict]:
    """Per-gene correlations for every target, plus their summaries.

    Parameters
    ----------
    pred_mean
        Predicted expected counts, spots x genes.
    counts
        Observed counts, same shape and order.
    genes
        Gene names (columns).
    pred_on_scale
        ``{target: matrix}`` predictions already on a target's scale, used instead of
        ``transform(pred_mean, target)`` (the ridge baseline predicts ``log1p`` counts directly).

    Returns
    -------
    A DataFrame (columns target, gene, pearson, spearman) and ``{target: {"pearson": summary,
    "spearman": summary}}``.
    """
    rows, summ = [], {}
    for t in TARGETS:
        pt = (pred_on_scale or {}).get(t)
        p, s = correlations(transform(pred_mean, t) if pt is None else pt, transform(counts, t))
        rows.append(pd.DataFrame({"target": t, "gene": list(genes), "pearson": p, "spearman": s}))
        summ[t] = {"pearson": summarize(p), "spearman": summarize(s)}
    return pd.concat(rows, ignore_index=True), summ


# ----------------------------------------------------------------------------- calibration
def _nb_size(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """NB size r from moments; ``inf`` (Poisson) where var <= mean."""
    excess = var - mean
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(excess > 1e-9 * np.maximum(mean, 1e-12), mean ** 2 / excess, np.inf)
    return r


def _nb_args(x, mean: np.ndarray, var: np.ndarray):
    """``x`` (counts, or ``None``), the mean (floored at a tiny positive value) and the NB size ``r``,
    broadcast together, and the mask of the Poisson entries (var <= mean)."""
    m = np.maximum(np.asarray(mean, dtype=np.float64), _EPS)
    v = np.asarray(var, dtype=np.float64)
    if x is None:
        m, v = np.broadcast_arrays(m, v)
    else:
        x, m, v = np.broadcast_arrays(np.asarray(x, dtype=np.float64), m, v)
    r = _nb_size(m, v)
    return x, m, r, ~np.isfinite(r)


def nb_logpmf(y: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """log P(y) under the negative binomial with the given mean and variance (Poisson if var <= mean)."""
    from scipy.special import gammaln, xlogy

    y, m, r, pois = _nb_args(y, mean, var)
    out = np.empty(y.shape)
    if pois.any():
        yy, mm = y[pois], m[pois]
        out[pois] = xlogy(yy, mm) - mm - gammaln(yy + 1)
    nb = ~pois
    if nb.any():
        yy, mm, rr = y[nb], m[nb], r[nb]
        out[nb] = (gammaln(yy + rr) - gammaln(rr) - gammaln(yy + 1)
                   + rr * (np.log(rr) - np.log(rr + mm)) + xlogy(yy, mm) - yy * np.log(rr + mm))
    return out


def nb_cdf(k: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """P(Y <= k) under the moment-matched negative binomial (0 for k < 0)."""
    from scipy.stats import nbinom, poisson

    k, m, r, pois = _nb_args(k, mean, var)
    out = np.zeros(k.shape)
    if pois.any():
        out[pois] = poisson.cdf(k[pois], m[pois])
    nb = ~pois
    if nb.any():
        out[nb] = nbinom.cdf(k[nb], r[nb], r[nb] / (r[nb] + m[nb]))
    return np.where(k < 0, 0.0, out)


def nb_ppf(q: float, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Quantile function of the moment-matched negative binomial."""
    from scipy.stats import nbinom, poisson

    _, m, r, pois = _nb_args(None, mean, var)
    out = np.zeros(m.shape)
    if pois.any():
        out[pois] = poisson.ppf(q, m[pois])
    nb = ~pois
    if nb.any():
        out[nb] = nbinom.ppf(q, r[nb], r[nb] / (r[nb] + m[nb]))
    return out


def _coverages(y, mean, var, levels) -> tuple[np.ndarray, np.ndarray]:
    """(randomised-PIT coverage, naive quantile-interval coverage) per level."""
    y = np.asarray(y, dtype=np.float64).ravel()
    m = np.asarray(mean, dtype=np.float64).ravel()
    v = np.asarray(var, dtype=np.float64).ravel()
    hi = nb_cdf(y, m, v)
    lo = nb_cdf(y - 1, m, v)
    width = hi - lo
    pit, naive = [], []
    for a in levels:
        a0, a1 = (1 - a) / 2, (1 + a) / 2
        overlap = np.clip(np.minimum(hi, a1) - np.maximum(lo, a0), 0, None)
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(width > 1e-12, overlap / width, ((hi >= a0) & (hi <= a1)).astype(float))
        pit.append(float(np.mean(frac)) if frac.size else float("nan"))
        # y in [F^-1(a0), F^-1(a1)]  <=>  F(y) >= a0 and F(y - 1) < a1
        naive.append(float(np.mean((hi >= a0) & (lo < a1))) if y.size else float("nan"))
    return np.asarray(pit), np.asarray(naive)


def pit_coverage(y: np.ndarray, mean: np.ndarray, var: np.ndarray,
                 levels: Sequence[float] = COVERAGE_LEVELS) -> np.ndarray:
    """Empirical coverage of central prediction intervals, via the randomised PIT in expectation.

    For a count ``y`` with predictive CDF ``F``, the randomised PIT is uniform on
    ``[F(y-1), F(y)]``; the probability that it falls in the central interval
    ``[(1-a)/2, (1+a)/2]`` is the overlap of the two intervals divided by ``F(y) - F(y-1)``.
    Averaged over observations this equals ``a`` when the predictive distribution is correct.

    Returns an array with one coverage per level.
    """
    return _coverages(y, mean, var, levels)[0]


def pit_histogram(y: np.ndarray, mean: np.ndarray, var: np.ndarray, bins: int = 10) -> np.ndarray:
    """The non-randomised PIT histogram of counts (Czado, Gneiting & Held 2009): the fraction of the
    observations' probability integral transform in each of ``bins`` equal bins of [0, 1].

    For a count ``y`` with predictive CDF ``F`` the randomised PIT is uniform on ``[F(y-1), F(y)]``; each
    observation adds the share of that interval lying in each bin (its expectation, so the histogram is
    deterministic). Flat at ``1 / bins`` when the predictive distribution is right; U-shaped when the
    intervals are too narrow, a hump when too wide, tilted when the mean is biased.
    """
    y = np.asarray(y, dtype=np.float64).ravel()
    m = np.asarray(mean, dtype=np.float64).ravel()
    v = np.asarray(var, dtype=np.float64).ravel()
    hi = nb_cdf(y, m, v)
    lo = nb_cdf(y - 1, m, v)
    width = hi - lo
    edges = np.linspace(0.0, 1.0, int(bins) + 1)
    out = np.empty(int(bins))
    for k in range(int(bins)):
        a0, a1 = edges[k], edges[k + 1]
        overlap = np.clip(np.minimum(hi, a1) - np.maximum(lo, a0), 0, None)
        with np.errstate(divide="ignore", invalid="ignore"):
            point = (hi >= a0) & ((hi < a1) if k < bins - 1 else (hi <= a1))
            frac = np.where(width > 1e-12, overlap / width, point.astype(float))
        out[k] = float(np.mean(frac)) if frac.size else float("nan")
    return out


def calibration(y: np.ndarray, mean: np.ndarray, aleatoric: np.ndarray, epistemic: np.ndarray | None = None,
                levels: Sequence[float] = COVERAGE_LEVELS) -> dict:
    """Calibration of the moment-matched NB predictive distribution (see the module docstring).

    Parameters
    ----------
    y
        Observed counts (spots x genes).
    mean
        Predictive mean.
    aleatoric, epistemic
        Variance components; ``epistemic=None`` scores the aleatoric part only.
    levels
        Nominal central-interval levels of the calibration curve (0.5 and 0.9 are always reported).

    Returns
    -------
    ``coverage_50``, ``coverage_90`` (randomised PIT), ``interval_coverage_50/90`` (naive quantile
    interval), ``nll`` (mean per spot and gene, nats) and ``curve`` (nominal vs empirical).
    """
    y = np.asarray(y, dtype=np.float64)
    var = np.asarray(aleatoric, dtype=np.float64)
    if epistemic is not None:
        var = var + np.asarray(epistemic, dtype=np.float64)
    var = np.maximum(var, 0)
    levels = sorted(set(float(a) for a in levels) | {0.5, 0.9})
    pit, naive = _coverages(y, mean, var, levels)
    i50, i90 = levels.index(0.5), levels.index(0.9)
    return {
        "coverage_50": float(pit[i50]),
        "coverage_90": float(pit[i90]),
        "interval_coverage_50": float(naive[i50]),
        "interval_coverage_90": float(naive[i90]),
        "nll": float(-np.mean(nb_logpmf(y, mean, var))),
        "curve": {"nominal": levels, "empirical": [float(c) for c in pit]},
    }


# ----------------------------------------------------------------------------- uncertainty ranking
def uncertainty_ranking(y: np.ndarray, mean: np.ndarray, aleatoric: np.ndarray, epistemic: np.ndarray,
                        keep: float = 0.5, retain: float = 0.8) -> dict:
    """Does the predicted uncertainty point at the worse predictions, and better than the obvious proxy?

    Calibration says the intervals are as wide as they should be on average; this says whether the
    uncertainty tells a user *which* genes and spots to trust (see the module docstring).

    Parameters
    ----------
    y, mean, aleatoric, epistemic
        Observed counts, predictive mean and the two variances (spots x genes).
    keep
        Fraction of genes kept by each gene filter.
    retain
        Fraction of spots kept, per gene, by each spot ranking.

    Returns
    -------
    ``genes``: Spearman correlation across genes of the relative predictive SD (``sqrt(mean var) /
    mean``; total and epistemic only) with the gene's Pearson r (log1p counts), and the mean r of all
    genes, of the ``keep`` most certain, and of the ``keep`` most expressed (the baseline filter).
    ``spots``: per gene, spots ranked by their SD on the log1p scale (delta method,
    ``sqrt(var) / (1 + mean)``); the mean |log1p error| of the ``retain`` most certain spots divided by
    that of all spots, averaged over genes (1 = no better than a random choice), for the total and the
    epistemic SD, for the oracle that ranks by the error itself and for the baseline that keeps the
    spots with the highest predicted panel depth; and the median over genes of the
    Spearman correlation between a spot's SD and its error. ``spots["curve"]``: the same ratio at every
    fraction of :data:`RETAINED_FRACTIONS` for each ranking (a sparsification curve).
    """
    from scipy.stats import rankdata, spearmanr

    y = np.asarray(y, dtype=np.float64)
    mu = np.asarray(mean, dtype=np.float64)
    var_t = np.maximum(np.asarray(aleatoric, dtype=np.float64) + np.asarray(epistemic, dtype=np.float64), 0)
    var_e = np.maximum(np.asarray(epistemic, dtype=np.float64), 0)
    n, g = y.shape
    if n == 0 or g == 0:
        raise ValueError(f"uncertainty_ranking needs spots and genes, got {y.shape}")
    r = np.nan_to_num(correlations(np.log1p(mu), np.log1p(y))[0], nan=0.0)
    m = np.maximum(mu.mean(0), _EPS)
    rel_t, rel_e = np.sqrt(var_t.mean(0)) / m, np.sqrt(var_e.mean(0)) / m
    k = max(1, int(round(keep * g)))

    def rho(a, b):
        return float(spearmanr(a, b)[0]) if g >= 3 and np.ptp(a) > 0 and np.ptp(b) > 0 else None

    genes = {
        "spearman_relative_sd_vs_r": rho(rel_t, r),
        "spearman_relative_epistemic_sd_vs_r": rho(rel_e, r),
        "spearman_mean_expression_vs_r": rho(m, r),
        "mean_r_all": float(r.mean()),
        f"mean_r_most_certain_{keep:g}": float(r[np.argsort(rel_t, kind="stable")[:k]].mean()),
        f"mean_r_most_expressed_{keep:g}": float(r[np.argsort(-m, kind="stable")[:k]].mean()),
    }
    err = np.abs(np.log1p(y) - np.log1p(mu))
    tot = err.sum(0)
    ok = tot > 0
    sd_t, sd_e = np.sqrt(var_t) / (1 + mu), np.sqrt(var_e) / (1 + mu)
    # the obvious proxy: trust the spots with the most predicted counts over the panel (cellularity)
    rankings = {"sd": sd_t, "epistemic_sd": sd_e, "predicted_depth": np.broadcast_to(-mu.sum(1, keepdims=True), mu.shape),
                "oracle": err}
    # per gene, cumulative mean error of the spots in each ranking's order (most certain first)
    cum = {k: np.cumsum(np.take_along_axis(err[:, ok], np.argsort(v[:, ok], axis=0, kind="stable"), axis=0), axis=0)
           for k, v in rankings.items()}

    def retained(name, frac):
        j = max(1, int(round(frac * n)))
        return float((cum[name][j - 1] / j / (tot[ok] / n)).mean()) if ok.any() else None

    per_gene = _colwise_pearson(rankdata(sd_t[:, ok], axis=0), rankdata(err[:, ok], axis=0))
    spots = {
        **{f"error_retained_{retain:g}_{'oracle' if k == 'oracle' else 'by_' + k}": retained(k, retain) for k in rankings},
        "spearman_sd_vs_abs_error_median": float(np.nanmedian(per_gene)) if np.isfinite(per_gene).any() else None,
        "curve": {"retained": list(RETAINED_FRACTIONS),
                  **{k: [retained(k, f) for f in RETAINED_FRACTIONS] for k in rankings}},
    }
    return {"genes": genes, "spots": spots}


# ----------------------------------------------------------------------------- cell types
def celltype_metrics(pred: pd.DataFrame, obs: pd.DataFrame) -> dict | None:
    """Cell-type proportions: Pearson per type, MAE, mean Jensen-Shannon divergence, dominant-type agreement.

    Both frames are spots x types; rows and columns are aligned by name (shared types only) and rows with
    missing targets are dropped. Returns ``None`` when nothing is shared.
    """
    types = [c for c in obs.columns if c in set(pred.columns)]
    rows = obs.index.intersection(pred.index)
    if not types or len(rows) == 0:
        return None
    P = pred.loc[rows, types].to_numpy(dtype=np.float64)
    Q = obs.loc[rows, types].to_numpy(dtype=np.float64)
    ok = np.isfinite(Q).all(axis=1) & np.isfinite(P).all(axis=1)
    P, Q = P[ok], Q[ok]
    if len(P) == 0:
        return None
    p_n = P / np.clip(P.sum(1, keepdims=True), 1e-12, None)
    q_n = Q / np.clip(Q.sum(1, keepdims=True), 1e-12, None)
    r, _ = correlations(P, Q)
    M = 0.5 * (p_n + q_n)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = lambda a, b: np.where(a > 0, a * np.log2(np.where(a > 0, a, 1) / np.where(b > 0, b, 1)), 0).sum(1)  # noqa: E731
        js = 0.5 * kl(p_n, M) + 0.5 * kl(q_n, M)
    return {
        "n_spots": int(len(P)),
        "types": types,
        "pearson": {t: (None if not np.isfinite(v) else float(v)) for t, v in zip(types, r)},
        "pearson_summary": summarize(r),
        "mae": float(np.mean(np.abs(p_n - q_n))),
        "js_divergence": float(np.mean(np.clip(js, 0, 1))),
        "dominant_agreement": float(np.mean(p_n.argmax(1) == q_n.argmax(1))),
    }


# ----------------------------------------------------------------------------- I/O helpers
def _json_default(o):
    if isinstance(o, (np.floating,)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _clean(o):
    """Replace non-finite floats by None so the JSON is strict."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    return o


def write_json_atomic(obj, path: str | os.PathLike) -> Path:
    """Write JSON via a temporary file and ``os.replace``."""
    return write_json(path, _clean(obj), indent=1, default=_json_default, allow_nan=False)


def _dense(X) -> np.ndarray:
    import scipy.sparse as sp

    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)


def _pred_files(pred_dir: Path, sections: Iterable[str] | None) -> list[Path]:
    if not pred_dir.is_dir():
        raise StimageInputError(f"{pred_dir}: prediction directory not found. Run `stimage-nb predict ... "
                                f"--out {pred_dir}` first.")
    files = sorted(p for p in pred_dir.glob("*.h5ad") if not p.name.startswith("."))
    if sections is not None:
        want = list(sections)
        files = [p for p in files if name_of_file(p, ".h5ad") in want]
        missing = sorted(set(want) - {name_of_file(p, ".h5ad") for p in files})
        if missing:
            raise StimageInputError(f"{pred_dir}: no predictions for sections {missing}.")
    if not files:
        raise StimageInputError(f"{pred_dir}: no <section>.h5ad prediction files. Run `stimage-nb predict` "
                                "with --out pointing here first.")
    return files


def _check_pred(adata, path: Path) -> dict:
    prov = dict(adata.uns.get(K.UNS, {}))
    for layer in (K.EPISTEMIC,):  # aleatoric_var is absent for point predictors (e.g. imported Path2Space)
        if layer not in adata.layers:
            raise StimageInputError(f"{path}: prediction lacks layers[{layer!r}]; was it written by "
                                    "`stimage-nb predict`?")
    return prov


# ----------------------------------------------------------------------------- baseline
class _BaselineCache:
    """Fit the ridge baseline once per (training sections, genes, tile geometry) within a run."""

    def __init__(self, manifest: Path, progress: bool, train_manifest: str | os.PathLike | None = None):
        self.manifest = manifest
        self.train_manifest = train_manifest
        self.progress = progress
        self._fitted: dict = {}
        self._located: dict = {}

    def locate(self, prov: dict, train_sections: Sequence[str]):
        """Where the model's training sections are (:func:`stimage_nb.io.provenance.locate_training_data`)."""
        from .io.provenance import TrainingData, locate_training_data, record_from_json

        raw = prov.get("training_data")
        key = (str(raw), tuple(train_sections))
        if key not in self._located and prov.get("baseline_sections"):  # named by the user: not the model's own
            self._located[key] = TrainingData(Path(self.train_manifest or self.manifest), "--baseline-sections", False,
                                              "sections named by the user, read by name")
        if key not in self._located:
            self._located[key] = locate_training_data(record_from_json(raw), train_sections,
                                                      evaluation_manifest=self.manifest,
                                                      train_manifest=self.train_manifest)
            td = self._located[key]
            log.info("baseline training sections %s from the %s %s%s", list(train_sections), td.source, td.manifest,
                     "" if td.verified else f" ({td.note})" if td.note else " (files not checked)")
        return self._located[key]

    def predict(self, train_sections: Sequence[str], genes: Sequence[str], tile_um: float, out_px: int, section,
                prov: dict | None = None):
        """The fitted baseline and its :class:`~stimage_nb.baseline.BaselinePrediction` for ``section``."""
        from .baseline import RidgeBaseline
        from .io.readers import read_manifest

        td = self.locate(prov or {}, train_sections)
        key = (str(td.manifest), tuple(train_sections), tuple(genes), float(tile_um), int(out_px))
        if key not in self._fitted:
            log.info("fitting the ridge baseline on %s (%d genes, %g µm tiles at %d px)",
                     list(train_sections), len(genes), tile_um, out_px)
            train = read_manifest(td.manifest, list(train_sections), genes=list(genes))
            self._fitted[key] = RidgeBaseline(tile_um=tile_um, out_px=out_px).fit(train, progress=self.progress)
        rb = self._fitted[key]
        return rb, rb.predict_sections([section], progress=self.progress)[section.name]


# ----------------------------------------------------------------------------- main entry point
def evaluate(pred_dir: str | os.PathLike, manifest: str | os.PathLike, out: str | os.PathLike | None = None,
             baseline: bool = True, *, sections: Sequence[str] | None = None, figures: bool = True,
             progress: bool = True, baseline_sections: Sequence[str] | None = None,
             train_manifest: str | os.PathLike | None = None) -> dict:
    """Score the predictions in ``pred_dir`` against the observed data of ``manifest``.

    Parameters
    ----------
    pred_dir
        Folder of ``<section>.h5ad`` predictions (``stimage-nb predict --out``).
    manifest
        The manifest CSV holding the same sections with their counts (rows without counts are skipped
        with a note).
    out
        Where ``metrics.json``, ``metrics_per_gene.csv`` and ``figures/`` go (default: ``pred_dir``).
    baseline
        Also train and score the ridge baseline (see the module docstring) in the same run.
    sections
        Evaluate only these sections (default: every prediction file).
    figures
        Write the correlation-distribution and calibration figures.
    progress
        Show progress bars.
    baseline_sections
        Train the baseline on these manifest sections instead of the prediction's training sections (a
        model trained elsewhere, e.g. an imported Path2Space model, records none).
    train_manifest
        Where the model's training sections are, for the baseline (default: found from the record
        the model keeps of its training files, :mod:`stimage_nb.io.provenance`: the recorded manifest,
        else this ``manifest`` when it holds the same files). Needed only when neither holds them.

    Returns
    -------
    The content of ``metrics.json`` (a JSON-compatible dict). When the baseline cannot be trained
    (its training sections cannot be found), each section's ``baseline`` says why in ``skipped``.
    """
    from .io.prediction import read_prediction
    from .io.readers import read_manifest

    pred_dir = Path(pred_dir)
    manifest = Path(manifest)
    files = _pred_files(pred_dir, sections)
    out = Path(out) if out is not None else pred_dir
    out.mkdir(parents=True, exist_ok=True)
    bl = _BaselineCache(manifest, progress, train_manifest) if baseline else None
    patients = _manifest_patients(manifest)

    result: dict = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "package_version": _package_version(),
        "pred_dir": str(pred_dir.resolve()),
        "manifest": str(manifest.resolve()),
        "protocol": PROTOCOL,
        "sections": {},
        "skipped": {},
    }
    per_gene: list[pd.DataFrame] = []
    it = files
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(files, desc="evaluate", leave=False)
    for path in it:
        pred = read_prediction(path)  # one clear error for a file that is not a prediction
        prov = _check_pred(pred, path)
        name = str(prov.get("section") or name_of_file(path, ".h5ad"))
        genes = [str(g) for g in pred.var_names]
        try:
            (sec,) = read_manifest(manifest, [name], genes=genes, drop_missing_genes=True)
        except StimageInputError as e:
            if "unknown sections" in str(e):
                result["skipped"][name] = f"section {name!r} is not in the manifest {manifest}"
                log.warning("%s: skipped (not in the manifest)", name)
                continue
            raise
        if not sec.has_counts:
            result["skipped"][name] = f"the manifest row of {name!r} has no counts; nothing to compare with"
            log.warning("%s: skipped (no counts in %s)", name, manifest)
            continue
        if baseline_sections:
            prov["baseline_sections"] = list(baseline_sections)
        entry, df = _evaluate_section(pred, sec, prov, bl, path, patients)
        result["sections"][name] = entry
        per_gene.append(df.assign(section=name))

    result["summary"] = _overall(result["sections"])
    if per_gene:
        pg = pd.concat(per_gene, ignore_index=True)[["section", "model", "target", "gene", "pearson", "spearman"]]
        result["per_gene_csv"] = str(write_csv(pg, out / "metrics_per_gene.csv"))
    else:
        pg = None
    if figures and result["sections"]:
        result["figures"] = _figures(result, pg, out)
    write_json_atomic(result, out / "metrics.json")
    log.info("wrote %s", out / "metrics.json")
    return _clean(result)


PROTOCOL = {
    "log1p_counts": "Pearson/Spearman per gene across spots of log1p(predicted mean) vs log1p(observed counts) "
                    "(STimage protocol; dominated by spot depth)",
    "log1p_cp10k": "the same after scaling each spot to 1e4 counts over the evaluated gene panel, for both observed "
                   "counts and predicted means (depth-normalised, gene-specific)",
    "summary": f"mean/median over genes with a defined correlation; n_r_gt_{R_THRESHOLD:g} = genes with r > {R_THRESHOLD}",
    "calibration": "negative binomial moment-matched to mean = X and variance = aleatoric_var + epistemic_var "
                   "(Poisson where variance <= mean); coverage_50/90 = randomised-PIT coverage of the central "
                   "50%/90% intervals (in expectation); interval_coverage_* = naive quantile-interval coverage "
                   "(conservative for discrete counts); nll = mean negative log-likelihood (nats) per spot and gene; "
                   "aleatoric_only = the same with variance = aleatoric_var",
    "uncertainty_ranking": "genes: Spearman across genes of relative predictive SD sqrt(mean var)/mean with "
                           "Pearson r (log1p counts); mean r of the half of genes with the smallest relative SD "
                           "vs the half with the highest predicted mean (baseline proxy). spots: per gene, mean "
                           "|log1p error| of the 80% of spots with the smallest log-scale SD sqrt(var)/(1+mean) "
                           "over that of all spots (1 = random; oracle ranks by the error; baseline keeps the spots with "
                           "the highest predicted panel depth), averaged over genes",
    "celltypes": "per-type Pearson across spots of predicted mean probability vs proportion; mae over spots and types; "
                 "mean Jensen-Shannon divergence (base 2) per spot; dominant_agreement = argmax match rate",
    "baseline": "ridge regression on handcrafted colour/texture features of the same tiles (stimage_nb.baseline), "
                "trained in the same run on the prediction's train_sections with the same tile_um/out_px",
}


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("stimage_nb")
    except Exception:  # noqa: BLE001
        return "unknown"


def _as_list(v) -> list[str]:
    """A provenance list (h5ad stores lists as arrays, a single name as a string)."""
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    return [str(x) for x in np.asarray(v).ravel().tolist()]


def _is_training_section(sec, prov: dict, train_sections: Sequence[str]) -> bool:
    """Was ``sec`` trained on? By its image's sha256 when the model records its files (a section of another lab
    may share a training section's name), else by name."""
    from .io.provenance import record_from_json, sha256_file

    rec = record_from_json(prov.get("training_data"))
    if rec is None or sec.image_path is None or not Path(sec.image_path).is_file():
        return sec.name in train_sections
    sha = sha256_file(sec.image_path)
    return any(f.get("role") == "image" and f.get("sha256") == sha
               for r in rec.get("sections", []) if r.get("section") in set(train_sections) for f in r.get("files", []))


def _recorded_patients(prov: dict) -> set[str]:
    """Patients of the training sections as the model recorded them (another lab's manifest lacks them)."""
    from .io.provenance import record_from_json

    rec = record_from_json(prov.get("training_data")) or {}
    train = set(_as_list(prov.get("train_sections")))
    return {str(r["patient"]) for r in rec.get("sections", []) if r.get("patient") and r.get("section") in train}


def _manifest_patients(manifest: Path) -> dict:
    try:
        m = pd.read_csv(manifest, dtype=str)
    except Exception:  # noqa: BLE001 - read_manifest reports a bad manifest properly
        return {}
    if "patient" not in m.columns:
        return {}
    return dict(zip(m["section"], m["patient"]))


def _evaluate_section(pred, sec, prov: dict, bl: _BaselineCache | None, path: Path,
                      patients: dict) -> tuple[dict, pd.DataFrame]:
    name = sec.name
    have = set(sec.adata.var_names)
    genes = [g for g in pred.var_names if g in have]
    dropped = [g for g in pred.var_names if g not in have]
    if dropped:
        log.warning("%s: %d predicted genes are not in the counts and are not scored (e.g. %s)",
                    name, len(dropped), dropped[:5])
    in_pred = sec.adata.obs_names.isin(pred.obs_names)
    ids = sec.adata.obs_names[in_pred]  # the section's order, so tile caches are shared with prediction
    if len(ids) < 3:
        raise StimageInputError(
            f"{path}: only {len(ids)} of its {pred.n_obs} spot ids match the counts of section {name!r} "
            f"(e.g. prediction {list(pred.obs_names[:3])} vs counts {list(sec.adata.obs_names[:3])}). "
            "Was it predicted from another manifest?")
    p = pred[ids, genes]
    s = sec.adata[ids, genes]
    Y = _dense(s.X)
    mu = _dense(p.X)
    epi = _dense(p.layers[K.EPISTEMIC])
    has_dist = K.ALEATORIC in p.layers
    alea = _dense(p.layers[K.ALEATORIC]) if has_dist else np.zeros_like(epi)
    train_sections = _as_list(prov.get("train_sections"))
    recorded = _recorded_patients(prov)  # by the model's record when it has one: another lab reuses names
    train_patients = sorted(recorded if recorded else {patients[t] for t in train_sections if patients.get(t)})
    entry: dict = {
        "n_spots": int(len(ids)),
        "n_spots_pred": int(pred.n_obs),
        "n_spots_counts": int(sec.adata.n_obs),
        "n_genes": len(genes),
        "genes_missing_from_counts": dropped,
        "train_sections": train_sections,
        "patient": sec.patient,
        "held_out_patient": bool(sec.patient and train_patients and sec.patient not in train_patients),
        "provenance": {k: prov.get(k) for k in ("run_id", "backbone", "n_members", "tile_um", "out_px",
                                               "weights_sha256") if k in prov},
    }
    if prov.get("domain"):  # how unlike the training data the section looks (stimage_nb.domain)
        entry["domain"] = {k: (v.item() if hasattr(v, "item") else v) for k, v in dict(prov["domain"]).items()}
    if _is_training_section(sec, prov, train_sections):
        entry["warning"] = f"{name} is one of the training sections: these are not held-out metrics"
        log.warning("%s: section was used for training; its metrics are not held-out", name)
    obs_depth, pred_depth = float(np.median(Y.sum(1))), float(np.median(mu.sum(1)))
    entry["depth"] = {  # a depth shift (another protocol or patient) shows up here and in the calibration
        "observed_median_panel_counts": obs_depth, "predicted_median_panel_counts": pred_depth,
        "predicted_over_observed": pred_depth / obs_depth if obs_depth > 0 else None,
    }
    df, summ = score_genes(mu, Y, genes)
    df["model"] = "model"
    if has_dist:
        cal = calibration(Y, mu, alea, epi)
        cal["aleatoric_only"] = calibration(Y, mu, alea, None)
    else:  # point predictions (not counts): no predictive distribution to calibrate
        cal = {"skipped": f"the prediction has no layers['{K.ALEATORIC}']: the model gives point predictions, not "
                          "a count distribution (e.g. an imported Path2Space model); the uncertainty ranking below "
                          "uses the epistemic variance only"}
    entry["model"] = {"genes": summ, "calibration": cal, "uncertainty_ranking": uncertainty_ranking(Y, mu, alea, epi)}
    ct_obs = sec.adata.obsm.get(K.CELLTYPE_PROPORTIONS)
    ct_obs = None if ct_obs is None else pd.DataFrame(ct_obs, index=sec.adata.obs_names).loc[ids]
    ct_pred = pred.obsm.get(K.CELLTYPE_MEAN)
    if ct_obs is not None and ct_pred is not None:
        ct_pred = pd.DataFrame(ct_pred, index=pred.obs_names).loc[ids]
        entry["model"]["celltypes"] = celltype_metrics(ct_pred, ct_obs)
    frames = [df]
    if bl is not None:
        res, bdf = _score_baseline(bl, sec, prov, ids, genes, Y, ct_obs, path)
        entry["baseline"] = res
        if bdf is not None:
            frames.append(bdf)
        if "genes" in res:
            comp = {}
            for t in TARGETS:
                m = entry["model"]["genes"][t]["pearson"]["mean"]
                b_ = res["genes"][t]["pearson"]["mean"]
                comp[t] = {"model_mean_pearson": m, "baseline_mean_pearson": b_,
                           "model_beats_baseline": None if m is None or b_ is None else bool(m > b_)}
            entry["comparison"] = comp
    return entry, pd.concat(frames, ignore_index=True)


def _score_baseline(bl: _BaselineCache, sec, prov: dict, ids, genes, Y, ct_obs,
                    path: Path) -> tuple[dict, pd.DataFrame | None]:
    train_sections = _as_list(prov.get("baseline_sections")) or _as_list(prov.get("train_sections"))
    if not train_sections:
        return {"skipped": f"{path}: uns['{K.UNS}'] has no train_sections; cannot train the baseline (give "
                           "baseline_sections, CLI --baseline-sections)"}, None
    tile_um, out_px = prov.get("tile_um"), prov.get("out_px")
    if tile_um is None or out_px is None:
        return {"skipped": f"{path}: uns['{K.UNS}'] lacks tile_um/out_px; cannot tile like the model"}, None
    held = sec if len(ids) == sec.adata.n_obs else sec.subset(sec.adata.obs_names.isin(ids))
    held, _ = _restrict_genes(held, genes)
    try:
        rb, bp = bl.predict(train_sections, genes, float(tile_um), int(out_px), held, prov)
    except StimageInputError as e:
        if bl.train_manifest is not None:  # the user named the training manifest: a wrong one is an error
            raise
        log.warning("%s: baseline skipped: %s", sec.name, e)
        return {"skipped": f"the baseline could not be trained: {e}"}, None
    order = pd.Index(bp.genes).get_indexer(genes)
    L = np.asarray(bp.log1p, dtype=np.float64)[:, order]
    counts = np.clip(np.expm1(L), 0, None)
    df, summ = score_genes(counts, Y, genes, pred_on_scale={"log1p_counts": L})
    df["model"] = "baseline"
    res = {"genes": summ, "train_sections": train_sections, "tile_um": float(tile_um), "out_px": int(out_px),
           "alpha": float(getattr(rb, "alpha_", float("nan"))),
           "training_data": bl.locate(prov, train_sections).to_dict()}
    if bp.celltypes is not None and ct_obs is not None:
        res["celltypes"] = celltype_metrics(bp.celltypes.loc[list(ids)], ct_obs)
    return res, df


def _restrict_genes(section, genes):
    from .io.section import select_genes

    return select_genes(section, list(genes))


def _overall(sections: dict) -> dict:
    """Averages over evaluated sections of the per-section means."""
    out: dict = {"n_sections": len(sections)}
    for who in ("model", "baseline"):
        d = {}
        for t in TARGETS:
            vals = [e[who]["genes"][t]["pearson"]["mean"] for e in sections.values()
                    if who in e and "genes" in e[who] and e[who]["genes"][t]["pearson"]["mean"] is not None]
            d[t] = {"mean_pearson_over_sections": float(np.mean(vals)) if vals else None}
        out[who] = d
    by_target = {}
    for t in TARGETS:
        comps = [e["comparison"][t]["model_beats_baseline"] for e in sections.values() if "comparison" in e]
        if comps:
            by_target[t] = bool(all(c for c in comps if c is not None))
    if by_target:
        # the headline is on log1p counts (what the model is trained to predict); every target is in the dict beside it
        out["model_beats_baseline_every_section"] = by_target.get("log1p_counts")
        out["model_beats_baseline_every_section_by_target"] = by_target
    return out


def _figures(result: dict, per_gene: pd.DataFrame | None, out: Path) -> dict:
    from . import plotting as P

    fdir = out / "figures"
    fdir.mkdir(parents=True, exist_ok=True)
    figs = {}
    if per_gene is not None:
        for t in TARGETS:
            fig = P.correlation_distribution(per_gene, target=t)
            figs[f"correlation_{t}"] = str(save_figure(fig, fdir / f"correlation_{t}.png"))
    fig = P.calibration_plot(result)
    figs["calibration"] = str(save_figure(fig, fdir / "calibration.png"))
    if any("uncertainty_ranking" in e.get("model", {}) for e in result.get("sections", {}).values()):
        fig = P.sparsification_plot(result)
        figs["uncertainty_ranking"] = str(save_figure(fig, fdir / "uncertainty_ranking.png"))
    return figs
