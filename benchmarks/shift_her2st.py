"""Robustness to other scanners and stains: the held-out sections of ``loso_her2st.py``, re-acquired.

For each fold of ``benchmarks/loso_her2st.py`` (leave-one-section-out in patient C; train C / test B4)
the held-out section is re-made under each of :data:`stimage_nb.shifts.STANDARD_SHIFTS` (a 2x and a 4x
coarser scan, defocus, a hematoxylin-heavy and an eosin-heavy staining, JPEG quality 30; see
``stimage_nb/shifts.py``) and predicted by the fold's ensemble, unchanged. The ridge baseline is trained
in the same run on the same training sections (original images) and scored on the same shifted tiles,
through ``stimage_nb.evaluate``. Nothing is re-fitted to the shifted images except what the model itself
does per section at prediction time (its stain estimate, when it normalises stains).

Reported per shift, averaged over the folds: the ensemble's and the baseline's mean Pearson (769 genes,
log1p counts), the change from the unshifted reference, how many folds the ensemble still beats the
baseline, and the coverage of the ensemble's 90% interval (does the uncertainty notice the shift?).

Usage::

    python benchmarks/loso_her2st.py   --out bench_out/loso                    # trains the folds (if not yet)
    python benchmarks/shift_her2st.py  --runs bench_out/loso --out bench_out/shift
    python benchmarks/shift_her2st.py  --runs bench_out/mac --out bench_out/shift_mac \\
        --images bench_out/shift/shifted   # another recipe (trained with --stain macenko), same images

Folds whose models are missing under ``--runs`` are trained first (through ``loso_her2st.run_fold``,
with the recipe's defaults or ``--stain``). Writes ``OUT/results.json`` and ``OUT/results.md``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loso_her2st  # noqa: E402  (the folds and their training)


def _metrics(entry: dict) -> dict:
    m, b = entry["model"], entry.get("baseline", {})
    g = m["genes"]
    out = {"r_log1p": g["log1p_counts"]["pearson"]["mean"], "r_cp10k": g["log1p_cp10k"]["pearson"]["mean"],
           "n_r_gt_0.3": g["log1p_counts"]["pearson"]["n_r_gt_0.3"],
           "coverage_50": m["calibration"]["coverage_50"], "coverage_90": m["calibration"]["coverage_90"]}
    dom = entry.get("domain") or {}
    out["domain_median_percentile"] = dom.get("median_percentile")
    out["domain_flagged"] = dom.get("flagged")
    if "genes" in b:
        out["baseline_r_log1p"] = b["genes"]["log1p_counts"]["pearson"]["mean"]
        out["baseline_r_cp10k"] = b["genes"]["log1p_cp10k"]["pearson"]["mean"]
    return out


def _ensure_domain(model: Path, manifest: Path, test: str) -> None:
    """Give a model trained before stimage_nb.domain existed its domain model (training sections' tiles,
    the fold's validation section as reference), saved into the model directory."""
    from stimage_nb.domain import fit_domain
    from stimage_nb.ensemble import Ensemble
    from stimage_nb.io.readers import read_manifest

    ens = Ensemble.load(model)
    if ens.domain is not None:
        return
    train_secs, val = loso_her2st.fold_sections(test)
    fit_domain(ens, read_manifest(manifest, train_secs), read_manifest(manifest, [val]))
    ens.save(model)


def run_fold(test: str, args, manifest: Path, genes: list[str], shifts) -> dict:
    from stimage_nb.evaluate import evaluate
    from stimage_nb.predict import predict_manifest
    from stimage_nb.shifts import shift_manifest

    model = args.runs / "runs" / f"test_{test}" / "model"
    if not (model / "ensemble.json").is_file():
        loso_args = loso_her2st.parse_args(["--out", str(args.runs)] + (["--stain", args.stain] if args.stain else []))
        loso_her2st.run_fold(test, loso_args, manifest, genes, args.runs)
    fdir = args.out / f"test_{test}"
    done = fdir / "fold.json"
    if done.is_file():
        return json.loads(done.read_text())
    _ensure_domain(model, manifest, test)
    t0 = time.perf_counter()
    shifted = shift_manifest(manifest, [test], shifts, args.images / test)
    t_shift = time.perf_counter() - t0
    names = [f"{test}__{s.name}" for s in shifts]
    t0 = time.perf_counter()
    predict_manifest(model, shifted, fdir / "pred", sections=names, device=args.device, progress=False)
    res = evaluate(fdir / "pred", shifted, out=fdir / "eval", sections=names, figures=False, progress=False)
    rec = {"test": test, "model": str(model), "seconds": {"shift_images": round(t_shift, 1),
                                                           "predict_evaluate": round(time.perf_counter() - t0, 1)},
           "shifts": {s.name: {**_metrics(res["sections"][n]), "shift": s.to_dict()} for s, n in zip(shifts, names)}}
    fdir.mkdir(parents=True, exist_ok=True)
    loso_her2st.write_atomic(done, json.dumps(rec, indent=1))
    return rec


def _dom(recs: list[dict], s: str) -> str:
    p = [r["shifts"][s].get("domain_median_percentile") for r in recs]
    f = [r["shifts"][s].get("domain_flagged") for r in recs]
    if any(v is None for v in p):
        return "– | –"
    return f"{np.mean(p):.2f} | {sum(bool(v) for v in f)}/{len(f)}"


def markdown(recs: list[dict], title: str) -> str:
    shifts = list(recs[0]["shifts"])
    ref = "reference"

    def vals(s, k):
        return np.array([r["shifts"][s][k] for r in recs], dtype=float)

    lines = [f"### {title}", "", f"Folds (held-out section): {', '.join(r['test'] for r in recs)}. Mean over the folds; "
             "Δ = change from the unshifted reference in the same run.", "",
             "| shift | ensemble r | Δ | baseline r | Δ | ensemble − baseline | folds ensemble > baseline "
             "| ensemble r (CP10k) | baseline r (CP10k) | 90% coverage | domain percentile (median) | folds flagged |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in shifts:
        m, b = vals(s, "r_log1p"), vals(s, "baseline_r_log1p")
        dm = m - vals(ref, "r_log1p") if ref in shifts else m * np.nan
        db = b - vals(ref, "baseline_r_log1p") if ref in shifts else b * np.nan
        lines.append(f"| {s} | {m.mean():.3f} | {dm.mean():+.3f} | {b.mean():.3f} | {db.mean():+.3f} | "
                     f"{(m - b).mean():+.3f} | {int((m > b).sum())}/{len(m)} | {vals(s, 'r_cp10k').mean():.3f} | "
                     f"{vals(s, 'baseline_r_cp10k').mean():.3f} | {vals(s, 'coverage_90').mean():.2f} | "
                     f"{_dom(recs, s)} |")
    lines += ["", "Per fold, ensemble / baseline mean r (log1p counts):", "",
              "| shift | " + " | ".join(r["test"] for r in recs) + " |", "|---|" + "---|" * len(recs)]
    for s in shifts:
        lines.append(f"| {s} | " + " | ".join(f"{r['shifts'][s]['r_log1p']:.3f} / {r['shifts'][s]['baseline_r_log1p']:.3f}"
                                              for r in recs) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, required=True, help="output folder of loso_her2st.py (models of the folds)")
    p.add_argument("--out", type=Path, required=True, help="output folder (results.json, results.md, test_*/)")
    p.add_argument("--images", type=Path, default=None, help="folder of the shifted images (default OUT/shifted); "
                   "share it between recipes")
    p.add_argument("--folds", default=",".join(loso_her2st.FOLDS))
    p.add_argument("--shifts", default="standard", help="comma-separated names of stimage_nb.shifts.STANDARD_SHIFTS")
    p.add_argument("--stain", default=None, choices=["none", "macenko"], help="recipe for folds trained here")
    p.add_argument("--device", default="auto")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    args.images = args.images or args.out / "shifted"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    if args.device != "cuda":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    from stimage_nb._settings import data_dir, her2st_manifest
    from stimage_nb.io.readers import read_gene_list
    from stimage_nb.shifts import parse_shifts

    shifts = parse_shifts(args.shifts)
    if "reference" not in [s.name for s in shifts]:
        shifts = parse_shifts("reference") + shifts
    manifest = her2st_manifest()
    genes = read_gene_list(data_dir() / "her2st" / "genes_stimage_her2st.txt")
    args.out.mkdir(parents=True, exist_ok=True)
    recs = []
    for test in [f.strip() for f in args.folds.split(",") if f.strip()]:
        if test not in loso_her2st.FOLDS:
            p.error(f"unknown fold {test!r}; choose from {list(loso_her2st.FOLDS)}")
        t0 = time.perf_counter()
        rec = run_fold(test, args, manifest, genes, shifts)
        recs.append(rec)
        print(f"{test}: " + " | ".join(f"{k} {v['r_log1p']:.3f}/{v['baseline_r_log1p']:.3f}"
                                       for k, v in rec["shifts"].items()) + f" | {time.perf_counter() - t0:.0f}s",
              flush=True)
    md = markdown(recs, args.title or f"robustness to simulated acquisition shifts ({args.runs.name})")
    print(md)
    loso_her2st.write_results(args.out, recs, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
