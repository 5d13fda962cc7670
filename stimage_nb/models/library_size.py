"""A spot's library size regressed from its image features, and a composition shrunk toward its mean.

The offline default's NB mean is a spot's **library size** (its counts over the gene panel) times a
**composition** over the genes (:class:`stimage_nb.models.heads.NBHead` with ``composition=True``). With
``TrainConfig(library_size="ridge")`` the two parts are fitted apart, as in count models of single cells
and spots that condition on the observed library size (scVI's observed library, GLM offsets):

1. the composition is trained with each spot's *observed* log library size as the NB offset
   (:func:`log_library_size`), so the depth of a spot cannot leak gene by gene into the composition;
2. the log library size, centred per section (sections are sequenced to different depths; a prediction is
   rescaled to the depth of the section it is for), is regressed on the same frozen features by ridge
   (scikit-learn), its penalty chosen by grouped cross-validation over the training sections (or the
   quarters of a single section); member ``i`` refits it on its own bootstrap sample of the spots, so the
   members disagree about depth where the features extrapolate (epistemic variance). The offset is the
   median over the training sections of their mean log library size: an undirected prediction is at the
   training depth (:func:`fit_library_size`);
3. the composition's deviations from the training mean composition are multiplied by a shrinkage factor
   (:func:`shrink_composition`): a composition learned from one patient transfers only in part to another,
   and with s = 1 the noise it adds to every gene outweighs its signal across patients (measured by
   leave-one-patient-out and simulated acquisitions, README "Validation"). The default factor is per gene
   and **cross-fitted** (:func:`held_out_loglik`, :func:`cross_fitted_shrinkage`): a head is trained without
   each group of the training spots (a section, or a quarter of a single section), the held-out spots' NB
   likelihood is measured with the gene's deviations scaled by 0, 0.1, ..., 1, and each gene keeps the best
   factor times a scale (0.25) for the step from held-out sections to held-out patients. Genes whose image
   signal holds on unseen spots keep more of it; genes whose learned deviations were noise fall to their
   mean share. A single factor for every gene (``composition_shrinkage=0.25``) was the previous default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

#: Ridge penalties tried (on standardised features), by grouped cross-validation.
ALPHAS = tuple(float(a) for a in np.logspace(-1, 5, 13))


def log_library_size(counts: torch.Tensor) -> torch.Tensor:
    """``log`` of each spot's counts over the genes, floored at one count: ``(n,)`` from ``(n, genes)`` counts."""
    return torch.log(counts.float().sum(1).clamp(min=1.0))


@dataclass
class LibrarySizeFit:
    """A fitted log-library-size regression: ``log L(f) = f @ weight + bias + offset`` (features ``f`` as the
    heads see them). ``alpha``: the ridge penalty; ``cv_r2``: its grouped cross-validated R² (centred
    targets); ``n``: spots in the member's bootstrap sample."""

    weight: np.ndarray
    bias: float
    offset: float
    alpha: float
    cv_r2: float
    n: int

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("weight")
        return d


def _cv_splits(groups: np.ndarray, n: int) -> list:
    from sklearn.model_selection import GroupKFold, KFold

    uniq = np.unique(groups)
    if len(uniq) >= 2:
        return list(GroupKFold(n_splits=min(5, len(uniq))).split(np.zeros(n), groups=groups))
    return list(KFold(n_splits=min(5, n)).split(np.zeros(n)))


def fit_library_size(features: np.ndarray, log_library: np.ndarray, sections: np.ndarray, cv_groups: np.ndarray, *,
                     rows: np.ndarray | None = None, seed: int = 0) -> LibrarySizeFit:
    """Regress the spots' log library sizes, centred per section, on their features (ridge).

    Parameters
    ----------
    features
        ``(n, F)`` features of the training spots (the frozen features the heads see).
    log_library
        ``(n,)`` observed log library sizes (:func:`log_library_size`).
    sections
        ``(n,)`` section of each spot: the targets are centred per section, and the offset is the median of
        the sections' mean log library size.
    cv_groups
        ``(n,)`` groups of the cross-validation that chooses the penalty among :data:`ALPHAS` (the sections,
        or the quarters of a single section); chosen on all spots, so every member uses the same penalty.
    rows
        The member's training rows (default all); the fit uses a bootstrap sample of them drawn with
        ``seed`` (``numpy.random.default_rng``).

    Raises
    ------
    ValueError
        Fewer than 3 spots, or shapes that do not agree.
    """
    from sklearn.linear_model import Ridge, RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(features, np.float64)
    y = np.asarray(log_library, np.float64)
    sections, cv_groups = np.asarray(sections), np.asarray(cv_groups)
    if not (len(X) == len(y) == len(sections) == len(cv_groups)) or len(X) < 3:
        raise ValueError(f"fit_library_size: {len(X)} feature rows, {len(y)} library sizes, {len(sections)} sections "
                         f"and {len(cv_groups)} groups must agree (at least 3 spots)")
    means = {s: float(y[sections == s].mean()) for s in np.unique(sections)}
    yc = y - np.array([means[s] for s in sections])
    offset = float(np.median(list(means.values())))
    splits = _cv_splits(cv_groups, len(X))
    cv = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS, cv=splits)).fit(X, yc)
    alpha = float(cv[-1].alpha_)
    pred = np.zeros_like(yc)
    for tr, va in splits:
        pred[va] = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(X[tr], yc[tr]).predict(X[va])
    rows = np.arange(len(X)) if rows is None else np.asarray(rows)
    boot = rows[np.random.default_rng(seed).integers(0, len(rows), len(rows))]
    m = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(X[boot], yc[boot])
    sc, rg = m[0], m[-1]
    scale = np.where(sc.scale_ > 0, sc.scale_, 1.0)
    w = rg.coef_ / scale
    b = float(rg.intercept_ - (sc.mean_ * w).sum())
    return LibrarySizeFit(weight=w, bias=b, offset=offset, alpha=alpha, cv_r2=float(r2_score(yc, pred)), n=len(boot))


@torch.no_grad()
def set_library_size(nb, fit: LibrarySizeFit) -> None:
    """Write a :class:`LibrarySizeFit` into a composition :class:`~stimage_nb.models.heads.NBHead`'s depth head."""
    if not getattr(nb, "composition", False):
        raise ValueError("set_library_size needs a composition head (composition=True)")
    nb.depth.weight.copy_(torch.as_tensor(fit.weight, dtype=nb.depth.weight.dtype).view_as(nb.depth.weight))
    nb.depth.bias.fill_(fit.bias)
    nb.log_total_bias.fill_(fit.offset)


@torch.no_grad()
def shrink_composition(nb, features: torch.Tensor, s) -> None:
    """Pull a composition head's gene map toward its mean over ``features`` (the training spots' features):
    ``g(f) -> s g(f) + (1 - s) mean_i g(f_i)``, where ``g`` is the (low-rank) linear map before the per-gene
    bias; exact because ``g`` is affine. ``s``: one factor in (0, 1], or one per gene ``(genes,)`` in [0, 1]
    (:func:`cross_fitted_shrinkage`; 0 keeps only the gene's mean share). ``s = 1`` leaves the head as it is."""
    per_gene = np.ndim(s) > 0
    sv = np.asarray(s, np.float64).reshape(-1)
    if per_gene:
        if sv.shape != (nb.log_mean_bias.shape[0],) or not np.all((sv >= 0) & (sv <= 1)):
            raise ValueError(f"per-gene shrinkage factors must be {nb.log_mean_bias.shape[0]} values in [0, 1]")
    elif not 0 < sv[0] <= 1:
        raise ValueError(f"the shrinkage factor must be in (0, 1], not {s}")
    if np.all(sv == 1):
        return
    was = nb.training
    nb.eval()
    gbar = nb.linear(nb.encoder(features.to(nb.linear.weight.dtype))).float().mean(0)
    st = torch.as_tensor(sv if per_gene else sv[:1], dtype=nb.linear.weight.dtype, device=nb.linear.weight.device)
    nb.linear.weight.mul_(st[:, None])  # (genes, rank): row g is gene g's map
    if nb.linear.bias is not None:
        nb.linear.bias.mul_(st)
    nb.log_mean_bias.add_(((1 - st) * gbar.to(st.dtype)).to(nb.log_mean_bias.dtype))
    nb.train(was)


#: Shrinkage factors tried per gene by :func:`cross_fitted_shrinkage`.
SHRINKAGE_GRID = tuple(float(v) for v in np.round(np.linspace(0, 1, 11), 2))


@torch.no_grad()
def held_out_loglik(nb, train_features: torch.Tensor, features: torch.Tensor, counts: torch.Tensor,
                    grid=SHRINKAGE_GRID) -> np.ndarray:
    """Negative-binomial log-likelihood of held-out spots under a composition head shrunk by each factor of
    ``grid``, summed over the spots per gene: ``(len(grid), genes)``.

    ``nb`` was trained without these spots; ``train_features`` ``(n_train, F)`` are the features it was trained
    on (the mean the composition is shrunk toward), ``features`` ``(n, F)`` and ``counts`` ``(n, genes)`` the
    held-out spots'. Each spot's mean is its *observed* library size ``L`` times the shrunk composition, as the
    model predicts it (a softmax over the genes): ``mu = L softmax(s (g(f) - mean g) + mean g + b)``, so the
    likelihood measures only the composition. All genes take the same factor within one evaluation; a gene's
    column then says how well its share is predicted at that factor. (Scoring the unnormalised rates at the
    GLM offset instead, each gene on its own, gave factors that correlate 0.97-0.99 with these but transferred
    worse to blurred scans in the leave-one-patient-out study.)
    """
    from .heads import LOG_THETA_RANGE

    was = nb.training
    nb.eval()
    dt = nb.linear.weight.dtype
    gbar = nb.linear(nb.encoder(train_features.to(dt))).double().mean(0)
    dev = nb.linear(nb.encoder(features.to(dt))).double() - gbar
    y = counts.double()
    log_lib = torch.log(y.sum(1).clamp(min=1.0))[:, None]
    lth = nb.log_theta.double().clamp(*LOG_THETA_RANGE)
    th = lth.exp()
    const = torch.lgamma(y + th) - torch.lgamma(th) - torch.lgamma(y + 1)
    out = []
    for s in grid:
        lmu = torch.log_softmax(s * dev + gbar + nb.log_mean_bias.double(), dim=1) + log_lib
        den = torch.logaddexp(lth, lmu)
        out.append((const + th * (lth - den) + y * (lmu - den)).sum(0))
    nb.train(was)
    return torch.stack(out).cpu().numpy()


def cross_fitted_shrinkage(loglik: np.ndarray, scale: float, grid=SHRINKAGE_GRID) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene shrinkage factors from cross-fitting: ``(applied, cross_fitted)``, each ``(genes,)``.

    ``loglik``: ``(len(grid), genes)`` held-out log-likelihoods summed over the folds of a grouped
    cross-fit (:func:`held_out_loglik` of a head trained without each group of the training spots). A gene's
    cross-fitted factor is the grid value with the highest held-out likelihood: near 1 where the image
    predicts the gene's share on spots the head did not see, 0 where its learned deviations only add noise.
    The factor applied is ``scale`` times it: the groups are sections (or quarters of one section) of the
    training patients, which overstates how far a composition transfers to another patient, so the
    cross-fitted factors are scaled down by ``scale`` (chosen by leave-one-patient-out and simulated
    acquisitions, README "Validation"). Empirical-Bayes-like, per gene, as a gene-wise ridge penalty
    chosen by cross-validation would be.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"the cross-fit scale must be in (0, 1], not {scale}")
    ll = np.asarray(loglik, np.float64)
    if ll.ndim != 2 or ll.shape[0] != len(grid):
        raise ValueError(f"loglik must be (len(grid)={len(grid)}, genes), not {ll.shape}")
    cv = np.asarray(grid, np.float64)[np.argmax(ll, axis=0)]
    return scale * cv, cv
