"""Survival: a penalised Cox model under nested cross-validation, scored with scikit-survival and lifelines.

Metrics (all computed by the libraries, on each outer test fold):

- Harrell's C: ``sksurv.metrics.concordance_index_censored``;
- Uno's C: ``sksurv.metrics.concordance_index_ipcw`` (censoring weights from the training fold, truncated
  at the fold's last evaluation time);
- time-dependent AUC: ``sksurv.metrics.cumulative_dynamic_auc`` at the evaluation times (mean over them);
- integrated Brier score: ``sksurv.metrics.integrated_brier_score`` of the model's Breslow survival curves,
  beside the same for the training fold's Kaplan-Meier curve (``sksurv.nonparametric.SurvivalFunctionEstimator``);
- risk groups: high/low by the median risk of the fold's *training* patients, pooled over folds, then
  ``lifelines.statistics.logrank_test`` and Kaplan-Meier curves (``lifelines.KaplanMeierFitter``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import StimageInputError
from ._cv import CVParams, bootstrap_fold_mean, fold_ci, inner_splits, outer_splits, transformer_cache
from ._estimators import model_coefficients, survival_pipeline
from ._results import Estimate, SurvivalResult

log = logging.getLogger(__name__)


def as_surv(outcome: pd.DataFrame):
    """``outcome`` (columns ``time``, ``event``) -> scikit-survival's structured array ``Surv.from_arrays``."""
    from sksurv.util import Surv

    return Surv.from_arrays(event=outcome["event"].to_numpy().astype(bool),
                            time=outcome["time"].to_numpy().astype(float), name_event="event", name_time="time")


def default_times(outcome: pd.DataFrame) -> tuple[float, ...]:
    """The 10th, 20th, ..., 80th percentiles of the event times (evaluation times of AUC(t) and the Brier score)."""
    t = outcome.loc[outcome["event"].astype(bool), "time"].to_numpy(float)
    if len(t) < 2:
        raise StimageInputError("fewer than two events: no survival analysis is possible")
    return tuple(float(x) for x in np.unique(np.percentile(t, np.arange(10, 90, 10))))


def _fold_times(times: np.ndarray, t_train: np.ndarray, t_test: np.ndarray) -> np.ndarray:
    lo = max(t_test.min(), t_train.min())
    hi = min(t_test.max(), t_train.max())
    return times[(times > lo) & (times < hi)]


def survival_grid(params: CVParams, pipeline) -> dict:
    names = set(pipeline.named_steps)
    grid = {"model__l1_ratio": list(params.l1_ratios), "model__alpha_ratio": list(params.alpha_ratios)}
    if "model" not in names:
        raise StimageInputError("the survival pipeline's last step must be named 'model'")
    return grid


def nested_cv_survival(X: pd.DataFrame, outcome: pd.DataFrame, *, params: CVParams | None = None, name: str = "model",
                       estimator=None, splits: Sequence | None = None, progress: bool = False) -> SurvivalResult:
    """Penalised Cox regression of ``outcome`` on ``X`` under nested cross-validation.

    Parameters
    ----------
    X
        Patients x features (index: patient ids; numeric; NaN allowed, imputed inside the folds).
    outcome
        Index: the same patient ids; columns ``time`` (> 0, any unit) and ``event`` (1 = event, 0 = censored).
    params
        The protocol (:class:`CVParams`).
    name
        Label of the feature set in the results.
    estimator
        An unfitted scikit-learn Pipeline whose last step ``model`` is a survival model with ``alpha_ratio``
        and ``l1_ratio`` (default: :func:`stimage_nb.outcomes.survival_pipeline` with ``params.k_best``).
    splits
        Outer splits as (train ids, test ids) pairs instead of stratified k-fold.
    progress
        A progress bar over the outer folds.

    Returns
    -------
    :class:`SurvivalResult`

    Raises
    ------
    StimageInputError
        Misaligned patients, non-positive times, events not 0/1, too few events for the folds.
    """
    from sklearn.base import clone
    from sklearn.exceptions import FitFailedWarning
    from sklearn.model_selection import GridSearchCV
    from sksurv.metrics import cumulative_dynamic_auc, integrated_brier_score
    from sksurv.nonparametric import SurvivalFunctionEstimator

    params = params or CVParams()
    X, outcome = _check_xy(X, outcome)
    y = as_surv(outcome)
    event, time = y["event"], y["time"]
    features = tuple(str(c) for c in X.columns)
    times_all = np.asarray(params.times if params.times else default_times(outcome), dtype=float)
    if estimator is None:
        k = params.k_best if params.k_best and params.k_best < X.shape[1] else None
        estimator = survival_pipeline(k_best=k)
    grid = survival_grid(params, estimator)
    folds = outer_splits(X.index, event.astype(int), params, splits)
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
        Xtr, Xte, ytr, yte = X.iloc[tr], X.iloc[te], y[tr], y[te]
        search = GridSearchCV(clone(cached), grid, cv=inner_splits(event[tr].astype(int), params, k),
                              refit=True, error_score=np.nan, n_jobs=None)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            warnings.filterwarnings("ignore", category=FitFailedWarning)  # a too-small penalty: scored NaN
            search.fit(Xtr, ytr)
        best = search.best_estimator_
        risk_te = np.asarray(best.predict(Xte), dtype=float)
        risk_tr = np.asarray(best.predict(Xtr), dtype=float)
        cut = float(np.median(risk_tr))
        harrell = _harrell(event[te], time[te], risk_te)
        row = {"fold": k, "n_train": len(tr), "n_test": len(te), "events_test": int(event[te].sum()),
               "harrell_c": harrell}
        tk = _fold_times(times_all, time[tr], time[te])
        tau = float(tk.max()) if len(tk) else float(min(time[te].max(), time[tr].max()) * 0.999)
        if not light:
            yte = censor_at(yte, np.nextafter(time[tr].max(), -np.inf))  # IPCW needs test times < the last train time
            row["uno_c"] = _uno(ytr, yte, risk_te, tau)
            if len(tk):
                with warnings.catch_warnings():  # a time without cases in a small fold: NaN there
                    warnings.filterwarnings("ignore", category=RuntimeWarning)
                    auc_t, auc_mean = cumulative_dynamic_auc(ytr, yte, risk_te, tk)
                row["auc"] = float(auc_mean)
            else:
                row["auc"] = np.nan
            if len(tk) >= 2:
                surv = best.predict_survival_function(Xte)
                probs = np.vstack([fn(tk) for fn in surv])
                row["ibs"] = float(integrated_brier_score(ytr, yte, probs, tk))
                km = SurvivalFunctionEstimator().fit(ytr).predict_proba(tk)
                row["ibs_km"] = float(integrated_brier_score(ytr, yte, np.tile(km, (len(te), 1)), tk))
            else:
                row["ibs"] = row["ibs_km"] = np.nan
        row.update({"l1_ratio": float(search.best_params_["model__l1_ratio"]),
                    "alpha_ratio": float(search.best_params_["model__alpha_ratio"]),
                    "inner_c": float(search.best_score_), "cut_point": cut, "tau": tau})
        try:
            cf = model_coefficients(best, features)
            coefs[k] = cf
            row["n_nonzero"] = int(np.count_nonzero(cf))
        except (AttributeError, ValueError):
            pass
        rows.append(row)
        preds.append(pd.DataFrame({"patient_id": X.index[te], "fold": k, "risk": risk_te,
                                   "risk_group": np.where(risk_te > cut, "high", "low"),
                                   "time": time[te], "event": event[te].astype(int)}))
        fold_data.append({"n": len(te), "event": event[te], "time": time[te], "risk": risk_te,
                          "y_train": ytr, "y_test": yte, "tau": tau})
        log.debug("%s fold %d: Harrell's C %.3f", name, k, harrell)

    stack.close()
    folds_df = pd.DataFrame(rows)
    pred = pd.concat(preds, ignore_index=True)
    h_mean = float(np.nanmean(folds_df["harrell_c"]))
    if light:
        harrell_est, uno_est = Estimate(h_mean, level=params.ci), Estimate(float("nan"), level=params.ci)
        auc = ibs = ibs_km = float("nan")
        logrank = {}
    else:
        lo, hi, reps = bootstrap_fold_mean(fold_data, _boot_harrell, params, 0)
        harrell_est = Estimate(h_mean, lo, hi, params.ci)
        for k in range(len(rows)):
            folds_df.loc[k, ["harrell_c_low", "harrell_c_high"]] = fold_ci(reps, k, params.ci)
        ulo, uhi, ureps = bootstrap_fold_mean(fold_data, _boot_uno, params, 1)
        uno_est = Estimate(float(np.nanmean(folds_df["uno_c"])), ulo, uhi, params.ci)
        for k in range(len(rows)):
            folds_df.loc[k, ["uno_c_low", "uno_c_high"]] = fold_ci(ureps, k, params.ci)
        auc = float(np.nanmean(folds_df["auc"])) if folds_df["auc"].notna().any() else float("nan")
        ibs = float(np.nanmean(folds_df["ibs"])) if folds_df["ibs"].notna().any() else float("nan")
        ibs_km = float(np.nanmean(folds_df["ibs_km"])) if folds_df["ibs_km"].notna().any() else float("nan")
        logrank = risk_group_logrank(pred)
    coef_df = pd.DataFrame(coefs, index=list(features)) if coefs else pd.DataFrame(index=list(features))
    coef_df.columns = [f"fold_{c}" for c in coef_df.columns]
    return SurvivalResult(
        name=name, features=features, n_patients=int(len(X)), n_events=int(event.sum()), harrell_c=harrell_est,
        uno_c=uno_est, auc=auc, ibs=ibs, ibs_km=ibs_km, logrank=logrank, folds=folds_df, predictions=pred,
        coefficients=coef_df, times=tuple(float(t) for t in times_all),
        params=dict(params.to_json(), estimator=_describe(estimator), outer="given splits" if splits is not None
                    else f"StratifiedKFold({params.n_splits}, by event)",
                    inner=f"GridSearchCV over {grid} with StratifiedKFold({params.inner_splits}, by event)"))


def censor_at(y, horizon: float):
    """Administrative censoring at ``horizon``: later times become ``horizon``, their events censored.

    The inverse-probability-of-censoring weights of Uno's C, AUC(t) and the Brier score are estimated on the
    training fold and undefined past its last time; a test patient followed longer is censored there. Every
    evaluation time lies before ``horizon``, where that patient's status (still at risk) is unchanged, so the
    metrics at those times are unchanged too.
    """
    from sksurv.util import Surv

    ev, t = y["event"].copy(), y["time"].astype(float).copy()
    late = t > horizon
    ev[late] = False
    t[late] = horizon
    return Surv.from_arrays(event=ev, time=t, name_event="event", name_time="time")


def _harrell(event, time, risk) -> float:
    from sksurv.metrics import concordance_index_censored

    try:
        return float(concordance_index_censored(np.asarray(event, bool), np.asarray(time, float), risk)[0])
    except Exception:  # noqa: BLE001 - no comparable pair: undefined
        return float("nan")


def _uno(ytr, yte, risk, tau) -> float:
    from sksurv.metrics import concordance_index_ipcw

    try:
        return float(concordance_index_ipcw(ytr, yte, risk, tau=tau)[0])
    except Exception:  # noqa: BLE001 - undefined on this resample
        return float("nan")


def _boot_harrell(d: dict, idx: np.ndarray) -> float:
    return _harrell(d["event"][idx], d["time"][idx], d["risk"][idx])


def _boot_uno(d: dict, idx: np.ndarray) -> float:
    return _uno(d["y_train"], d["y_test"][idx], d["risk"][idx], d["tau"])


def risk_group_logrank(pred: pd.DataFrame) -> dict:
    """Log-rank test (lifelines) of the out-of-fold ``risk_group`` high vs low."""
    from lifelines.statistics import logrank_test

    hi = pred[pred["risk_group"] == "high"]
    lo = pred[pred["risk_group"] == "low"]
    if len(hi) == 0 or len(lo) == 0:
        return {"statistic": float("nan"), "p_value": float("nan"), "n_high": int(len(hi)), "n_low": int(len(lo))}
    res = logrank_test(hi["time"], lo["time"], event_observed_A=hi["event"], event_observed_B=lo["event"])
    return {"statistic": float(res.test_statistic), "p_value": float(res.p_value), "n_high": int(len(hi)),
            "n_low": int(len(lo)), "events_high": int(hi["event"].sum()), "events_low": int(lo["event"].sum())}


def _describe(est) -> str:
    try:
        return " -> ".join(f"{n}:{type(s).__name__}" for n, s in est.steps)
    except AttributeError:
        return type(est).__name__


def _check_xy(X: pd.DataFrame, outcome: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    if not isinstance(X, pd.DataFrame) or not isinstance(outcome, pd.DataFrame):
        raise StimageInputError("X and outcome must be DataFrames indexed by patient id")
    for c in ("time", "event"):
        if c not in outcome.columns:
            raise StimageInputError(f"the outcome table needs a column {c!r} (has {list(outcome.columns)[:8]})")
    if X.index.has_duplicates:
        raise StimageInputError(f"X has duplicate patient ids, e.g. {X.index[X.index.duplicated()][:3].tolist()}; "
                                "average slides per patient first (outcomes.patient_features)")
    common = X.index.intersection(outcome.index)
    if len(common) < len(X) or len(common) < len(outcome):
        raise StimageInputError(f"X and outcome must hold the same patients ({len(X)} vs {len(outcome)}, "
                                f"{len(common)} shared); align them first (outcomes.align)")
    outcome = outcome.loc[X.index]
    if X.shape[1] == 0:
        raise StimageInputError("no feature columns")
    return X.astype(float), outcome
