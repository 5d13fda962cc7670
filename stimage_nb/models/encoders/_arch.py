"""Building a registry encoder as a torch module (timm trunks, CTransPath's stem, CONCH's pooler)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import StimageInputError
from ._registry import Encoder

#: Extra arguments of non-timm builders, removed before :func:`timm.create_model`.
_BUILDER_KWARGS = {"conch": ("pool_dim", "pool_heads")}


def _layer(name):
    import timm.layers

    table = {"swiglu_packed": timm.layers.SwiGLUPacked, "silu": nn.SiLU, "gelu": nn.GELU}
    if not isinstance(name, str):
        return name
    try:
        return table[name.lower()]
    except KeyError:
        raise StimageInputError(f"unknown layer {name!r} in encoder arguments; use one of {sorted(table)}") from None


def resolve_kwargs(kwargs: dict) -> dict:
    """timm arguments with layer names (``"swiglu_packed"``, ``"silu"``) replaced by the classes."""
    out = dict(kwargs)
    for k in ("mlp_layer", "act_layer"):
        if k in out:
            out[k] = _layer(out[k])
    return out


class ConvStem(nn.Module):
    """CTransPath's patch embedding (Wang et al. 2022): two 3x3 stride-2 conv-BN-ReLU, a 1x1 conv, a norm.

    Keys ``proj.{0,1,3,4,6}`` and ``norm`` as in the published ``ctranspath.pth``. Written for timm's
    current Swin, which asks its patch embedding for channels-last (NHWC) output.
    """

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None, output_fmt="NHWC",
                 strict_img_size=True, flatten=False, device=None, dtype=None, **_):
        super().__init__()
        ps = patch_size if isinstance(patch_size, int) else patch_size[0]
        if ps != 4 or embed_dim % 8:
            raise StimageInputError(f"CTransPath's ConvStem needs patch_size 4 and embed_dim divisible by 8, "
                                    f"not {patch_size}/{embed_dim}")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size, self.patch_size = size, (4, 4)
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.output_fmt, self.strict_img_size = output_fmt, strict_img_size
        dd = {"device": device, "dtype": dtype}
        stem, cin, cout = [], in_chans, embed_dim // 8
        for _ in range(2):
            stem += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False, **dd), nn.BatchNorm2d(cout, **dd),
                     nn.ReLU(inplace=True)]
            cin, cout = cout, cout * 2
        stem.append(nn.Conv2d(cin, embed_dim, 1, **dd))
        self.proj = nn.Sequential(*stem)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def forward(self, x):
        if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise StimageInputError(f"CTransPath takes {self.img_size[0]} px tiles, not {tuple(x.shape[-2:])}")
        x = self.proj(x).permute(0, 2, 3, 1)  # NCHW -> NHWC
        return self.norm(x)


class _LayerNorm(nn.LayerNorm):
    """LayerNorm that returns the input's dtype (CONCH's ``LayerNorm``)."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler as in CONCH/open_clip: learned queries attend over the normed tokens."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = _LayerNorm(d_model)
        self.ln_k = _LayerNorm(context_dim)

    def forward(self, x):
        x = self.ln_k(x).permute(1, 0, 2)  # NLD -> LND
        q = self.ln_q(self.query).unsqueeze(1).repeat(1, x.shape[1], 1)
        return self.attn(q, x, x, need_weights=False)[0].permute(1, 0, 2)


class ConchVisual(nn.Module):
    """CONCH's image tower up to the contrastive embedding: trunk tokens -> attentional pool -> LayerNorm."""

    def __init__(self, trunk: nn.Module, pool_dim: int = 512, pool_heads: int = 8):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(pool_dim, trunk.num_features, pool_heads, 1)
        self.ln_contrast = nn.LayerNorm(pool_dim)
        self.num_features = pool_dim

    def forward(self, x):
        tokens = self.trunk.forward_features(x)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


class EncoderModule(nn.Module):
    """A registry encoder: the trunk (``.model``) and the entry's output pooling; images in -> (n, F) features.

    Takes images already normalised with ``pretrained_cfg["mean"/"std"]`` (as any timm backbone of this
    package), shape (n, 3, h, w); returns float features (n, ``num_features``).

    Attributes
    ----------
    encoder
        The registry name.
    build_kwargs
        JSON-able arguments that differ from the entry's (from a checkpoint's config.json or the caller);
        ``create_backbone(encoder, "none", **build_kwargs)`` rebuilds the same shapes.
    pretrained_cfg
        timm-style preprocessing: ``mean``, ``std``, ``input_size``, ``um_per_px``, ``architecture``.
    weights_source
        Provenance of loaded weights (path, files and their sha256), ``None`` when randomly initialised.
    """

    def __init__(self, entry: Encoder, model: nn.Module, *, build_kwargs: dict | None = None, mean=None, std=None,
                 input_px: int | None = None):
        super().__init__()
        self.model = model
        self.encoder = entry.name
        self.output = entry.output
        self.build_kwargs = dict(build_kwargs or {})
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        width = int(model.num_features)
        self.num_features = 2 * width if entry.output == "cls+patch_mean" else width
        px = int(input_px or entry.input_px)
        self.pretrained_cfg = {
            "architecture": self.build_kwargs.get("architecture", entry.architecture), "encoder": entry.name,
            "mean": tuple(float(v) for v in (mean or entry.mean)), "std": tuple(float(v) for v in (std or entry.std)),
            "input_size": (3, px, px), "um_per_px": entry.um_per_px, "output": entry.output, "classifier": "head",
        }
        self.weights_source: dict | None = None

    def forward(self, x):
        out = self.model(x)
        if self.output == "cls+patch_mean":
            return torch.cat([out[:, 0], out[:, self.num_prefix_tokens:].mean(1)], dim=1)
        return out


def _create(entry: Encoder, kwargs: dict) -> nn.Module:
    import timm

    kw = resolve_kwargs(kwargs)
    arch = kw.pop("architecture", entry.architecture)
    extra = {k: kw.pop(k) for k in _BUILDER_KWARGS.get(entry.builder, ()) if k in kw}
    kw["num_classes"] = 0
    if entry.builder == "timm":
        return timm.create_model(arch, pretrained=False, **kw)
    if entry.builder == "ctranspath":
        return timm.create_model(arch, pretrained=False, embed_layer=ConvStem, **kw)
    if entry.builder == "conch":
        trunk = timm.create_model(arch, pretrained=False, **kw)
        return ConchVisual(trunk, int(extra.get("pool_dim", 512)), int(extra.get("pool_heads", 8)))
    raise StimageInputError(f"encoder {entry.name!r}: unknown builder {entry.builder!r}")


@contextlib.contextmanager
def _meta():
    with torch.device("meta"):
        yield


def build_module(entry: Encoder, overrides: dict | None = None, *, init: bool = True, device: str = "cpu",
                 mean=None, std=None, input_px: int | None = None) -> EncoderModule:
    """The entry's encoder with random weights (``init=True``) or uninitialised memory to be loaded into.

    Parameters
    ----------
    overrides
        Arguments that replace the entry's (JSON values, e.g. ``{"depth": 2}`` for a small stand-in, or
        a checkpoint's ``model_args``); an ``"architecture"`` key replaces the timm model name.
    init
        ``False`` builds on the meta device and allocates without initialising (a 1.1B-parameter ViT is
        ~1 min of random initialisation on a CPU), when every tensor of the module is in its state dict;
        the caller must then load a complete state dict. ``device="meta"`` keeps it on the meta device.
    """
    kw = {**entry.kwargs, **dict(overrides or {})}
    if device == "meta":
        with _meta():
            model = _create(entry, kw)
    elif init:
        model = _create(entry, kw)
    else:
        with _meta():
            model = _create(entry, kw)
        persistent = set(model.state_dict())
        if all(n in persistent for n, _ in model.named_buffers()):
            model = model.to_empty(device=device)
        else:  # non-persistent buffers (Swin's masks) must be computed: build for real
            model = _create(entry, kw)
    return EncoderModule(entry, model, build_kwargs=overrides, mean=mean, std=std, input_px=input_px)


def standin_overrides(entry: Encoder, *, width: int | None = None, depth: int = 2) -> dict:
    """Arguments for a small randomly initialised stand-in of the same family (keys, layout and pooling of the
    real encoder; fewer and narrower blocks), for tests and CPU benchmarks.

    ``width=None``: a narrow stand-in (96 channels; Swin: 32); an integer keeps that width (e.g. the real
    one, ``entry.kwargs``' ``embed_dim``) with only ``depth`` blocks.
    """
    if entry.builder == "ctranspath":
        w = width or 32
        return {"embed_dim": w, "depths": [depth] * 4, "num_heads": [max(1, w // 32 * m) for m in (1, 2, 4, 8)]}
    w = width or 96
    out = {"embed_dim": w, "depth": depth, "num_heads": max(1, w // 48)}
    if entry.builder == "conch":
        out.update({"pool_dim": 32, "pool_heads": 2} if width is None else {})
    return out


def parameter_count(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def meta_module(entry: Encoder, overrides: dict | None = None) -> EncoderModule:
    """The encoder on the meta device (shapes only, no memory)."""
    return build_module(entry, overrides, device="meta")

