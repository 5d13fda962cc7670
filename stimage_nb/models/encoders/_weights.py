"""Weights of registry encoders: files and Hugging Face folders, key layouts, loading, provenance.

- :func:`resolve_weights`: a ``.safetensors``/``.bin``/``.pth`` file, or a downloaded Hugging Face folder
  (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin`` / sharded safetensors).
- :func:`read_tensors`: safetensors, or a torch pickle read with ``torch.load(weights_only=True)`` (no
  pickled code is executed; a file holding other objects is refused with a message).
- :func:`to_timm_layout` / :func:`to_published_layout`: between the published checkpoint's key layout
  (:data:`~stimage_nb.models.encoders._registry.LAYOUTS`) and the timm module's.
- :func:`load_into`: load and check (every tensor present, every shape equal); a file that does not fit
  names the registered encoder whose key/shape signature it matches (:func:`identify`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import StimageInputError, WeightsUnavailableError
from ._arch import EncoderModule, meta_module
from ._registry import ENCODERS, Encoder

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "open_clip_model.safetensors")
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "dinov2.")


@dataclass
class WeightsSource:
    """Where an encoder's weights are: the path given, the weight files, the folder's config (or None)."""

    path: Path
    files: list[Path]
    config: dict | None = None
    config_file: Path | None = None


def resolve_weights(path: str | os.PathLike) -> WeightsSource:
    """The weight files (and ``config.json``) of a file or a Hugging Face folder.

    Raises :class:`~stimage_nb.errors.WeightsUnavailableError` when there is nothing to load, naming
    what was looked for.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return WeightsSource(p, [p])
    if not p.is_dir():
        raise WeightsUnavailableError(f"{p}: weights not found. Pass a .safetensors/.bin file or a downloaded Hugging "
                                      "Face folder (e.g. `huggingface-cli download ORG/REPO --local-dir DIR`).")
    cfg_file = next((p / n for n in ("config.json", "open_clip_config.json") if (p / n).is_file()), None)
    cfg = None
    if cfg_file is not None:
        try:
            cfg = json.loads(cfg_file.read_text())
        except Exception as e:  # noqa: BLE001
            raise WeightsUnavailableError(f"{cfg_file}: unreadable JSON ({e}).") from e
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except Exception as e:  # noqa: BLE001
            raise WeightsUnavailableError(f"{index}: not a safetensors index ({e}).") from e
        files = [p / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsUnavailableError(f"{p}: shards listed in {index.name} are missing: {missing[:5]}")
        return WeightsSource(p, files, cfg, cfg_file)
    for name in _FOLDER_FILES:
        if (p / name).is_file():
            return WeightsSource(p, [p / name], cfg, cfg_file)
    cands = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    if len(cands) == 1:
        return WeightsSource(p, cands, cfg, cfg_file)
    what = f"several weight files ({[f.name for f in cands]}); pass the one to use" if cands else \
        f"no weight file ({', '.join(_FOLDER_FILES)} or *.safetensors/*.bin/*.pth)"
    raise WeightsUnavailableError(f"{p}: {what}.")


def _read_one(f: Path) -> dict[str, torch.Tensor]:
    try:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(f))
        else:
            try:  # memory-mapped where the file format allows it (a 4 GB checkpoint is not copied twice)
                obj = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        hint = ("; it holds pickled Python objects besides tensors, which are not executed here: convert it once "
                "on a trusted machine with `torch.save(torch.load(f, weights_only=False)['model'], 'plain.pth')` or "
                "save a .safetensors file") if "weights_only" in str(e) or "Unsupported global" in str(e) else ""
        raise WeightsUnavailableError(f"{f}: cannot read the weights ({type(e).__name__}: {str(e)[:300]}){hint}.") from e
    for key in ("state_dict", "model", "model_state_dict", "teacher"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and not isinstance(obj.get(key), torch.Tensor):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsUnavailableError(f"{f}: not a state dict of tensors.")
    return obj


def read_tensors(src: WeightsSource) -> dict[str, torch.Tensor]:
    """All tensors of the source's files (shards merged)."""
    out: dict[str, torch.Tensor] = {}
    for f in src.files:
        out.update(_read_one(f))
    return out


# ---------------------------------------------------------------------------- provenance
def sha256_of(path: str | os.PathLike) -> str:
    """sha256 of a file (cached per path, size and modification time): :func:`stimage_nb.io.provenance.sha256_file`."""
    from ...io.provenance import sha256_file

    return sha256_file(path)


def provenance(src: WeightsSource) -> dict:
    """``{"path", "files": {name: sha256}, "sha256", "config"}``: ``sha256`` is the file's own for one file,
    else the sha256 of the sorted ``name:sha256`` lines."""
    files = {f.name: sha256_of(f) for f in src.files}
    combined = next(iter(files.values())) if len(files) == 1 else \
        hashlib.sha256("\n".join(f"{k}:{v}" for k, v in sorted(files.items())).encode()).hexdigest()
    out = {"path": str(src.path), "files": files, "sha256": combined}
    if src.config_file is not None:
        out["config"] = src.config_file.name
        out["config_sha256"] = sha256_of(src.config_file)
    return out


# ---------------------------------------------------------------------------- folder configs
def config_overrides(entry: Encoder, cfg: dict | None) -> tuple[dict, dict]:
    """(timm argument overrides, preprocessing overrides) from a Hugging Face folder's config.

    A timm hub ``config.json`` gives ``model_args`` (and ``architecture``, ``pretrained_cfg.mean/std/
    input_size``); a transformers Dinov2 config (Phikon-v2) is translated to timm arguments.
    """
    if not cfg:
        return {}, {}
    over, pre = {}, {}
    if cfg.get("model_type") == "dinov2" or "Dinov2Model" in (cfg.get("architectures") or []):
        if cfg.get("use_swiglu_ffn") or int(cfg.get("num_register_tokens") or 0):
            raise StimageInputError("this Dinov2 checkpoint uses a SwiGLU MLP or register tokens; only the plain "
                                    "DINOv2 ViT of Phikon-v2 is mapped onto timm here.")
        for ours, theirs in (("embed_dim", "hidden_size"), ("depth", "num_hidden_layers"),
                             ("num_heads", "num_attention_heads"), ("patch_size", "patch_size"),
                             ("img_size", "image_size"), ("mlp_ratio", "mlp_ratio"), ("init_values", "layerscale_value")):
            if cfg.get(theirs) is not None:
                over[ours] = cfg[theirs]
        return over, pre
    if "model_args" in cfg or "architecture" in cfg:
        over.update(cfg.get("model_args") or {})
        pcfg = cfg.get("pretrained_cfg") or {k: v for k, v in cfg.items() if k not in ("architecture", "model_args")}
        if cfg.get("architecture") and cfg["architecture"] != entry.architecture:
            over["architecture"] = cfg["architecture"]
        if "global_pool" in pcfg and "global_pool" not in over and "global_pool" in entry.kwargs:
            over["global_pool"] = pcfg["global_pool"]
        for k in ("mean", "std"):
            if pcfg.get(k) is not None:
                pre[k] = tuple(float(v) for v in pcfg[k])
        if pcfg.get("input_size"):
            pre["input_px"] = int(pcfg["input_size"][-1])
        for k in ("num_classes", "num_features"):
            over.pop(k, None)
    return over, pre


# ---------------------------------------------------------------------------- layouts
def _strip_wrappers(sd: dict, own: set) -> dict:
    """Remove wrapper prefixes (``module.``, ``model.``...) when that makes more keys match ``own``."""
    best, hits = sd, sum(k in own for k in sd)
    changed = True
    while changed and hits < len(own):
        changed = False
        for pre in _WRAPPER_PREFIXES:
            cand = {k[len(pre):]: v for k, v in best.items() if k.startswith(pre)}
            h = sum(k in own for k in cand)
            if cand and h > hits:
                best, hits, changed = cand, h, True
                break
    return best


def _from_dinov2_raw(sd: dict) -> dict:
    """The DINOv2 repository's layout (``mask_token``, ``register_tokens``, fused SwiGLU ``w12``/``w3``) -> timm."""
    sd = dict(sd)
    sd.pop("mask_token", None)
    out = {}
    if "register_tokens" in sd:  # timm's no_embed_class: neither cls nor registers overlap the position embedding
        out["reg_token"] = sd.pop("register_tokens")
        out["cls_token"] = sd.pop("cls_token") + sd["pos_embed"][:, :1]
        out["pos_embed"] = sd.pop("pos_embed")[:, 1:]
    for k, v in sd.items():
        out[re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k))] = v
    return out


_HF_DINOV2 = [  # (Hugging Face transformers Dinov2Model, timm) per block
    ("norm1", "norm1"), ("attention.output.dense", "attn.proj"), ("layer_scale1.lambda1", "ls1.gamma"),
    ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"), ("layer_scale2.lambda1", "ls2.gamma"),
]


def _from_hf_dinov2(sd: dict) -> dict:
    out = {}
    blocks: dict[int, dict] = {}
    for k, v in sd.items():
        if k == "embeddings.cls_token":
            out["cls_token"] = v
        elif k == "embeddings.position_embeddings":
            out["pos_embed"] = v
        elif k.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("layernorm."):
            out["norm." + k.rsplit(".", 1)[1]] = v
        elif k == "embeddings.mask_token":
            continue
        elif k.startswith("encoder.layer."):
            i, rest = k[len("encoder.layer."):].split(".", 1)
            blocks.setdefault(int(i), {})[rest] = v
        else:
            out[k] = v
    for i, b in blocks.items():
        for kind in ("weight", "bias"):
            qkv = [b.pop(f"attention.attention.{n}.{kind}", None) for n in ("query", "key", "value")]
            if all(t is not None for t in qkv):
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(qkv, 0)
        for hf, tm in _HF_DINOV2:
            for tail in ("", ".weight", ".bias"):
                if hf + tail in b:
                    out[f"blocks.{i}.{tm}{tail}"] = b.pop(hf + tail)
        out.update({f"blocks.{i}.{k}": v for k, v in b.items()})  # anything unknown stays (reported as unexpected)
    return out


def _to_hf_dinov2(sd: dict) -> dict:
    out = {}
    d = sd["cls_token"].shape[-1]
    for k, v in sd.items():
        if k == "cls_token":
            out["embeddings.cls_token"] = v
        elif k == "pos_embed":
            out["embeddings.position_embeddings"] = v
        elif k.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("norm."):
            out["layernorm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("blocks."):
            i, rest = k[len("blocks."):].split(".", 1)
            pre = f"encoder.layer.{i}."
            if rest.startswith("attn.qkv."):
                for n, part in zip(("query", "key", "value"), v.chunk(3, 0)):
                    out[f"{pre}attention.attention.{n}.{rest.rsplit('.', 1)[1]}"] = part.clone()
                continue
            for hf, tm in _HF_DINOV2:
                if rest == tm or rest.startswith(tm + "."):
                    out[pre + hf + rest[len(tm):]] = v
                    break
    out["embeddings.mask_token"] = torch.zeros(1, d, dtype=sd["cls_token"].dtype, device=sd["cls_token"].device)
    return out


def _conch_from_published(sd: dict) -> dict:
    if not any(k.startswith("visual.") for k in sd):
        return sd
    keep = ("trunk.", "attn_pool_contrast.", "ln_contrast.")
    return {k[7:]: v for k, v in sd.items() if k.startswith("visual.") and k[7:].startswith(keep)}


def _swin_from_published(sd: dict, module: EncoderModule) -> dict:
    from timm.models.swin_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(dict(sd), module.model)


def _swin_to_published(sd: dict, module: EncoderModule) -> dict:
    out = {}
    for k, v in sd.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        out[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k] = v
    for name, buf in module.model.named_buffers():  # the buffers timm 0.5.4 saved
        if name.endswith(("relative_position_index", "attn_mask")):
            out[name] = buf
    return out


def to_timm_layout(entry: Encoder, sd: dict, module: EncoderModule) -> dict:
    """A state dict in any supported layout of ``entry`` -> the keys of ``module.model``."""
    own = set(module.model.state_dict())
    sd = _strip_wrappers(dict(sd), own | {"visual.trunk.pos_embed", "embeddings.cls_token", "mask_token"})
    if entry.layout == "conch_coca":
        sd = _conch_from_published(sd)
    elif entry.layout == "hf_dinov2" and any(k.startswith("embeddings.") for k in sd):
        sd = _from_hf_dinov2(sd)
    elif entry.layout == "swin_v0.5" and any(k.startswith("layers.") for k in sd):
        sd = _swin_from_published(sd, module)
    if "mask_token" in sd or any(".mlp.w12." in k for k in sd):
        sd = _from_dinov2_raw(sd)
    return sd


def to_published_layout(entry: Encoder, module: EncoderModule, sd: dict | None = None) -> dict:
    """The module's tensors in the layout the encoder's authors published (for fixtures and stand-ins).

    CONCH: the image tower's keys (``visual.*``, including the caption pooler and the contrastive
    projection with zero values, which feature extraction does not use); the text tower is not produced.
    """
    sd = dict(sd if sd is not None else module.model.state_dict())
    if entry.layout == "hf_dinov2":
        return _to_hf_dinov2(sd)
    if entry.layout == "swin_v0.5":
        return _swin_to_published(sd, module)
    if entry.layout == "conch_coca":
        out = {f"visual.{k}": v for k, v in sd.items()}
        d = module.model.num_features
        w = module.model.trunk.num_features
        z = functools.partial(torch.zeros, dtype=next(iter(sd.values())).dtype, device=next(iter(sd.values())).device)
        out["visual.proj_contrast"] = z(d, d)
        cap = {"query": (256, w), "attn.in_proj_weight": (3 * w, w), "attn.in_proj_bias": (3 * w,),
               "attn.out_proj.weight": (w, w), "attn.out_proj.bias": (w,), "ln_q.weight": (w,), "ln_q.bias": (w,),
               "ln_k.weight": (w,), "ln_k.bias": (w,)}
        out.update({f"visual.attn_pool_caption.{k}": z(*s) for k, s in cap.items()})
        out.update({"visual.ln_caption.weight": z(w), "visual.ln_caption.bias": z(w)})
        return out
    return sd


# ---------------------------------------------------------------------------- identification
@functools.lru_cache(maxsize=None)
def _signatures(name: str) -> tuple[dict, dict]:
    entry = ENCODERS[name]
    m = meta_module(entry)
    timm_sig = {k: tuple(v.shape) for k, v in m.model.state_dict().items()}
    pub_sig = {k: tuple(v.shape) for k, v in to_published_layout(entry, m).items()}
    return timm_sig, pub_sig


def _shape_sig(sd) -> dict:
    return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in sd.items()}


def _structure(keys) -> set:
    return {re.sub(r"\.\d+\.", ".N.", k) for k in keys}


def identify(state_dict, top: int = 3) -> list[tuple[str, float]]:
    """Registered encoders whose checkpoint signature the tensors match best, as ``[(name, score)]``.

    ``state_dict``: tensors (meta tensors work) or ``{key: shape}``. The score is the fraction of keys
    whose name and shape both match the encoder's timm or published layout (after removing wrapper
    prefixes); when no encoder matches by shape (a resized copy), the overlap of the key structure
    (block indices ignored) is used, times 0.5.
    """
    sig = _shape_sig(state_dict)
    scores = []
    for name in ENCODERS:
        best = 0.0
        for ref in _signatures(name):
            s = _strip_wrappers(sig, set(ref))
            hit = sum(1 for k, shp in s.items() if ref.get(k) == shp)
            best = max(best, hit / max(len(s), len(ref)))
        if best < 0.5:
            a = _structure(_strip_wrappers(sig, set(_signatures(name)[0])))
            for ref in _signatures(name):
                b = _structure(ref)
                best = max(best, 0.5 * len(a & b) / max(len(a | b), 1))
        scores.append((name, round(best, 3)))
    scores.sort(key=lambda t: -t[1])
    return [s for s in scores[:top] if s[1] > 0]


def _describe_mismatch(path, entry: Encoder, missing, unexpected, bad_shape, n_own, sd) -> str:
    ids = identify(sd, top=len(ENCODERS))
    tied = [n for n, sc in ids if ids and sc == ids[0][1]]
    guess = ""
    if ids and entry.name not in tied and ids[0][1] >= 0.3:
        names = " or ".join(repr(n) for n in tied)
        guess = (f" Its tensors look like the registered encoder {names} (signature match {ids[0][1]:.0%}): "
                 f"use --backbone {tied[0]}.")
    elif ids and entry.name in tied:
        guess = (f" The keys are {entry.title}'s but the shapes differ: a resized variant? Give its Hugging Face "
                 "folder with config.json, or the matching backbone_kwargs.")
    parts = []
    if bad_shape:
        parts.append(f"{len(bad_shape)} tensors have another shape (e.g. {bad_shape[:2]})")
    if missing:
        parts.append(f"{len(missing)} of {n_own} tensors are missing (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} keys are not part of {entry.title} (e.g. {unexpected[:3]})")
    return f"{path}: these weights do not fit {entry.title} ({entry.name}): {'; '.join(parts)}.{guess}"


def read_shapes(src: WeightsSource) -> dict[str, torch.Tensor]:
    """The source's tensors as meta tensors (names and shapes only): the safetensors header, or a
    memory-mapped torch file; nothing is copied into memory."""
    out: dict[str, torch.Tensor] = {}
    for f in src.files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(f), "pt") as h:
                    for k in h.keys():
                        out[k] = torch.empty(h.get_slice(k).get_shape(), device="meta")
            except Exception as e:  # noqa: BLE001
                raise WeightsUnavailableError(f"{f}: cannot read the weights ({type(e).__name__}: {e}).") from e
        else:
            out.update({k: torch.empty(v.shape, device="meta") for k, v in _read_one(f).items()})
    return out


def mismatch(module: EncoderModule, entry: Encoder, sd: dict, path) -> str | None:
    """The error message when ``sd`` (any supported layout) does not fit ``module``; ``None`` when it does."""
    try:
        conv = to_timm_layout(entry, sd, module)
    except Exception as e:  # noqa: BLE001 - a layout conversion that cannot apply to these tensors
        return _describe_mismatch(path, entry, [f"(the {entry.layout} layout conversion failed: {type(e).__name__})"],
                                  [], [], len(module.model.state_dict()), sd)
    own = module.model.state_dict()
    ignored = ("head.",) if entry.builder != "conch" else ()
    unexpected = [k for k in conv if k not in own and not k.startswith(ignored)
                  and not k.endswith(("relative_position_index", "attn_mask"))]
    missing = [k for k in own if k not in conv and not k.endswith(("relative_position_index", "attn_mask"))]
    bad_shape = [f"{k}: file {tuple(conv[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in conv and tuple(conv[k].shape) != tuple(own[k].shape)]
    if missing or bad_shape or unexpected:
        return _describe_mismatch(path, entry, missing, unexpected, bad_shape, len(own), sd)
    return None


def load_into(module: EncoderModule, entry: Encoder, src: WeightsSource) -> dict:
    """Load ``src`` into ``module`` (strict: every tensor present with its shape); returns counts.

    Raises :class:`~stimage_nb.errors.WeightsUnavailableError` naming the encoder the file seems to be.
    """
    raw = read_tensors(src)
    msg = mismatch(module, entry, raw, src.path)
    if msg:
        raise WeightsUnavailableError(msg)
    sd = to_timm_layout(entry, raw, module)
    own = module.model.state_dict()
    module.model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    log.info("%s: loaded %d tensors of %s", src.path, len(own), entry.name)
    return {"loaded": len(own), "ignored": len(raw) - len(own)}
