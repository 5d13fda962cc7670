"""Turning the published Path2Space model into an :class:`~stimage_nb.ensemble.Ensemble`."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Sequence

from ..errors import StimageInputError
from ._layout import read_genes, read_layout

log = logging.getLogger(__name__)

#: Path2Space's preprocessing in its MPP-standardised mode (ge_model: 224-px tiles of 100 µm,
#: ``tile_size_px_100_micron``), and its Macenko target (``frozen/utils_color_norm.py``).
TILE_UM = 100.0
OUT_PX = 224
HIDDEN_DROPOUT = 0.2
MACENKO_IO = 255.0  # Path2Space's optical density is -log(I / 255)
REFERENCE = ("Shulman et al., Cell 2026 (doi:10.1016/j.cell.2026.04.023); code: path2space-companion/ge_model "
             "(Apache-2.0); weights: Zenodo records 14729337 / 20174301")
DIFFERENCES = [
    "Macenko normalisation to Path2Space's fixed target (stain matrix [[0.5626,0.2159],[0.7201,0.8012],[0.4062,"
    "0.5581]], maxC [1.9705,1.0308]) with this package's normaliser: the source stains are estimated once per "
    "section by least squares, where Path2Space estimates them per tile with SPAMS lasso after brightness "
    "standardisation",
    "tiles are read at 100 µm and resampled to 224 px by this package's reader (bilinear, from the nearest pyramid "
    "level), where Path2Space reads the level-0 region and resizes it with torchvision (bilinear, antialias=False)",
    "every spot is predicted: Path2Space's Sobel edge filter (evaluate_tile) that drops low-texture tiles is not "
    "applied; the domain-shift score flags tiles unlike the reference",
]


def _sha_file(p: Path) -> str:
    from ..models.encoders import sha256_of

    return sha256_of(p)


def import_path2space(weights: str | os.PathLike, out: str | os.PathLike | None = None, *,
                      reference_sections: Sequence | None = None, device: str = "cpu", progress: bool = True):
    """The published Path2Space model as an ensemble this package predicts, evaluates and exports with.

    Parameters
    ----------
    weights
        The Path2Space weights directory (``ctranspath.pth``, ``mlp_ensemble/result_{ik}_{il}_0/
        model_trained.pth``, ``genes.txt``; :func:`read_layout`).
    out
        Where to save the ensemble (``ensemble.json`` + safetensors; ``None``: not saved).
    reference_sections
        :class:`~stimage_nb.io.section.Section` objects whose tiles define "familiar" for the domain-shift
        score (Path2Space's training data are not published): the model is fitted on all but the last
        and the last is its held-out reference (one section: fitted and referenced on it). ``None``: no
        domain-shift score.
    device
        Where to run the domain model's feature pass.

    Returns
    -------
    :class:`~stimage_nb.ensemble.Ensemble` with one member per MLP (CTransPath shared, features computed
    once), tiles of 100 µm at 224 px, Macenko to Path2Space's fixed target, and
    ``meta["mean_groups"]`` = the outer folds, so the predictive mean is Path2Space's (inner mean over the
    inner folds, outer mean over the outer folds); ``epistemic_var`` = the population variance of all
    members' predictions; no aleatoric variance (the MLPs give point values).
    """
    from ..ensemble import Ensemble
    from ..models.encoders import load_encoder, read_tensors, resolve_weights
    from ..models.features import FeatureStack, TimmExtractor
    from ..models.model import STModel
    from ..stain import MacenkoNormalizer

    lay = read_layout(weights)
    genes = read_genes(lay.genes_file)
    ct = load_encoder("ctranspath", lay.ctranspath).eval()
    stack = FeatureStack(["timm"], timm=TimmExtractor(ct, "ctranspath")).eval()  # standardisation: identity
    for p in stack.parameters():
        p.requires_grad_(False)
    members, info, groups = [], [], []
    it = lay.folds
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(lay.folds, desc="Path2Space MLPs", unit="member")
    index = {}
    for ik, il in it:
        ck = lay.checkpoint(ik, il)
        sd = read_tensors(resolve_weights(ck))
        need = {"layer0.0.weight", "layer0.0.bias", "layer1.0.weight", "layer1.0.bias"}
        if set(sd) != need:
            raise StimageInputError(f"{ck}: not a Path2Space MLP (keys {sorted(sd)[:6]}, expected {sorted(need)}).")
        hidden, n_in = sd["layer0.0.weight"].shape
        if n_in != stack.num_features:
            raise StimageInputError(f"{ck}: the MLP takes {n_in} features, CTransPath gives {stack.num_features}.")
        if sd["layer1.0.weight"].shape != (len(genes), hidden):
            raise StimageInputError(f"{ck}: {sd['layer1.0.weight'].shape[0]} outputs for {len(genes)} genes in "
                                    f"{lay.genes_file.name}.")
        m = STModel(stack, len(genes), 0, backbone_name=stack.name, head="mlp", hidden=int(hidden),
                    dropout=HIDDEN_DROPOUT, init=False)
        m.mlp.load_state_dict(sd, strict=True)
        m.eval()
        index[(ik, il)] = len(members)
        members.append(m)
        info.append({"member": len(info), "fold": [ik, il], "source_file": str(ck.relative_to(lay.root)),
                     "source_sha256": _sha_file(ck)})
    for ik in lay.outer:
        groups.append([index[(ik, il)] for il in lay.inner])
    run_id = hashlib.sha256("".join(i["source_sha256"] for i in info).encode()).hexdigest()[:12] + "-path2space"
    meta = {
        "run_id": run_id, "source": "path2space", "train_sections": [], "val_sections": [], "mean_groups": groups,
        "members": info,
        "path2space": {
            "reference": REFERENCE, "weights_dir": str(lay.root), "n_outer_folds": len(lay.outer),
            "n_inner_folds": len(lay.inner), "ctranspath": ct.weights_source,
            "genes_file": {"path": str(lay.genes_file), "sha256": _sha_file(lay.genes_file)},
            "averaging": "mean over the inner folds il of each outer fold ik, then over the outer folds (as "
                         "ge_model/path2space/ensemble.py); epistemic_var = population variance over all members",
            "preprocessing": {"tile_um": TILE_UM, "out_px": OUT_PX, "stain": "macenko to the fixed target",
                              "mean": list(ct.pretrained_cfg["mean"]), "std": list(ct.pretrained_cfg["std"])},
            "differences_from_the_companion_code": DIFFERENCES,
        },
        "encoders": {"ctranspath": {"encoder": "ctranspath", "weights": ct.weights_source, "frozen": True,
                                    "preprocessing": {"mean": list(ct.pretrained_cfg["mean"]),
                                                      "std": list(ct.pretrained_cfg["std"]), "tile_um": TILE_UM,
                                                      "out_px": OUT_PX, "um_per_px": TILE_UM / OUT_PX}}},
    }
    ens = Ensemble(members, genes=genes, celltypes=[], tile_um=TILE_UM, out_px=OUT_PX,
                   stain=MacenkoNormalizer(Io=MACENKO_IO), meta=meta)
    if reference_sections:
        from ..domain import fit_domain

        refs = list(reference_sections)
        fit, held = (refs[:-1], refs[-1:]) if len(refs) > 1 else (refs, [])
        ens.to(device)
        fit_domain(ens, fit, held, progress=progress)
        ens.to("cpu")
        ens.meta["domain_reference_sections"] = [s.name for s in refs]
    else:
        log.warning("no reference sections: the imported model has no domain-shift score (give reference sections "
                    "of your own data, e.g. --reference-manifest M --reference-sections A,B)")
    if out is not None:
        ens.save(out)
        ens.path = Path(out)
    log.info("imported Path2Space: %d members (%d x %d folds), %d genes", len(members), len(lay.outer),
             len(lay.inner), len(genes))
    return ens

