"""Backbones: any timm model by name, with weights from nowhere, a local file, or a model hub.

``weights`` may be

- ``"none"`` (or ``None``): random initialisation (train from scratch);
- a path to a local ``.safetensors`` file (or a ``.pth``/``.bin``/``.pt`` state dict, read with
  ``torch.load(weights_only=True)``), for air-gapped GPU nodes;
- ``"pretrained"`` (alias ``"timm"``): the timm pretrained weights of the backbone name;
- a timm name with a tag (``"resnet50.a1_in1k"``) or an ``"hf-hub:org/repo"`` id.

A registered pathology foundation encoder (``"uni"``, ``"virchow2"``, ``"hf-hub:bioptimus/H-optimus-0"``...,
see :mod:`stimage_nb.models.encoders`) is built from the registry's timm architecture and arguments, so
its local weights (a file or a downloaded Hugging Face folder) load without any network access.

Hub downloads are attempted only when the hub answers within a few seconds; offline (no answer, or
``HF_HUB_OFFLINE=1``) only the local Hugging Face cache is consulted, and when the weights are not
there :class:`~stimage_nb.errors.WeightsUnavailableError` is raised at once, saying how to provide a
local file. Nothing here ever waits on a dead network.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

import torch
from torch import nn

from ..errors import StimageInputError, WeightsUnavailableError

log = logging.getLogger(__name__)

HUB_TIMEOUT_S = 4.0
_LOCAL_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_STRIP_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "trunk.")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _truthy(v: str | None) -> bool:
    return str(v or "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` seconds (False when ``HF_HUB_OFFLINE`` is set)."""
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
        return False
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/") + "/api/models?limit=1"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError as e:
        # a hub (or a mirror that wants a token) answered; anything else is a proxy or a wrong endpoint
        return e.code in (401, 403)
    except Exception:  # noqa: BLE001 - DNS failure, refused, timeout: offline
        return False


@contextlib.contextmanager
def _hub_offline():
    """Make huggingface_hub use its local cache only (no network, no retries)."""
    try:
        import huggingface_hub.constants as hc
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        yield
        return
    old_env, old = os.environ.get("HF_HUB_OFFLINE"), hc.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE = old
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def is_local_weights(weights: str | os.PathLike | None) -> bool:
    """Whether ``weights`` names a local file rather than ``none`` or a hub/timm name."""
    if weights is None:
        return False
    w = str(weights)
    if w.lower() in ("none", "", "pretrained", "timm") or w.startswith("hf-hub:"):
        return False
    return w.lower().endswith(_LOCAL_SUFFIXES) or os.sep in w or Path(w).exists()


def _check_name(name: str) -> None:
    import timm

    if name.startswith("hf-hub:"):
        return
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch[:6]}*")[:8] if arch else []
        raise StimageInputError(f"unknown timm backbone {name!r}. Use a name from timm.list_models()"
                                + (f" (similar: {', '.join(close)})." if close else "."))


def create_backbone(name: str, weights: str | os.PathLike | None = "none", *, hub_timeout: float = HUB_TIMEOUT_S,
                    init: bool = True, **kwargs) -> nn.Module:
    """A timm backbone that returns pooled features (``num_classes=0``).

    Parameters
    ----------
    name
        timm model name (``"resnet18"``, ``"test_resnet"``, ``"hf-hub:org/repo"``...) or a registered
        encoder (``"uni"``, ``"virchow2"``...; :mod:`stimage_nb.models.encoders`).
    weights
        See the module docstring.
    hub_timeout
        Seconds to wait for the model hub before treating the machine as offline.
    init
        ``False`` with ``weights="none"``: skip the random initialisation of a registered encoder because
        a complete state dict is loaded next (rebuilding a saved ensemble).
    **kwargs
        Passed to :func:`timm.create_model` (e.g. ``dynamic_img_size=True`` for ViTs); for a registered
        encoder, arguments that replace the registry's.

    Returns
    -------
    The module; ``module.num_features`` is the feature width and ``module.pretrained_cfg`` holds
    timm's preprocessing config.
    """
    import timm

    from .encoders import find_encoder, load_encoder

    entry = find_encoder(name)
    if entry is not None:
        return load_encoder(entry, weights, overrides=kwargs or None, init=init, hub_timeout=hub_timeout)
    _check_name(name)
    kwargs = dict(kwargs)
    kwargs["num_classes"] = 0
    w = None if weights is None else str(weights)
    if w is None or w.lower() in ("none", ""):
        if name.startswith("hf-hub:"):
            return _from_hub(name, None, hub_timeout, pretrained=False, **kwargs)
        return timm.create_model(name, pretrained=False, **kwargs)
    if is_local_weights(w):
        model = timm.create_model(name, pretrained=False, **kwargs) if not name.startswith("hf-hub:") else \
            _hub_model_offline(name, w, hub_timeout, **kwargs)
        load_local_weights(model, w)
        return model
    if w.lower() in ("pretrained", "timm"):
        return _from_hub(name, None, hub_timeout, **kwargs)
    if w.startswith("hf-hub:"):
        if name.startswith("hf-hub:"):
            return _from_hub(w, None, hub_timeout, **kwargs)
        return _from_hub(name, w[len("hf-hub:"):], hub_timeout, **kwargs)
    # a timm name with a pretrained tag, e.g. "resnet50.a1_in1k"
    if not timm.is_model(w.split(".")[0]):
        raise StimageInputError(f"weights {w!r} is neither 'none', a file that exists, 'pretrained', an "
                                "'hf-hub:org/repo' id nor a timm model name.")
    if w.split(".")[0] != name.split(".")[0]:
        raise StimageInputError(f"weights {w!r} are for architecture {w.split('.')[0]!r}, not the backbone {name!r}.")
    return _from_hub(w, None, hub_timeout, **kwargs)


def _hub_model_offline(name: str, weights: str, hub_timeout: float, **kwargs) -> nn.Module:
    """The architecture of an ``hf-hub:`` model whose weights are local: from the downloaded folder's
    ``config.json`` when there is one (no network), else from timm's hub config (the local cache offline)."""
    import timm

    from .encoders import resolve_weights

    src = resolve_weights(weights)
    cfg = src.config or {}
    if cfg.get("architecture"):
        pcfg = cfg.get("pretrained_cfg") or {}
        args = {**(cfg.get("model_args") or {}), **kwargs}
        if "global_pool" in pcfg:
            args.setdefault("global_pool", pcfg["global_pool"])
        model = timm.create_model(cfg["architecture"], pretrained=False, **args)
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}),
                                **{k: v for k, v in pcfg.items() if k in ("mean", "std", "input_size")}}
        return model
    try:
        return _from_hub(name, None, hub_timeout, pretrained=False, **kwargs)
    except WeightsUnavailableError as e:
        raise WeightsUnavailableError(
            f"{name} is not a registered encoder (`stimage-nb encoders`) and timm needs the hub's config.json to build "
            f"it, which is not available offline. Pass the downloaded Hugging Face folder (with config.json) as "
            f"--weights instead of the bare file {weights}, or a registered encoder name as --backbone.") from e


def _from_hub(name: str, hf_hub_id: str | None, hub_timeout: float, pretrained: bool = True, **kwargs) -> nn.Module:
    import timm

    if hf_hub_id:
        kwargs["pretrained_cfg_overlay"] = dict(hf_hub_id=hf_hub_id)
    online = hub_reachable(hub_timeout)
    what = f"{name}{' (' + hf_hub_id + ')' if hf_hub_id else ''}"
    try:
        if online:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        with _hub_offline():
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except WeightsUnavailableError:
        raise
    except Exception as e:  # noqa: BLE001 - any download/cache failure
        where = ("the model hub did not answer within %gs (offline, or HF_HUB_OFFLINE is set) and the "
                 "weights are not in the local Hugging Face cache" % hub_timeout) if not online else \
            f"the download failed ({type(e).__name__}: {e})"
        raise WeightsUnavailableError(
            f"cannot get pretrained weights for {what}: {where}. On a machine with internet, save them with "
            f"`python -c \"import timm, safetensors.torch as st; m = timm.create_model('{name}', pretrained=True, "
            f"num_classes=0); st.save_file(m.state_dict(), '{name.split('/')[-1].split(':')[-1]}.safetensors')\"` "
            "and pass that file (--weights PATH.safetensors), or train from scratch with --weights none."
        ) from e


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file or Hugging Face folder (safetensors, or a torch state dict loaded
    with ``torch.load(weights_only=True)``, which executes no pickled code)."""
    from .encoders import read_tensors, resolve_weights

    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsUnavailableError(f"{p}: weights file not found. Pass an existing .safetensors file, "
                                      "or --weights none to train from scratch.")
    return read_tensors(resolve_weights(p))


def load_local_weights(model: nn.Module, path: str | os.PathLike, *, strict_missing: bool = True) -> dict:
    """Load a local state dict into a backbone, reporting missing and unexpected keys.

    Common wrapper prefixes (``module.``, ``model.``, ``backbone.``...) are stripped when that makes
    the keys match, and the classifier's keys are ignored (the backbone has ``num_classes=0``).
    Missing keys or shape mismatches raise :class:`~stimage_nb.errors.WeightsUnavailableError`
    (unless ``strict_missing=False``); unexpected keys are logged.

    Returns
    -------
    ``{"missing": [...], "unexpected": [...], "loaded": n}``
    """
    sd = read_state_dict(path)
    own = model.state_dict()
    sd = _strip_prefixes(sd, set(own))
    classifier = (getattr(model, "pretrained_cfg", {}) or {}).get("classifier")
    cls = [classifier] if isinstance(classifier, str) else list(classifier or [])
    unexpected = [k for k in sd if k not in own]
    ignored = [k for k in unexpected if any(k.startswith(c + ".") for c in cls)]
    unexpected = [k for k in unexpected if k not in ignored]
    missing = [k for k in own if k not in sd]
    bad_shape = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in sd and sd[k].shape != own[k].shape]
    if bad_shape:
        raise WeightsUnavailableError(f"{path}: {len(bad_shape)} tensors have the wrong shape for this backbone "
                                      f"(e.g. {bad_shape[:3]}). Are these weights for another architecture?")
    if missing and strict_missing:
        raise WeightsUnavailableError(
            f"{path}: {len(missing)} of {len(own)} backbone tensors are missing from the file (e.g. {missing[:5]}); "
            f"{len(unexpected)} keys of the file are not in the model (e.g. {unexpected[:5]}). Are these weights "
            "for this backbone name?")
    if missing:
        log.warning("%s: %d backbone tensors missing (kept at initialisation): %s", path, len(missing), missing[:10])
    if unexpected:
        log.warning("%s: %d unexpected keys ignored: %s", path, len(unexpected), unexpected[:10])
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    log.info("loaded %d tensors from %s", len(own) - len(missing), path)
    return {"missing": missing, "unexpected": unexpected, "loaded": len(own) - len(missing)}


def _strip_prefixes(sd: dict, own_keys: set) -> dict:
    if sum(k in own_keys for k in sd) >= 0.5 * len(own_keys):
        return sd
    for pre in _STRIP_PREFIXES:
        cand = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
        if cand and sum(k in own_keys for k in cand) > sum(k in own_keys for k in sd):
            return cand
    return sd


def normalisation_of(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input mean and std of a timm model (its pretrained config), ImageNet's by default."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
    return mean, std
