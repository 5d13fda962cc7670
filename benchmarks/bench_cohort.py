"""Cohort prediction throughput on a Dask cluster, as a ratio to single-slide prediction in the same run.

Slides: the bundle's six her2st section images (0.69 µm/px) predicted as whole slides on a grid over their
tissue, and the bundle's SVS. Model: ``--model RUN``, or the default recipe (``TrainConfig()``: 5 members,
frozen k-means + handcrafted features) trained on C2-C5 with the STimage 769 genes (``--epochs``, default 20:
the number of epochs changes the weights, not the cost of prediction).

1. **single slide** (the ceiling): in this process, the ensemble loaded once, every slide predicted one after
   the other with ``stimage_nb.cohort.predict_slide`` and written as h5ad: what one cohort task does, without
   Dask. Slides per hour = slides / wall time.
2. **cohort**: ``stimage_nb.cohort.predict_cohort`` over the same slides on a ``LocalCluster`` of ``--workers``
   worker processes (one thread each), from a cold start: the cluster's start, each worker loading the
   ensemble, scheduling, the status records; slide-level features not included. Its slides per hour / the
   single-slide figure = the cluster's efficiency (1.0: no overhead; > 1 when workers overlap reading and
   computing better than one process does).
3. **features**: the slide-level features of the predictions (pseudo-bulk, cell types, spatial types and
   neighbourhood enrichment) on the same cluster, for the record.

Both predictions start from the converted images (the OME-Zarr conversion of each JPEG is done before
timing) and from an empty tile cache; the grid is 300 µm by default (``--grid-um``). ``--device cuda`` runs both on the GPU (the cluster: one worker per GPU,
``resources={"GPU": 1}``).

    nice python benchmarks/bench_cohort.py --out bench_out/cohort
    python benchmarks/bench_cohort.py --out bench_out/cohort_gpu --device cuda --workers 1

Writes ``OUT/results.json`` and ``OUT/results.md``; records ``os.getloadavg()`` beside the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECTIONS = ["C2", "C3", "C4", "C5", "C6", "B4"]


def _model(out: Path, model: Path | None, epochs: int, device: str) -> Path:
    if model is not None:
        return model
    from stimage_nb._settings import her2st_manifest
    from stimage_nb.train import TrainConfig, train

    run = out / "model"
    train(her2st_manifest(), genes="stimage769", out=run, sections=["C2", "C3", "C4", "C5"], val_sections=["C5"],
          config=TrainConfig(epochs=epochs, device=device), progress=False)
    return run


def _cohort(out: Path, with_svs: bool) -> Path:
    import pandas as pd

    from stimage_nb._settings import data_dir

    d = data_dir()
    rows = [{"slide": str(d / "her2st" / "images" / f"{s}.jpg"), "patient_id": s[0], "slide_id": s, "um_per_px": 0.69}
            for s in SECTIONS]
    if with_svs:
        rows.append({"slide": str(d / "fixtures" / "wsi" / "cmu_small_region.svs"), "patient_id": "CMU",
                     "slide_id": "cmu", "um_per_px": None})
    p = out / "cohort.csv"
    pd.DataFrame(rows).to_csv(p, index=False)
    return p


def _clear_tiles() -> None:
    from stimage_nb._settings import cache_dir

    shutil.rmtree(cache_dir() / "tiles", ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench_out/cohort"))
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--grid-um", type=float, default=300.0,
                    help="grid spacing (µm); default 300 (a quarter of the points of the model's 150 µm tiles: the fixed costs weigh more)")
    ap.add_argument("--no-svs", action="store_true")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)

    from stimage_nb.cluster import ClusterOptions
    from stimage_nb.cohort import FeatureOptions, predict_cohort, predict_slide, read_cohort
    from stimage_nb.ensemble import Ensemble
    from stimage_nb.io.image import open_image
    from stimage_nb.io.prediction import write_h5ad

    run = _model(a.out, a.model, a.epochs, a.device)
    csv = _cohort(a.out, not a.no_svs)
    slides = read_cohort(csv)
    for s in slides:  # convert the JPEGs once, outside the timings
        open_image(s.source, um_per_px=s.um_per_px)
    res = {"device": a.device, "workers": a.workers, "n_slides": len(slides), "cpu_count": os.cpu_count()}

    # 1. single slide, one after the other, in this process
    _clear_tiles()
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    ens = Ensemble.load(run, device=a.device)
    t_load = time.perf_counter() - t
    single = a.out / "single"
    n_points, per_slide = 0, {}
    t0 = time.perf_counter()
    for s in slides:
        t = time.perf_counter()
        ad = predict_slide(ens, s.source, slide_id=s.slide_id, grid_um=a.grid_um, um_per_px=s.um_per_px)
        write_h5ad(ad, single / f"{s.slide_id}.h5ad")
        per_slide[s.slide_id] = {"points": int(ad.n_obs), "seconds": round(time.perf_counter() - t, 2)}
        n_points += ad.n_obs
    t_single = time.perf_counter() - t0
    res["single"] = {"seconds": round(t_single, 1), "model_load_s": round(t_load, 1), "points": n_points,
                     "slides_per_hour": round(3600 * len(slides) / t_single, 1),
                     "points_per_s": round(n_points / t_single, 1), "per_slide": per_slide,
                     "load": [round(load0, 1), round(os.getloadavg()[0], 1)]}
    del ens

    # 2. the cohort on a LocalCluster, cold
    _clear_tiles()
    cdir = a.out / "cohort_run"
    shutil.rmtree(cdir, ignore_errors=True)
    opts = ClusterOptions(n_workers=a.workers, threads_per_worker=1,
                          gpus_per_worker=1 if a.device == "cuda" else 0)
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    r = predict_cohort(run, csv, cdir, grid_um=a.grid_um, device=a.device, cluster_options=opts, features=False,
                       progress=False)
    t_cohort = time.perf_counter() - t
    n_done = int((r.status["status"] == "done").sum())
    res["cohort"] = {"seconds": round(t_cohort, 1), "done": n_done,
                     "slides_per_hour": round(3600 * n_done / t_cohort, 1),
                     "points_per_s": round(float(r.status["n_spots"].sum()) / t_cohort, 1),
                     "load": [round(load0, 1), round(os.getloadavg()[0], 1)]}
    res["ratio_cohort_to_single"] = round(res["cohort"]["slides_per_hour"] / res["single"]["slides_per_hour"], 3)

    # 3. the features on the same kind of cluster (every slide is skipped: done)
    t = time.perf_counter()
    r2 = predict_cohort(run, csv, cdir, grid_um=a.grid_um, device=a.device, cluster_options=opts,
                        features=FeatureOptions(), progress=False)
    res["features"] = {"seconds": round(time.perf_counter() - t, 1), "predicted_again": len(r2.ran),
                       "n_types": len(r2.features.spatial_types.names) if r2.features.spatial_types else 0}
    (a.out / "results.json").write_text(json.dumps(res, indent=1))
    md = (f"| | slides | points | wall s | slides/hour | points/s | load (1-min avg, start→end) |\n|---|---|---|---|---|---|---|\n"
          f"| single slide, serial ({a.device}) | {len(slides)} | {n_points} | {res['single']['seconds']} | "
          f"{res['single']['slides_per_hour']} | {res['single']['points_per_s']} | {res['single']['load'][0]}→{res['single']['load'][1]} |\n"
          f"| cohort, LocalCluster {a.workers}x1 ({a.device}) | {n_done} | {int(r.status['n_spots'].sum())} | "
          f"{res['cohort']['seconds']} | {res['cohort']['slides_per_hour']} | {res['cohort']['points_per_s']} | "
          f"{res['cohort']['load'][0]}→{res['cohort']['load'][1]} |\n\n"
          f"ratio cohort / single: **{res['ratio_cohort_to_single']}**; features of the cohort afterwards: "
          f"{res['features']['seconds']} s ({res['features']['n_types']} spatial types, nothing predicted again: "
          f"{res['features']['predicted_again'] == 0}).\n")
    (a.out / "results.md").write_text(md)
    print(json.dumps(res, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
