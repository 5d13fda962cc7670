"""One ensemble member: input normalisation + feature extractor + NB head (+ cell-type head).

The extractor is either a timm backbone (fine-tuned, or frozen) or a frozen
:class:`~stimage_nb.models.features.FeatureStack` (the offline default: k-means + handcrafted
features), whose fitted state is part of the member's ``state_dict``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .backbone import create_backbone, normalisation_of
from .features import FeatureStack
from .heads import CellTypeHead, NBHead


@dataclass
class Output:
    """Forward result: per-gene ``log_mu`` (n, genes), ``log_theta`` (genes,), cell-type ``logits`` or None."""

    log_mu: Tensor
    log_theta: Tensor
    logits: Tensor | None


class STModel(nn.Module):
    """Backbone features -> negative-binomial gene head and optional cell-type head.

    Takes float images in [0, 1], shape (n, 3, h, w); normalises them with the backbone's mean/std.

    Parameters
    ----------
    backbone
        A timm module built with ``num_classes=0``, or a :class:`FeatureStack` (which normalises its
        own inputs: the member's mean/std are then 0/1).
    n_genes, n_celltypes
        Output sizes (``n_celltypes=0``: no cell-type head).
    backbone_name, backbone_kwargs
        Recorded so the member can be rebuilt from its JSON config.
    dropout
        Dropout on the features before each head.
    rank
        Rank of the NB head's gene map (0: full; see :class:`NBHead`).
    composition
        The NB head's mean as a depth head times a composition over the genes (:class:`NBHead`).
    """

    def __init__(self, backbone: nn.Module, n_genes: int, n_celltypes: int = 0, *, backbone_name: str,
                 backbone_kwargs: dict | None = None, dropout: float = 0.1, mean=None, std=None, rank: int = 0,
                 composition: bool = False):
        super().__init__()
        self.backbone = backbone
        self.backbone_name = backbone_name
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.feat_dim = int(backbone.num_features)
        self.n_genes, self.n_celltypes, self.dropout = int(n_genes), int(n_celltypes), float(dropout)
        self.rank = int(rank)
        self.composition = bool(composition)
        if isinstance(backbone, FeatureStack):
            m, s = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        else:
            m, s = normalisation_of(backbone)
        self.register_buffer("mean", torch.tensor(mean if mean is not None else m, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std if std is not None else s, dtype=torch.float32).view(1, 3, 1, 1))
        self.nb = NBHead(self.feat_dim, self.n_genes, dropout, rank=self.rank, composition=self.composition)
        self.celltype = CellTypeHead(self.feat_dim, self.n_celltypes, dropout) if self.n_celltypes else None

    # ------------------------------------------------------------------ forward
    @property
    def is_stack(self) -> bool:
        """Whether the extractor is a frozen :class:`FeatureStack`."""
        return isinstance(self.backbone, FeatureStack)

    def features(self, x01: Tensor) -> Tensor:
        """Pooled backbone features (standardised stack features) of images in [0, 1]."""
        x = (x01 - self.mean.to(x01.dtype)) / self.std.to(x01.dtype)
        return self.backbone(x)

    def heads(self, features: Tensor) -> Output:
        log_mu, log_theta = self.nb(features)
        return Output(log_mu, log_theta, self.celltype(features) if self.celltype is not None else None)

    def forward(self, x01: Tensor) -> Output:
        return self.heads(self.features(x01))

    # ------------------------------------------------------------------ config
    def config(self) -> dict:
        """JSON-able description from which :func:`build_model` rebuilds the architecture."""
        arch = (getattr(self.backbone, "pretrained_cfg", None) or {}).get("architecture")
        out = {"backbone": self.backbone_name, "architecture": arch, "backbone_kwargs": self.backbone_kwargs,
               "n_genes": self.n_genes, "n_celltypes": self.n_celltypes, "feat_dim": self.feat_dim,
               "dropout": self.dropout, "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist(),
               "rank": self.rank, "composition": self.composition}
        if self.is_stack:
            out["extractor"] = self.backbone.config()
        return out

    def backbone_digest(self) -> str:
        """sha256 over the backbone's tensors (members with equal digests share features)."""
        h = hashlib.sha256()
        for k, v in sorted(self.backbone.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


def build_model(config: dict, weights: str | None = "none", **create_kw) -> STModel:
    """An :class:`STModel` from :meth:`STModel.config` (weights of the backbone per ``weights``).

    For a :class:`FeatureStack` extractor the stack is built unfitted; load the member's
    ``state_dict`` to restore it.
    """
    name = config["backbone"]
    kwargs = dict(config.get("backbone_kwargs") or {})
    if config.get("extractor"):
        bb = FeatureStack.from_config(config["extractor"], weights, **create_kw)
    elif name.startswith("hf-hub:") and config.get("architecture") and (weights in (None, "none")):
        bb = create_backbone(config["architecture"], "none", **kwargs, **create_kw)  # no hub access needed
    else:
        bb = create_backbone(name, weights, **kwargs, **create_kw)
    return STModel(bb, config["n_genes"], config.get("n_celltypes", 0), backbone_name=name, backbone_kwargs=kwargs,
                   dropout=config.get("dropout", 0.1), mean=config.get("mean"), std=config.get("std"),
                   rank=config.get("rank", 0), composition=bool(config.get("composition", False)))
