"""Outcome analysis: slide- or patient-level features (e.g. predicted pseudo-bulk expression) against survival
and clinical status, with nested cross-validation and the baselines measured in the same run.

>>> from stimage_nb import outcomes as oc                                         # doctest: +SKIP
>>> X = oc.patient_features(features_table)                 # slides averaged per patient
>>> y = oc.tcga_outcome("PFI")                              # or oc.survival_outcome(clinical_table)
>>> X, y = oc.align(X, y)
>>> res = oc.nested_cv_survival(X, y)                       # penalised Cox, nested CV
>>> print(res.harrell_c, res.uno_c); res.plot_km()
>>> comp = oc.compare(X, y, clinical=oc.clinical_covariates(), n_random=20)   # + baselines

Everything statistical comes from scikit-learn, scikit-survival and lifelines; this package arranges the
protocol (:mod:`~._cv`: every imputation, scaling and selection step is fitted inside the training folds)
and the records. Modules: :mod:`~._estimators` (pipelines), :mod:`~._survival`, :mod:`~._classify`,
:mod:`~._compare` (baselines), :mod:`~._agreement` (pseudo-bulk vs bulk), :mod:`~._simulate` (degraded
bulk), :mod:`~._tcga` (the bundle's TCGA tables), :mod:`~._tables` (input tables), :mod:`~.cli`
(``stimage-nb outcomes``).
"""

from __future__ import annotations

from ._agreement import AgreementResult, pseudobulk_agreement
from ._classify import nested_cv_classifier
from ._compare import compare
from ._cv import CVParams
from ._estimators import ElasticNetCox, classifier_pipeline, concordance_scores, survival_pipeline
from ._results import ClassificationResult, Comparison, Estimate, SurvivalResult
from ._simulate import degrade_to_accuracy
from ._survival import as_surv, default_times, nested_cv_survival, risk_group_logrank
from ._tables import align, class_target, patient_features, read_table, survival_outcome
from ._tcga import (
    ENDPOINTS,
    SurvPathBrca,
    TcgaBulk,
    clinical_covariates,
    her2_amplification,
    stage_group,
    tcga_brca_bulk,
    tcga_brca_survpath,
    tcga_cdr,
    tcga_outcome,
)

__all__ = [
    "CVParams", "nested_cv_survival", "nested_cv_classifier", "compare", "pseudobulk_agreement",
    "degrade_to_accuracy", "SurvivalResult", "ClassificationResult", "Comparison", "AgreementResult", "Estimate",
    "ElasticNetCox", "survival_pipeline", "classifier_pipeline", "concordance_scores", "as_surv", "default_times",
    "risk_group_logrank", "read_table", "patient_features", "survival_outcome", "class_target", "align",
    "tcga_cdr", "tcga_outcome", "clinical_covariates", "tcga_brca_bulk", "her2_amplification", "tcga_brca_survpath",
    "TcgaBulk", "SurvPathBrca", "stage_group", "ENDPOINTS",
]
