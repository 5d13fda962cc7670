"""The metrics of a prediction against observed counts: gene correlations on two scales, calibration of the
predictive distribution, whether the uncertainty ranks the errors, cell types.

Used by :func:`stimage_nb.evaluate.evaluate` (per held-out section of a prediction folder) and by the
validation harness (:mod:`stimage_nb.validation`, per fold). Inputs are arrays: ``(spots, genes)`` predicted
means in counts, observed counts, and the aleatoric and epistemic variances in counts².

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
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

TARGETS = ("log1p_counts", "log1p_cp10k")
R_THRESHOLD = 0.3
COVERAGE_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
RETAINED_FRACTIONS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)  # sparsification curves
_EPS = 1e-8


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


def _pit_bounds(y, mean, var) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattened counts ``y`` and the bounds ``F(y - 1)``, ``F(y)`` of their randomised PIT."""
    y = np.asarray(y, dtype=np.float64).ravel()
    m = np.asarray(mean, dtype=np.float64).ravel()
    v = np.asarray(var, dtype=np.float64).ravel()
    return y, nb_cdf(y - 1, m, v), nb_cdf(y, m, v)


def _coverages(y, mean, var, levels) -> tuple[np.ndarray, np.ndarray]:
    """(randomised-PIT coverage, naive quantile-interval coverage) per level."""
    y, lo, hi = _pit_bounds(y, mean, var)
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
    y, lo, hi = _pit_bounds(y, mean, var)
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
