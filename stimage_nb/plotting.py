"""Figures of predictions and their evaluation (matplotlib, scanpy-style).

Every function takes ``ax=None`` (or ``axes=None`` for multi-panel figures), draws into it or into a new
figure, and returns the :class:`~matplotlib.figure.Figure`; none calls ``plt.show()``. Close figures you
no longer need (``plt.close(fig)``).

- :func:`celltype_colors`: the package's cell-type colours (those of every export, see :mod:`stimage_nb._colours`).
- :func:`spatial_gene`: observed vs predicted mean vs aleatoric vs epistemic uncertainty of one gene,
  over the section's H&E.
- :func:`celltype_map`: dominant cell type per spot (predicted, or observed proportions).
- :func:`correlation_distribution`: per-gene correlations, model vs baseline, per held-out section.
- :func:`calibration_plot`: nominal vs empirical coverage of the predictive intervals.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import _keys as K

log = logging.getLogger(__name__)

__all__ = ["celltype_colors", "spatial_gene", "celltype_map", "correlation_distribution",
           "calibration_plot", "MODEL_COLOR", "BASELINE_COLOR"]

MODEL_COLOR = "#3b6fb6"
BASELINE_COLOR = "#b0b0b0"

def celltype_colors(names: Sequence[str], *, as_rgb255: bool = False) -> dict:
    """Colours of cell types, the same in every figure and export of the package.

    A thin wrapper over :func:`stimage_nb._colours.class_colours`, the one place that assigns class
    colours (QuPath GeoJSON classes, OME-Zarr label ``colors`` and these figures all use it): QuPath's
    built-in classes keep QuPath's colours, other names take the next free colour of a fixed
    qualitative palette in the order given. Pass the full, ordered cell-type list of a model (e.g. the
    columns of ``obsm["celltype_mean"]``), not a subset, so a type keeps its colour everywhere.

    Parameters
    ----------
    names
        Cell-type names, in the model's order.
    as_rgb255
        Return ``(r, g, b)`` integer tuples in 0..255 instead of ``"#rrggbb"`` strings.

    Returns
    -------
    ``{name: colour}`` in the order of ``names``.
    """
    from ._colours import class_colours

    rgb = class_colours([str(n) for n in names])
    out = {n: rgb[str(n)] for n in names}
    if as_rgb255:
        return {n: tuple(int(v) for v in c) for n, c in out.items()}
    return {n: "#{:02x}{:02x}{:02x}".format(*c) for n, c in out.items()}


# ----------------------------------------------------------------------------- helpers
def _new_axes(ax, n: int = 1, size: tuple[float, float] = (4.2, 4.0)):
    import matplotlib.pyplot as plt

    if ax is None:
        fig, axes = plt.subplots(1, n, figsize=(size[0] * n, size[1]), squeeze=False)
        return fig, list(axes[0])
    axes = list(np.ravel(ax)) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
    if len(axes) != n:
        raise ValueError(f"expected {n} axes, got {len(axes)}")
    return axes[0].figure, axes


def _provenance(adata) -> dict:
    return dict(adata.uns.get(K.UNS, {})) if hasattr(adata, "uns") else {}


def _resolve_image(adata, section=None, image=None):
    """A SlideImage for the background: given, from the Section, or from the prediction's provenance."""
    if image is not None:
        return image
    if section is not None:
        try:
            return section.image
        except Exception as e:  # noqa: BLE001 - a figure without background is still useful
            log.warning("no H&E background: %s", e)
            return None
    prov = _provenance(adata)
    path = prov.get("image")
    if path and Path(str(path)).exists():
        from .io.image import open_image

        try:
            return open_image(path, um_per_px=prov.get("um_per_px"))
        except Exception as e:  # noqa: BLE001
            log.warning("no H&E background (%s): %s", path, e)
    return None


def _geometry(adata, image, um_per_px: float | None):
    """Spot centres (level-0 px) and diameters (px)."""
    xy = np.asarray(adata.obsm[K.SPATIAL], dtype=np.float64)[:, :2]
    um = um_per_px or (image.um_per_px if image is not None else None) or _provenance(adata).get("um_per_px")
    if K.DIAMETER_UM in adata.obs and um:
        d = adata.obs[K.DIAMETER_UM].to_numpy(dtype=np.float64) / float(um)
    else:  # no physical size known: a fraction of the typical spacing
        from scipy.spatial import cKDTree

        dist, _ = cKDTree(xy).query(xy, k=2) if len(xy) > 1 else (np.ones((1, 2)), None)
        d = np.full(len(xy), 0.5 * float(np.median(dist[:, 1])))
    return xy, d


class _Background:
    """The H&E thumbnail cropped to the spots, shared by the panels of one figure."""

    def __init__(self, image, xy: np.ndarray, diam: np.ndarray, max_px: int = 1200):
        self.image = image
        pad = float(np.nanmax(diam)) if len(diam) else 0.0
        self.x0, self.y0 = np.nanmin(xy[:, 0]) - pad, np.nanmin(xy[:, 1]) - pad
        self.x1, self.y1 = np.nanmax(xy[:, 0]) + pad, np.nanmax(xy[:, 1]) + pad
        self.rgb = None
        if image is not None:
            rgb, ds = image.thumbnail(max_px)
            self.ds = ds
            h, w = rgb.shape[:2]
            cx0, cy0 = int(max(0, self.x0 / ds)), int(max(0, self.y0 / ds))
            cx1, cy1 = int(min(w, np.ceil(self.x1 / ds))), int(min(h, np.ceil(self.y1 / ds)))
            if cx1 > cx0 and cy1 > cy0:
                self.rgb = rgb[cy0:cy1, cx0:cx1]
                self.extent = (cx0 * ds, cx1 * ds, cy1 * ds, cy0 * ds)

    def draw(self, ax, alpha: float = 1.0) -> None:
        if self.rgb is not None:
            ax.imshow(self.rgb, extent=self.extent, alpha=alpha, interpolation="bilinear")
        ax.set_xlim(self.x0, self.x1)
        ax.set_ylim(self.y1, self.y0)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])


def _spots(ax, xy, diam, values=None, colors=None, cmap="viridis", vmin=None, vmax=None, alpha=0.9):
    from matplotlib.collections import EllipseCollection

    coll = EllipseCollection(diam, diam, np.zeros(len(diam)), units="xy", offsets=xy,
                             offset_transform=ax.transData, alpha=alpha, linewidths=0)
    if values is not None:
        coll.set_array(np.asarray(values, dtype=np.float64))
        coll.set_cmap(cmap)
        coll.set_clim(vmin, vmax)
    elif colors is not None:
        coll.set_facecolor(colors)
    ax.add_collection(coll)
    return coll


def _dense_col(X, j: int) -> np.ndarray:
    import scipy.sparse as sp

    col = X[:, j]
    return np.asarray(col.toarray() if sp.issparse(col) else col, dtype=np.float64).ravel()


# ----------------------------------------------------------------------------- spatial maps
def spatial_gene(pred, gene: str, *, section=None, observed: np.ndarray | None = None, image=None,
                 axes=None, cmap: str = "viridis", uncertainty_cmap: str = "magma", shared_scale: bool = False,
                 background: bool = True, thumbnail_px: int = 1200, spot_alpha: float = 0.85):
    """One gene over the H&E: observed, predicted mean, aleatoric and epistemic uncertainty side by side.

    Parameters
    ----------
    pred
        A prediction AnnData (``X`` = predictive mean, ``layers["aleatoric_var"]``, ``layers["epistemic_var"]``).
    gene
        Gene to show.
    section
        The :class:`~stimage_nb.io.section.Section` the prediction is for: gives the observed counts (when it
        has them) and the H&E image.
    observed
        Observed counts of ``gene`` per prediction spot (instead of ``section``'s).
    image
        A :class:`~stimage_nb.io.image.SlideImage` for the background (default: the section's, else the
        image recorded in the prediction's provenance).
    axes
        3 (no observed values) or 4 axes to draw into; a new figure when ``None``.
    shared_scale
        Observed and predicted panels on one colour scale (default: each its own; Pearson is scale-free).

    Returns
    -------
    The Figure. Observed and predicted are shown as ``log1p`` counts (the evaluation scale); the
    uncertainties as standard deviations in counts (square roots of the variances).
    """
    if gene not in pred.var_names:
        raise KeyError(f"gene {gene!r} is not in the prediction ({pred.n_vars} genes, e.g. {list(pred.var_names[:5])}).")
    j = int(pred.var_names.get_loc(gene))
    mean = _dense_col(pred.X, j)
    panels = []
    if observed is None and section is not None and section.has_counts and gene in section.adata.var_names:
        sa = section.adata
        idx = sa.obs_names.get_indexer(pred.obs_names)
        col = _dense_col(sa.X, int(sa.var_names.get_loc(gene)))
        observed = np.where(idx >= 0, col[np.clip(idx, 0, None)], np.nan)
    if observed is not None:
        panels.append(("observed", np.log1p(np.asarray(observed, dtype=np.float64)), f"{gene}: observed\nlog1p(counts)", cmap))
    panels.append(("mean", np.log1p(mean), f"{gene}: predicted\nlog1p(mean)", cmap))
    for layer, label in ((K.ALEATORIC, "aleatoric"), (K.EPISTEMIC, "epistemic")):
        if layer in pred.layers:
            panels.append((layer, np.sqrt(np.clip(_dense_col(pred.layers[layer], j), 0, None)),
                           f"{gene}: {label} SD\n(counts)", uncertainty_cmap))
    fig, axs = _new_axes(axes, len(panels))
    img = _resolve_image(pred, section, image) if background else None
    xy, diam = _geometry(pred, img, section.um_per_px if section is not None else None)
    bg = _Background(img, xy, diam, thumbnail_px)
    lim = None
    if shared_scale and observed is not None:
        both = np.concatenate([panels[0][1], panels[1][1]])
        lim = (np.nanmin(both), np.nanmax(both))
    for ax, (key, vals, title, cm) in zip(axs, panels):
        bg.draw(ax)
        ok = np.isfinite(vals)
        lo, hi = lim if (lim and key in ("observed", "mean")) else (np.nanmin(vals[ok]) if ok.any() else 0,
                                                                   np.nanmax(vals[ok]) if ok.any() else 1)
        coll = _spots(ax, xy[ok], diam[ok], vals[ok], cmap=cm, vmin=lo, vmax=hi, alpha=spot_alpha)
        fig.colorbar(coll, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(title, fontsize=9)
    name = _provenance(pred).get("section") or (section.name if section is not None else "")
    if axes is None and name:
        fig.suptitle(str(name), fontsize=10)
    return fig


def celltype_map(adata, *, key: str | None = None, section=None, image=None, ax=None, legend: bool = True,
                 title: str | None = None, background: bool = True, thumbnail_px: int = 1200,
                 spot_alpha: float = 0.9):
    """Dominant cell type per spot over the H&E, in the fixed :func:`celltype_colors` palette.

    Parameters
    ----------
    adata
        A prediction AnnData (``obsm["celltype_mean"]``) or a section AnnData / Section
        (``obsm["celltype_proportions"]``, the observed proportions).
    key
        The ``obsm`` key of the proportions (default: whichever of the two is present).
    section, image
        Source of the background image (see :func:`spatial_gene`).
    ax
        Axes to draw into; a new figure when ``None``.
    """
    if hasattr(adata, "adata") and hasattr(adata, "image"):  # a Section
        section = section if section is not None else adata
        adata = adata.adata
    if key is None:
        key = next((k for k in (K.CELLTYPE_MEAN, K.CELLTYPE_PROPORTIONS) if k in adata.obsm), None)
        if key is None:
            raise KeyError(f"no cell-type proportions in obsm (looked for {K.CELLTYPE_MEAN!r}, "
                           f"{K.CELLTYPE_PROPORTIONS!r}; have {list(adata.obsm)}).")
    props = adata.obsm[key]
    if not isinstance(props, pd.DataFrame):
        prov_ct = _provenance(adata).get("celltypes")
        props = pd.DataFrame(np.asarray(props), index=adata.obs_names,
                             columns=list(prov_ct) if prov_ct is not None and len(prov_ct) == np.shape(props)[1] else None)
    P = props.to_numpy(dtype=np.float64)
    ok = np.isfinite(P).all(axis=1) & (P.sum(axis=1) > 0)
    types = [str(c) for c in props.columns]
    colors = celltype_colors(types)
    dom = np.where(ok, np.nan_to_num(P).argmax(axis=1), -1)
    fig, (ax,) = _new_axes(ax, 1, size=(5.2, 4.6))
    img = _resolve_image(adata, section, image) if background else None
    xy, diam = _geometry(adata, img, section.um_per_px if section is not None else None)
    bg = _Background(img, xy, diam, thumbnail_px)
    bg.draw(ax)
    from matplotlib.colors import to_rgba

    face = np.array([to_rgba(colors[types[d]]) if d >= 0 else (0.8, 0.8, 0.8, 0.5) for d in dom])
    _spots(ax, xy, diam, colors=face, alpha=spot_alpha)
    if legend:
        from matplotlib.patches import Patch

        present = [t for i, t in enumerate(types) if (dom == i).any()]
        ax.legend(handles=[Patch(color=colors[t], label=f"{t} ({int((dom == types.index(t)).sum())})") for t in present],
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False, title="dominant type",
                  title_fontsize=8)
    what = "predicted" if key == K.CELLTYPE_MEAN else "observed"
    name = _provenance(adata).get("section") or (section.name if section is not None else "")
    ax.set_title(title or f"{name} {what} dominant cell type".strip(), fontsize=9)
    return fig


# ----------------------------------------------------------------------------- evaluation figures
def _load_per_gene(per_gene) -> pd.DataFrame:
    if isinstance(per_gene, (str, os.PathLike)):
        return pd.read_csv(per_gene)
    return per_gene


def correlation_distribution(per_gene, *, target: str = "log1p_counts", metric: str = "pearson", ax=None,
                             sections: Sequence[str] | None = None):
    """Distribution of per-gene correlations, model vs baseline, for each held-out section.

    Parameters
    ----------
    per_gene
        The ``metrics_per_gene.csv`` written by :func:`stimage_nb.evaluate.evaluate` (path or DataFrame;
        columns section, model, target, gene, pearson, spearman).
    target
        ``"log1p_counts"`` (STimage protocol) or ``"log1p_cp10k"`` (depth-normalised).
    metric
        ``"pearson"`` or ``"spearman"``.
    ax
        Axes to draw into; a new figure when ``None``.

    Returns
    -------
    The Figure: one pair of violins per section (model left, baseline right), the mean marked with a
    white dot and written above (undefined correlations count as 0, as in the summaries).
    """
    df = _load_per_gene(per_gene)
    df = df[df["target"] == target]
    secs = list(sections) if sections is not None else list(dict.fromkeys(df["section"]))
    models = [m for m in ("model", "baseline") if m in set(df["model"])]
    fig, (ax,) = _new_axes(ax, 1, size=(max(3.5, 1.6 * len(secs) + 1.5), 3.8))
    width = 0.38
    for i, s in enumerate(secs):
        for k, m in enumerate(models):
            v = df[(df["section"] == s) & (df["model"] == m)][metric].to_numpy(dtype=np.float64)
            if v.size == 0:
                continue
            v = np.nan_to_num(v, nan=0.0)
            pos = i + (k - (len(models) - 1) / 2) * width
            color = MODEL_COLOR if m == "model" else BASELINE_COLOR
            parts = ax.violinplot([v], positions=[pos], widths=width * 0.95, showextrema=False)
            for b in parts["bodies"]:
                b.set_facecolor(color)
                b.set_edgecolor("black")
                b.set_linewidth(0.5)
                b.set_alpha(0.85)
            q1, med, q3 = np.percentile(v, [25, 50, 75])
            ax.vlines(pos, q1, q3, color="black", lw=2.5)
            ax.scatter([pos], [v.mean()], color="white", edgecolor="black", zorder=3, s=18)
            ax.text(pos, 1.02, f"{v.mean():.2f}", ha="center", va="bottom", fontsize=7,
                    transform=ax.get_xaxis_transform())
    from matplotlib.patches import Patch

    ax.axhline(0, color="grey", lw=0.6, ls=":")
    ax.set_xticks(range(len(secs)))
    ax.set_xticklabels(secs)
    ax.set_xlim(-0.6, len(secs) - 0.4)
    ax.set_ylabel(f"{metric.capitalize()} r per gene")
    label = {"log1p_counts": "log1p(counts)", "log1p_cp10k": "log1p(CP10k, depth-normalised)"}.get(target, target)
    ax.set_title(f"held-out sections, vs {label}", fontsize=9, pad=14)
    ax.legend(handles=[Patch(color=MODEL_COLOR if m == "model" else BASELINE_COLOR,
                             label="ensemble" if m == "model" else "ridge baseline") for m in models],
              fontsize=7, loc="lower right", frameon=False)
    return fig


def _load_metrics(metrics) -> dict:
    if isinstance(metrics, (str, os.PathLike)):
        p = Path(metrics)
        return json.loads((p / "metrics.json" if p.is_dir() else p).read_text())
    return metrics


def calibration_plot(metrics, *, ax=None, sections: Sequence[str] | None = None, aleatoric_only: bool = True):
    """Nominal vs empirical coverage of the central prediction intervals, per section.

    Parameters
    ----------
    metrics
        The dict returned by :func:`stimage_nb.evaluate.evaluate`, or the path of ``metrics.json``
        (or of its folder).
    aleatoric_only
        Also draw (dashed) the coverage with the aleatoric variance only, to show what the
        epistemic variance adds.
    ax
        Axes to draw into; a new figure when ``None``.
    """
    import matplotlib.pyplot as plt

    m = _load_metrics(metrics)
    secs = list(sections) if sections is not None else list(m.get("sections", {}))
    fig, (ax,) = _new_axes(ax, 1, size=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="ideal")
    cmap = plt.get_cmap("tab10")
    for i, s in enumerate(secs):
        cal = m["sections"][s].get("model", {}).get("calibration")
        if not cal:
            continue
        c = cmap(i % 10)
        ax.plot(cal["curve"]["nominal"], cal["curve"]["empirical"], "-o", ms=3, color=c,
                label=f"{s} (50%: {cal['coverage_50']:.2f}, 90%: {cal['coverage_90']:.2f})")
        al = cal.get("aleatoric_only")
        if aleatoric_only and al:
            ax.plot(al["curve"]["nominal"], al["curve"]["empirical"], "--", color=c, lw=1,
                    label=f"{s} aleatoric only")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("nominal central-interval level")
    ax.set_ylabel("empirical coverage (randomised PIT)")
    ax.set_title("calibration of the NB predictive distribution", fontsize=9)
    ax.legend(fontsize=6, loc="upper left", frameon=False)
    return fig


def sparsification_plot(metrics, *, ax=None, sections: Sequence[str] | None = None):
    """Does the uncertainty point at the errors? Per section, the mean |log1p error| of the spots kept
    (per gene, the most certain first) relative to all spots, against the fraction kept.

    Solid: ranked by the predictive SD; dashed: by the epistemic SD alone; dotted: by predicted depth
    (the obvious proxy); thin: the oracle (ranked by the error itself). A random choice stays at 1.
    See :func:`stimage_nb.evaluate.uncertainty_ranking`.

    Parameters
    ----------
    metrics
        The dict returned by :func:`stimage_nb.evaluate.evaluate`, or the path of ``metrics.json``
        (or of its folder).
    ax
        Axes to draw into; a new figure when ``None``.
    """
    import matplotlib.pyplot as plt

    m = _load_metrics(metrics)
    secs = list(sections) if sections is not None else list(m.get("sections", {}))
    fig, (ax,) = _new_axes(ax, 1, size=(4.6, 4.0))
    ax.axhline(1.0, color="grey", lw=0.8, ls=":", label="random")
    cmap = plt.get_cmap("tab10")
    styles = (("sd", "-", 1.6, "by SD"), ("epistemic_sd", "--", 1.0, "epistemic SD"),
              ("predicted_depth", ":", 1.0, "predicted depth"), ("oracle", "-", 0.6, "oracle"))
    for i, s in enumerate(secs):
        ur = m["sections"][s].get("model", {}).get("uncertainty_ranking")
        if not ur or "curve" not in ur["spots"]:
            continue
        c, curve = cmap(i % 10), ur["spots"]["curve"]
        for key, ls, lw, what in styles:
            ax.plot(curve["retained"], curve[key], ls=ls, lw=lw, color=c, label=f"{s} {what}")
    ax.set_xlim(1.0, 0.0)  # from keeping everything to keeping the most certain few
    ax.set_xlabel("fraction of spots kept per gene (most certain first)")
    ax.set_ylabel("mean |log1p error| kept / all")
    ax.set_title("does the uncertainty rank the errors?", fontsize=9)
    ax.legend(fontsize=6, loc="best", frameon=False, ncol=2)
    return fig
