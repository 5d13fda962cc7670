"""Typed results of the outcome analyses (frozen dataclasses with ``to_frame()`` / ``to_json()``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


def _f(v):
    """A JSON-safe float (None for NaN/inf)."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile bootstrap confidence interval (``low``/``high`` at ``level``)."""

    value: float
    low: float = float("nan")
    high: float = float("nan")
    level: float = 0.95

    def covers(self, x: float) -> bool:
        """Whether the interval contains ``x`` (False when there is no interval)."""
        return bool(np.isfinite(self.low) and np.isfinite(self.high) and self.low <= x <= self.high)

    def to_json(self) -> dict:
        return {"value": _f(self.value), "low": _f(self.low), "high": _f(self.high), "level": self.level}

    def __str__(self) -> str:
        if np.isfinite(self.low):
            return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"
        return f"{self.value:.3f}"


def _frame_json(df: pd.DataFrame) -> list[dict]:
    out = []
    for rec in df.to_dict(orient="records"):
        out.append({k: (_f(v) if isinstance(v, (float, np.floating)) else
                        int(v) if isinstance(v, (np.integer, np.bool_)) and not isinstance(v, bool) else v)
                    for k, v in rec.items()})
    return out


@dataclass(frozen=True)
class SurvivalResult:
    """Nested cross-validation of a penalised Cox model (:func:`stimage_nb.outcomes.nested_cv_survival`).

    Attributes
    ----------
    name
        What was modelled (e.g. ``"predicted genes"``, ``"clinical"``).
    features
        The input columns.
    n_patients, n_events
        Patients (rows) and events analysed.
    harrell_c, uno_c
        Mean over the outer test folds of Harrell's and Uno's (IPCW, truncated at ``tau``) concordance,
        with a percentile bootstrap CI (test patients resampled within each fold, the fold mean recomputed).
    auc
        Mean over folds of the mean cumulative/dynamic AUC at ``times`` (``cumulative_dynamic_auc``).
    ibs, ibs_km
        Mean over folds of the integrated Brier score of the model and of the Kaplan-Meier curve of the
        training fold (the reference a model must beat; lower is better).
    logrank
        Log-rank test of high vs low risk over all out-of-fold patients; each test patient's group comes
        from the cut-point (median risk) of *its training fold* (``statistic``, ``p_value``, ``n_high``,
        ``n_low``).
    folds
        One row per outer fold: sizes, every metric (with per-fold CIs), the chosen ``l1_ratio`` and
        ``alpha_ratio``, non-zero coefficients, the cut-point.
    predictions
        One row per patient (out-of-fold): ``fold``, ``risk``, ``risk_group`` (``"high"``/``"low"``), ``time``,
        ``event``.
    coefficients
        Features x folds: each fold's Cox coefficients (standardised features; 0 = not selected).
    times
        The evaluation times of the AUC and Brier score (time units of the input).
    params
        The protocol (splits, grids, bootstrap replicates, seed).
    """

    name: str
    features: tuple[str, ...]
    n_patients: int
    n_events: int
    harrell_c: Estimate
    uno_c: Estimate
    auc: float
    ibs: float
    ibs_km: float
    logrank: dict
    folds: pd.DataFrame
    predictions: pd.DataFrame
    coefficients: pd.DataFrame
    times: tuple[float, ...]
    params: dict = field(default_factory=dict)

    kind = "survival"

    @property
    def selection_frequency(self) -> pd.Series:
        """Fraction of outer folds in which each feature had a non-zero coefficient, highest first."""
        return (self.coefficients != 0).mean(axis=1).sort_values(ascending=False)

    def to_frame(self) -> pd.DataFrame:
        """The per-fold table."""
        return self.folds.copy()

    def summary(self) -> dict:
        return {"name": self.name, "n_features": len(self.features), "n_patients": self.n_patients,
                "n_events": self.n_events, "harrell_c": _f(self.harrell_c.value), "harrell_c_low": _f(self.harrell_c.low),
                "harrell_c_high": _f(self.harrell_c.high), "uno_c": _f(self.uno_c.value), "uno_c_low": _f(self.uno_c.low),
                "uno_c_high": _f(self.uno_c.high), "auc": _f(self.auc), "ibs": _f(self.ibs), "ibs_km": _f(self.ibs_km),
                "logrank_p": _f(self.logrank.get("p_value"))}

    def to_json(self) -> dict:
        return {
            "kind": self.kind, "name": self.name, "n_patients": self.n_patients, "n_events": self.n_events,
            "n_features": len(self.features), "features": list(self.features),
            "harrell_c": self.harrell_c.to_json(), "uno_c": self.uno_c.to_json(), "auc": _f(self.auc),
            "ibs": _f(self.ibs), "ibs_km": _f(self.ibs_km), "times": [_f(t) for t in self.times],
            "logrank": {k: _f(v) if isinstance(v, float) else v for k, v in self.logrank.items()},
            "folds": _frame_json(self.folds),
            "selection_frequency": {k: _f(v) for k, v in self.selection_frequency.head(50).items()},
            "params": self.params,
        }

    def plot_km(self, ax=None, **kw):
        """Kaplan-Meier curves of the out-of-fold risk groups with the log-rank p (lifelines); returns the Axes."""
        from ._plots import km_plot

        return km_plot(self, ax=ax, **kw)

    def __str__(self) -> str:
        return (f"{self.name}: Harrell's C {self.harrell_c}, Uno's C {self.uno_c}, AUC(t) {self.auc:.3f}, "
                f"IBS {self.ibs:.3f} (KM {self.ibs_km:.3f}), log-rank p {self.logrank.get('p_value', float('nan')):.2g} "
                f"({self.n_patients} patients, {self.n_events} events, {len(self.features)} features)")


@dataclass(frozen=True)
class ClassificationResult:
    """Nested cross-validation of a penalised logistic regression (:func:`stimage_nb.outcomes.nested_cv_classifier`).

    ``roc_auc``: mean over outer test folds of the ROC AUC (one-vs-rest macro average for several
    classes) with a percentile bootstrap CI (test patients resampled within each fold). ``pooled_auc``:
    the AUC of all out-of-fold probabilities together. ``predictions``: one row per patient with ``fold``,
    ``y`` and a probability column per class. ``folds``, ``coefficients``, ``params`` as in
    :class:`SurvivalResult`.
    """

    name: str
    features: tuple[str, ...]
    classes: tuple
    n_patients: int
    class_counts: dict
    roc_auc: Estimate
    pooled_auc: float
    folds: pd.DataFrame
    predictions: pd.DataFrame
    coefficients: pd.DataFrame
    params: dict = field(default_factory=dict)

    kind = "classification"

    def to_frame(self) -> pd.DataFrame:
        return self.folds.copy()

    def summary(self) -> dict:
        return {"name": self.name, "n_features": len(self.features), "n_patients": self.n_patients,
                "roc_auc": _f(self.roc_auc.value), "roc_auc_low": _f(self.roc_auc.low),
                "roc_auc_high": _f(self.roc_auc.high), "pooled_auc": _f(self.pooled_auc)}

    def to_json(self) -> dict:
        return {"kind": self.kind, "name": self.name, "n_patients": self.n_patients,
                "classes": [str(c) for c in self.classes], "class_counts": {str(k): int(v) for k, v in self.class_counts.items()},
                "n_features": len(self.features), "features": list(self.features),
                "roc_auc": self.roc_auc.to_json(), "pooled_auc": _f(self.pooled_auc), "folds": _frame_json(self.folds),
                "params": self.params}

    def plot_roc(self, ax=None, **kw):
        """Out-of-fold ROC curve(s) (scikit-learn); returns the Axes."""
        from ._plots import roc_plot

        return roc_plot(self, ax=ax, **kw)

    def __str__(self) -> str:
        return (f"{self.name}: ROC AUC {self.roc_auc} (pooled {self.pooled_auc:.3f}; {self.n_patients} patients, "
                f"{len(self.features)} features)")


@dataclass(frozen=True)
class Comparison:
    """A model beside its baselines, measured in the same run on the same patients and splits.

    ``results``: name -> result (the model, ``"clinical"``, ``"clinical + <model>"``...); ``random``: the
    results of random feature sets of the model's size (summaries only); ``model``: the name of the model.
    ``random_percentile``: the share of random sets the model beats on the primary metric (Harrell's C or
    ROC AUC). ``permuted``: runs of the model's features on shuffled outcomes (``permutation_p``).
    """

    model: str
    results: dict
    random: tuple = ()
    metric: str = "harrell_c"
    permuted: tuple = ()

    @property
    def random_scores(self) -> np.ndarray:
        return np.array([getattr(r, self.metric).value for r in self.random], dtype=float)

    @property
    def random_percentile(self) -> float:
        s = self.random_scores
        if not len(s):
            return float("nan")
        return float(np.mean(getattr(self.results[self.model], self.metric).value > s))

    @property
    def permutation_scores(self) -> np.ndarray:
        return np.array([getattr(r, self.metric).value for r in self.permuted], dtype=float)

    @property
    def permutation_p(self) -> float:
        """(1 + #permuted runs scoring at least the model) / (1 + #permutations): a p-value against chance
        that, unlike the bootstrap CI, includes the variability of refitting (the whole nested CV is rerun on
        outcomes shuffled across patients). NaN without permutations."""
        s = self.permutation_scores
        if not len(s):
            return float("nan")
        obs = getattr(self.results[self.model], self.metric).value
        return float((1 + np.sum(s >= obs)) / (1 + len(s)))

    def to_frame(self) -> pd.DataFrame:
        """One row per feature set (the random sets summarised as mean and 2.5/97.5% range)."""
        rows = [dict(r.summary(), set=name) for name, r in self.results.items()]
        s = self.random_scores
        if len(s):
            first = self.random[0].summary()
            rows.append({"set": f"random sets (n={len(s)})", "name": "random", "n_features": first["n_features"],
                         "n_patients": first["n_patients"], self.metric: float(np.mean(s)),
                         f"{self.metric}_low": float(np.percentile(s, 2.5)),
                         f"{self.metric}_high": float(np.percentile(s, 97.5))})
        df = pd.DataFrame(rows)
        return df[["set"] + [c for c in df.columns if c != "set"]]

    def to_json(self) -> dict:
        return {"model": self.model, "metric": self.metric,
                "results": {k: v.to_json() for k, v in self.results.items()},
                "random": {"n": len(self.random), "scores": [_f(x) for x in self.random_scores],
                           "model_beats_fraction": _f(self.random_percentile)},
                "permutation": {"n": len(self.permuted), "scores": [_f(x) for x in self.permutation_scores],
                                "p_value": _f(self.permutation_p)},
                "table": _frame_json(self.to_frame())}

    def plot(self, ax=None, **kw):
        """The primary metric of every set with its CI, and the random sets' distribution; returns the Axes."""
        from ._plots import comparison_plot

        return comparison_plot(self, ax=ax, **kw)
