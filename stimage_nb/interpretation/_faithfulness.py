"""Is an explanation faithful to the model? Deletion and insertion curves, and a randomised-model check.

**Deletion** (Samek et al. 2017; Petsiuk et al. 2018): mask a spot's nuclei in order — largest
attribution first — in ``steps`` equal fractions (the background stays), and record how the
explained output moves from ``f(tile)``; an explanation that ranks the nuclei the model relies on
makes it fall faster than masking as many nuclei **at random** (``n_random`` orders, averaged) or
**by size** (largest first: "it just counts big dark blobs"). **Insertion** is the mirror: start
from the tile with every nucleus masked and add them back in the same orders. Each curve's area
(the mean change over the fractions 0..1, in the output's units) gives per spot and gene

    deletion:  gap = AUC(other order) - AUC(attribution order)      (> 0: faithful)
    insertion: gap = AUC(attribution order) - AUC(other order)      (> 0: faithful)

summarised over spots by the mean gap with a 95% bootstrap confidence interval (2,000 resamples of
the spots); a comparison ``passes`` when the interval's lower end is above zero.

**Randomised model** (Adebayo et al. 2018, "Sanity checks for saliency maps"): the same spots are
explained again, with the same explainer and budget, for a copy of the ensemble whose gene and
cell-type heads are re-initialised; if attributions reflected the image rather than the model they
would barely change. Reported: the Spearman correlation, per spot and gene, between the nuclei's
original and randomised values, beside the same correlation for the *same* model explained again with
another seed (the explainer's own reproducibility); the check ``passes`` when the randomised model's
attributions agree less with the original than the reseeded ones do (the 95% bootstrap interval of the
paired difference lies above zero). Also reported: whether the mean correlation is below 0.5, and the
ratio of the attributions' magnitudes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ._game import BACKGROUND, TilePredictor, build_game, randomised_heads
from ._result import UNITS, Attributions

log = logging.getLogger(__name__)

KINDS = ("deletion", "insertion")
ORDERS = ("attribution", "random", "size")
SANITY_MAX_RHO = 0.5


def bootstrap_ci(x, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``x`` and its percentile-bootstrap confidence interval."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    if x.size == 1:
        return float(x[0]), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)
    a = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


@dataclass(frozen=True)
class Faithfulness:
    """Deletion/insertion curves and the randomised-model check of one :class:`Attributions`.

    Attributes
    ----------
    curves
        ``spot``, ``gene``, ``kind`` (deletion/insertion), ``order`` (attribution/random/size),
        ``fraction`` of nuclei masked (deletion) or shown (insertion), ``delta``: the output's change
        from the whole tile (deletion) or from the tile without nuclei (insertion).
    scores
        Per spot, gene and kind: ``auc_attribution``, ``auc_random``, ``auc_size``, ``gap_random``,
        ``gap_size`` (module docstring), ``n_nuclei``.
    sanity
        Per spot and gene: ``spearman`` between original and randomised-head nucleus values,
        ``scale``: the ratio of their mean absolute values (randomised / original), and
        ``spearman_reseeded``: original vs the same model explained with another seed.
    summary
        The JSON written as ``faithfulness.json`` (:meth:`to_json`).
    """

    curves: pd.DataFrame = field(repr=False)
    scores: pd.DataFrame = field(repr=False)
    sanity: pd.DataFrame = field(repr=False)
    summary: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return self.scores.copy()

    def to_json(self) -> dict:
        return dict(self.summary)

    def passed(self) -> bool:
        """Deletion and insertion beat random order, and the randomised model's attributions differ."""
        s = self.summary
        ok = all(s["overall"][k]["vs_random"]["passed"] for k in KINDS if k in s["overall"])
        if s.get("randomised_heads"):
            ok = ok and s["randomised_heads"]["passed"]
        return bool(ok)


def _orders(values: np.ndarray, areas: np.ndarray, n_random: int, rng: np.random.Generator) -> dict:
    n = len(values)
    return {"attribution": [np.argsort(-values, kind="stable")], "size": [np.argsort(-areas, kind="stable")],
            "random": [rng.permutation(n) for _ in range(n_random)]}


def _masks(order: np.ndarray, ks: np.ndarray, n_players: int, kind: str) -> np.ndarray:
    """(len(ks), P) coalitions: deletion removes ``order[:k]``; insertion shows only ``order[:k]`` (+ background)."""
    out = np.ones((len(ks), n_players), bool) if kind == "deletion" else np.zeros((len(ks), n_players), bool)
    out[:, -1] = True  # the background stays
    for r, k in enumerate(ks):
        out[r, order[:k]] = kind != "deletion"
    return out


def _auc(fr: np.ndarray, y: np.ndarray) -> float:
    return float(np.trapezoid(y, fr))


def faithfulness(attr: Attributions, ensemble, section, *, steps: int = 10, n_random: int = 3, sanity: bool = True,
                 seed: int = 0, batch_size: int = 64, progress: bool = True) -> Faithfulness:
    """Deletion/insertion curves of every explained spot and gene, and the randomised-model check.

    Parameters
    ----------
    attr
        The attributions to check (from :func:`~stimage_nb.interpretation.explain`).
    ensemble, section
        The model and section they explain (the same ones).
    steps
        Fractions 0, 1/steps, ..., 1 of the nuclei masked (deletion) or shown (insertion).
    n_random
        Random orders per spot (averaged).
    sanity
        Also run the randomised-heads check (explains every spot twice more: the randomised model and
        the reseeded control; triples the cost).
    seed, batch_size, progress
        Seed of the random orders, the bootstrap and the randomised heads; tiles per forward pass;
        a progress bar.

    Returns
    -------
    Faithfulness
    """
    from ._explain import explain, section_stain_source

    genes = list(attr.genes)
    src = section_stain_source(ensemble, section)
    predictor = TilePredictor(ensemble, genes, src, output=attr.output, batch_size=batch_size)
    rng = np.random.default_rng(seed)
    fr = np.linspace(0.0, 1.0, int(steps) + 1)
    curves, scores = [], []
    meta = attr.meta
    names = [str(s) for s in section.adata.obs_names]
    it = list(attr.spots.index)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"faithfulness {attr.section}", unit="spot")
    for spot in it:
        i = names.index(str(spot))
        cx, cy = section.xy[i]
        game = build_game(section.image, spot, cx, cy, tile_um=ensemble.tile_um, out_px=ensemble.out_px,
                          nuclei=attr.nuclei, grow_um=float(meta.get("grow_um", 0.7)),
                          fill=meta.get("fill", "background"))
        N = game.n_nuclei
        if N == 0:
            continue
        players, vals = attr.matrix(spot)
        pos = {p: k for k, p in enumerate(players)}
        V = np.array([[vals[pos[n], g] if n in pos else 0.0 for g in range(len(genes))] for n in game.nucleus_ids])
        areas = attr.nuclei.table["area_um2"].reindex(game.nucleus_ids).to_numpy(dtype=np.float64)
        ks = np.round(fr * N).astype(int)
        shared = {o: v for o, v in _orders(V[:, 0], areas, n_random, rng).items() if o != "attribution"}
        batches, index = [], []
        for kind in KINDS:
            for o, orders in shared.items():
                for r, order in enumerate(orders):
                    batches.append(_masks(order, ks, game.n_players, kind))
                    index.append((kind, o, r, None))
            for g in range(len(genes)):
                batches.append(_masks(np.argsort(-V[:, g], kind="stable"), ks, game.n_players, kind))
                index.append((kind, "attribution", 0, g))
        Z = np.concatenate(batches)
        Y = np.concatenate([predictor(game.compose(Z[a:a + batch_size])) for a in range(0, len(Z), batch_size)])
        Y = Y.reshape(len(batches), len(ks), len(genes))
        full = predictor(game.tile())[0]
        bare = predictor(game.compose(_masks(np.arange(N), np.array([0]), game.n_players, "insertion")))[0]
        for g, gene in enumerate(genes):
            per = {}
            for kind in KINDS:
                ref = full[g] if kind == "deletion" else bare[g]
                for (k2, o, _r, gg), y in zip(index, Y):
                    if k2 != kind or (gg is not None and gg != g):
                        continue
                    per.setdefault((kind, o), []).append(y[:, g] - ref)
                for o in ORDERS:
                    d = np.mean(per[(kind, o)], axis=0)
                    curves += [(spot, gene, kind, o, float(f), float(v)) for f, v in zip(fr, d)]
                a = {o: _auc(fr, np.mean(per[(kind, o)], axis=0)) for o in ORDERS}
                sign = 1.0 if kind == "deletion" else -1.0
                scores.append({"spot": spot, "gene": gene, "kind": kind, "n_nuclei": N,
                               "auc_attribution": a["attribution"], "auc_random": a["random"], "auc_size": a["size"],
                               "gap_random": sign * (a["random"] - a["attribution"]),
                               "gap_size": sign * (a["size"] - a["attribution"])})
    curves_df = pd.DataFrame(curves, columns=["spot", "gene", "kind", "order", "fraction", "delta"])
    scores_df = pd.DataFrame(scores, columns=["spot", "gene", "kind", "n_nuclei", "auc_attribution", "auc_random",
                                              "auc_size", "gap_random", "gap_size"])
    sanity_df = pd.DataFrame(columns=["spot", "gene", "spearman", "scale", "spearman_reseeded"])
    if sanity and len(attr.spots):
        kw = dict(genes=genes, spots=list(attr.spots.index), method=attr.method,
                  max_evals=int(meta.get("max_evals", 500)), output=attr.output, nuclei=attr.nuclei,
                  fill=meta.get("fill", "background"), grow_um=float(meta.get("grow_um", 0.7)), batch_size=batch_size,
                  progress=progress)
        attr_r = explain(randomised_heads(ensemble, seed=seed), section, seed=int(meta.get("seed", 0)), **kw)
        attr_s = explain(ensemble, section, seed=int(meta.get("seed", 0)) + 1, **kw)  # the explainer's own noise
        sanity_df = sanity_table(attr, attr_r)
        sanity_df["spearman_reseeded"] = sanity_table(attr, attr_s)["spearman"].to_numpy()
    return Faithfulness(curves_df, scores_df, sanity_df, _summary(attr, scores_df, sanity_df, steps, n_random, seed))


def sanity_table(attr: Attributions, other: Attributions) -> pd.DataFrame:
    """Per spot and gene: Spearman correlation and scale ratio of two attributions' nucleus values."""
    from scipy.stats import spearmanr

    a = attr.values[attr.values["player"] != BACKGROUND].set_index(["spot", "player", "gene"])["value"]
    b = other.values[other.values["player"] != BACKGROUND].set_index(["spot", "player", "gene"])["value"]
    j = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").reset_index()
    rows = []
    for (spot, gene), d in j.groupby(["spot", "gene"], sort=False):
        if len(d) < 3 or d["a"].nunique() < 2 or d["b"].nunique() < 2:
            rho = np.nan
        else:
            rho = float(spearmanr(d["a"], d["b"])[0])
        scale = float(d["b"].abs().mean() / d["a"].abs().mean()) if d["a"].abs().mean() > 0 else np.nan
        rows.append({"spot": spot, "gene": gene, "spearman": rho, "scale": scale})
    return pd.DataFrame(rows, columns=["spot", "gene", "spearman", "scale"])


def _comparison(x: pd.Series, seed: int) -> dict:
    m, lo, hi = bootstrap_ci(x.to_numpy(), seed=seed)
    v = x.to_numpy(dtype=np.float64)
    v = v[np.isfinite(v)]
    return {"mean_gap": m, "ci95": [lo, hi], "n_spots": int(v.size),
            "fraction_of_spots_above": float((v > 0).mean()) if v.size else None,
            "passed": bool(np.isfinite(lo) and lo > 0)}


def _summary(attr: Attributions, scores: pd.DataFrame, sanity: pd.DataFrame, steps: int, n_random: int, seed: int) -> dict:
    out: dict = {"section": attr.section, "method": attr.method, "output": attr.output,
                 "units": "area between curves, in the explained output's units (" + UNITS.get(attr.output, attr.output) + ")",
                 "steps": int(steps), "n_random_orders": int(n_random), "genes": {}, "overall": {}}
    for gene, d in scores.groupby("gene", sort=False):
        out["genes"][gene] = {kind: {"vs_random": _comparison(dk["gap_random"], seed),
                                     "vs_size": _comparison(dk["gap_size"], seed)}
                              for kind, dk in d.groupby("kind", sort=False)}
    for kind, dk in scores.groupby("kind", sort=False):
        # spots are the units: average a spot's genes first
        per_spot = dk.groupby("spot")[["gap_random", "gap_size"]].mean()
        out["overall"][kind] = {"vs_random": _comparison(per_spot["gap_random"], seed),
                                "vs_size": _comparison(per_spot["gap_size"], seed)}
    if len(sanity):
        m, lo, hi = bootstrap_ci(sanity["spearman"].to_numpy(), seed=seed)
        mr, lor, hir = bootstrap_ci(sanity["spearman_reseeded"].to_numpy(), seed=seed)
        md, lod, hid = bootstrap_ci((sanity["spearman_reseeded"] - sanity["spearman"]).to_numpy(), seed=seed)
        out["randomised_heads"] = {
            "what": "Spearman correlation, per spot and gene, between the nuclei's attributions by the model and by a "
                    "copy with re-initialised heads (Adebayo et al. 2018), against the same model explained again "
                    "with another seed (the explainer's own reproducibility)",
            "mean_spearman": m, "ci95": [lo, hi], "mean_spearman_reseeded": mr, "ci95_reseeded": [lor, hir],
            "mean_difference": md, "ci95_difference": [lod, hid], "n": int(sanity["spearman"].notna().sum()),
            "median_scale_ratio": float(sanity["scale"].median()),
            "below_0.5": bool(np.isfinite(m) and m < SANITY_MAX_RHO),
            "passed": bool(np.isfinite(lod) and lod > 0)}
    return out


def plot_curves(faith: Faithfulness, gene: str, *, axes=None):
    """Mean deletion and insertion curves over spots (attribution, random, size orders) for one gene.

    Returns the matplotlib Figure; never calls ``plt.show()``.
    """
    import matplotlib.pyplot as plt

    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    else:
        fig = axes[0].figure
    c = faith.curves[faith.curves["gene"] == gene]
    colours = {"attribution": "#c0392b", "random": "#7f8c8d", "size": "#2e86c1"}
    for ax, kind in zip(axes, KINDS):
        d = c[c["kind"] == kind]
        for o in ORDERS:
            m = d[d["order"] == o].groupby("fraction")["delta"].agg(["mean", "sem"])
            ax.plot(m.index, m["mean"], "-o", ms=3, color=colours[o], label=f"{o} first" if o != "random" else "random")
            ax.fill_between(m.index, m["mean"] - m["sem"], m["mean"] + m["sem"], color=colours[o], alpha=0.15)
        g = faith.summary.get("genes", {}).get(gene, {}).get(kind, {}).get("vs_random", {})
        ci = g.get("ci95", [np.nan, np.nan])
        ax.set_title(f"{kind}: gap vs random {g.get('mean_gap', np.nan):+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]", fontsize=9)
        ax.set_xlabel("fraction of nuclei " + ("masked" if kind == "deletion" else "shown"))
        ax.axhline(0, color="k", lw=0.5)
    axes[0].set_ylabel(f"change in {gene} ({faith.summary.get('output', '')})")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
