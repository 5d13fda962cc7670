"""``stimage-nb cohort predict|features``: thin wrappers over :func:`predict_cohort` and :func:`cohort_features`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _add_cluster_args(p) -> None:
    g = p.add_argument_group("cluster (Dask)")
    g.add_argument("--scheduler", default="local",
                   help="local (a LocalCluster on this machine, default) | slurm | pbs | a scheduler address "
                        "(tcp://host:8786)")
    g.add_argument("--workers", type=int, default=None,
                   help="workers (local: default min(2, cores); slurm/pbs: batch jobs, default 1)")
    g.add_argument("--threads-per-worker", type=int, default=1)
    g.add_argument("--gpus-per-worker", type=int, default=0,
                   help="GPUs per worker: workers get the resource GPU, each task asks for one; "
                        "Slurm jobs get --gres=gpu:N, PBS jobs ngpus=N")
    g.add_argument("--memory", default=None, help="memory per worker or job, e.g. 32GB")
    g.add_argument("--cores", type=int, default=4, help="cores per Slurm/PBS job")
    g.add_argument("--queue", default=None, help="Slurm partition / PBS queue")
    g.add_argument("--account", default=None, help="account to charge (Slurm/PBS)")
    g.add_argument("--walltime", default="04:00:00", help="job time limit (Slurm/PBS)")
    g.add_argument("--job-extra", action="append", default=[],
                   help="an extra #SBATCH/#PBS directive (repeatable), e.g. --job-extra=--constraint=a100")
    g.add_argument("--prologue", action="append", default=[],
                   help="a shell line run before each worker starts (repeatable), e.g. 'module load cuda'")


def cluster_options(a):
    """:class:`~stimage_nb.cluster.ClusterOptions` from the arguments of :func:`_add_cluster_args`."""
    from ..cluster import ClusterOptions

    return ClusterOptions(n_workers=a.workers, threads_per_worker=a.threads_per_worker, memory=a.memory,
                          gpus_per_worker=a.gpus_per_worker, cores=a.cores, queue=a.queue, account=a.account,
                          walltime=a.walltime, job_extra=tuple(a.job_extra), prologue=tuple(a.prologue))


def _add_feature_args(p) -> None:
    from ..panels import SPEC_HELP

    g = p.add_argument_group("slide-level features")
    g.add_argument("--region", default=None,
                   help="pseudo-bulk over the points in this QuPath annotation class/name (shell pattern, e.g. "
                        "'Tumo*r'; the cohort table's annotations column) instead of the whole tissue")
    g.add_argument("--genes", default=None, help=f"genes for the pseudo-bulk and spatial types: {SPEC_HELP} "
                   "(default: all the model predicts)")
    g.add_argument("--epistemic", default="correlated", choices=["correlated", "independent"],
                   help="how the pseudo-bulk's epistemic variance is bounded (docs/cohort.md)")
    g.add_argument("--smooth-um", type=float, default=None,
                   help="smooth predictions over this radius (µm) before the spatial types")
    g.add_argument("--no-spatial-types", action="store_true", help="skip the spatial types")
    g.add_argument("--resolution", type=float, default=0.5, help="Leiden resolution of the spatial types")
    g.add_argument("--max-spots", type=int, default=10000,
                   help="spots sampled from the whole cohort to fit the spatial types")
    g.add_argument("--n-perms", type=int, default=200, help="neighbourhood-enrichment permutations")
    g.add_argument("--pam50-centroids", default=None, type=Path,
                   help="a PAM50 centroid table (genes x subtypes) for subtype calls; none is shipped")
    g.add_argument("--seed", type=int, default=0)


def feature_options(a):
    from ._features import FeatureOptions

    return FeatureOptions(region=a.region, genes=a.genes, epistemic=a.epistemic, smooth_um=a.smooth_um,
                          spatial_types=not a.no_spatial_types, resolution=a.resolution, max_spots=a.max_spots,
                          n_perms=a.n_perms, seed=a.seed,
                          pam50_centroids=str(a.pam50_centroids) if a.pam50_centroids else None)


def _resolvers(values) -> dict:
    from ..errors import StimageInputError

    out = {}
    for v in values or []:
        scheme, _, fn = v.partition("=")
        if not scheme or ":" not in fn:
            raise StimageInputError(f"--resolver {v!r}: give it as SCHEME=module:function, e.g. gdc=mypkg.gdc:download.")
        out[scheme.strip().lower()] = fn.strip()
    return out


def add_cli(sub) -> None:
    """Register ``stimage-nb cohort ...``."""
    p = sub.add_parser("cohort", help="predict a cohort of slides on a Dask cluster; slide-level features")
    csub = p.add_subparsers(dest="cohort_command", required=True)

    pr = csub.add_parser("predict", help="predict every slide of a cohort table, then the slide-level features",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pr.add_argument("--model", required=True, type=Path, help="run directory written by `train`")
    pr.add_argument("--slides", required=True, type=Path,
                    help="cohort CSV: slide (path | omero:<id> | gdc:<uuid>), patient_id, optional slide_id, "
                         "um_per_px, annotations")
    pr.add_argument("--out", required=True, type=Path,
                    help="output directory (slides/<slide>.h5ad, status.csv, features.csv, ...); re-runs resume")
    pr.add_argument("--grid-um", type=float, default=None, help="grid spacing in µm (default: the model's tile side)")
    pr.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pr.add_argument("--batch-size", type=int, default=256)
    pr.add_argument("--resolver", action="append", default=[],
                    help="SCHEME=module:function that fetches slides of that scheme (repeatable), e.g. "
                         "gdc=stimage_nb.gdc:resolve_gdc_slide")
    pr.add_argument("--retry-failed", action="store_true", help="retry slides that failed before")
    pr.add_argument("--keep-downloads", action="store_true", help="keep slides a resolver downloaded")
    pr.add_argument("--no-features", action="store_true", help="predict only")
    _add_cluster_args(pr)
    _add_feature_args(pr)
    pr.set_defaults(func=_cmd_predict)

    fe = csub.add_parser("features", help="slide-level features of predictions already made (no model)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fe.add_argument("--pred", required=True, type=Path, action="append",
                    help="a prediction .h5ad or a folder of them (repeatable)")
    fe.add_argument("--out", required=True, type=Path)
    _add_feature_args(fe)
    fe.set_defaults(func=_cmd_features)


def _cmd_predict(a) -> int:
    from ._predict import predict_cohort

    res = predict_cohort(a.model, a.slides, a.out, scheduler=a.scheduler, cluster_options=cluster_options(a),
                         grid_um=a.grid_um, device=a.device, batch_size=a.batch_size, resolvers=_resolvers(a.resolver),
                         retry_failed=a.retry_failed, keep_downloads=a.keep_downloads,
                         features=False if a.no_features else feature_options(a))
    s = json.loads(res.to_json())
    print(f"{s['n_done']} of {s['n_slides']} slides done ({len(res.ran)} predicted now, {len(res.skipped)} kept from "
          f"an earlier run), {s['n_failed']} failed -> {res.out}")
    for f in s["failed"]:
        print(f"  failed: {f['slide_id']}: {f['error']}")
    if s["n_failed"]:  # a script must see it without reading status.csv; the good slides are done and kept
        from ..errors import StimageInputError

        raise StimageInputError(f"{s['n_failed']} of {s['n_slides']} slides failed (each one's error is in "
                                f"{res.out}/status.csv; the other slides are done and kept); fix them and re-run with "
                                "--retry-failed")
    return 0


def _cmd_features(a) -> int:
    from ..errors import StimageInputError
    from ._features import cohort_features, write_features

    preds = {}
    for p in a.pred:
        files = sorted(p.glob("*.h5ad")) if p.is_dir() else [p]
        if not files:
            raise StimageInputError(f"{p}: no .h5ad predictions there.")
        for f in files:
            preds[f.name[: -len(".h5ad")] if f.name.endswith(".h5ad") else f.stem] = f
    feats = cohort_features(preds, options=feature_options(a), progress=True)
    paths = write_features(feats, a.out)
    print(f"{len(feats.table)} slides -> {paths['features']}")
    return 0
