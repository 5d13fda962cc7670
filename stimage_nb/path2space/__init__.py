"""The published Path2Space model (Shulman et al., Cell 2026) inside this package.

``stimage-nb import-model path2space --weights DIR --out RUN`` turns the published weights directory
(CTransPath ``ctranspath.pth``, the 22 x 7 ensemble of two-layer ReLU MLPs
``mlp_ensemble/result_{ik}_{il}_0/model_trained.pth``, ``genes.txt``) into an
:class:`~stimage_nb.ensemble.Ensemble`: the same preprocessing (224-px tiles of 100 µm, Macenko to the
same fixed target, ImageNet normalisation) and the same averaging order for the mean (inner mean over
the 7 folds, outer over the 22), plus what Path2Space does not give: the spread across its 154 members as
epistemic variance, the domain-shift score (against reference sections the user names), and every
export and evaluation of this package. Its neighbourhood smoothing is :func:`stimage_nb.smoothing.smooth_prediction`.

- :func:`import_path2space`, :func:`read_layout`, :class:`Path2SpaceLayout`, :func:`read_genes`
"""

from ._import import DIFFERENCES, OUT_PX, TILE_UM, import_path2space
from ._layout import Path2SpaceLayout, read_genes, read_layout

__all__ = ["DIFFERENCES", "OUT_PX", "TILE_UM", "Path2SpaceLayout", "import_path2space", "read_genes", "read_layout"]
