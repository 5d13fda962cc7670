"""Response / status classification: penalised logistic regression under nested cross-validation.

ROC AUC (``sklearn.metrics.roc_auc_score``; one-vs-rest macro average for more than two classes) on each
outer test fold, the mean over folds with a bootstrap CI (:mod:`._cv`), and the AUC of the pooled
out-of-fold probabilities.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import StimageInputError
from ._cv import CVParams, bootstrap_fold_mean, fold_ci, inner_splits, outer_splits, transformer_cache
from ._estimators import classifier_pipeline, model_coefficients
from ._results import ClassificationResult, Estimate


def _auc(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < len(classes):
        return float("nan")
    if len(classes) == 2:
        return float(roc_auc_score(y, proba[:, 1]))
    return float(roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=np.arange(len(classes))))


def nested_cv_classifier(X: pd.DataFrame, y: pd.Series, *, params: CVParams | None = None, name: str = "model",
                         estimator=None, splits: Sequence | None = None, progress: bool = False) -> ClassificationResult:
    """Elastic-net logistic regression of a class label on ``X`` under nested cross-validation.

    Parameters
    ----------
    X
        Patients x features (index: patient ids).
    y
        Class label per patient (same index; two or more classes).
    params, name, estimator, splits, progress
        As :func:`stimage_nb.outcomes.nested_cv_survival`; the grid is ``params.Cs`` (x ``params.clf_l1_ratios``)
        and the inner search maximises ROC AUC.

    Returns
    -------
    :class:`ClassificationResult`

    Raises
    ------
    StimageInputError
        Misaligned patients, a class with fewer patients than folds.
    """
    from sklearn.base import clone
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GridSearchCV

    params = params or CVParams()
    if not isinstance(X, pd.DataFrame) or not isinstance(y, pd.Series):
        raise StimageInputError("X must be a DataFrame and y a Series, both indexed by patient id")
    if X.index.has_duplicates or not X.index.equals(y.index):
        if set(X.index) != set(y.index) or X.index.has_duplicates:
            raise StimageInputError("X and y must hold the same patients once each; align them first (outcomes.align)")
        y = y.loc[X.index]
    classes, codes = np.unique(y.to_numpy(), return_inverse=True)
    if len(classes) < 2:
        raise StimageInputError("one class only: nothing to classify")
    features = tuple(str(c) for c in X.columns)
    X = X.astype(float)
    if estimator is None:
        k = params.k_best if params.k_best and params.k_best < X.shape[1] else None
        estimator = classifier_pipeline(k_best=k, seed=params.seed, elastic_net=any(r > 0 for r in params.clf_l1_ratios))
    grid = {"model__C": list(params.Cs)}
    if any(r > 0 for r in params.clf_l1_ratios):
        grid["model__l1_ratio"] = list(params.clf_l1_ratios)
    scoring = "roc_auc" if len(classes) == 2 else "roc_auc_ovr"
    folds = outer_splits(X.index, codes, params, splits)
    light = params.metrics == "primary"
    rows, preds, coefs, fold_data = [], [], {}, []
    import contextlib

    stack = contextlib.ExitStack()
    cached = stack.enter_context(transformer_cache(estimator))
    it = enumerate(folds)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(list(it), desc=f"nested CV ({name})", leave=False)
    for k, (tr, te) in it:
        search = GridSearchCV(clone(cached), grid, cv=inner_splits(codes[tr], params, k), scoring=scoring,
                              refit=True, error_score=np.nan)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=ConvergenceWarning)
            warnings.filterwarnings("ignore", category=UserWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            search.fit(X.iloc[tr], codes[tr])
        best = search.best_estimator_
        proba = best.predict_proba(X.iloc[te])
        auc = _auc(codes[te], proba, classes)
        rows.append({"fold": k, "n_train": len(tr), "n_test": len(te), "roc_auc": auc,
                     "C": float(search.best_params_["model__C"]),
                     "l1_ratio": float(search.best_params_.get("model__l1_ratio", 0.0)),
                     "inner_auc": float(search.best_score_)})
        try:
            cf = model_coefficients(best, features)
            cf = cf if cf.ndim == 1 else np.abs(cf).mean(axis=0)
            coefs[k] = cf
            rows[-1]["n_nonzero"] = int(np.count_nonzero(cf))
        except (AttributeError, ValueError):
            pass
        p = pd.DataFrame(proba, columns=[f"p_{c}" for c in classes])
        p.insert(0, "y", classes[codes[te]])
        p.insert(0, "fold", k)
        p.insert(0, "patient_id", X.index[te])
        preds.append(p)
        fold_data.append({"n": len(te), "y": codes[te], "proba": proba})
    stack.close()
    folds_df = pd.DataFrame(rows)
    pred = pd.concat(preds, ignore_index=True)
    mean = float(np.nanmean(folds_df["roc_auc"]))
    if light:
        est = Estimate(mean, level=params.ci)
    else:
        lo, hi, reps = bootstrap_fold_mean(fold_data, lambda d, i: _auc(d["y"][i], d["proba"][i], classes), params)
        est = Estimate(mean, lo, hi, params.ci)
        for k in range(len(rows)):
            folds_df.loc[k, ["roc_auc_low", "roc_auc_high"]] = fold_ci(reps, k, params.ci)
    all_codes = np.searchsorted(classes, pred["y"].to_numpy())
    pooled = _auc(all_codes, pred[[f"p_{c}" for c in classes]].to_numpy(), classes)
    coef_df = pd.DataFrame(coefs, index=list(features)) if coefs else pd.DataFrame(index=list(features))
    coef_df.columns = [f"fold_{c}" for c in coef_df.columns]
    counts = pd.Series(classes[codes]).value_counts().to_dict()
    return ClassificationResult(
        name=name, features=features, classes=tuple(classes.tolist()), n_patients=int(len(X)), class_counts=counts,
        roc_auc=est, pooled_auc=pooled, folds=folds_df, predictions=pred, coefficients=coef_df,
        params=dict(params.to_json(), outer="given splits" if splits is not None
                    else f"StratifiedKFold({params.n_splits}, by class)",
                    inner=f"GridSearchCV({scoring}) over {grid} with StratifiedKFold({params.inner_splits})"))
