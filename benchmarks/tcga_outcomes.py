"""TCGA-BRCA outcome analyses of notebook 05 (sections 2-3), at full settings, with their run time.

    nice .venv/bin/python benchmarks/tcga_outcomes.py --out bench_out/tcga [--endpoint PFI] [--quick]

Measured bulk RNA of the 71 genes of the STimage her2st list that the TCGA table holds, against a TCGA-CDR
endpoint (default PFI) and HER2 amplification, beside the clinical covariates, clinical + genes, all
1,558 genes, random 71-gene sets and a permutation test, all in one run on the same patients and outer
splits (``stimage_nb.outcomes.compare``). Writes ``OUT/results.json`` and ``OUT/results.md``; prints the
tables. The docs' table (docs/outcomes.md) comes from this script.

``--simulate`` adds notebook 05's simulation at the same settings: the offline-default ensemble trained on
her2st patient C (C2-C5, C5 for validation; or ``--run DIR``), its per-gene accuracy on the other patient's
section B4 measured by ``evaluate`` (beside the ridge baseline), and the two analyses rerun with the 71
genes' bulk values degraded to that accuracy (``outcomes.degrade_to_accuracy``): a simulation.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _simulation(a, oc, X, y, Xh, yh, genes71, params):
    import numpy as np
    import pandas as pd

    from stimage_nb.datasets import fetch_her2st, her2st_gene_list
    from stimage_nb.evaluate import evaluate
    from stimage_nb.predict import predict_manifest
    from stimage_nb.train import TrainConfig, train

    manifest = fetch_her2st()
    run = a.run or a.out / "run-c"
    if a.run is None:
        train(manifest, genes=her2st_gene_list(manifest), out=run, sections=["C2", "C3", "C4", "C5"],
              val_sections=["C5"], config=TrainConfig(), drop_missing_genes=True, progress=False)
    predict_manifest(run, manifest, out=a.out / "pred-B4", sections=["B4"], progress=False)
    evaluate(a.out / "pred-B4", manifest, out=a.out / "eval-B4", baseline=True, progress=False)
    per_gene = pd.read_csv(a.out / "eval-B4" / "metrics_per_gene.csv")
    acc = per_gene[per_gene["gene"].isin(genes71)].pivot_table(index="gene", columns=["model", "target"],
                                                               values="pearson")
    rows = []
    for label, key in (("model, r on log1p CP10k", ("model", "log1p_cp10k")),
                       ("model, r on log1p counts", ("model", "log1p_counts")),
                       ("ridge baseline, r on log1p CP10k", ("baseline", "log1p_cp10k")),
                       ("ridge baseline, r on log1p counts", ("baseline", "log1p_counts"))):
        r = acc[key].reindex(genes71).fillna(0.0)
        s = oc.nested_cv_survival(oc.degrade_to_accuracy(X[genes71], r, seed=params.seed), y, params=params, name=label)
        h = oc.nested_cv_classifier(oc.degrade_to_accuracy(Xh[genes71], r, seed=params.seed), yh, params=params,
                                    name=label)
        rows.append({"expression": label, "mean r used": round(float(np.clip(r, 0, 1).mean()), 3),
                     f"Harrell's C ({a.endpoint})": str(s.harrell_c), "HER2 ROC AUC": str(h.roc_auc)})
        print(rows[-1], flush=True)
    summary = acc.describe().loc[["count", "mean", "50%"]]
    summary.columns = [f"{m} / {t}" for m, t in summary.columns]
    return pd.DataFrame(rows).set_index("expression"), summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench_out/tcga"))
    ap.add_argument("--endpoint", default="PFI")
    ap.add_argument("--random-sets", type=int, default=20)
    ap.add_argument("--permutations", type=int, default=20)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="3 folds, 100 bootstrap replicates, 3 random sets, no permutations")
    ap.add_argument("--simulate", action="store_true", help="also the degraded-bulk simulation (trains a model)")
    ap.add_argument("--skip-measured", action="store_true", help="only the simulation")
    ap.add_argument("--run", type=Path, default=None, help="with --simulate: a trained run to use instead")
    a = ap.parse_args(argv)

    from stimage_nb import outcomes as oc
    from stimage_nb.datasets import her2st_gene_list

    params = oc.CVParams(n_bootstrap=a.bootstrap)
    n_random, n_perm = a.random_sets, a.permutations
    if a.quick:
        params = oc.CVParams(n_splits=3, inner_splits=2, n_bootstrap=100)
        n_random, n_perm = 3, 0
    t0 = time.perf_counter()
    bulk = oc.tcga_brca_bulk()
    genes71 = [g for g in bulk.expression.columns if g in set(her2st_gene_list())]
    clinical = oc.clinical_covariates("BRCA")
    X, y = oc.align(bulk.expression, oc.tcga_outcome(a.endpoint, "BRCA"))
    t_load = time.perf_counter() - t0
    res = {"endpoint": a.endpoint, "params": params.to_json(), "n_random": n_random, "n_permutations": n_perm,
           "load_s": round(t_load, 1), "load": os.getloadavg()[0]}
    a.out.mkdir(parents=True, exist_ok=True)
    Xh, yh = oc.align(bulk.expression, oc.her2_amplification(bulk))
    md = [f"# TCGA-BRCA outcomes ({a.endpoint}; HER2 amplification)", "",
          f"{len(X)} patients, {int(y['event'].sum())} events; HER2: {int(yh.sum())} of {len(yh)} amplified. "
          f"Protocol: {params}", ""]
    if not a.skip_measured:
        t = time.perf_counter()
        surv = oc.compare(X, y, model_features=genes71, name="71 predicted genes",
                          clinical=clinical.reindex(X.index), extra={"all 1,558 genes": list(X.columns)},
                          n_random=n_random, n_permutations=n_perm, params=params, progress=True)
        res["survival_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        her2 = oc.compare(Xh, yh, model_features=genes71, name="71 predicted genes",
                          clinical=clinical.reindex(Xh.index), extra={"all 1,558 genes": list(Xh.columns)},
                          n_random=n_random, n_permutations=n_perm, params=params, progress=True)
        res["her2_s"] = round(time.perf_counter() - t, 1)
        res["survival"] = surv.to_json()
        res["her2"] = her2.to_json()
        s_tab = surv.to_frame().set_index("set")[["n_features", "harrell_c", "harrell_c_low", "harrell_c_high",
                                                  "uno_c", "uno_c_low", "uno_c_high", "auc", "ibs", "ibs_km",
                                                  "logrank_p"]]
        h_tab = her2.to_frame().set_index("set")[["n_features", "roc_auc", "roc_auc_low", "roc_auc_high",
                                                  "pooled_auc"]]
        md += ["## Survival", "", "```\n" + s_tab.round(3).to_string() + "\n```", "",
               f"permutation p (71 genes): {surv.permutation_p:.3f}; the model beats {surv.random_percentile:.0%} "
               "of the random sets", "", "## HER2 amplification", "", "```\n" + h_tab.round(3).to_string() + "\n```",
               "", f"permutation p (71 genes): {her2.permutation_p:.3f}; the model beats {her2.random_percentile:.0%} "
               "of the random sets", "", f"time: survival {res['survival_s']} s, HER2 {res['her2_s']} s"]
    if a.simulate:
        t = time.perf_counter()
        sim, acc_summary = _simulation(a, oc, X, y, Xh, yh, genes71, params)
        res["simulation_s"] = round(time.perf_counter() - t, 1)
        res["simulation"] = sim.reset_index().to_dict(orient="records")
        res["simulation_accuracy"] = acc_summary.reset_index().to_dict(orient="records")
        md += ["", "## Simulation: bulk degraded to the accuracy measured on held-out patient B (B4)", "",
               "per-gene Pearson r over the TCGA genes (evaluate, B4):", "", "```\n" + acc_summary.round(3).to_string()
               + "\n```", "", "```\n" + sim.to_string() + "\n```", "", f"time: {res['simulation_s']} s"]
    res["load_end"] = os.getloadavg()[0]
    md += ["", f"load average {res['load']:.1f} at the start, {res['load_end']:.1f} at the end (2 cores)"]
    (a.out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (a.out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
