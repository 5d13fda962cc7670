"""Cohorts of slides: prediction on a Dask cluster and slide-level features for outcome analysis.

- :func:`predict_cohort`: a cohort table (:func:`read_cohort`: local paths, ``omero:<id>``,
  ``gdc:<uuid>`` with a patient id) → one Dask task per slide (tissue grid → ensemble →
  ``OUT/slides/<slide>.h5ad``), resumable, a failed slide recorded with its error while the rest go on;
  then :func:`cohort_features`. CLI: ``stimage-nb cohort predict``.
- :func:`cohort_features`: one row per slide: pseudo-bulk (:func:`pseudobulk`, with its uncertainty
  propagated from the aleatoric and epistemic variances), predicted cell-type composition, spatial
  types (:func:`fit_spatial_types`: spots of the whole cohort clustered on predicted expression) with
  each slide's composition and neighbourhood enrichment, PAM50-like calls (:func:`subtype_calls`).
  CLI: ``stimage-nb cohort features``.
- neighbourhood smoothing of any prediction: :func:`stimage_nb.smoothing.smooth_prediction`.
- :func:`resolve_slide`: where a slide comes from; the GDC download hook (:data:`GDC_RESOLVER`).

Where the tasks run: :mod:`stimage_nb.cluster`. The method and the variance derivation: ``docs/cohort.md``.
"""

from ._features import CohortFeatures, FeatureOptions, cohort_features, write_features
from ._predict import CohortResult, predict_cohort, predict_slide, read_status
from ._pseudobulk import PseudoBulk, pseudobulk, weighted_mean_var
from ._subtype import SubtypeCalls, read_centroids, subtype_calls
from ._table import GDC_RESOLVER, CohortSlide, read_cohort, resolve_slide
from ._types import SpatialTypes, fit_spatial_types, type_features

__all__ = ["predict_cohort", "CohortResult", "predict_slide", "read_status", "read_cohort", "CohortSlide",
           "resolve_slide", "GDC_RESOLVER", "cohort_features", "FeatureOptions", "CohortFeatures", "write_features",
           "pseudobulk", "PseudoBulk", "weighted_mean_var", "fit_spatial_types", "SpatialTypes",
           "type_features", "subtype_calls", "SubtypeCalls", "read_centroids"]
