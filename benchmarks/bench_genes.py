"""Accuracy and cost of predicting more genes: the STimage 769, 2,000 highly variable, and every detected gene.

For each gene panel (``stimage_nb.panels``: ``stimage769``, ``hvg:2000``, ``all``), in its own process (so
its peak memory is its own):

1. ``train`` the default recipe (``TrainConfig()``, frozen k-means + handcrafted features, rank-8 NB heads,
   5 members) on C2, C3, C4 with C5 as the validation section, ``--drop-missing-genes``;
2. ``predict_manifest`` the held-out section C6 and the held-out patient's section B4;
3. ``evaluate`` both, which trains and scores the ridge baseline on the same training sections and tiles in
   the same run.

Reported per panel: genes, wall time of training / prediction / evaluation, peak resident memory of the
process, size of the model directory and of the two prediction files, the mean per-gene Pearson r of
model and baseline against log1p counts and log1p CP10k on C6 and B4, the same restricted to the genes
all panels share (does predicting more genes cost the shared ones anything?), and the clinical markers'
r (ERBB2, ESR1, MKI67, GRB7, ... where a panel has them).

Usage::

    nice python benchmarks/bench_genes.py --out bench_out/genes                       # the three panels
    nice python benchmarks/bench_genes.py --out o --panels stimage769,hvg:2000 --epochs 30 --members 2   # quick

Writes ``OUT/results.json`` and ``OUT/results.md``; each panel's run and predictions in ``OUT/<panel>/``.
Timings depend on the machine's load: the script records ``os.getloadavg()`` before and after each panel.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRAIN, VAL, TEST = ["C2", "C3", "C4"], "C5", ["C6", "B4"]
MARKERS = ["ERBB2", "GRB7", "ESR1", "PGR", "MKI67", "FOXA1", "GATA3", "KRT5", "EGFR", "AR", "TOP2A", "CD274"]
PANELS = ["stimage769", "hvg:2000", "all"]


def _dir_mb(p: Path) -> float:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e6


def _safe(panel: str) -> str:
    return panel.replace(":", "_")


def run_one(panel: str, out: Path, members: int, epochs: int | None) -> dict:
    """Train, predict and evaluate one panel in this process; return its numbers."""
    from stimage_nb._settings import her2st_manifest
    from stimage_nb.evaluate import evaluate
    from stimage_nb.predict import predict_manifest
    from stimage_nb.train import TrainConfig, train

    m = her2st_manifest()
    d = out / _safe(panel)
    load0 = os.getloadavg()[0]
    cfg = TrainConfig(members=members, **({"epochs": epochs} if epochs else {}))
    t = time.perf_counter()
    ens = train(m, genes=panel, out=d / "run", sections=TRAIN + [VAL], val_sections=[VAL], config=cfg,
                drop_missing_genes=True, progress=False)
    t_train = time.perf_counter() - t
    t = time.perf_counter()
    paths = predict_manifest(d / "run", m, d / "pred", sections=TEST, progress=False)
    t_pred = time.perf_counter() - t
    t = time.perf_counter()
    met = evaluate(d / "pred", m, out=d / "eval", progress=False, figures=False)
    t_eval = time.perf_counter() - t
    res = {"panel": panel, "n_genes": len(ens.genes), "train_s": round(t_train, 1), "predict_s": round(t_pred, 1),
           "evaluate_s": round(t_eval, 1),
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
           "model_mb": round(_dir_mb(d / "run"), 1), "pred_mb": round(sum(p.stat().st_size for p in paths) / 1e6, 1),
           "load_before": round(load0, 1), "load_after": round(os.getloadavg()[0], 1), "sections": {}}
    for s, e in met["sections"].items():
        g, b = e["model"]["genes"], e.get("baseline", {}).get("genes", {})
        res["sections"][s] = {
            "r_log1p": g["log1p_counts"]["pearson"]["mean"], "r_cp10k": g["log1p_cp10k"]["pearson"]["mean"],
            "baseline_r_log1p": b.get("log1p_counts", {}).get("pearson", {}).get("mean"),
            "baseline_r_cp10k": b.get("log1p_cp10k", {}).get("pearson", {}).get("mean"),
            "n_genes_scored": g["log1p_counts"]["pearson"].get("n_genes"),
            "coverage_90": e["model"]["calibration"]["coverage_90"]}
    res["per_gene_csv"] = met.get("per_gene_csv")
    return res


def _shared_and_markers(results: list[dict]) -> None:
    """Add the mean r over the genes every panel has, and the markers' r, from the per-gene tables."""
    import pandas as pd

    tables = {r["panel"]: pd.read_csv(r["per_gene_csv"]) for r in results if r.get("per_gene_csv")}
    if not tables:
        return
    shared = set.intersection(*(set(t["gene"]) for t in tables.values()))
    for r in results:
        t = tables.get(r["panel"])
        if t is None:
            continue
        r["n_shared_genes"] = len(shared)
        for s in TEST:
            for model in ("model", "baseline"):
                for target in ("log1p_counts", "log1p_cp10k"):
                    sel = t[(t.section == s) & (t.model == model) & (t.target == target) & t.gene.isin(shared)]
                    r["sections"].setdefault(s, {})[f"shared_{model}_{target}"] = float(sel["pearson"].mean())
            mk = t[(t.section == s) & (t.model == "model") & (t.target == "log1p_counts") & t.gene.isin(MARKERS)]
            r["sections"][s]["markers_r_log1p"] = {g: round(float(v), 3) for g, v in zip(mk.gene, mk.pearson)}


def _md(results: list[dict]) -> str:
    f = lambda v: "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"  # noqa: E731
    lines = ["| panel | genes | train s | predict s (C6+B4) | peak RSS GB | model MB | predictions MB | load |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['panel']} | {r['n_genes']} | {r['train_s']} | {r['predict_s']} | {r['peak_rss_gb']} | "
                     f"{r['model_mb']} | {r['pred_mb']} | {r['load_before']}→{r['load_after']} |")
    lines += ["", "| panel | section | r log1p model / baseline | r CP10k model / baseline | shared genes: r log1p "
              "model / baseline | shared: r CP10k model / baseline | 90% coverage |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for s, e in r["sections"].items():
            lines.append(f"| {r['panel']} | {s} | {f(e.get('r_log1p'))} / {f(e.get('baseline_r_log1p'))} | "
                         f"{f(e.get('r_cp10k'))} / {f(e.get('baseline_r_cp10k'))} | "
                         f"{f(e.get('shared_model_log1p_counts'))} / {f(e.get('shared_baseline_log1p_counts'))} | "
                         f"{f(e.get('shared_model_log1p_cp10k'))} / {f(e.get('shared_baseline_log1p_cp10k'))} | "
                         f"{f(e.get('coverage_90'))} |")
    mk = [(r["panel"], s, e.get("markers_r_log1p")) for r in results for s, e in r["sections"].items()
          if e.get("markers_r_log1p")]
    if mk:
        lines += ["", "Clinical markers, model r vs log1p counts: " + "; ".join(
            f"{p} {s}: " + ", ".join(f"{g} {v:.2f}" for g, v in m.items()) for p, s, m in mk)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench_out/genes"))
    ap.add_argument("--panels", default=",".join(PANELS))
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=None, help="default: the recipe's 150")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one panel, print JSON
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.one:
        print("RESULT " + json.dumps(run_one(a.one, a.out, a.members, a.epochs)))
        return 0
    results = []
    for panel in [p.strip() for p in a.panels.split(",") if p.strip()]:
        cmd = [sys.executable, __file__, "--one", panel, "--out", str(a.out), "--members", str(a.members)]
        if a.epochs:
            cmd += ["--epochs", str(a.epochs)]
        print(f"== {panel}", flush=True)
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if p.returncode or line is None:
            print(p.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(line[len("RESULT "):]))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "sections"}), flush=True)
    _shared_and_markers(results)
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    md = _md(results)
    (a.out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
