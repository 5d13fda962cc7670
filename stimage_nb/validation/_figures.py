"""Figures of a :class:`~stimage_nb.validation.ValidationResult` (each returns a matplotlib Figure)."""

from __future__ import annotations

import numpy as np
import pandas as pd

MODEL_STYLE = {"ensemble": ("#1f77b4", "o"), "single_member": ("#9467bd", "s"), "baseline": ("#7f7f7f", "^")}
LABEL = {"ensemble": "ensemble", "single_member": "single member", "baseline": "ridge baseline"}


def _ax_grid(n: int, w: float = 4.6, h: float = 3.4):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(w * n, h), squeeze=False)
    return fig, axes[0]


def correlations_by_fold(result, protocol: str):
    """Mean per-gene Pearson r of each held-out section (as scanned), the three models side by side."""
    t = result.table()
    t = t[(t["protocol"] == protocol) & (t["acquisition"] == "reference")]
    fig, axes = _ax_grid(2, w=max(4.6, 0.5 * len(t) + 2.5))
    for ax, target, cols in ((axes[0], "log1p counts", ("ensemble r", "single member r", "baseline r")),
                             (axes[1], "log1p CP10k (depth-normalised)", ("ensemble r CP10k", None, "baseline r CP10k"))):
        labels = [f"{r.section}\n({r.fold})" if protocol == "lopo" else str(r.section) for r in t.itertuples()]
        x = np.arange(len(t))
        for (m, (c, mk)), col, dx in zip(MODEL_STYLE.items(), cols, (-0.15, 0.0, 0.15)):
            if col is None:
                continue
            ax.scatter(x + dx, t[col], color=c, marker=mk, label=LABEL[m], zorder=3)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("mean Pearson r over genes")
        ax.set_title(target, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{protocol}: held-out sections", fontsize=10)
    fig.tight_layout()
    return fig


def acquisition_summary(result):
    """Per acquisition (mean over the held-out sections): mean r of the three models, and 90% coverage."""
    t = result.table()
    t = t[t["protocol"] == "acquisition"]
    order = list(dict.fromkeys(t["acquisition"]))
    g = t.groupby("acquisition", sort=False).mean(numeric_only=True).reindex(order)
    fig, axes = _ax_grid(2, w=max(5.0, 0.55 * len(order) + 2))
    x = np.arange(len(order))
    for m, col in (("ensemble", "ensemble r"), ("single_member", "single member r"), ("baseline", "baseline r")):
        c, mk = MODEL_STYLE[m]
        axes[0].plot(x, g[col], marker=mk, color=c, label=LABEL[m])
    axes[0].set_ylabel("mean Pearson r (log1p counts)")
    axes[1].axhspan(0.85, 0.95, color="#2ca02c", alpha=0.12, label="target 0.85-0.95")
    axes[1].axhline(0.9, color="#2ca02c", lw=0.8)
    for m, col in (("ensemble", "coverage 90%"), ("single_member", "single member coverage 90%")):
        c, mk = MODEL_STYLE[m]
        axes[1].plot(x, g[col], marker=mk, color=c, label=LABEL[m])
    axes[1].set_ylabel("coverage of the 90% interval")
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(order, rotation=45, ha="right", fontsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("acquisition: held-out patients' sections re-made (mean over sections)", fontsize=10)
    fig.tight_layout()
    return fig


def calibration_panels(result, protocol: str):
    """Reliability curves (nominal vs empirical coverage of central intervals) per held-out section, and the
    PIT histogram pooled over them (flat = calibrated), for the ensemble as scanned."""
    cur = [c for c in result.curves if c["protocol"] == protocol and c["model"] == "ensemble"
           and c["acquisition"] == "reference"]
    fig, axes = _ax_grid(2)
    for c in (c for c in cur if c["kind"] == "reliability"):
        axes[0].plot(c["x"], c["y"], marker=".", lw=1, label=str(c["section"]))
    axes[0].plot([0, 1], [0, 1], "k--", lw=0.8)
    axes[0].set_xlabel("nominal coverage")
    axes[0].set_ylabel("empirical coverage")
    axes[0].set_title("reliability (central intervals)", fontsize=9)
    axes[0].legend(fontsize=6, ncol=2)
    pits = [np.asarray(c["y"]) for c in cur if c["kind"] == "pit_histogram"]
    if pits:
        h = np.mean(pits, axis=0)
        edges = np.linspace(0, 1, len(h) + 1)
        axes[1].bar(edges[:-1], h, width=np.diff(edges), align="edge", color="#1f77b4", edgecolor="white")
        axes[1].axhline(1 / len(h), color="k", ls="--", lw=0.8)
    axes[1].set_xlabel("PIT")
    axes[1].set_ylabel("fraction of counts")
    axes[1].set_title("PIT histogram (flat = calibrated)", fontsize=9)
    fig.suptitle(f"{protocol}: calibration of the ensemble's predictive distribution", fontsize=10)
    fig.tight_layout()
    return fig


def sparsification_panels(result, protocol: str = "lopo"):
    """Sparsification on each held-out patient's sections: the error kept when only the most certain spots
    are kept, by the predictive SD, the epistemic SD, the depth proxy and the oracle."""
    cur = [c for c in result.curves if c["protocol"] == protocol and c["kind"] == "sparsification"
           and c["acquisition"] == "reference" and c.get("held_out_patient")]
    secs = list(dict.fromkeys(c["section"] for c in cur))[:6]
    fig, axes = _ax_grid(max(1, len(secs)), w=3.4)
    style = {"y_sd": ("predictive SD", "#1f77b4"), "y_epistemic_sd": ("epistemic SD", "#d62728"),
             "y_predicted_depth": ("predicted depth (proxy)", "#7f7f7f"), "y_oracle": ("oracle", "#2ca02c")}
    for ax, s in zip(axes, secs):
        c = next(c for c in cur if c["section"] == s)
        for k, (lab, col) in style.items():
            ax.plot(c["x"], c[k], color=col, marker=".", label=lab)
        ax.axhline(1, color="k", lw=0.6, ls=":")
        ax.invert_xaxis()
        ax.set_xlabel("fraction of spots kept")
        ax.set_title(f"{s} ({c['fold']})", fontsize=8)
    axes[0].set_ylabel("mean |log1p error| kept / all")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{protocol}: does the uncertainty rank the errors?", fontsize=10)
    fig.tight_layout()
    return fig


def map_agreement(result):
    """Distributions over genes of Lee's L and SSIM (predicted vs observed maps, log1p counts), per model,
    pooled over the held-out sections as scanned."""
    pg = result.per_gene
    fig, axes = _ax_grid(2)
    if pg is None or pg.empty:
        return fig
    d = pg[(pg["target"] == "log1p_counts") & (pg["acquisition"] == "reference")]
    for ax, col, name in ((axes[0], "lees_l", "Lee's L"), (axes[1], "ssim", "SSIM")):
        data = [d.loc[d["model"] == m, col].dropna().to_numpy() for m in MODEL_STYLE]
        bp = ax.boxplot(data, showfliers=False, patch_artist=True)
        for patch, (c, _) in zip(bp["boxes"], MODEL_STYLE.values()):
            patch.set_facecolor(c)
            patch.set_alpha(0.5)
        ax.set_xticks(range(1, len(MODEL_STYLE) + 1))
        ax.set_xticklabels([LABEL[m] for m in MODEL_STYLE], fontsize=8)
        ax.set_ylabel(f"{name} per gene")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("agreement of predicted and observed maps (held-out sections as scanned)", fontsize=10)
    fig.tight_layout()
    return fig


def as_frame(curves) -> pd.DataFrame:  # pragma: no cover - convenience for notebooks
    return pd.DataFrame(list(curves))
