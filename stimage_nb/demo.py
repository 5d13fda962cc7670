"""The end-to-end demo on the bundled her2st data: train, predict held-out data, evaluate, report.

``stimage-nb demo`` (or :func:`run_demo`) trains a deep ensemble on sections of patient C, predicts a
held-out section of the same patient (C6) and the held-out patient B (B4), evaluates both against
their observed counts side by side with the handcrafted ridge baseline (trained in the same run on
the same sections and tiles), and writes ``OUT/report.md`` with its figures:

- a metrics table (Pearson/Spearman vs log1p counts and vs depth-normalised CP10k, model vs baseline;
  calibration; cell types),
- the distribution of per-gene correlations, model vs baseline, per held-out section,
- observed vs predicted maps of the best-predicted genes with their aleatoric and epistemic
  uncertainty,
- predicted vs observed dominant cell-type maps,
- the calibration curve of the predictive distribution,
- robustness: the held-out section C6 re-made as a 2x coarser scan, defocused, restained and
  JPEG-compressed (:mod:`stimage_nb.shifts`), model vs baseline.

Layout of ``OUT``::

    report.md            the report (links the PNGs below)
    run[-quick]/         the training run directory (an Ensemble once finished)
    pred[-quick]/        <section>.h5ad predictions
    eval[-quick]/        metrics.json, metrics_per_gene.csv, figures/ (from stimage_nb.evaluate)
    figures[-quick]/     the demo's maps
    shifted[-quick]/     the robustness check: C6 as a coarser scan, defocused, restained, JPEG-compressed
                         (images, manifest.csv, pred/, eval/; see stimage_nb.shifts)

Re-running resumes: a finished training run is loaded, not retrained (an interrupted one continues
from its last epoch), and predictions made by the same run are reused.

``quick=True`` is a smoke run (a tiny timm test backbone, two sections, 24 genes, two epochs) that
finishes in a minute or two on a CPU; its numbers mean nothing beyond "the pipeline runs".
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import _keys as K
from .atomic import save_figure, write_json, write_text
from .names import file_stem

log = logging.getLogger(__name__)

GENE_LIST = "genes_stimage_her2st.txt"


@dataclass
class DemoPlan:
    """What the demo trains on and tests on (see :data:`FULL` and :data:`QUICK`).

    Attributes
    ----------
    train_sections
        Sections the ensemble is trained on (the validation sections included: they are held out from
        fitting by :func:`stimage_nb.train.train` and used for early stopping).
    val_sections
        Whole sections for early stopping (inside ``train_sections``).
    test_sections
        Held-out sections to predict and evaluate (a section of the training patient and another patient).
    n_genes
        ``None``: the whole STimage her2st list (769 genes); an int: that many of the list's genes with
        the highest mean count in the training sections.
    config
        :class:`stimage_nb.train.TrainConfig` settings.
    n_best_genes
        Genes per held-out section shown as maps.
    shift_section, shifts
        A held-out section re-made as other acquisitions would have made it (names of
        :data:`stimage_nb.shifts.STANDARD_SHIFTS`), predicted by the same ensemble and scored with the
        same baseline; ``shift_section=None`` skips the robustness check.
    """

    train_sections: list[str]
    val_sections: list[str]
    test_sections: list[str]
    n_genes: int | None
    config: dict = field(default_factory=dict)
    n_best_genes: int = 3
    shift_section: str | None = "C6"
    shifts: tuple[str, ...] = ("scan_2x", "defocus_1.5um", "stain_H0.8_E1.3", "jpeg_q30")


#: The full demo: 769 genes, trained on C2-C5 (C5 for early stopping), tested on C6 and B4, with the
#: package's offline default (:class:`stimage_nb.train.TrainConfig` defaults: frozen k-means +
#: handcrafted features, NB mean = library size from the image x a low-rank composition, 5 members; see
#: docs/offline_default.md). On 2 cores: ~1 min
#: converting the six JPEGs to OME-Zarr on a fresh machine, ~1-4 min training (k-means filters,
#: features, 5 heads), under a minute to predict, evaluate (with the ridge baseline) and draw, and about
#: a minute for the robustness check (four shifted copies of C6 written, predicted and scored).
FULL = DemoPlan(
    train_sections=["C2", "C3", "C4", "C5"], val_sections=["C5"], test_sections=["C6", "B4"], n_genes=None,
    config=dict(members=5, seed=0),
)

#: The smoke run: a tiny timm test model, C4 (train) + C5 (validation), 24 genes, 2 epochs.
QUICK = DemoPlan(
    train_sections=["C4", "C5"], val_sections=["C5"], test_sections=["C6", "B4"], n_genes=24,
    config=dict(backbone="test_resnet", weights="none", tile_um=150.0, out_px=32, epochs=2, batch_size=32,
                members=2, patience=2, seed=0),
    n_best_genes=2, shifts=("scan_2x",),
)


# ----------------------------------------------------------------------------- steps
def _top_genes(manifest: Path, sections: list[str], genes: list[str], n: int) -> list[str]:
    from .io.readers import read_manifest

    secs = read_manifest(manifest, sections, genes=genes)
    means = np.mean([np.asarray(s.adata.X.mean(axis=0)).ravel() for s in secs], axis=0)
    order = np.argsort(-means, kind="stable")[:n]
    return [genes[i] for i in sorted(order)]


def _train(manifest: Path, genes: list[str], run_dir: Path, plan: DemoPlan, device: str, progress: bool):
    from .train import TrainConfig, train

    cfg = TrainConfig(**{**plan.config, "device": device})
    return train(manifest, genes=genes, out=run_dir, sections=plan.train_sections, val_sections=plan.val_sections,
                 config=cfg, progress=progress)


def _predict(run_dir: Path, manifest: Path, pred_dir: Path, sections: list[str], run_id: str, device: str,
             progress: bool) -> list[Path]:
    """Predict the held-out sections, reusing predictions this run already made."""
    import anndata as ad

    from .predict import predict_manifest

    todo = []
    for s in sections:
        p = pred_dir / f"{file_stem(s)}.h5ad"
        if p.is_file():
            try:
                prov = ad.read_h5ad(p, backed="r").uns.get(K.UNS, {})
                if str(prov.get("run_id")) == str(run_id):
                    log.info("%s: reusing %s (same run %s)", s, p, run_id)
                    continue
            except Exception:  # noqa: BLE001 - an unreadable file is simply predicted again
                pass
        todo.append(s)
    if todo:
        predict_manifest(run_dir, manifest, out=pred_dir, sections=todo, device=device, progress=progress)
    return [pred_dir / f"{file_stem(s)}.h5ad" for s in sections]


def _savefig(fig, path: Path, dpi: int = 100) -> Path:

    return save_figure(fig, path, dpi=dpi)


def _best_genes(per_gene: pd.DataFrame, section: str, n: int) -> list[tuple[str, float]]:
    d = per_gene[(per_gene["section"] == section) & (per_gene["model"] == "model")
                 & (per_gene["target"] == "log1p_counts")].dropna(subset=["pearson"])
    d = d.sort_values("pearson", ascending=False).head(n)
    return list(zip(d["gene"], d["pearson"]))


def _maps(pred_paths: list[Path], manifest: Path, per_gene: pd.DataFrame, fig_dir: Path, n_best: int) -> dict:
    """Best-gene and cell-type maps per held-out section."""
    import matplotlib.pyplot as plt

    from . import plotting as P
    from .io.prediction import read_prediction
    from .io.readers import read_manifest

    out: dict = {}
    for path in pred_paths:
        pred = read_prediction(path)
        name = str(pred.uns.get(K.UNS, {}).get("section", path.stem))
        (sec,) = read_manifest(manifest, [name], genes=list(pred.var_names), drop_missing_genes=True)
        entry: dict = {"genes": []}
        for gene, r in _best_genes(per_gene, name, n_best):
            fig = P.spatial_gene(pred, gene, section=sec)
            fig.suptitle(f"{name}: {gene} (Pearson r = {r:.2f} vs log1p counts)", fontsize=10)
            entry["genes"].append({"gene": gene, "pearson": float(r),
                                   "png": _savefig(fig, fig_dir / f"{file_stem(name)}_{file_stem(gene)}.png")})
        if K.CELLTYPE_MEAN in pred.obsm:
            fig, axs = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"wspace": 0.45})
            P.celltype_map(pred, section=sec, ax=axs[0])
            if K.CELLTYPE_PROPORTIONS in sec.adata.obsm:
                P.celltype_map(sec, ax=axs[1])
            else:
                axs[1].set_axis_off()
            entry["celltypes_png"] = _savefig(fig, fig_dir / f"{file_stem(name)}_celltypes.png")
        out[name] = entry
    return out


# ----------------------------------------------------------------------------- report
def _f(v, nd: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{nd}f}"


def _rel(p, base: Path) -> str:
    return os.path.relpath(str(p), str(base)).replace(os.sep, "/")


def _report(out: Path, metrics: dict, maps: dict, info: dict) -> str:
    """The markdown report (the demo's report template)."""
    secs = {s: metrics["sections"][s] for s in info["test_sections"] if s in metrics["sections"]}
    L: list[str] = []
    w = L.append
    w(f"# stimage_nb demo report{' (quick smoke run)' if info['quick'] else ''}\n")
    w(f"Generated {info['created']} in {info['elapsed_min']:.1f} min on {info['device']} "
      f"({info['platform']}, stimage_nb {metrics.get('package_version')}).\n")
    if info["quick"]:
        w("> **Quick mode**: a tiny test backbone trained for two epochs on a few genes. The numbers below "
          "only show that the pipeline runs end to end; run `stimage-nb demo` for the real demo.\n")
    w("## Setup\n")
    w(f"- Data: the bundled her2st sections (Andersson et al., Nat Commun 2021), manifest `{info['manifest']}`.")
    w(f"- Training: sections {', '.join(info['train_sections'])} of patient C "
      f"({', '.join(info['val_sections'])} held out of fitting, for validation); {info['n_genes']} genes "
      f"({info['genes_source']}).")
    c = info["config"]
    if c.get("frozen") and c.get("extractor") not in (None, "timm"):
        model = (f"deep ensemble of {c['members']} members on frozen `{c['extractor']}` features (the offline "
                 "default: k-means convolutional filters learned from the training sections' own tiles plus "
                 "handcrafted colour/texture statistics; no pretrained weights), each with a "
                 f"{'rank-' + str(c['rank']) + ' ' if c.get('rank') else ''}negative-binomial gene head"
                 + (" (mean = a library size regressed from the image x a composition over the genes shrunk "
                    + (f"per gene by cross-fitted factors x {c.get('composition_cv_scale')}"
                       if c.get("composition_shrinkage") == "cv" else f"by {c.get('composition_shrinkage')}") + ")"
                    if c.get("library_size") == "ridge" else "")
                 + f" and a cell-type head trained for {c['epochs']} epochs")
    else:
        model = (f"deep ensemble of {c['members']} × `{c['backbone']}` (weights: {c['weights']}"
                 f"{', frozen' if c.get('frozen') else ', fine-tuned'}), negative-binomial gene head + cell-type "
                 f"head; up to {c['epochs']} epochs")
    w(f"- Model: {model}; tiles of {c['tile_um']:g} µm resampled to {c['out_px']} px. Run `{info['run_id']}`.")
    w(f"- Held out: {', '.join(info['test_sections'])} — "
      + "; ".join(f"{s} ({'another patient' if secs[s]['held_out_patient'] else 'same patient, unseen section'})"
                  for s in info["test_sections"] if s in secs) + ".")
    w("- Baseline: ridge regression on 40 handcrafted colour/texture features of the same tiles, trained in the "
      "same run on the same training sections (`stimage_nb.baseline`).")
    w("- Time per step: " + ", ".join(f"{k} {v:.0f} s" for k, v in info["timings"].items())
      + f"; CPU time of the process {info['cpu_s']:.0f} s.\n")

    w("## Gene expression on held-out sections\n")
    w("Mean (median) per-gene Pearson r across the spots of each held-out section, and the number of genes "
      "with r > 0.3. *log1p counts* is the STimage protocol (dominated by spot depth); *CP10k* compares "
      "depth-normalised expression and measures gene-specific prediction.\n")
    w("| section | spots | genes | model r, log1p counts | baseline r, log1p counts | model genes r>0.3 | "
      "baseline genes r>0.3 | model r, CP10k | baseline r, CP10k | model Spearman, log1p counts |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for s, e in secs.items():
        m, b = e["model"]["genes"], e.get("baseline", {}).get("genes")
        mp, mc = m["log1p_counts"]["pearson"], m["log1p_cp10k"]["pearson"]
        bp = b["log1p_counts"]["pearson"] if b else {}
        bc = b["log1p_cp10k"]["pearson"] if b else {}
        model_wins = bp.get("mean") is None or (mp["mean"] is not None and mp["mean"] >= bp["mean"])
        bm, bb = ("**", "") if model_wins else ("", "**")  # bold marks the better of the two, never by default
        w(f"| {s} | {e['n_spots']} | {e['n_genes']} | {bm}{_f(mp['mean'])}{bm} ({_f(mp['median'])}) | "
          f"{bb}{_f(bp.get('mean'))}{bb} ({_f(bp.get('median'))}) | {mp['n_r_gt_0.3']} | {bp.get('n_r_gt_0.3', '–')} | "
          f"{_f(mc['mean'])} | {_f(bc.get('mean'))} | {_f(m['log1p_counts']['spearman']['mean'])} |")
    w("")
    verdict = []
    for s, e in secs.items():
        comp = e.get("comparison", {}).get("log1p_counts")
        if comp and comp["model_beats_baseline"] is not None:
            verdict.append(f"{s}: the ensemble {'beats' if comp['model_beats_baseline'] else 'does **not** beat'} "
                           f"the baseline ({_f(comp['model_mean_pearson'])} vs {_f(comp['baseline_mean_pearson'])})")
    if verdict:
        w("On log1p counts, " + "; ".join(verdict) + ".\n")
    figs = metrics.get("figures", {})
    for t, label in (("log1p_counts", "log1p counts"), ("log1p_cp10k", "depth-normalised CP10k")):
        if f"correlation_{t}" in figs:
            w(f"![per-gene Pearson vs {label}, model vs baseline]({_rel(figs[f'correlation_{t}'], out)})\n")

    w("## Best-predicted genes: observed, predicted and uncertainty\n")
    w("Each row: observed log1p counts, predicted log1p mean, aleatoric SD (the noise the model expects "
      "around its mean) and epistemic SD (the disagreement between ensemble members), over the H&E.\n")
    for s, e in maps.items():
        w(f"### {s}\n")
        for g in e["genes"]:
            w(f"![{s} {g['gene']}]({_rel(g['png'], out)})\n")

    w("## Calibration of the predictive distribution\n")
    w("Each spot and gene gets a negative binomial with the predictive mean and variance = aleatoric + "
      "epistemic. Coverage = fraction of observed counts inside the central 50% / 90% interval (randomised "
      "PIT, exact for discrete counts); NLL = mean negative log-likelihood per spot and gene.\n")
    w("| section | coverage 50% | coverage 90% | NLL | aleatoric only: 50% | aleatoric only: 90% | "
      "aleatoric only: NLL | median counts/spot, observed | predicted |")
    w("|---|---|---|---|---|---|---|---|---|")
    for s, e in secs.items():
        cal = e["model"]["calibration"]
        al = cal["aleatoric_only"]
        d = e.get("depth", {})
        w(f"| {s} | {_f(cal['coverage_50'])} | {_f(cal['coverage_90'])} | {_f(cal['nll'])} | "
          f"{_f(al['coverage_50'])} | {_f(al['coverage_90'])} | {_f(al['nll'])} | "
          f"{_f(d.get('observed_median_panel_counts'), 0)} | {_f(d.get('predicted_median_panel_counts'), 0)} |")
    w("")
    shifted = [s for s, e in secs.items() if (e.get("depth", {}).get("predicted_over_observed") or 1) > 2
               or (e.get("depth", {}).get("predicted_over_observed") or 1) < 0.5]
    for s in shifted:
        d = secs[s]["depth"]
        w(f"{s} was sequenced at another depth than the training sections (median counts per spot over the gene "
          f"panel: observed {_f(d['observed_median_panel_counts'], 0)}, predicted "
          f"{_f(d['predicted_median_panel_counts'], 0)}). The model predicts counts at the training depth, so "
          f"{s}'s coverage and NLL mix calibration with that shift; its correlations, computed across the "
          "spots of the section, are largely unaffected.\n")
    if "calibration" in figs:
        w(f"![calibration]({_rel(figs['calibration'], out)})\n")

    if all("uncertainty_ranking" in e["model"] for e in secs.values()):
        w("### Does the uncertainty say which predictions to trust?\n")
        w("Genes: mean r of all genes, of the half the model is most certain of (smallest relative predictive "
          "SD), and of the most expressed half (the obvious proxy). Spots: mean |log1p error| of the 80% of spots "
          "kept per gene, relative to all spots (1 = a random choice), ranked by the predictive SD, by the "
          "epistemic SD alone, by predicted depth (proxy), and by the error itself (oracle).\n")
        w("| section | r, all genes | most certain half | most expressed half | spots by SD | by epistemic SD | "
          "by depth | oracle |")
        w("|---|---|---|---|---|---|---|---|")
        for s, e in secs.items():
            ug, us = e["model"]["uncertainty_ranking"]["genes"], e["model"]["uncertainty_ranking"]["spots"]
            w(f"| {s} | {_f(ug['mean_r_all'])} | {_f(ug['mean_r_most_certain_0.5'])} | "
              f"{_f(ug['mean_r_most_expressed_0.5'])} | {_f(us['error_retained_0.8_by_sd'])} | "
              f"{_f(us['error_retained_0.8_by_epistemic_sd'])} | {_f(us['error_retained_0.8_by_predicted_depth'])} | "
              f"{_f(us['error_retained_0.8_oracle'])} |")
        w("")
        if "uncertainty_ranking" in figs:
            w(f"![uncertainty ranking]({_rel(figs['uncertainty_ranking'], out)})\n")

    rob = info.get("robustness")
    if rob:
        sec = rob["section"]
        w("## Robustness to other scanners and stains (simulated)\n")
        w(f"Held-out section {sec} re-made as other acquisitions would have made it (`stimage_nb.shifts`: a coarser "
          "scan, defocus, another staining, JPEG compression; same spots and counts) and predicted by the same "
          "ensemble, unchanged; the baseline is scored on the same shifted tiles. Mean per-gene Pearson r vs "
          "log1p counts. The full six-fold table: `benchmarks/shift_her2st.py`.\n")
        w("| acquisition | model r | baseline r | model − baseline | model coverage 90% | domain percentile |")
        w("|---|---|---|---|---|---|")
        for name, e in rob["rows"].items():
            diff = None if e["model"] is None or e["baseline"] is None else e["model"] - e["baseline"]
            w(f"| {name} | {_f(e['model'])} | {_f(e['baseline'])} | {'–' if diff is None else f'{diff:+.3f}'} | "
              f"{_f(e['coverage_90'], 2)} | {_f(e.get('domain_percentile'), 2)} |")
        from .datasets import HER2ST_UM_PER_PX

        tile_res = info.get("tile_um_per_px")
        if tile_res and tile_res >= 2 * HER2ST_UM_PER_PX and "scan_2x" in rob["rows"]:
            w(f"\nThe model reads its tiles at {tile_res:.2f} µm/px: an acquisition finer than that (a 2x coarser scan of "
              "a 0.69 µm/px slide is 1.38 µm/px) reaches the model as the same pixels, so its row can equal the "
              "reference's exactly.")
        w("\n*Domain percentile*: the median spot's distance from the training data, as a percentile of the "
          "validation sections' tiles (`stimage_nb.domain`; ~0.5 for data like them, above 0.8 the section is "
          "flagged as unlike the training data).\n")
        w("")

    w("## Cell types\n")
    w("Stereoscope proportions (major types) as soft targets. Pearson r per type averaged over types, mean "
      "absolute error, Jensen–Shannon divergence per spot, and how often the dominant type agrees.\n")
    w("| section | model mean r | baseline mean r | model MAE | baseline MAE | model JS | baseline JS | "
      "model dominant agreement | baseline dominant agreement |")
    w("|---|---|---|---|---|---|---|---|---|")
    for s, e in secs.items():
        mc = e["model"].get("celltypes") or {}
        bc = (e.get("baseline") or {}).get("celltypes") or {}
        w(f"| {s} | {_f((mc.get('pearson_summary') or {}).get('mean'))} | "
          f"{_f((bc.get('pearson_summary') or {}).get('mean'))} | {_f(mc.get('mae'))} | {_f(bc.get('mae'))} | "
          f"{_f(mc.get('js_divergence'))} | {_f(bc.get('js_divergence'))} | {_f(mc.get('dominant_agreement'))} | "
          f"{_f(bc.get('dominant_agreement'))} |")
    w("")
    for s, e in maps.items():
        if e.get("celltypes_png"):
            w(f"![{s} cell types: predicted (left) vs observed (right)]({_rel(e['celltypes_png'], out)})\n")

    if metrics.get("skipped"):
        w("## Skipped\n")
        for s, why in metrics["skipped"].items():
            w(f"- {s}: {why}")
        w("")
    w("## Files\n")
    w(f"- metrics: `{_rel(info['eval_dir'] / 'metrics.json', out)}`, per gene: "
      f"`{_rel(info['eval_dir'] / 'metrics_per_gene.csv', out)}`")
    w(f"- predictions: `{_rel(info['pred_dir'], out)}/<section>.h5ad`; model: `{_rel(info['run_dir'], out)}/`")
    w(f"- reproduce: `stimage-nb demo{' --quick' if info['quick'] else ''} --out {out}` "
      "(re-running reuses the finished run and predictions).")
    return "\n".join(L) + "\n"


def _robustness(manifest: Path, metrics: dict, plan: DemoPlan, sdir: Path, run_dir: Path, run_id: str, device: str,
                progress: bool) -> dict:
    """Predict and score the plan's held-out section under simulated acquisition shifts."""
    from .evaluate import evaluate
    from .shifts import parse_shifts, shift_manifest

    sec = plan.shift_section
    shifts = parse_shifts(",".join(plan.shifts))
    shifted = shift_manifest(manifest, [sec], shifts, sdir)
    names = [f"{sec}__{sh.name}" for sh in shifts]
    _predict(run_dir, shifted, sdir / "pred", names, run_id, device, progress)
    m = evaluate(sdir / "pred", shifted, out=sdir / "eval", baseline=True, sections=names, figures=False,
                 progress=progress)

    def row(e):
        if e is None:
            return {"model": None, "baseline": None, "coverage_90": None, "domain_percentile": None}
        b = (e.get("baseline") or {}).get("genes")
        return {"model": e["model"]["genes"]["log1p_counts"]["pearson"]["mean"],
                "baseline": b["log1p_counts"]["pearson"]["mean"] if b else None,
                "coverage_90": e["model"]["calibration"]["coverage_90"],
                "domain_percentile": (e.get("domain") or {}).get("median_percentile")}

    rows = {f"as scanned ({sec})": row(metrics["sections"].get(sec))}
    for sh, n in zip(shifts, names):
        rows[sh.name] = row(m["sections"].get(n))
    return {"section": sec, "rows": rows, "manifest": str(shifted)}


# ----------------------------------------------------------------------------- entry point
def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): on a busy shared machine, CPU time divided by
    the number of cores estimates the wall time the demo needs when it has the machine to itself."""
    t = os.times()
    return float(t.user + t.system)


def _her2st_manifest(progress: bool) -> Path:
    """The bundle's her2st manifest, or the six public sections fetched into the data directory."""
    from .datasets import fetch_her2st
    from .errors import DataUnavailableError

    try:
        return fetch_her2st(progress=progress)
    except DataUnavailableError as e:
        raise DataUnavailableError(f"the demo needs the public her2st data (about 25 MB), which is not on this machine "
                                   f"and cannot be downloaded now: {e}") from e


def run_demo(out: str | os.PathLike = "demo_out", quick: bool = False, device: str = "auto", *,
             manifest: str | os.PathLike | None = None, plan: DemoPlan | None = None,
             progress: bool = True) -> Path:
    """Train on her2st patient C, predict a held-out section and patient, evaluate, write a report.

    Parameters
    ----------
    out
        Output folder (see the module docstring for its layout).
    quick
        A one-to-two-minute smoke run (:data:`QUICK`) instead of the full demo (:data:`FULL`).
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    manifest
        The her2st manifest (default: the bundled ``her2st/sections.csv`` of the data directory; without
        a bundle the six public sections are fetched first, :func:`stimage_nb.datasets.fetch_her2st`,
        and the STimage gene list is replaced by the most variable genes, which the report says).
    plan
        Override the sections, genes or training settings.
    progress
        Progress bars.

    Returns
    -------
    The path of ``report.md``.

    Raises
    ------
    DataUnavailableError
        No bundle and no way to download the data (offline): one line that says how to get it.
    """
    from .devices import resolve_device
    from .evaluate import evaluate
    from .io.readers import read_gene_list

    t_start = time.perf_counter()
    cpu_start = _cpu_seconds()
    manifest = Path(manifest) if manifest is not None else _her2st_manifest(progress)  # before writing anything
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan or (QUICK if quick else FULL)
    sfx = "-quick" if quick else ""
    run_dir, pred_dir, eval_dir, fig_dir = (out / f"{n}{sfx}" for n in ("run", "pred", "eval", "figures"))
    timings: dict[str, float] = {}

    if (manifest.parent / GENE_LIST).is_file():
        genes_all, list_name = read_gene_list(manifest.parent / GENE_LIST), f"the STimage her2st list `{GENE_LIST}`"
    else:  # fetched data: the STimage list is not part of the public her2st repository
        from .datasets import her2st_gene_list

        genes_all = her2st_gene_list(manifest, train_sections=plan.train_sections)
        list_name = (f"the {len(genes_all)} most variable genes of the training sections (`{GENE_LIST}` of the "
                     "offline bundle is not part of the public her2st data)")
    if plan.n_genes is None:
        genes, genes_source = genes_all, list_name
    else:
        genes = _top_genes(manifest, plan.train_sections, genes_all, plan.n_genes)
        genes_source = f"the {plan.n_genes} genes of {list_name} with the highest mean count in training"
    log.info("demo: training on %s with %d genes -> %s", plan.train_sections, len(genes), run_dir)

    t = time.perf_counter()
    ens = _train(manifest, genes, run_dir, plan, device, progress)
    timings["training"] = time.perf_counter() - t
    run_id = ens.run_id

    t = time.perf_counter()
    preds = _predict(run_dir, manifest, pred_dir, plan.test_sections, run_id, device, progress)
    timings["prediction"] = time.perf_counter() - t

    t = time.perf_counter()
    metrics = evaluate(pred_dir, manifest, out=eval_dir, baseline=True, sections=plan.test_sections,
                       progress=progress)
    timings["evaluation + baseline"] = time.perf_counter() - t

    t = time.perf_counter()
    per_gene = pd.read_csv(eval_dir / "metrics_per_gene.csv")
    maps = _maps(preds, manifest, per_gene, fig_dir, plan.n_best_genes)
    timings["figures"] = time.perf_counter() - t

    robustness = None
    if plan.shift_section and plan.shifts and plan.shift_section in metrics["sections"]:
        t = time.perf_counter()
        robustness = _robustness(manifest, metrics, plan, out / f"shifted{sfx}", run_dir, run_id, device, progress)
        timings["robustness (simulated shifts)"] = time.perf_counter() - t

    dev = resolve_device(device)
    info = {
        "quick": quick, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_min": (time.perf_counter() - t_start) / 60, "device": str(dev) if dev.type != "cpu" else
        f"cpu ({os.cpu_count()} cores)", "platform": f"{platform.system()} {platform.machine()}, Python "
        f"{platform.python_version()}", "manifest": str(manifest), "train_sections": plan.train_sections,
        "val_sections": plan.val_sections, "test_sections": plan.test_sections, "n_genes": len(ens.genes),
        "genes_source": genes_source, "config": {**ens.meta.get("train_config", plan.config)}, "run_id": run_id,
        "timings": timings, "robustness": robustness, "tile_um_per_px": float(ens.tile_um) / int(ens.out_px),
        "cpu_s": _cpu_seconds() - cpu_start, "eval_dir": eval_dir, "pred_dir": pred_dir, "run_dir": run_dir,
    }
    text = _report(out, metrics, maps, info)
    report = out / "report.md"
    write_text(report, text)
    summary = {"report": str(report), "elapsed_s": time.perf_counter() - t_start, "cpu_s": info["cpu_s"],
               "cpu_count": os.cpu_count(), "timings": timings,
               "quick": quick, "run_id": run_id}
    write_json(out / f"demo{sfx}.json", summary, indent=1)
    log.info("demo finished in %.1f min: %s", summary["elapsed_s"] / 60, report)
    return report
