"""``stimage-nb validate``: run validation protocols on a manifest and write the report folder."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import StimageInputError


def _csv(v):
    return None if v is None else [x.strip() for x in v.split(",") if x.strip()]


def add_cli(sub) -> None:
    p = sub.add_parser("validate", help="hold out sections, patients, platforms or acquisitions; score the ensemble, "
                                        "a single member and the ridge baseline on the same tiles")
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path,
                   help="report folder (validation.csv, table.csv, figures/, report.md; models/ and folds/ for resuming)")
    p.add_argument("--protocol", default="all",
                   help="loso, lopo, cross_platform, acquisition (comma-separated), or all (default: every protocol "
                        "the manifest supports)")
    p.add_argument("--genes", type=Path, default=None, help="gene list file (default: the genes all sections share)")
    p.add_argument("--sections", help="comma-separated manifest rows to use (default: all)")
    p.add_argument("--patients", help="leave-one-patient-out: only these held-out patients")
    p.add_argument("--train-platform", default=None, help="cross-platform: train on this platform")
    p.add_argument("--test-platform", default=None, help="cross-platform: test on this platform")
    p.add_argument("--shifts", default=None,
                   help="acquisition protocol: comma-separated shift names (default: the acquisition set of "
                        "stimage_nb.shifts.ACQUISITION_SHIFTS)")
    p.add_argument("--depth", default="observed", choices=["observed", "reference"],
                   help="give each held-out section's sequencing depth to the model (default) or predict at the "
                        "training depth")
    p.add_argument("--val", default="none", choices=["none", "last"],
                   help="hold the last training section out of fitting for validation (default: none)")
    p.add_argument("--config", default=None,
                   help="training recipe: a JSON file or inline JSON of TrainConfig fields (default: TrainConfig())")
    p.add_argument("--members", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples of spots for the CI (0: none)")
    p.add_argument("--keep-shifted", action="store_true", help="keep the shifted images")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_validate)


def _config(a):
    from ..train import TrainConfig

    d = {}
    if a.config:
        src = Path(a.config)
        try:
            d = json.loads(src.read_text() if src.is_file() else a.config)
        except (json.JSONDecodeError, OSError) as e:
            raise StimageInputError(f"--config {a.config!r}: not a JSON file or JSON object ({e}).") from e
        if not isinstance(d, dict):
            raise StimageInputError(f"--config {a.config!r}: give a JSON object of TrainConfig fields.")
    for k in ("members", "epochs", "device"):
        if getattr(a, k) is not None:
            d[k] = getattr(a, k)
    return TrainConfig.from_dict(d)


def _cmd_validate(a) -> int:
    from ..io.readers import read_gene_list
    from ..shifts import parse_shifts
    from . import validate, write_report

    if a.protocol is not None and not a.protocol.strip(" ,"):
        raise StimageInputError("--protocol is empty; give loso, lopo, cross_platform, acquisition (comma-separated) "
                                "or all, or leave the flag out for every protocol the manifest supports.")
    protocol = _csv(a.protocol) or ["all"]
    res = validate(a.manifest, out=a.out, protocol=protocol if protocol != ["all"] else "all",
                   genes=read_gene_list(a.genes) if a.genes else None, config=_config(a), sections=_csv(a.sections),
                   val=a.val, depth=a.depth, shifts=parse_shifts(a.shifts) if a.shifts else None,
                   patients=_csv(a.patients), train_platform=a.train_platform, test_platform=a.test_platform,
                   n_boot=a.n_boot, keep_shifted=a.keep_shifted, seed=a.seed)
    paths = write_report(res, a.out, figures=not a.no_figures)
    for by in ("patient", "section"):
        met = res.targets_met(by)
        if met:
            print(f"targets per held-out {by} (and acquisition): " + ", ".join(
                f"{k} {v['met']}/{v['of']}" for k, v in met.items() if isinstance(v, dict)))
    print(paths["report"])
    return 0
