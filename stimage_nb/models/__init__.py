"""The model layer: timm backbones, the negative-binomial gene head and the cell-type head.

- :mod:`.backbone`: :func:`create_backbone` (any timm name; weights none / local file / hub, never a hang)
- :mod:`.nb`: the negative-binomial log-likelihood and variance in the (mean, dispersion) form
- :mod:`.heads`: :class:`NBHead`, :class:`CellTypeHead`, :func:`soft_cross_entropy`
- :mod:`.features`: frozen extractors (:class:`KMeansExtractor`, handcrafted statistics, a timm backbone)
  and :class:`FeatureStack`, the offline default's ``"kmeans+handcrafted"`` features
- :mod:`.model`: :class:`STModel` (one ensemble member) and :func:`build_model`
- :mod:`.encoders`: the registry of pathology foundation encoders (UNI, Virchow2, H-optimus...), built from
  timm and loaded offline from local files
"""

from . import encoders
from .backbone import (
                       create_backbone,
                       hub_reachable,
                       load_local_weights,
                       normalisation_of,
)
from .features import (
                       FeatureStack,
                       HandcraftedExtractor,
                       KMeansExtractor,
                       TimmExtractor,
                       build_stack,
                       parse_extractor,
)
from .heads import CellTypeHead, MLPHead, NBHead, labels_to_targets, soft_cross_entropy
from .model import Output, STModel, build_model
from .nb import moment_init, nb_log_prob, nb_nll, nb_variance, to_torch_distribution

__all__ = [
                       "CellTypeHead",
                       "FeatureStack",
                       "HandcraftedExtractor",
                       "KMeansExtractor",
                       "MLPHead",
                       "NBHead",
                       "Output",
                       "STModel",
                       "TimmExtractor",
                       "build_model",
                       "build_stack",
                       "create_backbone",
                       "encoders",
                       "hub_reachable",
                       "labels_to_targets",
                       "load_local_weights",
                       "moment_init",
                       "nb_log_prob",
                       "nb_nll",
                       "nb_variance",
                       "normalisation_of",
                       "parse_extractor",
                       "soft_cross_entropy",
                       "to_torch_distribution",
]
