"""The model layer: timm backbones, the negative-binomial gene head and the cell-type head.

- :mod:`.backbone`: :func:`create_backbone` (any timm name; weights none / local file / hub, never a hang)
- :mod:`.nb`: the negative-binomial log-likelihood and variance in the (mean, dispersion) form
- :mod:`.heads`: :class:`NBHead`, :class:`CellTypeHead`, :func:`soft_cross_entropy`
- :mod:`.model`: :class:`STModel` (one ensemble member) and :func:`build_model`
"""

from .backbone import create_backbone, hub_reachable, load_local_weights, normalisation_of
from .heads import CellTypeHead, NBHead, labels_to_targets, soft_cross_entropy
from .model import Output, STModel, build_model
from .nb import moment_init, nb_log_prob, nb_nll, nb_variance, to_torch_distribution

__all__ = ["create_backbone", "hub_reachable", "load_local_weights", "normalisation_of", "CellTypeHead", "NBHead",
           "labels_to_targets", "soft_cross_entropy", "Output", "STModel", "build_model", "moment_init",
           "nb_log_prob", "nb_nll", "nb_variance", "to_torch_distribution"]
