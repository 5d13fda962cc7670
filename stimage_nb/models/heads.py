"""Prediction heads on top of a backbone's pooled features.

- :class:`NBHead`: one negative-binomial distribution per gene (the STimage head). The mean is
  ``exp(W f + b)`` with a per-gene log-mean bias ``b`` initialised from the training counts (so an
  untrained head already predicts each gene's average), and the dispersion θ is a learned per-gene
  parameter (initialised by the method of moments). With ``rank=k > 0`` the map is low-rank,
  ``W = W_dec W_enc`` (features -> k -> genes, the decoder without bias), which shares a few
  expression programmes across genes (the offline default uses k = 8). With ``composition=True`` the mean
  is factorised as a spot's depth times its composition: ``log mu_g = s(f) + log_softmax(W f + b)_g``, a
  scalar depth head ``s`` (how many counts the spot holds, from the image) and a composition over the genes
  that sums to one, so the gene-specific part cannot absorb the spot's depth gene by gene. Given a spot's
  observed log library size (``forward(features, log_library=...)``) as a GLM offset, the same rates are
  trained without the depth head, which is then fitted apart (``TrainConfig(library_size="ridge")``,
  :mod:`stimage_nb.models.library_size`).
- :class:`MLPHead`: the two-layer ReLU regression head of Path2Space (a point prediction per gene, no
  count distribution), so that published model's members run here.
- :class:`CellTypeHead`: softmax over cell types, trained by cross-entropy against soft targets
  (per-spot proportions) or one-hot labels; rows with NaN targets are ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .nb import moment_init, nb_nll

MAX_LOG_MEAN = 20.0   # exp(20) ~ 5e8 counts: far above any spot, keeps exp finite under bf16
LOG_THETA_RANGE = (-7.0, 12.0)


class NBHead(nn.Module):
    """Per-gene negative-binomial head.

    Parameters
    ----------
    in_features
        Width of the backbone features.
    n_genes
        Number of genes.
    dropout
        Dropout on the features during training.
    rank
        ``0``: a full linear map features -> genes (``linear``). ``k > 0``: ``encoder`` (features -> k,
        with bias) then ``linear`` (k -> genes, no bias).
    composition
        Factorise the mean into a scalar depth head and a softmax composition over the genes (module
        docstring).
    """

    def __init__(self, in_features: int, n_genes: int, dropout: float = 0.0, rank: int = 0,
                 composition: bool = False):
        super().__init__()
        self.rank = int(rank)
        self.composition = bool(composition)
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, not {rank}")
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.encoder = nn.Linear(in_features, self.rank) if self.rank else nn.Identity()
        self.linear = nn.Linear(self.rank or in_features, n_genes, bias=not self.rank)
        self.log_mean_bias = nn.Parameter(torch.zeros(n_genes))
        self.log_theta = nn.Parameter(torch.zeros(n_genes))
        if self.composition:
            self.depth = nn.Linear(in_features, 1)
            self.log_total_bias = nn.Parameter(torch.zeros(()))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-draw the weights (from torch's global RNG): encoder as :class:`torch.nn.Linear`, gene map N(0, 0.01²)."""
        if self.rank:
            self.encoder.reset_parameters()
        nn.init.normal_(self.linear.weight, std=0.01)
        if self.linear.bias is not None:
            nn.init.zeros_(self.linear.bias)
        if self.composition:
            nn.init.normal_(self.depth.weight, std=0.01)
            nn.init.zeros_(self.depth.bias)

    @torch.no_grad()
    def init_from_counts(self, counts: Tensor) -> None:
        """Set the log-mean bias to log(mean count) and θ to its moment estimate, per gene (with a
        composition head: the log of the mean total as the depth bias, the composition at the mean)."""
        log_mu, log_theta = moment_init(counts.float().cpu())
        self.log_mean_bias.copy_(log_mu.to(self.log_mean_bias.device))
        if self.composition:
            self.log_total_bias.fill_(float(torch.logsumexp(log_mu, 0)))
        self.log_theta.copy_(log_theta.clamp(*LOG_THETA_RANGE).to(self.log_theta.device))

    def forward(self, features: Tensor, log_library: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return ``(log_mu (n, genes), log_theta (genes,))``.

        ``log_library`` (n,): with a composition head, the spots' observed log library sizes (log counts over
        the genes), used as a GLM offset instead of the depth head: ``log mu = W f + b + log_library - c``
        with ``c`` the log mean library size of the training spots (``log_total_bias`` as initialised by
        :meth:`init_from_counts`, not trained here). The per-gene rates are free to sum to more or less
        than one at a spot (how far its counts over the panel stray from its composition's); without
        ``log_library`` the same rates are normalised into a composition (softmax) times the depth head.
        """
        f = self.dropout(features)
        eta = self.linear(self.encoder(f)).float() + self.log_mean_bias
        if self.composition and log_library is None:
            eta = torch.log_softmax(eta, dim=-1) + self.depth(f).float() + self.log_total_bias
        elif self.composition:  # a GLM offset: the rates are normalised to a composition only at prediction
            eta = eta + (log_library.float() - self.log_total_bias.detach())[:, None]
        elif log_library is not None:
            raise ValueError("log_library needs a composition head (composition=True)")
        return eta.clamp(max=MAX_LOG_MEAN), self.log_theta.clamp(*LOG_THETA_RANGE)

    @staticmethod
    def loss(counts: Tensor, log_mu: Tensor, log_theta: Tensor) -> Tensor:
        """Mean NB negative log-likelihood over spots and genes."""
        return nb_nll(counts.float(), log_mu.float(), log_theta.float())


class CellTypeHead(nn.Module):
    """Softmax cell-type head trained on proportions (soft targets) or one-hot labels."""

    def __init__(self, in_features: int, n_types: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.linear = nn.Linear(in_features, n_types)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-draw the weights N(0, 0.01²) and zero the bias."""
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    @torch.no_grad()
    def init_from_targets(self, targets: Tensor) -> None:
        """Set the bias to the log of the mean target proportions (NaN rows ignored)."""
        ok = ~torch.isnan(targets).any(1)
        if ok.any():
            p = targets[ok].float().mean(0).clamp_min(1e-4)
            self.linear.bias.copy_(torch.log(p / p.sum()).to(self.linear.bias.device))

    def forward(self, features: Tensor) -> Tensor:
        """Logits (n, types)."""
        return self.linear(self.dropout(features)).float()

    @staticmethod
    def loss(logits: Tensor, targets: Tensor) -> Tensor:
        """See :func:`soft_cross_entropy`."""
        return soft_cross_entropy(logits, targets)


class MLPHead(nn.Module):
    """Two-layer ReLU regression head: ``relu(W1 dropout(relu(W0 f + b0)) + b1)``, one output per gene.

    The gene-expression model of Path2Space (Shulman et al., Cell 2026; ``MLP_regression_relu_two`` of the
    companion code ``ge_model/path2space/model_mlp.py``), with its state-dict keys ``layer0.0.{weight,bias}``
    and ``layer1.0.{weight,bias}``, so its published ``model_trained.pth`` files load as they are. It predicts
    a point value per gene (non-negative), not a count distribution.
    """

    def __init__(self, in_features: int, hidden: int, n_genes: int, dropout: float = 0.2):
        super().__init__()
        self.layer0 = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.layer1 = nn.Sequential(nn.Linear(hidden, n_genes), nn.ReLU())

    def forward(self, features: Tensor) -> Tensor:
        """Predicted values (n, genes), float32."""
        return self.layer1(self.layer0(features)).float()


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy −Σ p log q against target distributions, averaged over rows with valid targets.

    ``targets`` are proportions (each row is renormalised to sum to 1) or one-hot labels; a row
    holding any NaN, or summing to zero, is masked out. With no valid row the loss is a zero that
    keeps the graph (so it can always be added).
    """
    targets = targets.to(logits.dtype)
    valid = ~torch.isnan(targets).any(1)
    t = torch.nan_to_num(targets, nan=0.0).clamp_min(0)
    s = t.sum(1, keepdim=True)
    valid = valid & (s[:, 0] > 0)
    if not bool(valid.any()):
        return logits.sum() * 0.0
    t = t[valid] / s[valid]
    logq = torch.log_softmax(logits[valid], dim=1)
    return -(t * logq).sum(1).mean()


def labels_to_targets(labels, classes: list[str]) -> Tensor:
    """One-hot targets (n, len(classes)) for hard labels; unknown or missing labels become NaN rows."""
    index = {c: i for i, c in enumerate(classes)}
    out = torch.full((len(labels), len(classes)), float("nan"))
    for r, lab in enumerate(labels):
        i = index.get(str(lab)) if lab is not None else None
        if i is not None:
            out[r] = 0.0
            out[r, i] = 1.0
    return out
