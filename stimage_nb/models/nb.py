"""The negative-binomial distribution used for counts, in the (mean, dispersion) parametrisation.

A count ``y`` with mean ``mu`` and inverse dispersion (``total_count``) ``theta`` has

    P(y) = Γ(y + θ) / (Γ(θ) y!) · (θ / (θ + μ))^θ · (μ / (θ + μ))^y,     Var(y) = μ + μ² / θ.

This is :class:`torch.distributions.NegativeBinomial` with ``total_count = θ`` and
``logits = log μ − log θ`` (its ``probs`` is the success probability μ / (θ + μ)). Everything here
works on ``log μ`` and ``log θ`` so that very small or large means stay finite.
"""

from __future__ import annotations

import torch
from torch import Tensor


def nb_log_prob(y: Tensor, log_mu: Tensor, log_theta: Tensor) -> Tensor:
    """Elementwise log P(y) of a negative binomial with mean ``exp(log_mu)``, dispersion ``exp(log_theta)``.

    Shapes broadcast (e.g. ``y`` and ``log_mu`` of (n, genes) with a per-gene ``log_theta`` of (genes,)).
    """
    theta = torch.exp(log_theta)
    log_denom = torch.logaddexp(log_theta, log_mu)  # log(θ + μ)
    return (torch.lgamma(y + theta) - torch.lgamma(theta) - torch.lgamma(y + 1.0)
            + theta * (log_theta - log_denom) + y * (log_mu - log_denom))


def nb_nll(y: Tensor, log_mu: Tensor, log_theta: Tensor, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of counts ``y`` (the STimage training loss).

    ``reduction``: ``"mean"`` over all elements (so the scale does not depend on the number of
    genes), ``"sum"``, or ``"none"``.
    """
    nll = -nb_log_prob(y, log_mu, log_theta)
    if reduction == "mean":
        return nll.mean()
    if reduction == "sum":
        return nll.sum()
    if reduction == "none":
        return nll
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")


def nb_variance(mu: Tensor, theta: Tensor) -> Tensor:
    """Variance μ + μ²/θ of the negative binomial."""
    return mu + mu * mu / theta


def to_torch_distribution(log_mu: Tensor, log_theta: Tensor) -> torch.distributions.NegativeBinomial:
    """The same distribution as a :class:`torch.distributions.NegativeBinomial` (for sampling, checks)."""
    log_theta = torch.broadcast_to(log_theta, log_mu.shape)
    return torch.distributions.NegativeBinomial(total_count=torch.exp(log_theta), logits=log_mu - log_theta)


def moment_init(counts: Tensor, min_mean: float = 1e-3, theta_range: tuple[float, float] = (0.05, 1e3)
                ) -> tuple[Tensor, Tensor]:
    """Per-gene ``(log μ, log θ)`` from counts by the method of moments.

    θ = μ² / (var − μ), clipped to ``theta_range`` (a gene with var <= μ is close to Poisson and gets
    the upper bound).
    """
    counts = counts.double()
    mu = counts.mean(0).clamp_min(min_mean)
    var = counts.var(0, unbiased=True) if counts.shape[0] > 1 else mu.clone()
    excess = var - mu
    theta = torch.where(excess > 1e-8, mu * mu / excess.clamp_min(1e-8), torch.full_like(mu, theta_range[1]))
    theta = theta.clamp(*theta_range)
    return torch.log(mu).float(), torch.log(theta).float()
