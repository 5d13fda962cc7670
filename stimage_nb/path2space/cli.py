"""``stimage-nb import-model path2space --weights DIR --out RUN``."""

from __future__ import annotations

from pathlib import Path


def add_cli(sub) -> None:
    p = sub.add_parser("import-model", help="turn a published model (Path2Space) into an ensemble this package "
                                            "predicts, evaluates and exports with")
    p.add_argument("kind", choices=["path2space"], help="the published model's format")
    p.add_argument("--weights", required=True, type=Path,
                   help="Path2Space weights directory: ctranspath.pth, mlp_ensemble/result_{ik}_{il}_0/"
                        "model_trained.pth, genes.txt")
    p.add_argument("--out", required=True, type=Path, help="run directory for the ensemble")
    p.add_argument("--reference-manifest", type=Path, default=None,
                   help="sections of your own data that define 'familiar' for the domain-shift score")
    p.add_argument("--reference-sections", default=None,
                   help="comma-separated sections of --reference-manifest (the last is the held-out reference)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=_cmd)


def _cmd(a) -> int:
    from ..errors import StimageInputError
    from ._import import import_path2space

    refs = None
    if a.reference_manifest is not None:
        from ..io.readers import read_manifest

        names = [s.strip() for s in a.reference_sections.split(",")] if a.reference_sections else None
        refs = read_manifest(a.reference_manifest, names)
    elif a.reference_sections:
        raise StimageInputError("--reference-sections needs --reference-manifest")
    ens = import_path2space(a.weights, a.out, reference_sections=refs, device=a.device)
    groups = ens.meta["mean_groups"]
    print(f"{a.out}: Path2Space as {ens.n_members} members ({len(groups)} x {len(groups[0])} folds), "
          f"{len(ens.genes)} genes, tiles {ens.tile_um:g} µm at {ens.out_px} px"
          + ("" if ens.domain is not None else "; no domain-shift score (no reference sections)"))
    return 0
