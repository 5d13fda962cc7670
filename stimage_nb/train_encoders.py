"""What a training run checks and records about its encoders' weights (timm backbones and registered
foundation encoders, :mod:`stimage_nb.models.encoders`): an unknown name or weights that do not fit fail before any
tile is read; random weights warn; ``ensemble.json`` records each registered encoder's entry, build arguments,
preprocessing and weight files with their sha256."""

from __future__ import annotations

import logging

from .train_config import TrainConfig

log = logging.getLogger("stimage_nb.train")


def _warn_random_weights(cfg: TrainConfig) -> None:
    """A timm backbone that the run uses (fine-tuned, or as the frozen ``timm`` branch) with ``weights="none"``
    starts from random weights: legitimate (tests, training from scratch) but rarely what a user means."""
    from .models.backbone import _check_name
    from .models.encoders import find_encoder

    if cfg.frozen and "timm" not in cfg.extractor:
        return
    for b in cfg.backbones:
        registered = find_encoder(b) is not None
        if not registered:
            _check_name(b)  # an unknown name fails here, before any tile is read, not after a warning
        if cfg.weights_for(b).strip().lower() not in ("none", ""):
            continue
        if registered:
            log.warning("encoder %r starts from random weights (weights='none'): its features mean nothing until "
                        "you give --weights PATH to its downloaded weights (`stimage-nb encoders` says where)", b)
        else:
            log.warning("backbone %r starts from random weights (weights='none'): give --weights pretrained for "
                        "timm's ImageNet weights, or a local weights file", b)


def _check_encoder_weights(cfg: TrainConfig) -> None:
    """Each registered encoder's local weights exist and fit (names and shapes only, no loading)."""
    from .models.encoders import check_weights, find_encoder

    for name in cfg.backbones:
        if find_encoder(name) is not None and (cfg.frozen and "timm" in cfg.extractor.split("+") or not cfg.frozen):
            check_weights(name, cfg.weights_for(name), overrides=cfg.backbone_kwargs or None)


def _encoder_provenance(cfg: TrainConfig, tile_um: float, stacks: dict) -> dict:
    """What ensemble.json records per registered encoder: the entry, the arguments it was built with, the
    preprocessing actually used (normalisation, tile µm and px) and the weights' files with their sha256."""
    from .models.backbone import is_local_weights
    from .models.encoders import find_encoder, provenance, resolve_weights

    out = {}
    for name in cfg.backbones:
        entry = find_encoder(name)
        if entry is None:
            continue
        module = None
        for ident, (stack, _, _) in stacks.items():
            if ident.split("#")[0] == name and "timm" in getattr(stack, "branches", {}):
                module = stack.branches["timm"].backbone
        w = cfg.weights_for(name)
        if module is not None and getattr(module, "weights_source", None):
            weights = module.weights_source
        elif is_local_weights(w):
            weights = provenance(resolve_weights(w))
        else:
            weights = {"path": w, "files": {}, "sha256": ""}
        pcfg = getattr(module, "pretrained_cfg", None) or {}
        out[name] = {
            "encoder": entry.name, "title": entry.title, "architecture": pcfg.get("architecture", entry.architecture),
            "registry_kwargs": entry.kwargs, "build_kwargs": getattr(module, "build_kwargs", dict(cfg.backbone_kwargs)),
            "output": entry.output, "feature_dim": int(getattr(module, "num_features", entry.feature_dim)),
            "preprocessing": {"mean": list(pcfg.get("mean", entry.mean)), "std": list(pcfg.get("std", entry.std)),
                              "tile_um": float(tile_um), "out_px": int(cfg.out_px),
                              "um_per_px": float(tile_um) / int(cfg.out_px),
                              "encoder_input_px": entry.input_px, "encoder_um_per_px": entry.um_per_px,
                              "stain": cfg.stain},
            "weights": weights, "licence": entry.licence, "frozen": bool(cfg.frozen),
        }
        if not weights.get("sha256"):
            log.warning("encoder %s trained with weights %r (no local file): its features are %s", name, w,
                        "random" if w.lower() in ("none", "") else "from the hub")
    return out
