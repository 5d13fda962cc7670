"""The variance of weighted means of per-spot predictive distributions (pseudo-bulk, smoothing), and the
exact rescaling of a prediction to another sequencing depth (:func:`scale_prediction`).

The variance of a mean of per-spot predictive distributions
------------------------------------------------------------
Each spot ``i`` of a slide (``n`` spots) has an ensemble predictive distribution for the count ``Y_i`` a
spatial assay would measure there: the mixture over the ``M`` members of NB(μ_mi, θ_mi). The
prediction file stores its mean μ̄_i = mean_m μ_mi, the aleatoric variance A_i = mean_m (μ_mi +
μ_mi²/θ_mi) and the epistemic variance E_i = var_m μ_mi (:mod:`stimage_nb.ensemble`). A weighted mean
over spots, ``B = Σ_i w_i Y_i`` with Σ w_i = 1 (the pseudo-bulk: w_i = 1/n; smoothing: a neighbourhood's
weights), has

    E[B]   = Σ_i w_i μ̄_i
    Var[B] = E_m Var(B | m) + Var_m E(B | m)                      (law of total variance over members)
           = Σ_i w_i² A_i  +  Σ_i Σ_j w_i w_j Cov_m(μ_mi, μ_mj)

assuming one member (one model) holds for the whole slide and, given the member, the counts of
different spots are independent (separate captures: the counting noise of one spot says nothing about
another's). The first term is exact under that assumption. The second needs the members' means
jointly, which the per-spot file does not keep; from the E_i alone it is bounded:

- ``epistemic="independent"``: members' errors uncorrelated between spots, Cov = 0 for i ≠ j, giving
  Σ_i w_i² E_i. It shrinks like 1/n, so a slide of 10,000 grid points would look almost certain;
- ``epistemic="correlated"`` (the default): members' errors perfectly correlated between spots (a member
  that reads the slide's stain or tissue differently is off everywhere), giving (Σ_i w_i √E_i)², the
  largest value the E_i allow (Cauchy–Schwarz). It does not shrink with n.

The truth lies between the two; ``correlated`` is the conservative choice and the one that matches how
ensemble members differ (their weights apply to every spot). The aleatoric term shrinks like 1/n under
its (physical) independence assumption, so for a whole slide the pseudo-bulk's uncertainty is
essentially epistemic. For comparison with *bulk RNA-seq* (not a spatial assay's spot counts) use the
epistemic part alone: the aleatoric variance is the spot assay's counting noise. Checked against a
Monte-Carlo simulation of members and counts in ``tests/cohort/test_pseudobulk.py``.

Used by :func:`stimage_nb.smoothing.smooth_prediction` (neighbourhood means) and
:func:`stimage_nb.cohort.pseudobulk` (slide means).
"""

from __future__ import annotations

import numpy as np

from .errors import StimageInputError

EPISTEMIC_MODES = ("correlated", "independent")


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def weighted_mean_var(W, mean, aleatoric, epistemic, *, epistemic_mode: str = "correlated"):
    """Weighted means of per-spot predictive distributions and their variance components.

    Parameters
    ----------
    W
        (k, n) weights, each row summing to 1 (dense or scipy sparse): k means over n spots.
    mean, aleatoric, epistemic
        (n, genes) predictive mean and the two variances (counts, counts²).
    epistemic_mode
        ``"correlated"`` or ``"independent"`` (module docstring).

    Returns
    -------
    (mean, var_aleatoric, var_epistemic), each (k, genes) float64.
    """
    import scipy.sparse as sp

    if epistemic_mode not in EPISTEMIC_MODES:
        raise StimageInputError(f"epistemic must be one of {EPISTEMIC_MODES}, not {epistemic_mode!r}")
    W = sp.csr_matrix(W, dtype=np.float64)
    W2 = W.multiply(W).tocsr()
    mu, A, E = _dense(mean), _dense(aleatoric), _dense(epistemic)
    m = np.asarray(W @ mu)
    va = np.asarray(W2 @ A)
    ve = np.asarray(W @ np.sqrt(np.clip(E, 0, None))) ** 2 if epistemic_mode == "correlated" else np.asarray(W2 @ E)
    return m, va, ve


def scale_prediction(pred: dict, f: float) -> dict:
    """Every NB mean of ``pred`` (any rows of :meth:`stimage_nb.ensemble.Ensemble.predict_tiles` output) times ``f``, dispersions
    kept: mean x f, epistemic variance x f^2, aleatoric ``f mean + f^2 (aleatoric - mean)`` (also the single
    member's ``member_*``). What :func:`stimage_nb.ensemble.rescale_to_depth` applies, block by block where rows stream."""
    out = dict(pred)
    mean = pred["mean"].astype(np.float64)
    out["mean"] = (f * mean).astype(np.float32)
    if "aleatoric_var" in pred:
        out["aleatoric_var"] = (f * mean + f * f * (pred["aleatoric_var"] - mean)).astype(np.float32)
    out["epistemic_var"] = (f * f * pred["epistemic_var"]).astype(np.float32)
    if "member_mean" in pred:
        mm = pred["member_mean"].astype(np.float64)
        out["member_mean"] = (f * mm).astype(np.float32)
        out["member_aleatoric_var"] = (f * mm + f * f * (pred["member_aleatoric_var"] - mm)).astype(np.float32)
    return out
