"""The ``stimage-nb`` command line. Each sub-command is a thin wrapper over the Python API."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import StimageInputError, WeightsUnavailableError


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a deep ensemble on manifest sections")
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--sections", help="comma-separated training sections (default: all with counts)")
    p.add_argument("--val-sections", help="comma-separated validation sections for early stopping "
                   "(default: one training section is held out)")
    p.add_argument("--genes", required=True, type=Path, help="gene list file, one symbol per line")
    p.add_argument("--drop-missing-genes", action="store_true", help="drop listed genes absent from the counts")
    p.add_argument("--out", required=True, type=Path, help="run directory (resumes if it holds a run)")
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--backbone", default=None,
                   help="timm model name to fine-tune end to end (e.g. resnet18; default: the offline default, "
                        "frozen k-means + handcrafted features with low-rank NB heads). With --frozen or "
                        "--extractor timm: its frozen features")
    p.add_argument("--weights", default=None, help="PATH to a safetensors file, a timm/hf-hub name, or 'none'")
    p.add_argument("--extractor", default=None,
                   help="frozen feature branches joined by '+': kmeans, handcrafted, timm (the --backbone with "
                        "--weights, e.g. a local pathology foundation model). Default: kmeans+handcrafted")
    p.add_argument("--rank", type=int, default=None, help="rank of the NB head (0: full; default 8 frozen, 0 fine-tuned)")
    p.add_argument("--bagging", action="store_true", help="train each member on a bootstrap sample of the spots")
    p.add_argument("--member-features", default=None, choices=["shared", "per_member"],
                   help="frozen path: one k-means dictionary for all members, or one per member")
    p.add_argument("--stain", default=None, choices=["macenko", "none"],
                   help="stain normalisation per section to the training sections' stain (default: macenko)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None,
                   help="tiles per training step (default: 1024 frozen, 32 fine-tuned; lower it if the GPU runs out of memory)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 3e-3 frozen, 1e-3 fine-tuned)")
    p.add_argument("--tile-um", type=float, default=None, help="tile side in µm (default 150)")
    p.add_argument("--out-px", type=int, default=None, help="tile side in pixels fed to the model (default 112)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frozen", action="store_true",
                   help="with --backbone: frozen-backbone fast path (features cached once, heads trained)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(a) -> int:
    from .io.readers import read_gene_list
    from .train import TrainConfig, train

    cfg = TrainConfig.from_cli(a)
    train(a.manifest, genes=read_gene_list(a.genes), out=a.out, sections=_csv(a.sections),
          val_sections=_csv(a.val_sections), config=cfg, drop_missing_genes=a.drop_missing_genes)
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
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(a) -> int:
    from .evaluate import evaluate

    evaluate(a.pred, a.manifest, out=a.out, baseline=not a.no_baseline)
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
    p = sub.add_parser("fetch-data", help="download the public her2st data into the cache")
    p.add_argument("--dest", type=Path, default=None)
    p.set_defaults(func=_cmd_fetch)


def _cmd_fetch(a) -> int:
    from .datasets import fetch_her2st

    print(fetch_her2st(a.dest))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stimage-nb", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_predict, _add_evaluate, _add_demo, _add_fetch):
        add(sub)
    from . import export, shifts
    from .omero import cli as omero_cli  # imports no omero-py: commands say so when it is missing

    export.add_cli(sub)
    shifts.add_cli(sub)
    omero_cli.add_cli(sub)
    from . import interpretation  # stimage-nb interpret (shap is imported only when it runs)

    interpretation.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(a.func(a) or 0)
    except (StimageInputError, WeightsUnavailableError, FileNotFoundError) as e:
        print(f"stimage-nb {a.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
