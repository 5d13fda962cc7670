"""One ensemble member: input normalisation + feature extractor + NB head (+ cell-type head).

The extractor is either a timm backbone (fine-tuned, or frozen) or a frozen
:class:`~stimage_nb.models.features.FeatureStack` (the offline default: k-means + handcrafted
features), whose fitted state is part of the member's ``state_dict``.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .backbone import create_backbone, normalisation_of
from .features import FeatureStack
from .heads import CellTypeHead, MLPHead, NBHead


@dataclass
class Output:
    """Forward result: per-gene ``log_mu`` (n, genes), ``log_theta`` (genes,), cell-type ``logits`` or None.

    A regression head (``STModel(head="mlp")``) has no count distribution: ``log_mu``/``log_theta`` are
    None and ``mean`` (n, genes) holds its point prediction.
    """

    log_mu: Tensor | None
    log_theta: Tensor | None
    logits: Tensor | None
    mean: Tensor | None = None


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
    head
        ``"nb"`` (the negative-binomial head, default) or ``"mlp"`` (:class:`MLPHead`, a point prediction
        per gene, e.g. an imported Path2Space member; no count distribution, no cell types).
    hidden
        Hidden width of the ``"mlp"`` head (default: the feature width).
    composition
        The NB head's mean as a depth head times a composition over the genes (:class:`NBHead`).
    """

    def __init__(self, backbone: nn.Module, n_genes: int, n_celltypes: int = 0, *, backbone_name: str,
                 backbone_kwargs: dict | None = None, dropout: float = 0.1, mean=None, std=None, rank: int = 0,
                 head: str = "nb", hidden: int | None = None, init: bool = True, composition: bool = False):
        super().__init__()
        if head not in ("nb", "mlp"):
            raise ValueError(f"head must be 'nb' or 'mlp', not {head!r}")
        if head == "mlp" and n_celltypes:
            raise ValueError("the 'mlp' head predicts genes only (n_celltypes=0)")
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
        self.head_kind = head
        self.hidden = int(hidden or self.feat_dim) if head == "mlp" else None
        # init=False: the heads' memory is allocated without random initialisation (a state dict follows)
        with contextlib.nullcontext() if init else torch.device("meta"):
            if head == "mlp":
                self.mlp = MLPHead(self.feat_dim, self.hidden, self.n_genes, dropout)
            else:
                self.nb = NBHead(self.feat_dim, self.n_genes, dropout, rank=self.rank, composition=self.composition)
            self.celltype = CellTypeHead(self.feat_dim, self.n_celltypes, dropout) if self.n_celltypes else None
        if not init:
            for name in ("mlp", "nb", "celltype"):
                if getattr(self, name, None) is not None:
                    setattr(self, name, getattr(self, name).to_empty(device="cpu"))

    # ------------------------------------------------------------------ forward
    @property
    def is_stack(self) -> bool:
        """Whether the extractor is a frozen :class:`FeatureStack`."""
        return isinstance(self.backbone, FeatureStack)

    def features(self, x01: Tensor) -> Tensor:
        """Pooled backbone features (standardised stack features) of images in [0, 1]."""
        x = (x01 - self.mean.to(x01.dtype)) / self.std.to(x01.dtype)
        return self.backbone(x)

    @property
    def has_distribution(self) -> bool:
        """Whether the member predicts a count distribution (NB head) rather than a point value."""
        return self.head_kind == "nb"

    def heads(self, features: Tensor, log_library: Tensor | None = None) -> Output:
        """The heads' outputs for pooled features; ``log_library``: the spots' observed log library sizes
        in place of the depth head of a composition head (:meth:`NBHead.forward`)."""
        if self.head_kind == "mlp":
            return Output(None, None, None, self.mlp(features))
        log_mu, log_theta = self.nb(features, log_library)
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
               "rank": self.rank}
        if self.composition:
            out["composition"] = True
        if self.head_kind != "nb":
            out.update({"head": self.head_kind, "hidden": self.hidden})
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


def build_model(config: dict, weights: str | None = "none", *, backbone: nn.Module | None = None, init: bool = True,
                **create_kw) -> STModel:
    """An :class:`STModel` from :meth:`STModel.config` (weights of the backbone per ``weights``).

    For a :class:`FeatureStack` extractor the stack is built unfitted; load the member's
    ``state_dict`` to restore it.

    Parameters
    ----------
    backbone
        An already built backbone to use as it is (members that share one; nothing is built).
    init
        ``False``: a registered foundation encoder is allocated without random initialisation, because
        the caller loads the complete state dict next (a 1B-parameter ViT takes ~1 min to initialise).
    """
    from .encoders import find_encoder

    name = config["backbone"]
    kwargs = dict(config.get("backbone_kwargs") or {})
    if backbone is not None:
        bb = backbone
    elif config.get("extractor"):
        bb = FeatureStack.from_config(config["extractor"], weights, init=init, **create_kw)
    elif find_encoder(name) is not None:
        bb = create_backbone(name, weights, init=init, **kwargs, **create_kw)
    elif name.startswith("hf-hub:") and config.get("architecture") and (weights in (None, "none")):
        bb = create_backbone(config["architecture"], "none", **kwargs, **create_kw)  # no hub access needed
    else:
        bb = create_backbone(name, weights, **kwargs, **create_kw)
    return STModel(bb, config["n_genes"], config.get("n_celltypes", 0), backbone_name=name, backbone_kwargs=kwargs,
                   dropout=config.get("dropout", 0.1), mean=config.get("mean"), std=config.get("std"),
                   rank=config.get("rank", 0), head=config.get("head", "nb"), hidden=config.get("hidden"), init=init,
                   composition=bool(config.get("composition", False)))
