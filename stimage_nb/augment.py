"""Training augmentations applied on the device to uint8 tile batches.

Tiles live on the device as uint8 (n, h, w, 3); :func:`augment` turns a batch into float
(n, 3, h, w) in [0, 1] with, per tile, a random dihedral transform (flips and 90° rotations: tissue
has no orientation) and colour jitter (brightness, contrast, saturation) plus HED jitter (random
scaling and shift of the hematoxylin, eosin and DAB concentrations; Tellez et al. 2018), which
mimics staining variation between labs. Random numbers come from a CPU ``torch.Generator`` so runs
are reproducible on any device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .devices import fast_paths
from .stain import RUIFROK_HED

# Ruifrok & Johnston stain vectors (as scikit-image's rgb_from_hed): rows H, E, DAB in OD space.
_RGB_FROM_HED = torch.from_numpy(RUIFROK_HED)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


@dataclass
class AugmentConfig:
    """Augmentation strengths (0 disables one)."""

    flips: bool = True
    rot90: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hed: float = 0.05

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "AugmentConfig":
        return cls(**(d or {}))


def to_float(x_uint8: Tensor, channels_last: bool | None = None) -> Tensor:
    """uint8 (n, h, w, 3) -> float (n, 3, h, w) in [0, 1].

    Memory layout channels_last where the device's fast paths are on (CUDA: fast with bf16
    convolutions; :mod:`stimage_nb.devices`), contiguous otherwise (``channels_last`` overrides).
    """
    x = x_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    return _layout(x, channels_last)


def _layout(x: Tensor, channels_last: bool | None) -> Tensor:
    if channels_last is None:
        channels_last = fast_paths(x.device)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _uniform(n: int, strength: float, g: torch.Generator, shape=()) -> Tensor:
    return (torch.rand((n, *shape), generator=g) * 2 - 1) * strength


def dihedral(x: Tensor, k: Tensor, flip: Tensor) -> Tensor:
    """Per-sample 90° rotations ``k`` (0-3) and horizontal flips of (n, c, h, w) square images."""
    out = x.clone()
    for kk in range(4):
        for ff in (False, True):
            sel = ((k == kk) & (flip == ff)).nonzero().flatten()
            if len(sel) == 0 or (kk == 0 and not ff):
                continue
            sel = sel.to(x.device)
            y = x.index_select(0, sel)
            if ff:
                y = torch.flip(y, dims=(3,))
            if kk:
                y = torch.rot90(y, kk, dims=(2, 3))
            out.index_copy_(0, sel, y)
    return out


def augment(x_uint8: Tensor, cfg: AugmentConfig | None = None, generator: torch.Generator | None = None,
            channels_last: bool | None = None) -> Tensor:
    """Augment a uint8 (n, h, w, 3) batch on its device; returns float (n, 3, h, w) in [0, 1]
    (channels_last on CUDA unless ``channels_last`` says otherwise)."""
    cfg = cfg or AugmentConfig()
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    n, dev = x_uint8.shape[0], x_uint8.device
    x = to_float(x_uint8, channels_last=False)
    if cfg.hed > 0:
        x = hed_jitter(x, 1 + _uniform(n, cfg.hed, g, (3,)), _uniform(n, cfg.hed, g, (3,)))
    if cfg.brightness > 0:
        x = x * (1 + _uniform(n, cfg.brightness, g)).to(dev).view(n, 1, 1, 1)
    if cfg.contrast > 0:
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - m) * (1 + _uniform(n, cfg.contrast, g)).to(dev).view(n, 1, 1, 1) + m
    if cfg.saturation > 0:
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - gray) * (1 + _uniform(n, cfg.saturation, g)).to(dev).view(n, 1, 1, 1) + gray
    x = x.clamp_(0, 1)
    if cfg.flips or cfg.rot90:
        k = torch.randint(0, 4, (n,), generator=g) if cfg.rot90 else torch.zeros(n, dtype=torch.long)
        f = torch.rand(n, generator=g) < 0.5 if cfg.flips else torch.zeros(n, dtype=torch.bool)
        x = dihedral(x, k, f)
    return _layout(x, channels_last)


def hed_jitter(x01: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Scale and shift the H, E, DAB concentrations of float RGB (n, 3, h, w) images.

    ``scale`` and ``shift`` are (n, 3); shifts are in optical-density units.
    """
    n, dev = x01.shape[0], x01.device
    hed_from_rgb = _HED_FROM_RGB.to(dev, torch.float32)
    rgb_from_hed = _RGB_FROM_HED.to(dev, torch.float32)
    od = -torch.log(x01.clamp_min(1e-6)).permute(0, 2, 3, 1).reshape(n, -1, 3)  # (n, p, 3)
    # hed = od @ H; hed' = hed * a + b; od' = hed' @ R  ==  od @ (H diag(a) R) + b @ R
    A = hed_from_rgb.unsqueeze(0) * scale.to(dev, torch.float32).unsqueeze(1)  # (n, 3, 3)
    M = A @ rgb_from_hed
    b = shift.to(dev, torch.float32) @ rgb_from_hed  # (n, 3)
    od2 = torch.bmm(od, M) + b.unsqueeze(1)
    h, w = x01.shape[2], x01.shape[3]
    return torch.exp(-od2).clamp_(0, 1).reshape(n, h, w, 3).permute(0, 3, 1, 2)


def dihedral_views(x: Tensor) -> list[Tensor]:
    """The 8 dihedral transforms of (n, c, h, w) images (identity first)."""
    out = []
    for f in (False, True):
        y = torch.flip(x, dims=(3,)) if f else x
        for k in range(4):
            out.append(torch.rot90(y, k, dims=(2, 3)) if k else y)
    return out
