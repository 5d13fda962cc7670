"""A model's features beside its baselines, in one run: clinical covariates only, clinical + model, and
random feature sets of the same size (Venet et al., PLoS Comput Biol 2011: most random gene sets are
associated with breast cancer outcome, so a signature has to beat them, not just 0.5)."""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import StimageInputError
from ._classify import nested_cv_classifier
from ._cv import CVParams
from ._results import Comparison
from ._survival import nested_cv_survival

log = logging.getLogger(__name__)


def _run(X, target, params, name, splits, progress):
    if isinstance(target, pd.DataFrame):
        return nested_cv_survival(X, target, params=params, name=name, splits=splits, progress=progress)
    return nested_cv_classifier(X, target, params=params, name=name, splits=splits, progress=progress)


def compare(X: pd.DataFrame, target, *, model_features: Sequence[str] | None = None, name: str = "model",
            clinical: pd.DataFrame | None = None, extra: Mapping[str, Sequence[str]] | None = None,
            n_random: int = 20, n_permutations: int = 0, params: CVParams | None = None, splits=None,
            progress: bool = False) -> Comparison:
    """Nested CV of the model's features and of its baselines on the same patients and outer splits.

    Parameters
    ----------
    X
        Patients x every candidate feature (the pool the random sets are drawn from).
    target
        A survival outcome (DataFrame with ``time``/``event``) or a class label (Series), indexed by patient.
    model_features
        The model's columns of ``X`` (default: all of them).
    name
        The model's label.
    clinical
        Patients x clinical covariates: adds ``"clinical"`` and ``"clinical + <name>"``.
    extra
        More named feature sets (columns of ``X``) to run beside, e.g. ``{"all genes": X.columns}``.
    n_random
        Random sets of ``len(model_features)`` columns drawn (seeded by ``params.seed``) from the columns of
        ``X`` outside the model's set (from all of ``X`` if too few), scored on the primary metric only.
    n_permutations
        Reruns of the whole nested CV of the model's features with the outcome shuffled across patients
        (primary metric only): the null distribution for :attr:`Comparison.permutation_p`.
    params
        :class:`CVParams` shared by every run.

    Returns
    -------
    :class:`Comparison`

    Raises
    ------
    StimageInputError
        Unknown columns, no patient in common.
    """
    params = params or CVParams()
    model_features = list(X.columns if model_features is None else model_features)
    missing = [c for c in model_features if c not in X.columns]
    if missing:
        raise StimageInputError(f"model features not in X: {missing[:5]}")
    ids = X.index.intersection(target.index)
    if clinical is not None:
        ids = ids.intersection(clinical.index)
    if len(ids) == 0:
        raise StimageInputError("the features, outcome and clinical tables share no patient")
    ids = ids.sort_values()
    if len(ids) < len(X):
        log.info("%d patients have features, outcome%s", len(ids), " and clinical covariates" if clinical is not None else "")
    X = X.loc[ids]
    target = target.loc[ids]
    metric = "harrell_c" if isinstance(target, pd.DataFrame) else "roc_auc"
    results = {name: _run(X[model_features], target, params, name, splits, progress)}
    if clinical is not None:
        C = clinical.loc[ids]
        results["clinical"] = _run(C, target, params, "clinical", splits, progress)
        both = pd.concat([C.add_prefix("clinical:"), X[model_features]], axis=1)
        results[f"clinical + {name}"] = _run(both, target, params, f"clinical + {name}", splits, progress)
    for label, cols in (extra or {}).items():
        cols = list(cols)
        results[label] = _run(X[cols], target, params, label, splits, progress)
    random = []
    if n_random:
        pool = [c for c in X.columns if c not in set(model_features)]
        if len(pool) < len(model_features):
            pool = list(X.columns)
        if len(pool) <= len(model_features):
            log.warning("no random baseline: the pool has %d columns, the model %d", len(pool), len(model_features))
        else:
            rng = np.random.default_rng(params.seed + 104729)
            light = params.replace(metrics="primary", n_bootstrap=0)
            it = range(int(n_random))
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(it, desc="random sets", leave=False)
            for i in it:
                cols = list(rng.choice(pool, size=len(model_features), replace=False))
                random.append(_run(X[cols], target, light, f"random {i}", splits, False))
    permuted = []
    if n_permutations:
        rng = np.random.default_rng(params.seed + 15485863)
        light = params.replace(metrics="primary", n_bootstrap=0)
        it = range(int(n_permutations))
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="permutations", leave=False)
        for i in it:
            order = rng.permutation(len(target))
            shuffled = target.iloc[order].copy()
            shuffled.index = target.index  # each patient gets another patient's outcome
            permuted.append(_run(X[model_features], shuffled, light, f"permutation {i}", splits, False))
    return Comparison(model=name, results=results, random=tuple(random), metric=metric, permuted=tuple(permuted))
