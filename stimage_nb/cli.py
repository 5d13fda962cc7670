"""The ``stimage-nb`` command line. Each sub-command is a thin wrapper over the Python API."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import describe_error


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a deep ensemble on manifest sections")
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--sections", help="comma-separated training sections (default: all with counts)")
    p.add_argument("--val-sections", help="comma-separated validation sections for early stopping "
                   "(default: with three or more training sections, the last is held out; '' for none: "
                   "all epochs, no early stopping)")
    p.add_argument("--genes", required=True,
                   help="genes to predict: stimage769 | pam50 | breast_clinical | hvg:N (highly variable genes of the "
                        "training sections, e.g. hvg:2000) | all (every gene detected in training) | PATH (a gene "
                        "list file, one symbol per line)")
    p.add_argument("--drop-missing-genes", action="store_true", help="drop listed genes absent from the counts")
    p.add_argument("--out", required=True, type=Path, help="run directory (resumes if it holds a run)")
    p.add_argument("--members", type=int, default=5, help="ensemble members (default 5)")
    p.add_argument("--backbone", default=None,
                   help="timm model name to fine-tune end to end (e.g. resnet18; default: the offline default, "
                        "frozen k-means + handcrafted features; NB mean = a library size regressed from the image x a "
                        "low-rank composition over the genes). With --frozen or "
                        "--extractor timm: its frozen features. A registered pathology encoder (uni, virchow2, "
                        "h-optimus-0...; `stimage-nb encoders`) gives frozen features, tiles at its own µm/px "
                        "and size; several, comma-separated, are cycled over the members (uni,virchow2)")
    p.add_argument("--weights", default=None,
                   help="PATH to a .safetensors/.bin file or a downloaded Hugging Face folder (read offline), a "
                        "timm/hf-hub name, or 'none'; one per backbone, comma-separated, for several")
    p.add_argument("--extractor", default=None,
                   help="frozen feature branches joined by '+': kmeans, handcrafted, timm (the --backbone with "
                        "--weights, e.g. a local pathology foundation model). Default: kmeans+handcrafted")
    p.add_argument("--rank", type=int, default=None, help="rank of the NB head (0: full; default 8 frozen, 0 fine-tuned)")
    p.add_argument("--bagging", action="store_true", help="train each member on a bootstrap sample of the spots")
    p.add_argument("--member-features", default=None, choices=["shared", "per_member"],
                   help="frozen path: one k-means dictionary for all members, or one per member")
    p.add_argument("--stain", default=None, choices=["macenko", "none"],
                   help="stain normalisation per section to the training sections' stain (default: macenko)")
    p.add_argument("--background", default=None, choices=["keep", "white"],
                   help="a black masked background in the tiles: turned into white glass (white) or kept (keep)")
    p.add_argument("--depth", default=None, choices=["none", "section"],
                   help="NB mean = section depth x rate (section) or counts at the training depth (none)")
    p.add_argument("--composition", default=None, choices=["on", "off"],
                   help="NB head as a spot's depth times a composition over the genes (on) or per-gene (off); "
                        "default: on for the frozen path, off when fine-tuning")
    p.add_argument("--library-size", default=None, choices=["ridge", "joint"],
                   help="with a composition head: the composition trained at each spot's observed library size and "
                        "the library size regressed from the image by ridge (ridge, the frozen default; needs "
                        "--depth none), or a depth head trained jointly through the genes' likelihood (joint: the "
                        "default with --depth section; without a composition head, e.g. fine-tuning, it does nothing)")
    p.add_argument("--composition-shrinkage", default=None, metavar="cv|S",
                   help="how much of the fitted composition's deviations from the mean composition is kept: 'cv' "
                        "(default with --library-size ridge) a factor per gene cross-fitted over the training "
                        "sections times --composition-cv-scale; or one factor S in (0, 1] for every gene (1 = as "
                        "fitted); anything but 1 needs --library-size ridge")
    p.add_argument("--composition-cv-scale", type=float, default=None, metavar="F",
                   help="with --composition-shrinkage cv, the fraction F in (0, 1] of each gene's cross-fitted factor "
                        "applied (default 0.25, chosen by leave-one-patient-out); RUN/crossfit/gene_shrinkage.json "
                        "records both")
    p.add_argument("--acquisition-views", default=None, metavar="NAMES|none",
                   help="frozen path: simulated acquisitions of the training tiles (stimage_nb.shifts names, "
                        "comma-separated) whose features are added as training views; default scan_4.5um,"
                        "defocus_1um+jpeg_q60,stain_H1.2_E0.85,stain_H0.85_E1.2 (another scanner or lab), "
                        "'none' for the tiles only")
    p.add_argument("--acquisition-share", type=float, default=None, metavar="P",
                   help="with --acquisition-views, the probability P in (0, 1] that a spot is seen in one of its "
                        "simulated acquisitions in a training step, else as scanned (default 0.5)")
    p.add_argument("--member-data", default=None, choices=["all", "groups"],
                   help="members train on all spots (all) or each leaves one training section out (groups)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 150 frozen, 12 fine-tuned)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="tiles per training step (default: 1024 frozen, 32 fine-tuned; lower it if the GPU runs out of memory)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 3e-3 frozen, 1e-3 fine-tuned)")
    p.add_argument("--tile-um", type=float, default=None,
                   help="tile side in µm (default 150; a registered encoder's own: UNI 112)")
    p.add_argument("--out-px", type=int, default=None,
                   help="tile side in pixels fed to the model (default 112; a registered encoder's own: 224)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--frozen", action="store_true",
                      help="with --backbone: frozen-backbone fast path (features cached once, heads trained)")
    mode.add_argument("--finetune", action="store_true",
                      help="fine-tune a registered encoder end to end instead of its frozen features")
    p.add_argument("--scheduler", default=None,
                   help="train the members in parallel on a Dask cluster: local | slurm | pbs | a scheduler address "
                        "(the run directory must be on a shared filesystem); default: one after another here")
    p.add_argument("--workers", type=int, default=None, help="with --scheduler: workers (or batch jobs)")
    p.add_argument("--gpus-per-worker", type=int, default=0, help="with --scheduler: GPUs per worker")
    p.set_defaults(func=_cmd_train)


def _cmd_train(a) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig.from_cli(a)
    opts = None
    if a.scheduler:
        from .cluster import ClusterOptions

        opts = ClusterOptions(n_workers=a.workers, gpus_per_worker=a.gpus_per_worker)
    train(a.manifest, genes=a.genes, out=a.out, sections=_csv(a.sections),
          val_sections=_csv(a.val_sections), config=cfg, drop_missing_genes=a.drop_missing_genes,
          scheduler=a.scheduler, cluster_options=opts)
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict sections (a manifest) or whole slides (--image) with a trained ensemble")
    p.add_argument("--model", required=True, type=Path, help="run directory written by `train`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", type=Path, help="sections with their spots (counts optional)")
    src.add_argument("--image", type=Path, action="append",
                     help="a whole slide without spots (SVS/TIFF/OME-Zarr/JPEG), predicted on a grid over its "
                          "tissue; repeat for several")
    p.add_argument("--grid-um", type=float, default=None,
                   help="with --image: grid spacing in µm (default: the model's tile side)")
    p.add_argument("--um-per-px", type=float, default=None,
                   help="with --image: the scan's µm per pixel when the file does not record it")
    p.add_argument("--sections", help="comma-separated sections (default: all)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=256,
                   help="tiles per forward pass (halved automatically if the GPU runs out of memory)")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(a) -> int:
    import anndata as ad

    from . import _keys as K
    from .predict import predict_manifest

    if a.image:
        from .predict import predict_slides

        paths = predict_slides(a.model, a.image, out=a.out, grid_um=a.grid_um, um_per_px=a.um_per_px,
                               device=a.device, batch_size=a.batch_size)
    else:
        paths = predict_manifest(a.model, a.manifest, out=a.out, sections=_csv(a.sections), device=a.device,
                                 batch_size=a.batch_size)
    for p in paths:
        dom = (ad.read_h5ad(p, backed="r").uns.get(K.UNS) or {}).get("domain") or {}
        pct = dom.get("median_percentile")
        note = "" if pct is None else (f"  domain-shift percentile {float(pct):.2f}"
                                       + (" (unlike the training data: check against measured spots)"
                                          if bool(dom.get("flagged")) else ""))
        print(f"{p}{note}")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics, calibration and a baseline for predictions")
    p.add_argument("--pred", required=True, type=Path)
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: the prediction directory")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--baseline-sections", default=None,
                   help="comma-separated sections to train the baseline on (default: the model's training sections; "
                        "needed for a model trained elsewhere, e.g. an imported Path2Space model)")
    p.add_argument("--train-manifest", type=Path, default=None,
                   help="manifest holding the model's training sections, for the baseline (default: the one the "
                        "model recorded, else --manifest when it holds the same files)")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(a) -> int:
    from .evaluate import evaluate

    evaluate(a.pred, a.manifest, out=a.out, baseline=not a.no_baseline,
             baseline_sections=_csv(getattr(a, "baseline_sections", None)), train_manifest=a.train_manifest)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train, predict held-out section and patient, evaluate, report")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--quick", action="store_true", help="a minute-long smoke run")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(a) -> int:
    from .demo import run_demo

    report = run_demo(a.out, quick=a.quick, device=a.device)
    print(report)
    return 0


def _add_fetch(sub) -> None:
    p = sub.add_parser("fetch-data", help="download public datasets (her2st by default) with checksums",
                       description="Download a public dataset into the data directory (sha256-checked, retried, "
                                   "resumable). `--list` says what each dataset is, its licence and its source.")
    p.add_argument("--dataset", default="her2st", help="dataset name (default her2st; see --list)")
    p.add_argument("--list", action="store_true", help="describe the datasets (source, licence, size, checksums)")
    p.add_argument("--dest", type=Path, default=None,
                   help="parent folder (default: $STIMAGE_NB_DATA, else ~/.cache/stimage_nb/data)")
    p.add_argument("--sections", default=None, help="her2st: comma-separated sections (default: all six)")
    p.add_argument("--base-url", default=None, help="fetch from this mirror instead of the dataset's source")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_fetch)


def _cmd_fetch(a) -> int:
    from .datasets import DATASETS, fetch

    if a.list:
        for d in DATASETS.values():
            print(f"{d.name}\n  {d.title}\n  {d.description}\n  size: {d.size}\n  licence: {d.licence}\n"
                  f"  cite: {d.citation}\n  source: {d.page} ({d.base_url})\n  checksums: {d.checksums}\n")
        return 0
    if a.dataset == "her2st":  # the offline bundle, when there is one and no --dest asks for a download
        from .datasets import fetch_her2st

        print(fetch_her2st(a.dest, _csv(a.sections), base_url=a.base_url, progress=not a.quiet))
        return 0
    root = fetch(a.dataset, a.dest, sections=_csv(a.sections), base_url=a.base_url, progress=not a.quiet)
    manifest = root / "sections.csv"
    print(manifest if manifest.is_file() else root)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (exit 2), like every other error of the command line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stimage-nb", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_train, _add_predict, _add_evaluate, _add_demo, _add_fetch):
        add(sub)
    from . import export, shifts, smoothing, validation
    from .cohort import _cli as cohort_cli
    from .gdc import cli as gdc_cli
    from .io import cache as io_cache
    from .io import convert as io_convert
    from .io import summary as io_summary
    from .models.encoders import cli as encoders_cli
    from .omero import cli as omero_cli  # imports no omero-py: commands say so when it is missing
    from .outcomes import cli as outcomes_cli
    from .path2space import cli as path2space_cli

    cohort_cli.add_cli(sub)
    export.add_cli(sub)
    shifts.add_cli(sub)
    omero_cli.add_cli(sub)
    io_summary.add_cli(sub)
    encoders_cli.add_cli(sub)
    path2space_cli.add_cli(sub)
    smoothing.add_cli(sub)
    validation.add_cli(sub)
    io_cache.add_cli(sub)
    io_convert.add_cli(sub)
    gdc_cli.add_cli(sub)
    outcomes_cli.add_cli(sub)
    from . import interpretation  # stimage-nb interpret (shap is imported only when it runs)

    interpretation.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; every error ends in one line on stderr, never a traceback.

    Exit status: 0 done, 2 bad input / missing data / unreachable service (see
    :func:`stimage_nb.errors.describe_error`), 130 interrupted (Ctrl-C), 1 an internal error (a bug).
    """
    command, verbose = "", False
    try:
        parser = build_parser()
        a = parser.parse_args(argv)
        command, verbose = a.command, bool(a.verbose)
        if a.command == "omero" and getattr(a, "omero_command", None):
            command = f"omero {a.omero_command}"
        logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
        if not a.verbose:  # the cluster's own bookkeeping (workers starting, ports) is not the user's business
            logging.getLogger("distributed").setLevel(logging.WARNING)
            import warnings

            warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        return int(a.func(a) or 0)
    except BaseException as e:  # noqa: BLE001 - the one place every failure becomes one line
        if isinstance(e, SystemExit):  # argparse (--help, usage errors) and sys.exit in commands
            raise
        if isinstance(e, BrokenPipeError):  # `stimage-nb ... | head`: the reader left, nothing to report
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            return 1
        msg, code = describe_error(e)
        if verbose:
            logging.getLogger("stimage_nb").error("traceback of the error below", exc_info=e)
        print(f"stimage-nb{' ' + command if command else ''}: error: {msg}", file=sys.stderr, flush=True)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
