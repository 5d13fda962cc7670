"""Attribution throughput and the evaluation budget: how fast, and how many evaluations are enough.

For the offline default recipe (150 µm tiles at 112 px, frozen k-means + handcrafted features, low-rank
NB heads, 3 members) trained on her2st C2–C5, on spots of the held-out section C6:

1. **ceiling**: model evaluations per second on plain tiles already in memory (the ensemble's forward,
   batch 64) — what an explainer could reach if masking, resampling and shap's bookkeeping were free;
2. for each explainer (partition, permutation) and budget (model evaluations per spot), two seeds:
   end-to-end **attributions per second per spot and gene** (every explained gene shares one set of
   evaluations), the evaluations per second achieved and their ratio to the ceiling;
3. **stability**: Spearman correlation of the nuclei's attributions between the two seeds, and with a
   reference run of 4x the largest budget (permutation, many permutations: the Shapley values it
   converges to); and the deletion gap against random order (faithfulness, 6 steps, 3 random orders).

    nice python benchmarks/bench_interpret.py --model runs/default --out bench_out/interp   # ~1 h on 2 busy cores
    python benchmarks/bench_interpret.py --device cuda ...                                  # GPU (unmeasured here)
    nice python benchmarks/bench_interpret.py --cellularity --out bench_out/interp         # nuclei vs UMIs, all spots

Without ``--model`` the default recipe is trained first into ``OUT/model`` (a few minutes). Writes
``OUT/results.json`` and ``OUT/results.md``; the table and its reading are in ``benchmarks/README.md``.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stimage_nb  # noqa: E402,F401  (sets OMP_WAIT_POLICY before torch is imported)

GENES = ["EPCAM", "CD3D", "COL1A2", "PTPRC"]


def train_default(out: Path, manifest, genes) -> Path:
    from stimage_nb.train import TrainConfig, train

    if not (out / "ensemble.json").is_file():
        train(manifest, genes=genes, out=out, sections=["C2", "C3", "C4", "C5"], val_sections=["C5"],
              config=TrainConfig(members=3), progress=False)
    return out


def ceiling(ens, tiles, src, n_rounds: int = 3) -> float:
    """Model evaluations per second on plain in-memory tiles (batch of 64)."""
    from stimage_nb.devices import synchronize

    x = np.ascontiguousarray(tiles[:64])
    ens.predict_tiles(x[:8], stain_source=src)
    synchronize(ens.device)
    t0 = time.perf_counter()
    for _ in range(n_rounds):
        ens.predict_tiles(x, stain_source=src, batch_size=64)
    synchronize(ens.device)
    return n_rounds * len(x) / (time.perf_counter() - t0)


def nucleus_values(attr) -> dict:
    from stimage_nb.interpretation._game import BACKGROUND

    v = attr.values[attr.values["player"] != BACKGROUND]
    return {k: g.set_index("player")["value"] for k, g in v.groupby(["spot", "gene"])}


def agreement(a: dict, b: dict, how: str = "spearman") -> float:
    """Mean over (spot, gene) of the agreement of two runs' nucleus values: Spearman, Pearson, or the
    share of the 10 nuclei with the largest |value| that both runs put in their top 10."""
    from scipy.stats import pearsonr, spearmanr

    out = []
    for k, va in a.items():
        vb = b[k].reindex(va.index)
        if va.nunique() < 2 or vb.nunique() < 2:
            continue
        if how == "spearman":
            out.append(spearmanr(va, vb)[0])
        elif how == "pearson":
            out.append(pearsonr(va, vb)[0])
        else:
            ta, tb = set(va.abs().nlargest(10).index), set(vb.abs().nlargest(10).index)
            out.append(len(ta & tb) / 10)
    return float(np.mean(out)) if out else float("nan")


def cellularity(out: Path) -> dict:
    """Nuclei per 100 µm spot vs the spot's total UMIs, Spearman within each section, on every spot of the
    bundle, beside the spot's mean haematoxylin OD (the simplest baseline)."""
    from scipy.stats import spearmanr

    from stimage_nb._settings import her2st_manifest
    from stimage_nb.interpretation import hematoxylin_od, segment_slide
    from stimage_nb.io.readers import read_manifest

    res = {}
    for s in read_manifest(her2st_manifest()):
        t0 = time.perf_counter()
        r = 50.0 / s.um_per_px
        nuc = segment_slide(s.image, boxes=np.column_stack([s.xy - r, s.xy + r]))
        n = nuc.count_in_discs(s.xy, r)
        umi = np.asarray(s.adata.X.sum(1)).ravel()
        h = [hematoxylin_od(s.image.read_region(int(x - r), int(y - r), int(2 * r), int(2 * r), 0)).mean()
             for x, y in s.xy]
        res[s.name] = {"spots": int(len(n)), "median_nuclei": float(np.median(n)),
                       "spearman_nuclei_umi": float(spearmanr(n, umi)[0]),
                       "spearman_hematoxylin_umi": float(spearmanr(h, umi)[0]),
                       "threshold_od": nuc.params.get("threshold"), "seconds": time.perf_counter() - t0}
        print(s.name, json.dumps(res[s.name]), flush=True)
    (out / "cellularity.json").write_text(json.dumps(res, indent=1))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a trained run (default: train the offline default into OUT/model)")
    p.add_argument("--section", default="C6")
    p.add_argument("--genes", default=",".join(GENES))
    p.add_argument("--spots", type=int, default=3, help="spots of the section, spread over it")
    p.add_argument("--budgets", default="125,250,500,1000")
    p.add_argument("--explainers", default="partition,permutation")
    p.add_argument("--reference-evals", type=int, default=None,
                   help="evaluations/spot of the permutation reference (default 4x the largest budget; 0: none)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("bench_out/interp"))
    p.add_argument("--cellularity", action="store_true",
                   help="only: nuclei per spot vs UMIs on every spot of the bundle (writes OUT/cellularity.json)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.cellularity:
        a.out.mkdir(parents=True, exist_ok=True)
        cellularity(a.out)
        return 0

    from stimage_nb._settings import her2st_manifest
    from stimage_nb.ensemble import Ensemble
    from stimage_nb.interpretation import explain, faithfulness
    from stimage_nb.io.readers import read_manifest
    from stimage_nb.tiles import extract_tiles

    a.out.mkdir(parents=True, exist_ok=True)
    genes = a.genes.split(",")
    run = a.model or train_default(a.out / "model", her2st_manifest(), genes)
    ens = Ensemble.load(run, device=a.device)
    genes = [g for g in genes if g in ens.genes] or ens.genes[:2]
    sec = read_manifest(her2st_manifest(), [a.section], genes=ens.genes)[0]
    spots = [str(sec.adata.obs_names[i]) for i in np.linspace(0, sec.adata.n_obs - 1, a.spots + 2).astype(int)[1:-1]]
    tiles = extract_tiles(sec.image, sec.xy, ens.tile_um, ens.out_px)
    src = ens.stain_source(tiles)
    load = os.getloadavg()
    top = ceiling(ens, tiles, src)
    print(f"{ens}; {len(spots)} spots of {sec.name} x {len(genes)} genes; ceiling {top:.1f} evaluations/s; "
          f"load {load[0]:.1f}", flush=True)
    budgets = [int(b) for b in a.budgets.split(",")]
    from stimage_nb.interpretation import segment_slide

    boxes = []
    for s in spots:
        cx, cy = sec.xy[list(sec.adata.obs_names).index(s)]
        lv, bx, by, n = sec.image.tile_box(cx, cy, ens.tile_um, ens.out_px)
        d = sec.image.downsamples[lv]
        boxes.append((bx * d, by * d, (bx + n) * d, (by + n) * d))
    nuclei = segment_slide(sec.image, boxes=boxes)  # one segmentation for every run below
    ref_budget = 4 * max(budgets) if a.reference_evals is None else int(a.reference_evals)
    ref_vals, n_players = None, None
    if ref_budget:
        t0 = time.perf_counter()
        ref = explain(ens, sec, genes=genes, spots=spots, method="permutation", max_evals=ref_budget, nuclei=nuclei,
                      seed=123, progress=False)
        ref_vals = nucleus_values(ref)
        n_players = ref.spots["n_nuclei"].to_numpy() + 1
        print(f"reference: permutation, {ref_budget} evaluations/spot, {time.perf_counter() - t0:.0f} s; players per "
              f"spot {n_players.tolist()}", flush=True)
    rows = []
    for method in a.explainers.split(","):
        for b in budgets:
            top_here = ceiling(ens, tiles, src, n_rounds=2)  # the load changes: a ceiling beside every row
            res, secs, evals = [], [], []
            for seed in (0, 1):
                t0 = time.perf_counter()
                at = explain(ens, sec, genes=genes, spots=spots, method=method, max_evals=b, nuclei=nuclei, seed=seed,
                             progress=False)
                secs.append(time.perf_counter() - t0)
                evals.append(at.meta["n_model_evaluations"])
                res.append(at)
            if n_players is None:
                n_players = res[0].spots["n_nuclei"].to_numpy() + 1
            f = faithfulness(res[0], ens, sec, steps=6, n_random=3, sanity=False, progress=False)
            d = f.summary["overall"]["deletion"]["vs_random"]
            dt = float(np.mean(secs))
            v0, v1 = nucleus_values(res[0]), nucleus_values(res[1])
            row = {"explainer": method, "budget": b, "evaluations_per_spot": float(np.mean(evals)) / len(spots),
                   "seconds_per_run": round(dt, 1), "attributions_per_s": len(spots) * len(genes) / dt,
                   "evaluations_per_s": float(np.mean(evals)) / dt, "ceiling": top_here,
                   "ratio_to_ceiling": float(np.mean(evals)) / dt / top_here,
                   "seed_spearman": agreement(v0, v1), "seed_pearson": agreement(v0, v1, "pearson"),
                   "seed_top10": agreement(v0, v1, "top10"),
                   "reference_spearman": agreement(v0, ref_vals) if ref_vals else float("nan"),
                   "deletion_gap_vs_random": d["mean_gap"], "deletion_ci95": d["ci95"], "load": os.getloadavg()[0]}
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    result = {"model": str(run), "section": sec.name, "spots": spots, "genes": genes, "players": n_players.tolist(),
              "ceiling_evaluations_per_s": top, "device": str(ens.device), "load_at_start": load,
              "reference": {"explainer": "permutation", "budget": ref_budget}, "rows": rows}
    (a.out / "results.json").write_text(json.dumps(result, indent=1))
    lines = ["| explainer | budget (evaluations/spot done) | attributions/s (spot x gene) | evaluations/s (/ ceiling) | "
             "seed 0 vs 1: Spearman / Pearson / top-10 | Spearman vs reference | deletion gap vs random [95% CI] |",
             "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['explainer']} | {r['budget']} ({r['evaluations_per_spot']:.0f}) | {r['attributions_per_s']:.3f} | "
                     f"{r['evaluations_per_s']:.1f} ({r['ratio_to_ceiling']:.2f}) | {r['seed_spearman']:.2f} / "
                     f"{r['seed_pearson']:.2f} / {r['seed_top10']:.2f} | {r['reference_spearman']:.2f} | "
                     f"{r['deletion_gap_vs_random']:+.3f} [{r['deletion_ci95'][0]:+.3f}, {r['deletion_ci95'][1]:+.3f}] |")
    md = (f"ceiling {top:.1f} evaluations/s at the start ({ens.device}); players per spot {n_players.tolist()}; "
          f"reference: permutation at {ref_budget}/spot\n\n" + "\n".join(lines) + "\n")
    (a.out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
