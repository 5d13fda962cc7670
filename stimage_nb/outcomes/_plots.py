"""Figures of the outcome analyses: Kaplan-Meier curves (lifelines), ROC curves, model vs baselines.

Each takes ``ax=None`` and returns the Axes; none calls ``plt.show()``.
"""

from __future__ import annotations

import numpy as np


def _ax(ax, size=(5.5, 4.2)):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=size)
    return ax


def km_plot(result, ax=None, *, at_risk: bool = True, title: str | None = None):
    """Kaplan-Meier curves of the out-of-fold high/low risk groups of a :class:`SurvivalResult`."""
    from lifelines import KaplanMeierFitter

    ax = _ax(ax)
    pred = result.predictions
    fitters = []
    for grp, colour in (("low", "#1f77b4"), ("high", "#d62728")):
        d = pred[pred["risk_group"] == grp]
        if len(d) == 0:
            continue
        kmf = KaplanMeierFitter(label=f"{grp} risk (n={len(d)}, {int(d['event'].sum())} events)")
        kmf.fit(d["time"], d["event"])
        kmf.plot_survival_function(ax=ax, ci_show=True, color=colour)
        fitters.append(kmf)
    if at_risk and len(fitters) == 2:
        from lifelines.plotting import add_at_risk_counts

        add_at_risk_counts(*fitters, ax=ax, rows_to_show=["At risk"])
    p = result.logrank.get("p_value", float("nan"))
    ax.set_title(title or f"{result.name}: log-rank p = {p:.2g}\n(cut-point: median risk of each training fold)",
                 fontsize=9)
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    return ax


def roc_plot(result, ax=None):
    """Pooled out-of-fold ROC curve(s) of a :class:`ClassificationResult` (one vs rest for several classes)."""
    from sklearn.metrics import roc_curve

    ax = _ax(ax, (4.5, 4.2))
    pred = result.predictions
    for c in result.classes if len(result.classes) > 2 else result.classes[1:]:
        fpr, tpr, _ = roc_curve((pred["y"] == c).astype(int), pred[f"p_{c}"])
        ax.plot(fpr, tpr, label=f"{c}" if len(result.classes) > 2 else f"{result.name}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{result.name}: ROC AUC {result.roc_auc} (out-of-fold)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    return ax


def comparison_plot(comp, ax=None):
    """The primary metric with its CI for every feature set, random sets as a strip of points."""
    ax = _ax(ax, (6.0, 0.5 + 0.45 * (len(comp.results) + 1)))
    names = list(comp.results)
    ys = np.arange(len(names))[::-1] + 1
    for y, n in zip(ys, names):
        est = getattr(comp.results[n], comp.metric)
        lo, hi = est.low, est.high
        colour = "#d62728" if n == comp.model else "#1f77b4"
        if np.isfinite(lo):
            ax.plot([lo, hi], [y, y], c=colour, lw=2)
        ax.plot(est.value, y, "o", c=colour)
    s = comp.random_scores
    if len(s):
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(s))
        ax.plot(s, np.zeros(len(s)) + jitter, "o", c="grey", alpha=0.6, ms=4)
        names = names + [f"random sets of {len(comp.results[comp.model].features)} (n={len(s)})"]
        ys = np.append(ys, 0)
    ax.axvline(0.5, ls="--", c="grey", lw=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels(names, fontsize=8)
    label = "Harrell's C" if comp.metric == "harrell_c" else "ROC AUC"
    ax.set_xlabel(f"{label} (mean over outer folds, bootstrap 95% CI)")
    return ax


def agreement_plot(res, ax=None):
    """Histogram of the per-gene correlations across slides, with the across-genes figure marked."""
    ax = _ax(ax, (5, 3.5))
    r = res.per_gene["r"].dropna()
    ax.hist(r, bins=np.linspace(-1, 1, 21), color="#1f77b4", alpha=0.8, label=f"per gene across slides (n={len(r)})")
    w = res.per_slide["r_across_genes"].mean()
    if np.isfinite(w):
        ax.axvline(w, c="#d62728", ls="--", label=f"across genes within a slide (mean {w:.2f})")
    ax.set_xlabel(f"{res.method} r, predicted vs measured pseudo-bulk")
    ax.set_ylabel("genes")
    ax.legend(fontsize=8)
    return ax
