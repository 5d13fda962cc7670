"""Building a registry encoder with its weights: random, a local file or folder (offline), or the hub."""

from __future__ import annotations

import logging
import os

from ...errors import StimageInputError, WeightsUnavailableError
from ._arch import EncoderModule, build_module, resolve_kwargs
from ._registry import Encoder, get_encoder
from ._weights import config_overrides, load_into, mismatch, provenance, read_shapes, resolve_weights

log = logging.getLogger(__name__)


def _is_local(weights: str) -> bool:
    from ..backbone import is_local_weights

    return is_local_weights(weights)


def load_encoder(name: str | Encoder, weights: str | os.PathLike | None = "none", *, overrides: dict | None = None,
                 init: bool = True, hub_timeout: float | None = None) -> EncoderModule:
    """A registry encoder as an :class:`~stimage_nb.models.encoders.EncoderModule`.

    Parameters
    ----------
    name
        Registry name, alias or Hugging Face id of an entry (``"uni"``, ``"hf-hub:paige-ai/Virchow2"``).
    weights
        ``"none"``: random weights (``init=False``: uninitialised memory, for a state dict loaded next).
        A local ``.safetensors``/``.bin``/``.pth`` file or a downloaded Hugging Face folder: built from
        the registry (and the folder's ``config.json``, which wins) and loaded **offline**, strictly;
        the module's ``weights_source`` records the files and their sha256. ``"pretrained"`` or
        ``"hf-hub:ORG/REPO"``: downloaded through timm when the hub answers (timm-hosted encoders only).
    overrides
        timm arguments replacing the entry's (e.g. a resized stand-in); a folder's ``config.json``
        ``model_args`` are applied first.

    Raises
    ------
    WeightsUnavailableError
        Missing or unreadable weights, weights of another architecture (naming the encoder they match),
        or a download that is impossible offline.
    """
    entry = name if isinstance(name, Encoder) else get_encoder(name)
    w = None if weights is None else str(weights)
    if w is None or w.lower() in ("none", ""):
        return build_module(entry, overrides, init=init)
    if _is_local(w):
        src = resolve_weights(w)
        cfg_over, pre = config_overrides(entry, src.config)
        over = {**cfg_over, **dict(overrides or {})}
        module = build_module(entry, over or None, init=False, mean=pre.get("mean"), std=pre.get("std"),
                              input_px=pre.get("input_px"))
        load_into(module, entry, src)
        module.weights_source = provenance(src)
        return module
    if w.lower() in ("pretrained", "timm") or w.startswith("hf-hub:"):
        hub_id = w[len("hf-hub:"):] if w.startswith("hf-hub:") else entry.hf_hub_id
        if entry.builder != "timm" or not hub_id:
            raise WeightsUnavailableError(
                f"{entry.title} is not published as a timm model on a hub; download {', '.join(entry.weights_files)} "
                f"from {entry.source.split(' ')[0]} and pass --weights PATH.")
        from ..backbone import HUB_TIMEOUT_S, _from_hub

        kw = resolve_kwargs({**entry.kwargs, **dict(overrides or {})})
        kw.pop("architecture", None)
        kw["num_classes"] = 0
        model = _from_hub(f"hf-hub:{hub_id}", None, hub_timeout or HUB_TIMEOUT_S, **kw)
        module = EncoderModule(entry, model, build_kwargs=overrides)
        module.weights_source = {"path": f"hf-hub:{hub_id}", "files": {}, "sha256": ""}
        return module
    raise StimageInputError(f"weights {w!r} for encoder {entry.name!r}: give 'none', a local file or Hugging Face "
                            "folder, 'pretrained' or 'hf-hub:ORG/REPO'.")


def check_weights(name: str | Encoder, weights: str | os.PathLike | None, *, overrides: dict | None = None) -> None:
    """Fail fast: raise the error :func:`load_encoder` would raise for local ``weights``, reading only the
    file's tensor names and shapes (safetensors header / memory map) against a meta-device build."""
    entry = name if isinstance(name, Encoder) else get_encoder(name)
    w = None if weights is None else str(weights)
    if w is None or not _is_local(w):
        return
    src = resolve_weights(w)
    cfg_over, _ = config_overrides(entry, src.config)
    module = build_module(entry, {**cfg_over, **dict(overrides or {})} or None, device="meta")
    msg = mismatch(module, entry, read_shapes(src), src.path)
    if msg:
        raise WeightsUnavailableError(msg)
