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

import importlib

# name -> private module; imported on first use (PEP 562), so `stimage-nb --help` does not load scikit-learn
_EXPORTS = {
    "CVParams": "_cv", "nested_cv_survival": "_survival", "nested_cv_classifier": "_classify", "compare": "_compare",
    "pseudobulk_agreement": "_agreement", "pseudobulk_log_cp10k": "_agreement", "degrade_to_accuracy": "_simulate", "SurvivalResult": "_results",
    "ClassificationResult": "_results", "Comparison": "_results", "AgreementResult": "_agreement",
    "Estimate": "_results", "ElasticNetCox": "_estimators", "survival_pipeline": "_estimators",
    "classifier_pipeline": "_estimators", "concordance_scores": "_estimators", "as_surv": "_survival",
    "default_times": "_survival", "risk_group_logrank": "_survival", "read_table": "_tables",
    "patient_features": "_tables", "survival_outcome": "_tables", "class_target": "_tables", "align": "_tables",
    "tcga_cdr": "_tcga", "tcga_outcome": "_tcga", "clinical_covariates": "_tcga", "tcga_brca_bulk": "_tcga",
    "her2_amplification": "_tcga", "tcga_brca_survpath": "_tcga", "TcgaBulk": "_tcga", "SurvPathBrca": "_tcga",
    "stage_group": "_tcga", "ENDPOINTS": "_tcga",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
