"""Held-out benchmark of the offline default on the bundled her2st data, through the package's own API.

Folds (769 genes of ``genes_stimage_her2st.txt``):

- leave-one-section-out within patient C: test one of C2..C6, the other four are the training pool;
- cross-patient: the training pool is C2..C6, the test section is B4.

In every fold the **last section of the training pool** (in C2..C6 order) is the validation section
(test C2..C5 -> validation C6, test C6 -> validation C5, test B4 -> validation C6): ``train`` scores it
every epoch (early stopping when ``TrainConfig.early_stop`` is not ``"none"``; the frozen default trains
its 150 epochs and keeps the last) and this script scores it at the end. The model and the ridge
baseline are trained on the remaining sections.

Each fold runs ``stimage_nb.train.train`` (the default :class:`~stimage_nb.train.TrainConfig`, i.e. the
offline default recipe, unless options say otherwise) -> ``stimage_nb.predict.predict_manifest`` ->
``stimage_nb.evaluate.evaluate`` (which trains and scores the ridge baseline in the same run on the same
training sections and tiles). Reported per held-out section: the model's mean Pearson over the 769 genes
against ``log1p`` counts and against ``log1p`` CP10k, genes with r > 0.3, the 50%/90% coverage of the
predictive distribution, and the baseline's mean Pearson for both targets. The validation section is
scored too (``--score-val``, default on): it was used for early stopping only, so its numbers are the
ones on which settings (e.g. ``--bagging``) may be chosen without looking at the test sections.

Usage::

    python benchmarks/loso_her2st.py --out bench_out/loso            # all 6 folds, the default recipe
    python benchmarks/loso_her2st.py --out bench_out/bag --bagging   # the same with bootstrap members
    python benchmarks/loso_her2st.py --out bench_out/mac --stain macenko   # with Macenko normalisation
    python benchmarks/loso_her2st.py --out o --folds C5,B4 --members 2 --epochs 20   # a quick look

Writes ``OUT/results.json`` and ``OUT/results.md``; run directories and predictions go in ``OUT/runs``
(re-running resumes finished folds).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

C = ["C2", "C3", "C4", "C5", "C6"]
FOLDS = {**{h: [c for c in C if c != h] for h in C}, "B4": list(C)}


def fold_sections(test: str) -> tuple[list[str], str]:
    """(training sections, validation section) of a fold."""
    pool = FOLDS[test]
    return pool[:-1], pool[-1]


def _row(entry: dict) -> dict:
    m, b = entry["model"], entry.get("baseline", {})
    g = m["genes"]
    out = {
        "r_log1p": g["log1p_counts"]["pearson"]["mean"],
        "r_cp10k": g["log1p_cp10k"]["pearson"]["mean"],
        "n_r_gt_0.3": g["log1p_counts"]["pearson"]["n_r_gt_0.3"],
        "n_r_gt_0.3_cp10k": g["log1p_cp10k"]["pearson"]["n_r_gt_0.3"],
        "coverage_50": m["calibration"]["coverage_50"],
        "coverage_90": m["calibration"]["coverage_90"],
        "coverage_90_aleatoric_only": m["calibration"]["aleatoric_only"]["coverage_90"],
        "nll": m["calibration"]["nll"],
        "depth_pred_over_obs": entry["depth"]["predicted_over_observed"],
    }
    ur = m.get("uncertainty_ranking")
    if ur:  # does the uncertainty say which genes / spots to trust? (stimage_nb.evaluate.uncertainty_ranking)
        out.update({"unc_rho_gene_sd_vs_r": ur["genes"]["spearman_relative_sd_vs_r"],
                    "r_most_certain_half": ur["genes"]["mean_r_most_certain_0.5"],
                    "r_most_expressed_half": ur["genes"]["mean_r_most_expressed_0.5"],
                    "err80_by_sd": ur["spots"]["error_retained_0.8_by_sd"],
                    "err80_by_epistemic_sd": ur["spots"]["error_retained_0.8_by_epistemic_sd"],
                    "err80_by_predicted_depth": ur["spots"]["error_retained_0.8_by_predicted_depth"],
                    "err80_oracle": ur["spots"]["error_retained_0.8_oracle"]})
    if "genes" in b:
        out["baseline_r_log1p"] = b["genes"]["log1p_counts"]["pearson"]["mean"]
        out["baseline_r_cp10k"] = b["genes"]["log1p_cp10k"]["pearson"]["mean"]
        out["baseline_n_r_gt_0.3"] = b["genes"]["log1p_counts"]["pearson"]["n_r_gt_0.3"]
    return out


def _uncertainty(pred_path: Path) -> dict:
    """Mean epistemic SD / mean predictive mean, and the same for the aleatoric SD, of one prediction file."""
    import anndata as ad

    a = ad.read_h5ad(pred_path)
    mu = float(np.mean(a.X))
    return {"epistemic_sd_over_mean": float(np.mean(np.sqrt(a.layers["epistemic_var"]))) / mu,
            "aleatoric_sd_over_mean": float(np.mean(np.sqrt(a.layers["aleatoric_var"]))) / mu}


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` beside ``path`` and rename it into place (a killed run never leaves half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(out: Path, recs: list[dict], md: str) -> None:
    """``OUT/results.json`` (the fold records) and ``OUT/results.md`` (the tables)."""
    write_atomic(out / "results.json", json.dumps(recs, indent=1))
    write_atomic(out / "results.md", md)


def run_fold(test: str, args, manifest: Path, genes: list[str], out: Path) -> dict:
    from stimage_nb.evaluate import evaluate
    from stimage_nb.predict import predict_manifest
    from stimage_nb.train import TrainConfig, train

    train_secs, val = fold_sections(test)
    fdir = out / "runs" / f"test_{test}"
    done = fdir / "fold.json"
    old = json.loads(done.read_text()) if done.is_file() else None
    if old is not None and not args.rescore:
        return old
    kw = {"members": args.members, "device": args.device, "bagging": args.bagging, "seed": args.seed,
          "member_features": args.member_features}
    for k in ("epochs", "kmeans_k", "rank", "extractor", "stain"):
        if getattr(args, k) is not None:
            kw[k] = getattr(args, k)
    cfg = TrainConfig(**kw)
    t0 = time.perf_counter()
    ens = train(manifest, genes=genes, out=fdir / "model", sections=train_secs, val_sections=[val], config=cfg,
                progress=args.progress)
    t_train = time.perf_counter() - t0
    secs = [test] + ([val] if args.score_val else [])
    t0 = time.perf_counter()
    predict_manifest(fdir / "model", manifest, fdir / "pred", sections=secs, device=args.device,
                     progress=args.progress)
    t_pred = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = evaluate(fdir / "pred", manifest, out=fdir / "eval", sections=secs, figures=False, progress=args.progress)
    t_eval = time.perf_counter() - t0
    members = ens.meta.get("members", [])
    rows = {s: _row(res["sections"][s]) for s in secs}
    for s in secs:
        rows[s].update(_uncertainty(fdir / "pred" / f"{s}.h5ad"))
    rec = {"test": test, "train_sections": train_secs, "val_section": val, "config": cfg.to_dict(),
           "test_metrics": rows[test],
           "val_metrics": rows[val] if args.score_val else None,
           "best_epochs": [m.get("best_epoch") for m in members],
           "seconds": {"train": round(t_train, 1), "predict": round(t_pred, 1), "evaluate_with_baseline": round(t_eval, 1)}}
    if old is not None:  # --rescore: the saved model was loaded, not trained; keep the original timings
        rec["seconds"], rec["best_epochs"] = old["seconds"], old["best_epochs"]
    write_atomic(done, json.dumps(rec, indent=1))
    return rec


def markdown(recs: list[dict], title: str) -> str:
    cols = [r["test"] for r in recs]
    lines = [f"### {title}", "", "Held-out section in each column (validation section, monitored every epoch: "
             + ", ".join(f"{r['test']}→{r['val_section']}" for r in recs) + ").", "",
             "| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]

    def line(name, key, fmt="{:.3f}", src="test_metrics"):
        vals = []
        for r in recs:
            v = (r.get(src) or {}).get(key)
            vals.append("–" if v is None else fmt.format(v))
        lines.append(f"| {name} | " + " | ".join(vals) + " |")

    line("**ensemble**, mean r vs log1p counts", "r_log1p")
    line("ridge baseline, mean r vs log1p counts", "baseline_r_log1p")
    lines.append("| ensemble − baseline (log1p counts) | " + " | ".join(
        "{:+.3f}".format(r["test_metrics"]["r_log1p"] - r["test_metrics"]["baseline_r_log1p"]) for r in recs) + " |")
    line("**ensemble**, mean r vs log1p CP10k", "r_cp10k")
    line("ridge baseline, mean r vs log1p CP10k", "baseline_r_cp10k")
    lines.append("| ensemble − baseline (log1p CP10k) | " + " | ".join(
        "{:+.3f}".format(r["test_metrics"]["r_cp10k"] - r["test_metrics"]["baseline_r_cp10k"]) for r in recs) + " |")
    line("ensemble, genes with r > 0.3 (log1p counts)", "n_r_gt_0.3", "{:d}")
    line("baseline, genes with r > 0.3 (log1p counts)", "baseline_n_r_gt_0.3", "{:d}")
    line("ensemble, genes with r > 0.3 (log1p CP10k)", "n_r_gt_0.3_cp10k", "{:d}")
    line("coverage of the 50% interval", "coverage_50", "{:.2f}")
    line("coverage of the 90% interval", "coverage_90", "{:.2f}")
    line("coverage of the 90% interval, aleatoric only", "coverage_90_aleatoric_only", "{:.2f}")
    line("predicted / observed median depth", "depth_pred_over_obs", "{:.2f}")
    line("mean epistemic SD / mean predictive mean", "epistemic_sd_over_mean", "{:.4f}")
    if all("err80_by_sd" in r["test_metrics"] for r in recs):
        line("genes: Spearman(relative predictive SD, r)", "unc_rho_gene_sd_vs_r", "{:+.2f}")
        line("genes: mean r of the most certain half", "r_most_certain_half")
        line("genes: mean r of the most expressed half (proxy)", "r_most_expressed_half")
        line("spots: error kept with the 80% most certain (by SD)", "err80_by_sd")
        line("spots: same, by epistemic SD", "err80_by_epistemic_sd")
        line("spots: same, by predicted depth (proxy)", "err80_by_predicted_depth")
        line("spots: same, oracle (by the error itself)", "err80_oracle")
    if all(r.get("val_metrics") for r in recs):
        lines += ["", "Validation sections (never trained on; where settings are chosen):", "",
                  "| metric | " + " | ".join(f"{r['val_section']} (fold {r['test']})" for r in recs) + " |",
                  "|---|" + "---|" * len(cols)]
        line("ensemble, mean r vs log1p counts", "r_log1p", src="val_metrics")
        line("baseline, mean r vs log1p counts", "baseline_r_log1p", src="val_metrics")
        line("ensemble, mean r vs log1p CP10k", "r_cp10k", src="val_metrics")
        line("coverage of the 90% interval", "coverage_90", "{:.3f}", src="val_metrics")
        line("coverage of the 90% interval, aleatoric only", "coverage_90_aleatoric_only", "{:.3f}", src="val_metrics")
        line("mean epistemic SD / mean predictive mean", "epistemic_sd_over_mean", "{:.4f}", src="val_metrics")
    lines += ["", "Seconds per fold (train / predict / evaluate incl. baseline): " + ", ".join(
        f"{r['test']} {r['seconds']['train']:.0f}/{r['seconds']['predict']:.0f}/{r['seconds']['evaluate_with_baseline']:.0f}"
        for r in recs), "Best epochs per member: " + ", ".join(f"{r['test']} {r['best_epochs']}" for r in recs)]
    beats = [r["test_metrics"]["r_log1p"] > r["test_metrics"]["baseline_r_log1p"] for r in recs]
    beats_cp = [r["test_metrics"]["r_cp10k"] > r["test_metrics"]["baseline_r_cp10k"] for r in recs]
    lines += ["", f"Ensemble beats the baseline on log1p counts in {sum(beats)}/{len(beats)} held-out sections; "
              f"on log1p CP10k in {sum(beats_cp)}/{len(beats_cp)}."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (results.json, results.md, runs/)")
    p.add_argument("--folds", default=",".join(FOLDS), help="held-out sections (default: C2,C3,C4,C5,C6,B4)")
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument("--kmeans-k", type=int, default=None)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--extractor", default=None)
    p.add_argument("--stain", default=None, choices=["none", "macenko"],
                   help="stain normalisation (default: the recipe's, macenko)")
    p.add_argument("--bagging", action="store_true", help="bootstrap the training spots per member")
    p.add_argument("--member-features", default="shared", choices=["shared", "per_member"],
                   help="one frozen feature stack for all members, or a k-means dictionary per member")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-score-val", dest="score_val", action="store_false")
    p.add_argument("--rescore", action="store_true",
                   help="folds already done: load their saved models, predict and evaluate again (new metrics "
                        "on the same models; the original timings are kept)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--title", default=None)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1)) if args.device != "cuda" else None
    from stimage_nb._settings import data_dir, her2st_manifest
    from stimage_nb.io.readers import read_gene_list

    manifest = her2st_manifest()
    genes = read_gene_list(data_dir() / "her2st" / "genes_stimage_her2st.txt")
    args.out.mkdir(parents=True, exist_ok=True)
    recs = []
    for test in [f.strip() for f in args.folds.split(",") if f.strip()]:
        if test not in FOLDS:
            p.error(f"unknown fold {test!r}; choose from {list(FOLDS)}")
        t0 = time.perf_counter()
        rec = run_fold(test, args, manifest, genes, args.out)
        recs.append(rec)
        m = rec["test_metrics"]
        print(f"{test}: ensemble r {m['r_log1p']:.3f} / cp10k {m['r_cp10k']:.3f} | baseline {m['baseline_r_log1p']:.3f} / "
              f"{m['baseline_r_cp10k']:.3f} | r>0.3 {m['n_r_gt_0.3']} | cov50 {m['coverage_50']:.2f} cov90 "
              f"{m['coverage_90']:.2f} | {time.perf_counter() - t0:.0f}s", flush=True)
    title = args.title or ("offline default" + (" + bagging" if args.bagging else "")
                           + (f" + stain {args.stain}" if args.stain else ""))
    md = markdown(recs, title)
    print(md)
    write_results(args.out, recs, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
