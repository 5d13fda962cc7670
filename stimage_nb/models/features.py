"""Frozen feature extractors for the fast path: k-means convolutional features, handcrafted statistics, a timm backbone.

The package's offline default (``docs/offline_default.md``) learns no image network by gradient: it
describes each tile by two frozen branches and trains only the heads on top.

- ``"kmeans"``: :class:`KMeansExtractor`, a single-layer unsupervised convolutional feature extractor
  (Coates & Ng, 2011) learned from the training sections' own unlabelled tiles: optical-density
  7x7x3 patches minus their own mean, ZCA whitening with an eigenvalue floor, ``MiniBatchKMeans``
  centroids, triangle encoding at stride 2, mean and RMS pooling over positions (``2 K`` features).
- ``"handcrafted"``: :class:`HandcraftedExtractor`, the 40 colour/texture statistics of the ridge
  baseline (:func:`stimage_nb.baseline.handcrafted_features`).
- ``"timm"``: :class:`TimmExtractor`, a frozen timm backbone (random, or local weights such as a
  pathology foundation model in safetensors), with its own input normalisation.

:class:`FeatureStack` concatenates the branches named by a spec such as ``"kmeans+handcrafted"`` and
standardises the result with the training spots' mean and SD. Its whole fitted state (ZCA matrix,
means, centroids, standardisation, timm weights) is a plain ``state_dict`` of tensors, so it is saved
as safetensors with every ensemble member and rebuilt from :meth:`FeatureStack.config` — no pickle.

All extractors take float images in [0, 1], shape ``(n, 3, h, w)`` (what
:func:`stimage_nb.augment.to_float` returns), and return float32 ``(n, features)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import StimageInputError

log = logging.getLogger(__name__)

COMPONENTS = ("kmeans", "handcrafted", "timm")
DEFAULT_EXTRACTOR = "kmeans+handcrafted"


def parse_extractor(spec: str) -> list[str]:
    """Components of an extractor spec (``"kmeans+handcrafted"`` -> ``["kmeans", "handcrafted"]``)."""
    parts = [p.strip().lower() for p in str(spec).replace(",", "+").split("+") if p.strip()]
    bad = [p for p in parts if p not in COMPONENTS]
    if not parts or bad or len(set(parts)) != len(parts):
        raise StimageInputError(f"feature extractor {spec!r}: give one or more of {list(COMPONENTS)} joined by '+' "
                                "(each once), e.g. 'kmeans+handcrafted' (the default) or 'timm' (a frozen timm "
                                "backbone named by --backbone, with --weights PATH.safetensors).")
    return parts


def optical_density(x01: Tensor) -> Tensor:
    """``-log(max(I, 1) / 255)`` of images in [0, 1] (I = 8-bit intensity), same shape."""
    i = torch.round(x01.float() * 255.0).clamp_(min=1.0)
    return -torch.log(i / 255.0)


def _to_uint8_hwc(x01: Tensor) -> np.ndarray:
    return torch.round(x01.float() * 255.0).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class KMeansExtractor(nn.Module):
    """Coates & Ng single-layer k-means convolutional features (fitted on training tiles only).

    Parameters
    ----------
    k
        Number of centroids (features: ``2 k``, the mean and the RMS of each triangle activation).
    patch
        Patch side in pixels (patches are ``patch x patch x 3`` optical densities).
    stride
        Encoding stride.
    eig_floor
        ZCA eigenvalue floor, as a fraction of the largest eigenvalue.
    """

    def __init__(self, k: int = 128, patch: int = 7, stride: int = 2, eig_floor: float = 0.01):
        super().__init__()
        self.k, self.patch, self.stride, self.eig_floor = int(k), int(patch), int(stride), float(eig_floor)
        d = 3 * self.patch * self.patch
        self.register_buffer("zca", torch.zeros(d, d))
        self.register_buffer("patch_mean", torch.zeros(d))
        self.register_buffer("centroids", torch.zeros(self.k, d))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.uint8))

    @property
    def num_features(self) -> int:
        return 2 * self.k

    def config(self) -> dict:
        return {"k": self.k, "patch": self.patch, "stride": self.stride, "eig_floor": self.eig_floor}

    def _patches(self, tiles: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` random mean-removed OD patches (n, 3 p p), channel-major like ``F.unfold``."""
        nt, h, w, _ = tiles.shape
        p = self.patch
        if h < p or w < p:
            raise StimageInputError(f"tiles of {h}x{w} px are smaller than the {p} px k-means patch; use larger out_px.")
        positions = nt * (h - p + 1) * (w - p + 1)
        n = min(int(n), positions)
        flat = rng.choice(positions, n, replace=False)
        t, rest = np.divmod(flat, (h - p + 1) * (w - p + 1))
        y, x = np.divmod(rest, w - p + 1)
        ar = np.arange(p)
        pix = tiles[t[:, None, None], y[:, None, None] + ar[None, :, None], x[:, None, None] + ar[None, None, :]]
        od = -np.log(np.maximum(pix.astype(np.float64), 1.0) / 255.0)          # (n, p, p, 3)
        P = od.transpose(0, 3, 1, 2).reshape(n, -1)
        return P - P.mean(1, keepdims=True)

    def fit(self, tiles, *, n_patches: int = 60000, seed: int = 0) -> KMeansExtractor:
        """Fit the whitening and the centroids on uint8 tiles ``(n, h, w, 3)`` (training sections only).

        Deterministic for a given ``seed``.
        """
        from sklearn.cluster import MiniBatchKMeans

        t = tiles.cpu().numpy() if isinstance(tiles, torch.Tensor) else np.asarray(tiles)
        if t.ndim != 4 or t.shape[-1] != 3 or t.dtype != np.uint8:
            raise StimageInputError(f"k-means fit needs uint8 tiles (n, h, w, 3), got {t.shape} {t.dtype}")
        P = self._patches(t, n_patches, np.random.default_rng(seed))
        if len(P) < self.k:
            raise StimageInputError(f"only {len(P)} patches for {self.k} k-means centroids; give more tiles or a smaller K.")
        mean = P.mean(0)
        e, V = np.linalg.eigh(np.cov(P - mean, rowvar=False))
        e = np.clip(e, 0, None)
        W = V @ np.diag(1.0 / np.sqrt(e + self.eig_floor * e.max())) @ V.T
        Z = (P - mean) @ W
        km = MiniBatchKMeans(self.k, random_state=seed, n_init=3, batch_size=4096).fit(Z)
        dev = self.zca.device
        self.zca.copy_(torch.as_tensor(W, dtype=torch.float32, device=dev))
        self.patch_mean.copy_(torch.as_tensor(mean, dtype=torch.float32, device=dev))
        self.centroids.copy_(torch.as_tensor(km.cluster_centers_, dtype=torch.float32, device=dev))
        self.fitted.fill_(1)
        log.info("k-means extractor: %d centroids fitted on %d patches of %d tiles", self.k, len(P), len(t))
        return self

    def forward(self, x01: Tensor, chunk: int = 64) -> Tensor:
        if not bool(self.fitted):
            raise RuntimeError("KMeansExtractor.forward before fit()")
        out = []
        with torch.autocast(x01.device.type, enabled=False):
            W, mu, D = self.zca.float(), self.patch_mean.float(), self.centroids.float()
            d2 = (D * D).sum(1)
            for i in range(0, x01.shape[0], chunk):
                xu = F.unfold(optical_density(x01[i:i + chunk].contiguous()), self.patch, stride=self.stride)
                xu = xu - xu.mean(1, keepdim=True)                              # per-patch mean removal
                z = torch.einsum("ij,njl->nil", W, xu - mu[None, :, None])      # ZCA (W symmetric)
                dist = ((z * z).sum(1)[:, None, :] - 2 * torch.einsum("kj,njl->nkl", D, z)
                        + d2[None, :, None]).clamp_(min=0).sqrt_()
                act = (dist.mean(1, keepdim=True) - dist).clamp_(min=0)         # triangle activation
                out.append(torch.cat([act.mean(2), act.pow(2).mean(2).sqrt()], 1))
        return torch.cat(out) if out else x01.new_zeros((0, self.num_features))


class HandcraftedExtractor(nn.Module):
    """The 40 colour/texture statistics of :func:`stimage_nb.baseline.handcrafted_features` (CPU, numpy)."""

    def __init__(self):
        super().__init__()
        from ..baseline import FEATURE_NAMES

        self.num_features = len(FEATURE_NAMES)

    def config(self) -> dict:
        return {}

    def forward(self, x01: Tensor) -> Tensor:
        from ..baseline import handcrafted_features

        f = handcrafted_features(_to_uint8_hwc(x01))
        return torch.as_tensor(f, dtype=torch.float32, device=x01.device)


class TimmExtractor(nn.Module):
    """A frozen timm backbone with its own input normalisation (its pretrained config, ImageNet's by default)."""

    def __init__(self, backbone: nn.Module, name: str, kwargs: dict | None = None, mean=None, std=None):
        super().__init__()
        from .backbone import normalisation_of

        # a registered encoder knows the arguments that rebuild it (its config.json's, not only the caller's)
        kwargs = getattr(backbone, "build_kwargs", kwargs)
        self.backbone, self.name, self.kwargs = backbone, str(name), dict(kwargs or {})
        self.num_features = int(backbone.num_features)
        m, s = normalisation_of(backbone)
        self.register_buffer("mean", torch.tensor(mean if mean is not None else m, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std if std is not None else s, dtype=torch.float32).view(1, 3, 1, 1))

    def config(self) -> dict:
        pcfg = getattr(self.backbone, "pretrained_cfg", None) or {}
        out = {"name": self.name, "architecture": pcfg.get("architecture"), "kwargs": self.kwargs,
               "num_features": self.num_features, "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}
        if pcfg.get("encoder"):  # a registered foundation encoder: its name, pooling and native input
            out["encoder"] = {"name": pcfg["encoder"], "output": pcfg.get("output"),
                              "input_px": int(pcfg["input_size"][-1]), "um_per_px": pcfg.get("um_per_px")}
        return out

    def forward(self, x01: Tensor) -> Tensor:
        x = (x01 - self.mean.to(x01.dtype)) / self.std.to(x01.dtype)
        return self.backbone(x).float()


class FeatureStack(nn.Module):
    """Concatenated frozen branches, standardised with the training spots' mean/SD (buffers).

    Parameters
    ----------
    components
        Branch names, a subset of ``("kmeans", "handcrafted", "timm")`` in the wanted order.
    kmeans
        :class:`KMeansExtractor` arguments.
    timm
        A built :class:`TimmExtractor` (required when ``"timm"`` is a component).
    """

    def __init__(self, components: Sequence[str], *, kmeans: dict | None = None, timm: TimmExtractor | None = None):
        super().__init__()
        self.components = list(components)
        branches = {}
        for c in self.components:
            if c == "kmeans":
                branches[c] = KMeansExtractor(**(kmeans or {}))
            elif c == "handcrafted":
                branches[c] = HandcraftedExtractor()
            elif c == "timm":
                if timm is None:
                    raise ValueError("the 'timm' component needs a TimmExtractor")
                branches[c] = timm
            else:
                raise StimageInputError(f"unknown feature extractor component {c!r}; use {list(COMPONENTS)}")
        self.branches = nn.ModuleDict(branches)
        self.num_features = int(sum(b.num_features for b in self.branches.values()))
        self.register_buffer("feat_mean", torch.zeros(self.num_features))
        self.register_buffer("feat_std", torch.ones(self.num_features))

    @property
    def name(self) -> str:
        """``"kmeans+handcrafted"``, with the timm model named (``"timm:resnet18+handcrafted"``)."""
        return "+".join(f"timm:{self.branches['timm'].name}" if c == "timm" else c for c in self.components)

    def config(self) -> dict:
        return {"components": self.components, "num_features": self.num_features,
                **{c: self.branches[c].config() for c in self.components}}

    @classmethod
    def from_config(cls, cfg: dict, weights: str | None = "none", *, init: bool = True, **create_kw) -> FeatureStack:
        """An unfitted stack of the recorded shapes (load its ``state_dict`` to restore the fitted state).

        ``init=False``: a registered encoder's memory is allocated without random initialisation (the
        caller loads the complete state dict next)."""
        comps = list(cfg["components"])
        timm = None
        if "timm" in comps:
            from .backbone import create_backbone
            from .encoders import find_encoder

            t = cfg["timm"]
            name = t["name"]
            if find_encoder(name) is None and name.startswith("hf-hub:") and t.get("architecture") \
                    and weights in (None, "none"):
                name_to_build = t["architecture"]  # no hub access needed: the weights come from the state dict
            else:
                name_to_build = name
            if find_encoder(name) is not None:
                create_kw = {**create_kw, "init": init}
            bb = create_backbone(name_to_build, weights, **dict(t.get("kwargs") or {}), **create_kw)
            timm = TimmExtractor(bb, name, t.get("kwargs"), mean=t.get("mean"), std=t.get("std"))
        return cls(comps, kmeans=cfg.get("kmeans"), timm=timm)

    # ------------------------------------------------------------------ fitting
    def fit(self, tiles, *, n_patches: int = 60000, seed: int = 0) -> FeatureStack:
        """Fit the learned branches (k-means) on uint8 training tiles; the standardisation is set separately
        (:meth:`set_standardisation`), from the training spots' raw features."""
        if "kmeans" in self.branches:
            self.branches["kmeans"].fit(tiles, n_patches=n_patches, seed=seed)
        return self

    @torch.no_grad()
    def set_standardisation(self, raw: Tensor) -> None:
        """Mean/SD of raw training features ``(n, F)``; a constant feature gets SD 1."""
        raw = raw.double()
        sd = raw.std(0, correction=0)
        self.feat_mean.copy_(raw.mean(0).to(self.feat_mean))
        self.feat_std.copy_(torch.where(sd > 1e-6, sd, torch.ones_like(sd)).to(self.feat_std))

    # ------------------------------------------------------------------ features
    def raw(self, x01: Tensor) -> Tensor:
        """Unstandardised concatenated features."""
        return torch.cat([self.branches[c](x01).float() for c in self.components], 1)

    def standardise(self, raw: Tensor) -> Tensor:
        return (raw - self.feat_mean) / self.feat_std

    def forward(self, x01: Tensor) -> Tensor:
        return self.standardise(self.raw(x01))


def build_stack(spec: str, *, backbone: str | None = None, weights: str | None = "none",
                backbone_kwargs: dict | None = None, kmeans_k: int = 128) -> FeatureStack:
    """An unfitted :class:`FeatureStack` from an extractor spec (``"kmeans+handcrafted"``, ``"timm"``...).

    ``backbone``/``weights``/``backbone_kwargs`` build the timm branch (see
    :func:`stimage_nb.models.create_backbone`).
    """
    comps = parse_extractor(spec)
    timm = None
    if "timm" in comps:
        from .backbone import create_backbone

        if not backbone:
            raise StimageInputError("the 'timm' feature extractor needs a backbone name (--backbone NAME)")
        bb = create_backbone(backbone, weights, **dict(backbone_kwargs or {}))
        timm = TimmExtractor(bb, backbone, backbone_kwargs)
    return FeatureStack(comps, kmeans={"k": kmeans_k}, timm=timm).eval()
