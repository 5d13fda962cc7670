"""The nested cross-validation protocol shared by the survival and classification models.

Outer loop: ``StratifiedKFold`` over patients (stratified by the event indicator or the class), or splits
given by the caller (e.g. published case splits). Inside each outer training fold, ``GridSearchCV`` with
its own ``StratifiedKFold`` chooses the hyper-parameters, and every fitted step of the pipeline
(imputation, scaling, selection, the model) is fitted on training patients only; the outer test patients
are only ever transformed and predicted. Confidence intervals: a percentile bootstrap of the test patients,
resampled within each outer fold, of the mean of the per-fold metric (so the CI describes the evaluation's
sampling error; it does not include the variability of refitting on other training sets).
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ..errors import StimageInputError


@dataclass(frozen=True)
class CVParams:
    """Options of the nested cross-validation (one object, so every model and baseline of a run shares them).

    Parameters
    ----------
    n_splits, inner_splits
        Outer folds (the test estimate) and inner folds (hyper-parameter choice in each outer training fold).
    seed
        Seeds the splits, the bootstrap and the random feature sets.
    n_bootstrap
        Bootstrap replicates for the confidence intervals (0: no intervals).
    ci
        Confidence level.
    k_best
        Univariate pre-selection of k features inside the training folds (None: all features).
    l1_ratios, alpha_ratios
        Elastic-net grids of the Cox model (``alpha_ratio`` = penalty / alpha_max of the training fold; 1 is
        the null model).
    Cs, clf_l1_ratios
        The logistic regression's grid: inverse penalties and elastic-net mixing (default ridge only, solved
        by lbfgs; any l1_ratio > 0 switches to the saga solver, which is far slower on thousands of genes).
    times
        Evaluation times of the time-dependent AUC and the Brier score, in the outcome's time unit. Default:
        the 10th to 80th percentiles of the event times (a function of the outcome alone, never of the
        features); each fold keeps those inside both its training and test follow-up.
    metrics
        ``"all"`` or ``"primary"`` (Harrell's C or ROC AUC only, no bootstrap: the random-set baselines).
    """

    n_splits: int = 5
    inner_splits: int = 3
    seed: int = 0
    n_bootstrap: int = 500
    ci: float = 0.95
    k_best: int | None = None
    l1_ratios: tuple[float, ...] = (0.5, 0.9)
    alpha_ratios: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1, 0.05)
    Cs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    clf_l1_ratios: tuple[float, ...] = (0.0,)
    times: tuple[float, ...] | None = None
    metrics: str = "all"

    def __post_init__(self):
        if self.n_splits < 2 or self.inner_splits < 2:
            raise StimageInputError("n_splits and inner_splits must be at least 2")
        if self.metrics not in ("all", "primary"):
            raise StimageInputError(f"metrics must be 'all' or 'primary', not {self.metrics!r}")
        if not 0 < self.ci < 1:
            raise StimageInputError(f"ci must be between 0 and 1, not {self.ci}")

    def replace(self, **kw) -> "CVParams":
        from dataclasses import replace

        return replace(self, **kw)

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def outer_splits(ids: pd.Index, strata: np.ndarray, params: CVParams,
                 splits: Sequence[tuple[Sequence, Sequence]] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Positional (train, test) index pairs of the outer loop.

    ``splits``: optional (train patient ids, test patient ids) pairs (e.g. published case splits); ids not in
    ``ids`` are ignored, and a patient may be in at most one test fold.
    """
    from sklearn.model_selection import StratifiedKFold

    if splits is None:
        _check_strata(strata, params.n_splits, "outer")
        skf = StratifiedKFold(params.n_splits, shuffle=True, random_state=params.seed)
        return [(tr, te) for tr, te in skf.split(np.zeros(len(ids)), strata)]
    pos = pd.Series(np.arange(len(ids)), index=ids)
    out, seen = [], set()
    for k, (tr_ids, te_ids) in enumerate(splits):
        tr = pos.reindex(pd.Index(tr_ids)).dropna().astype(int).to_numpy()
        te = pos.reindex(pd.Index(te_ids)).dropna().astype(int).to_numpy()
        if len(np.intersect1d(tr, te)):
            raise StimageInputError(f"split {k}: {len(np.intersect1d(tr, te))} patients are in both training and test")
        dup = seen & set(te.tolist())
        if dup:
            raise StimageInputError(f"split {k}: {len(dup)} patients were already in an earlier test fold")
        seen |= set(te.tolist())
        if len(tr) == 0 or len(te) == 0:
            raise StimageInputError(f"split {k}: no patients of the data in its training or test part")
        out.append((np.sort(tr), np.sort(te)))
    return out


def inner_splits(strata: np.ndarray, params: CVParams, fold: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    _check_strata(strata, params.inner_splits, "inner")
    skf = StratifiedKFold(params.inner_splits, shuffle=True, random_state=params.seed + 1 + fold)
    return list(skf.split(np.zeros(len(strata)), strata))


def _check_strata(strata: np.ndarray, k: int, which: str) -> None:
    _, counts = np.unique(strata, return_counts=True)
    if len(counts) < 2 or counts.min() < k:
        raise StimageInputError(
            f"too few patients for {k}-fold {which} cross-validation: the smallest group (events, or a class) "
            f"has {int(counts.min()) if len(counts) else 0} patients; lower the number of folds or add patients")


def bootstrap_fold_mean(fold_data: list, stat: Callable, params: CVParams, seed_offset: int = 0
                        ) -> tuple[float, float, np.ndarray]:
    """Percentile CI of the mean over folds of ``stat(fold_data[k], idx)`` with ``idx`` resampled in each fold.

    ``stat(data, idx)`` returns the metric of fold ``data`` on the test rows ``idx`` (NaN when undefined,
    e.g. no comparable pair; such replicates are dropped). Returns (low, high, per-fold replicate matrix
    of shape (n_bootstrap, n_folds)).
    """
    B = int(params.n_bootstrap)
    if B <= 0:
        return float("nan"), float("nan"), np.empty((0, len(fold_data)))
    rng = np.random.default_rng(params.seed + 7919 + seed_offset)
    reps = np.full((B, len(fold_data)), np.nan)
    for k, d in enumerate(fold_data):
        n = d["n"]
        for b in range(B):
            reps[b, k] = stat(d, rng.integers(0, n, n))
    means = np.nanmean(reps, axis=1) if np.isfinite(reps).any() else np.full(B, np.nan)
    means = means[np.isfinite(means)]
    if not len(means):
        return float("nan"), float("nan"), reps
    a = (1 - params.ci) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a)), reps


def fold_ci(reps: np.ndarray, k: int, ci: float) -> tuple[float, float]:
    col = reps[:, k] if reps.size else np.array([])
    col = col[np.isfinite(col)]
    if not len(col):
        return float("nan"), float("nan")
    a = (1 - ci) / 2
    return float(np.quantile(col, a)), float(np.quantile(col, 1 - a))


@contextlib.contextmanager
def transformer_cache(estimator):
    """A clone of ``estimator``; a Pipeline with a ``select`` step gets a joblib cache of its fitted
    transformers for the run (GridSearchCV then fits the selector once per training set, not once per
    candidate: the same fits, the same results)."""
    from sklearn.base import clone
    from sklearn.pipeline import Pipeline

    est = clone(estimator)
    if isinstance(est, Pipeline) and "select" in est.named_steps and est.memory is None:
        import joblib

        with tempfile.TemporaryDirectory(prefix="stimage_nb_cv_") as d:
            yield est.set_params(memory=joblib.Memory(d, verbose=0))
    else:
        yield est
