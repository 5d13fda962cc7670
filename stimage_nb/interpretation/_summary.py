"""What a pathologist reads from attributions: which nuclei and which predicted cell types drive a gene.

:func:`summarise` pools every explained nucleus of a section and, per gene, reports

- **morphology**: for each nucleus feature (area, eccentricity, solidity, circularity, haematoxylin
  OD), the mean attribution of the nuclei in each quartile of that feature, the share of them with a
  positive attribution, and the Spearman correlation of feature and attribution over all nuclei;
- **cell types**: spots grouped by their predicted dominant cell type (argmax of the ensemble's
  predicted proportions: cell types are predicted per spot, not per nucleus), with the mean total
  attribution of their nuclei, of their background, the share of positive nuclei, and across spots the
  Spearman correlation between the predicted proportion of the type and the nuclei's total.

:func:`plot_summary` draws both; :func:`plot_spot` puts side by side the tile, its nuclei coloured by
attribution, and a pixel map (:func:`~stimage_nb.interpretation.pixel_map`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ._game import BACKGROUND
from ._result import Attributions

FEATURES = ("area_um2", "eccentricity", "solidity", "circularity", "hematoxylin_od_mean")
LABELS = {"area_um2": "area (µm²)", "eccentricity": "eccentricity", "solidity": "solidity",
          "circularity": "circularity", "hematoxylin_od_mean": "haematoxylin OD", "perimeter_um": "perimeter (µm)",
          "major_axis_um": "major axis (µm)", "minor_axis_um": "minor axis (µm)",
          "hematoxylin_od_max": "max haematoxylin OD"}


@dataclass(frozen=True)
class AttributionSummary:
    """Per gene: attribution by nucleus morphology and by predicted cell type (module docstring).

    Attributes
    ----------
    morphology
        ``gene``, ``feature``, ``quartile`` (1–4), ``low``, ``high`` (the quartile's feature range),
        ``n_nuclei``, ``mean`` attribution, ``positive`` (share of nuclei with a positive attribution).
    correlation
        ``gene``, ``feature``, ``spearman``, ``p_value``, ``n_nuclei``.
    celltypes
        ``gene``, ``celltype``, ``n_spots``, ``nuclei_total`` (mean over spots of the sum of their
        nuclei's attributions), ``background`` (mean background attribution), ``positive`` (share of
        positive nuclei), ``spearman_proportion`` (over all spots: predicted proportion of the type vs
        ``nuclei_total``).
    output
        What the attributions explain (``log_mean`` / ``mean``).
    """

    morphology: pd.DataFrame = field(repr=False)
    correlation: pd.DataFrame = field(repr=False)
    celltypes: pd.DataFrame = field(repr=False)
    output: str = "log_mean"

    def to_frame(self) -> pd.DataFrame:
        return self.correlation.copy()

    def to_json(self) -> dict:
        def rec(df):
            return json_records(df)

        return {"output": self.output, "correlation": rec(self.correlation), "morphology": rec(self.morphology),
                "celltypes": rec(self.celltypes)}


def json_records(df: pd.DataFrame) -> list[dict]:
    out = []
    for r in df.to_dict(orient="records"):
        out.append({k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()})
    return out


def summarise(attr: Attributions, *, features=FEATURES) -> AttributionSummary:
    """Summaries of a section's attributions by nucleus morphology and predicted cell type.

    Parameters
    ----------
    attr
        Attributions of one section (:func:`~stimage_nb.interpretation.explain`).
    features
        Nucleus features (columns of :attr:`Nuclei.table`).
    """
    from scipy.stats import spearmanr

    df = attr.to_frame()
    nuc = df[df["player"] != BACKGROUND]
    morph, corr, cts = [], [], []
    for gene in attr.genes:
        d = nuc[nuc["gene"] == gene]
        for f in features:
            x, v = d[f].to_numpy(dtype=np.float64), d["value"].to_numpy(dtype=np.float64)
            ok = np.isfinite(x) & np.isfinite(v)
            x, v = x[ok], v[ok]
            if len(x) >= 3 and np.ptp(x) > 0 and np.ptp(v) > 0:
                rho, p = spearmanr(x, v)
            else:
                rho, p = np.nan, np.nan
            corr.append({"gene": gene, "feature": f, "spearman": float(rho), "p_value": float(p), "n_nuclei": int(len(x))})
            if len(x) >= 4:
                edges = np.quantile(x, [0, 0.25, 0.5, 0.75, 1.0])
                q = np.clip(np.searchsorted(edges[1:-1], x, side="right"), 0, 3)
                for k in range(4):
                    sel = q == k
                    morph.append({"gene": gene, "feature": f, "quartile": k + 1, "low": float(edges[k]),
                                  "high": float(edges[k + 1]), "n_nuclei": int(sel.sum()),
                                  "mean": float(v[sel].mean()) if sel.any() else np.nan,
                                  "positive": float((v[sel] > 0).mean()) if sel.any() else np.nan})
        spot_tot = nuc[nuc["gene"] == gene].groupby("spot")["value"].agg(["sum", lambda s: float((s > 0).mean())])
        spot_tot.columns = ["nuclei_total", "positive"]
        bg = df[(df["player"] == BACKGROUND) & (df["gene"] == gene)].set_index("spot")["value"]
        sp = attr.spots.join(spot_tot, how="left").join(bg.rename("background"), how="left")
        if "celltype" in sp:
            for ct, g in sp.groupby("celltype", sort=True):
                col = f"P({ct})"
                rho = np.nan
                if col in sp and sp["nuclei_total"].notna().sum() >= 3 and np.ptp(sp[col]) > 0 \
                        and np.ptp(sp["nuclei_total"].fillna(0)) > 0:
                    rho = float(spearmanr(sp[col], sp["nuclei_total"].fillna(0))[0])
                cts.append({"gene": gene, "celltype": ct, "n_spots": int(len(g)),
                            "nuclei_total": float(g["nuclei_total"].mean()), "background": float(g["background"].mean()),
                            "positive": float(g["positive"].mean()), "spearman_proportion": rho})
    return AttributionSummary(pd.DataFrame(morph, columns=["gene", "feature", "quartile", "low", "high", "n_nuclei",
                                                           "mean", "positive"]),
                              pd.DataFrame(corr, columns=["gene", "feature", "spearman", "p_value", "n_nuclei"]),
                              pd.DataFrame(cts, columns=["gene", "celltype", "n_spots", "nuclei_total", "background",
                                                         "positive", "spearman_proportion"]),
                              attr.output)


# ====================================================================== pictures
def plot_summary(summary: AttributionSummary, gene: str, *, axes=None):
    """Mean nucleus attribution by morphology quartile, and by predicted cell type, for one gene.

    Returns the matplotlib Figure (never calls ``plt.show()``).
    """
    import matplotlib.pyplot as plt

    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.1, 1]})
    else:
        fig = axes[0].figure
    m = summary.morphology[summary.morphology["gene"] == gene]
    c = summary.correlation[summary.correlation["gene"] == gene].set_index("feature")
    ax = axes[0]
    for f, d in m.groupby("feature", sort=False):
        rho = c["spearman"].get(f, np.nan)
        ax.plot(d["quartile"], d["mean"], "-o", ms=4, label=f"{LABELS.get(f, f)} (ρ {rho:+.2f})")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks([1, 2, 3, 4], ["Q1\nsmallest", "Q2", "Q3", "Q4\nlargest"])
    ax.set_ylabel(f"mean attribution per nucleus\n({summary.output})")
    ax.set_title(f"{gene}: which nucleus morphologies carry the prediction", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    t = summary.celltypes[summary.celltypes["gene"] == gene].sort_values("nuclei_total")
    y = np.arange(len(t))
    cols = np.where(t["nuclei_total"] >= 0, "#c0392b", "#2e86c1")
    ax.barh(y - 0.18, t["nuclei_total"], height=0.36, color=cols, label="nuclei (sum per spot)")
    ax.barh(y + 0.18, t["background"], height=0.36, color="#bbbbbb", label="background")
    ax.set_yticks(y, [f"{ct} (n={n})" for ct, n in zip(t["celltype"], t["n_spots"])], fontsize=7)
    ax.axvline(0, color="k", lw=0.6)
    ax.set_xlabel(f"mean attribution per spot ({summary.output})")
    ax.set_title("by the spot's predicted dominant cell type", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _region_of(attr: Attributions, spot: str, image):
    row = attr.spots.loc[str(spot)]
    lv, x, y, n = int(row["level"]), int(row["box_x"]), int(row["box_y"]), int(row["box_n"])
    return image.read_region(x, y, n, n, level=lv), float(row["downsample"]), x, y, n


def plot_spot(attr: Attributions, spot: str, gene: str, image, *, pixel=None, axes=None, vmax: float | None = None):
    """Side by side: the spot's tile, its nuclei coloured by attribution, and a pixel map.

    Parameters
    ----------
    attr, spot, gene
        Which attributions to draw.
    image
        The section's :class:`~stimage_nb.io.image.SlideImage`.
    pixel
        A ``shap.Explanation`` from :func:`~stimage_nb.interpretation.pixel_map` (its ``values``
        (h, w, G)); omitted: two panels.
    vmax
        Symmetric colour limit of the nuclei (default: their largest |value|).

    Returns
    -------
    matplotlib Figure (never ``plt.show()``).
    """
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import TwoSlopeNorm

    n_ax = 3 if pixel is not None else 2
    if axes is None:
        fig, axes = plt.subplots(1, n_ax, figsize=(4.0 * n_ax, 4.2))
    else:
        fig = axes[0].figure
    region, ds, x0, y0, n = _region_of(attr, spot, image)
    players, vals = attr.matrix(spot)
    g = list(attr.genes).index(gene)
    row = attr.spots.loc[str(spot)]
    axes[0].imshow(region)
    axes[0].set_title(f"spot {spot}: {n * ds * image.um_per_px:.0f} µm tile", fontsize=9)
    nuc_vals = vals[:-1, g]
    lim = float(vmax or (np.abs(nuc_vals).max() if len(nuc_vals) else 1.0) or 1.0)
    norm = TwoSlopeNorm(vmin=-lim, vcenter=0.0, vmax=lim)
    axes[1].imshow(region, alpha=0.35)
    pos = attr.nuclei.table.index.get_indexer(players[:-1])
    polys = [attr.nuclei.polygons[i] / ds - [x0, y0] - 0.5 for i in pos]
    pc = PolyCollection(polys, array=nuc_vals, cmap="RdBu_r", norm=norm, edgecolors="k", linewidths=0.3)
    axes[1].add_collection(pc)
    axes[1].set_xlim(-0.5, n - 0.5)
    axes[1].set_ylim(n - 0.5, -0.5)
    fig.colorbar(pc, ax=axes[1], fraction=0.046, pad=0.02, label=f"{gene} attribution")
    axes[1].set_title(f"{len(polys)} nuclei; background {vals[-1, g]:+.3f}\n"
                      f"prediction {row[f'prediction:{gene}']:.3f} = base {row[f'base:{gene}']:.3f} + sum",
                      fontsize=8)
    if pixel is not None:
        pv = np.asarray(pixel.values)[..., g]
        plim = float(np.abs(pv).max() or 1.0)
        grey = region.mean(2)
        axes[2].imshow(grey, cmap="gray", alpha=0.5, extent=(-0.5, n - 0.5, n - 0.5, -0.5))
        im = axes[2].imshow(pv, cmap="RdBu_r", vmin=-plim, vmax=plim, alpha=0.8, extent=(-0.5, n - 0.5, n - 0.5, -0.5))
        fig.colorbar(im, ax=axes[2], fraction=0.046, pad=0.02, label="per pixel")
        axes[2].set_title("pixel map", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig
