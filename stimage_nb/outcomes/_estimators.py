"""The estimators of the outcome models: scikit-learn pipelines whose every fitted step sees training data only.

- Survival: ``SimpleImputer(median) -> StandardScaler -> [SelectKBest(univariate concordance)] ->
  ElasticNetCox`` where :class:`ElasticNetCox` is scikit-survival's ``CoxnetSurvivalAnalysis`` (elastic-net
  penalised Cox, Simon et al. 2011) with its penalty set *relative to the largest useful one on its own
  training data* (``alpha = alpha_ratio * alpha_max``, glmnet's ``lambda.min.ratio``), so a grid of
  ``alpha_ratio`` means the same thing in every fold without looking at held-out patients.
  ``alpha_ratio = 1`` is the null model (all coefficients zero): the inner search can choose "no signal".
- Classification: ``SimpleImputer -> StandardScaler -> [SelectKBest(ANOVA F)] -> LogisticRegression``
  (elastic net, saga solver).

Hyper-parameters are chosen by ``GridSearchCV`` inside each outer training fold (:mod:`._cv`).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.feature_selection import SelectKBest, f_classif
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler


class ElasticNetCox(BaseEstimator):
    """Elastic-net penalised Cox model at a penalty relative to the training data's ``alpha_max``.

    Wraps :class:`sksurv.linear_model.CoxnetSurvivalAnalysis`: ``fit`` computes the regularisation path
    from ``alpha_max`` (the smallest penalty with all coefficients zero) down to
    ``alpha_ratio * alpha_max`` on the training data and keeps the model at its end.

    Parameters
    ----------
    alpha_ratio
        Penalty as a fraction of ``alpha_max`` (1 = the null model, smaller = more features).
    l1_ratio
        Elastic-net mixing (1 = lasso, near 0 = ridge).
    n_alphas
        Points on the path down to the chosen penalty (warm starts; more = more stable, slower).

    Attributes
    ----------
    model_ : CoxnetSurvivalAnalysis
    alpha_ : float
        The penalty used.
    coef_ : ndarray, shape (n_features,)
    """

    def __init__(self, alpha_ratio: float = 0.1, l1_ratio: float = 0.5, n_alphas: int = 20, max_iter: int = 100000):
        self.alpha_ratio = alpha_ratio
        self.l1_ratio = l1_ratio
        self.n_alphas = n_alphas
        self.max_iter = max_iter

    def fit(self, X, y):
        from sksurv.linear_model import CoxnetSurvivalAnalysis

        X = np.asarray(X, dtype=float)
        n = 1 if self.alpha_ratio >= 1 else int(self.n_alphas)
        m = CoxnetSurvivalAnalysis(l1_ratio=self.l1_ratio, n_alphas=n, alpha_min_ratio=min(float(self.alpha_ratio), 1.0),
                                   fit_baseline_model=True, max_iter=self.max_iter)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="all coefficients are zero")
            warnings.filterwarnings("ignore", category=UserWarning, module="sksurv")
            m.fit(X, y)
        self.model_ = m
        self.alpha_ = float(m.alphas_[-1])
        self.coef_ = np.asarray(m.coef_[:, -1], dtype=float)
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X) -> np.ndarray:
        """Risk score (linear predictor; higher = worse outcome), shape (n_samples,)."""
        return self.model_.predict(np.asarray(X, dtype=float), alpha=self.alpha_)

    def predict_survival_function(self, X, return_array: bool = False):
        """Breslow survival functions S(t | x) of the samples (scikit-survival step functions)."""
        return self.model_.predict_survival_function(np.asarray(X, dtype=float), alpha=self.alpha_,
                                                     return_array=return_array)

    def score(self, X, y) -> float:
        """Harrell's concordance index of :meth:`predict` (scikit-survival), the inner search's criterion."""
        from sksurv.metrics import concordance_index_censored

        event, time = _surv_fields(y)
        return float(concordance_index_censored(event, time, self.predict(X))[0])


def _surv_fields(y) -> tuple[np.ndarray, np.ndarray]:
    names = y.dtype.names
    return np.asarray(y[names[0]], dtype=bool), np.asarray(y[names[1]], dtype=float)


def concordance_scores(X, y) -> np.ndarray:
    """Univariate score of each column for survival: ``|Harrell's C - 0.5|`` (scikit-survival), shape (n_features,).

    The score function of the survival pipeline's ``SelectKBest`` (it sees training folds only).
    """
    from sksurv.metrics import concordance_index_censored

    event, time = _surv_fields(y)
    X = np.asarray(X, dtype=float)
    out = np.zeros(X.shape[1])
    for j in range(X.shape[1]):
        col = X[:, j]
        if np.ptp(col) > 0:
            out[j] = abs(concordance_index_censored(event, time, col)[0] - 0.5)
    return out


def survival_pipeline(*, k_best: int | None = None, n_alphas: int = 20) -> Pipeline:
    """The default survival model (an unfitted Pipeline; see the module docstring).

    ``k_best``: keep the k features of highest univariate concordance before the Cox model (inside the
    training folds); None = all (the elastic net selects on its own).
    """
    steps = [("impute", SimpleImputer(strategy="median", keep_empty_features=True)), ("scale", StandardScaler())]
    if k_best:
        steps.append(("select", SelectKBest(concordance_scores, k=int(k_best))))
    steps.append(("model", ElasticNetCox(n_alphas=n_alphas)))
    return Pipeline(steps)


def classifier_pipeline(*, k_best: int | None = None, elastic_net: bool = False, max_iter: int = 2000,
                        seed: int = 0) -> Pipeline:
    """The default classifier: penalised logistic regression after imputation and scaling.

    ``elastic_net``: the saga solver with an ``l1_ratio`` to tune; default ridge (lbfgs, ``l1_ratio=0``).
    """
    import sklearn
    from sklearn.linear_model import LogisticRegression

    old = tuple(int(v) for v in sklearn.__version__.split(".")[:2]) < (1, 8)  # 1.8 deprecated `penalty`
    if elastic_net:
        kw = dict(solver="saga", max_iter=max_iter, C=1.0, l1_ratio=0.5, random_state=seed)
        if old:
            kw["penalty"] = "elasticnet"
    else:
        kw = dict(solver="lbfgs", max_iter=max_iter, C=1.0, l1_ratio=0.0)
        if old:
            kw = dict(solver="lbfgs", max_iter=max_iter, C=1.0)
    steps = [("impute", SimpleImputer(strategy="median", keep_empty_features=True)), ("scale", StandardScaler())]
    if k_best:
        steps.append(("select", SelectKBest(f_classif, k=int(k_best))))
    steps.append(("model", LogisticRegression(**kw)))
    return Pipeline(steps)


def model_coefficients(pipeline: Pipeline, feature_names) -> np.ndarray:
    """Coefficients of a fitted pipeline's final model mapped back to the input features (0 where dropped).

    Shape (n_features,) for a Cox model or a binary classifier, (n_classes, n_features) for several classes.
    """
    coef = np.atleast_2d(np.asarray(pipeline[-1].coef_, dtype=float))
    keep = np.ones(len(feature_names), dtype=bool)
    if "select" in pipeline.named_steps:
        keep = pipeline.named_steps["select"].get_support()
    out = np.zeros((coef.shape[0], len(feature_names)))
    out[:, keep] = coef
    return out[0] if out.shape[0] == 1 else out
