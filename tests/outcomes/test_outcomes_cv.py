"""Nested cross-validation: no test patient reaches a fitted step, noise stays at chance, and every reported
number equals the one scikit-survival / lifelines / scikit-learn compute from the same predictions."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator
from sklearn.feature_selection import SelectKBest
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _outcome_data  # noqa: E402
from _outcome_data import noise  # noqa: E402

from stimage_nb import outcomes as oc  # noqa: E402

# fixtures (a module, not a conftest.py: tests/omero imports its conftest by name)
bulk = _outcome_data.bulk  # a fixture
os_outcome = _outcome_data.os_outcome  # a fixture
os_subset = _outcome_data.os_subset  # a fixture

FAST = oc.CVParams(n_bootstrap=100, l1_ratios=(0.5,), alpha_ratios=(1.0, 0.3, 0.1), seed=0)

FIT_LOG: list[tuple[str, frozenset]] = []
TRANSFORM_LOG: list[tuple[str, frozenset]] = []


class SpyScaler(StandardScaler):
    """StandardScaler that records which patients it was fitted on and which it transformed."""

    def fit(self, X, y=None, sample_weight=None):
        FIT_LOG.append(("scale", frozenset(X.index)))
        return super().fit(X, y, sample_weight)

    def transform(self, X, copy=None):
        TRANSFORM_LOG.append(("scale", frozenset(X.index)))
        return super().transform(X, copy)


class SpySelect(SelectKBest):
    """SelectKBest (univariate concordance) that records the patients it was fitted on."""

    def fit(self, X, y=None):
        FIT_LOG.append(("select", frozenset(X.index)))
        return super().fit(X, y)


def test_scaler_and_selector_only_ever_fit_on_training_patients(os_subset):
    X = noise(os_subset.index, 40, seed=3)
    pipe = Pipeline([("scale", SpyScaler()), ("select", SpySelect(oc.concordance_scores, k=5)),
                     ("model", oc.ElasticNetCox())]).set_output(transform="pandas")
    FIT_LOG.clear()
    TRANSFORM_LOG.clear()
    res = oc.nested_cv_survival(X, os_subset, params=FAST.replace(n_bootstrap=0), estimator=pipe)
    tests = [frozenset(g["patient_id"]) for _, g in res.predictions.groupby("fold")]
    assert len(tests) == 5 and frozenset().union(*tests) == frozenset(X.index)  # every patient tested once
    assert {kind for kind, _ in FIT_LOG} == {"scale", "select"}
    for kind, fitted in FIT_LOG:
        # each fit lies inside one outer training fold: it shares no patient with that fold's test set
        folds = [k for k, te in enumerate(tests) if not fitted & te]
        assert len(folds) == 1, f"{kind} was fitted on patients of {5 - len(folds)} test folds"
        assert len(fitted) <= len(X) - len(tests[folds[0]])
    # the test patients were transformed (and predicted), never fitted on
    for te in tests:
        assert any(te <= seen for _, seen in TRANSFORM_LOG)


def test_pure_noise_gives_chance_and_leaky_selection_would_not(os_subset):
    X = noise(os_subset.index, 150, seed=0)
    # the default protocol, with a selection of 10 of 150 noise features inside the training folds
    p = FAST.replace(k_best=10, alpha_ratios=oc.CVParams().alpha_ratios)
    res = oc.nested_cv_survival(X, os_subset, params=p)
    assert res.harrell_c.covers(0.5), res.harrell_c
    assert res.uno_c.covers(0.5), res.uno_c
    # STimage-style: the same selection on ALL patients, then cross-validation -> optimistic on pure noise
    top = X.columns[np.argsort(-oc.concordance_scores(X.to_numpy(), oc.as_surv(os_subset)))[:10]]
    leaky = oc.nested_cv_survival(X[top], os_subset, params=p.replace(k_best=None))
    assert leaky.harrell_c.low > 0.5, leaky.harrell_c
    # The bootstrap CI resamples test patients only: it leaves out the variability of refitting (on 8 other
    # noise draws it covered 0.5 in 7; one draw scored 0.68). compare(n_permutations=...) reruns the whole
    # nested CV on shuffled outcomes for a p-value that includes it (next test).


def test_permutation_test_reruns_the_nested_cv_on_shuffled_outcomes(bulk, os_subset):
    age = bulk.clinical.loc[os_subset.index, ["age"]]  # age at diagnosis: prognostic for overall survival
    comp = oc.compare(age, os_subset, n_random=0, n_permutations=5, params=FAST.replace(n_bootstrap=0))
    obs = comp.results["model"].harrell_c.value
    null = comp.permutation_scores
    assert obs > 0.6 and len(null) == 5 and (null < obs).all() and abs(null.mean() - 0.5) < 0.08
    assert comp.permutation_p == pytest.approx(1 / 6)
    for r in comp.permuted:  # each run saw the same patients with shuffled outcomes
        p = r.predictions.set_index("patient_id").loc[os_subset.index]
        assert sorted(p["time"]) == sorted(os_subset["time"]) and (p["time"].to_numpy() != os_subset["time"].to_numpy()).mean() > 0.9
    assert comp.to_json()["permutation"]["p_value"] == pytest.approx(1 / 6)


class FirstColumnRisk(BaseEstimator):
    """A 'model' whose risk is the first feature: the cut-point's provenance becomes checkable."""

    def __init__(self, alpha_ratio=1.0, l1_ratio=0.5):
        self.alpha_ratio = alpha_ratio
        self.l1_ratio = l1_ratio

    def fit(self, X, y):
        self.coef_ = np.r_[1.0, np.zeros(np.asarray(X).shape[1] - 1)]
        return self

    def predict(self, X):
        return np.asarray(X, dtype=float)[:, 0]

    def score(self, X, y):
        return 0.5

    def predict_survival_function(self, X, return_array=False):
        from sksurv.nonparametric import SurvivalFunctionEstimator  # noqa: F401 - not used by this test
        raise AttributeError


def test_cut_point_comes_from_the_training_fold(os_subset):
    X = noise(os_subset.index, 3, seed=5)
    res = oc.nested_cv_survival(X, os_subset, params=FAST.replace(n_bootstrap=0, metrics="primary"),
                                estimator=Pipeline([("model", FirstColumnRisk())]))
    for k, g in res.predictions.groupby("fold"):
        train = X.index.difference(g["patient_id"])
        cut = res.folds.loc[k, "cut_point"]
        assert cut == pytest.approx(np.median(X.loc[train, "noise0"]))  # median risk of the TRAINING patients
        assert cut != pytest.approx(np.median(g["risk"]))
        assert ((g["risk"] > cut) == (g["risk_group"] == "high")).all()


def test_metrics_equal_the_libraries_on_fixed_splits(bulk, os_outcome):
    from lifelines.statistics import logrank_test
    from lifelines.utils import concordance_index
    from sksurv.metrics import concordance_index_censored, concordance_index_ipcw, cumulative_dynamic_auc

    genes = ["GATA3", "AURKA", "BCL2", "CD3D", "EPCAM", "CDH1", "ERBB2", "EGFR", "CD8A", "PDGFRB"]
    genes = [g for g in genes if g in bulk.expression.columns]
    X, y = oc.align(bulk.expression[genes], os_outcome)
    # a fixed split: SurvPath's first two published case splits (train ids, test ids)
    sp = oc.tcga_brca_survpath().splits[:2]
    res = oc.nested_cv_survival(X, y, params=FAST.replace(n_bootstrap=30), splits=sp)
    ys = oc.as_surv(y)
    for k, (tr_ids, te_ids) in enumerate(sp):
        g = res.predictions[res.predictions["fold"] == k].set_index("patient_id")
        te = X.index.intersection(pd.Index(te_ids))
        tr = X.index.intersection(pd.Index(tr_ids))
        assert set(g.index) == set(te)
        g = g.loc[te]
        e, t, r = y.loc[te, "event"].astype(bool).to_numpy(), y.loc[te, "time"].to_numpy(), g["risk"].to_numpy()
        c_sk = concordance_index_censored(e, t, r)[0]
        assert res.folds.loc[k, "harrell_c"] == pytest.approx(c_sk, abs=1e-12)
        assert res.folds.loc[k, "harrell_c"] == pytest.approx(concordance_index(t, -r, e), abs=1e-9)
        pos_tr = X.index.get_indexer(tr)
        pos_te = X.index.get_indexer(te)
        y_te = oc._survival.censor_at(ys[pos_te], np.nextafter(ys["time"][pos_tr].max(), -np.inf))
        tau = res.folds.loc[k, "tau"]
        assert res.folds.loc[k, "uno_c"] == pytest.approx(concordance_index_ipcw(ys[pos_tr], y_te, r, tau=tau)[0])
        tk = np.array([x for x in res.times if max(t.min(), ys["time"][pos_tr].min()) < x
                       < min(t.max(), ys["time"][pos_tr].max())])
        assert res.folds.loc[k, "auc"] == pytest.approx(cumulative_dynamic_auc(ys[pos_tr], y_te, r, tk)[1])
    p = res.predictions
    hi, lo = p[p["risk_group"] == "high"], p[p["risk_group"] == "low"]
    lr = logrank_test(hi["time"], lo["time"], event_observed_A=hi["event"], event_observed_B=lo["event"])
    assert res.logrank["p_value"] == pytest.approx(lr.p_value) and res.logrank["statistic"] == pytest.approx(lr.test_statistic)
    # the CI brackets the estimate, per fold too; the JSON is strict
    assert res.harrell_c.low <= res.harrell_c.value <= res.harrell_c.high
    assert (res.folds["harrell_c_low"] <= res.folds["harrell_c"]).all()
    import json

    json.dumps(res.to_json(), allow_nan=False)


def test_classifier_noise_at_chance_and_auc_equals_sklearn(os_subset):
    from sklearn.metrics import roc_auc_score

    y = pd.Series(os_subset["event"].to_numpy(), index=os_subset.index, name="died")
    X = noise(os_subset.index, 30, seed=9)
    res = oc.nested_cv_classifier(X, y, params=FAST)
    assert res.roc_auc.covers(0.5), res.roc_auc
    for k, g in res.predictions.groupby("fold"):
        assert res.folds.loc[k, "roc_auc"] == pytest.approx(roc_auc_score(g["y"], g["p_1"]))
    assert res.pooled_auc == pytest.approx(roc_auc_score(res.predictions["y"], res.predictions["p_1"]))
    assert res.classes == (0, 1) and sum(res.class_counts.values()) == len(X)


def test_too_few_events_and_misaligned_inputs_are_clear(os_subset):
    from stimage_nb.errors import StimageInputError

    X = noise(os_subset.index, 5)
    few = os_subset.copy()
    few["event"] = 0
    few.iloc[:3, few.columns.get_loc("event")] = 1
    with pytest.raises(StimageInputError, match="too few patients for 5-fold outer"):
        oc.nested_cv_survival(X, few, params=FAST)
    with pytest.raises(StimageInputError, match="same patients"):
        oc.nested_cv_survival(X.iloc[:-3], os_subset, params=FAST)
    with pytest.raises(StimageInputError, match="must be at least 2"):
        oc.CVParams(n_splits=1)
