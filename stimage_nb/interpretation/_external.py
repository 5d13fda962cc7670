"""Optional nucleus segmenters that need the user's own weights: StarDist and Cellpose.

Neither is a dependency of the package, and neither may download weights at run time (air-gapped
nodes, CI): both are loaded from a local ``model_path`` only. Without the package or the path the
caller gets a one-line :class:`~stimage_nb.errors.StimageInputError` naming the fix; the default,
weights-free watershed (:func:`stimage_nb.interpretation.segment_nuclei`) always works.

- **StarDist** (Schmidt et al. 2018): ``model_path`` is a model folder (``config.json`` +
  ``weights_best.h5``, e.g. the H&E model ``2D_versatile_he`` unpacked), loaded with
  ``StarDist2D(None, name=folder.name, basedir=folder.parent)``; the RGB image is normalised to its
  1st–99.8th percentiles (``csbdeep.utils.normalize``) and ``predict_instances`` returns the labels.
- **Cellpose** (Stringer et al. 2021): ``model_path`` is a weights file, loaded with
  ``models.CellposeModel(pretrained_model=path)``; it is given the haematoxylin OD (nuclei bright on
  a dark background, as its nucleus models expect) and a nucleus diameter of 8 µm in pixels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import StimageInputError

NUCLEUS_DIAMETER_UM = 8.0
_INSTALL = {"stardist": "pip install stardist tensorflow", "cellpose": "pip install cellpose"}


def _require(method: str, model_path) -> Path:
    import importlib.util

    if importlib.util.find_spec(method) is None:
        raise StimageInputError(f"nucleus segmentation with {method} needs the {method} package, which is not "
                                f"installed ({_INSTALL[method]}), and your local weights (--nuclei-model PATH). "
                                "Without them use the default weights-free watershed (method='watershed').")
    if model_path is None:
        raise StimageInputError(f"{method} needs local weights: pass model_path= (CLI --nuclei-model PATH); "
                                "stimage_nb never downloads weights at run time.")
    p = Path(model_path)
    if not p.exists():
        raise StimageInputError(f"{p}: {method} weights not found.")
    return p


def external_labels(rgb: np.ndarray, um_per_px: float, method: str, model_path: str | os.PathLike | None) -> np.ndarray:
    """An int32 nucleus label image from StarDist or Cellpose with local weights (module docstring)."""
    p = _require(method, model_path)
    if method == "stardist":  # pragma: no cover - needs the optional package and weights
        from csbdeep.utils import normalize
        from stardist.models import StarDist2D

        folder = p if p.is_dir() else p.parent
        model = StarDist2D(None, name=folder.name, basedir=str(folder.parent))
        labels, _ = model.predict_instances(normalize(rgb.astype(np.float32), 1, 99.8, axis=(0, 1, 2)))
        return np.asarray(labels, dtype=np.int32)
    if method == "cellpose":  # pragma: no cover - needs the optional package and weights
        from cellpose import models

        from ._nuclei import hematoxylin_od

        model = models.CellposeModel(pretrained_model=str(p))
        out = model.eval(hematoxylin_od(rgb), diameter=NUCLEUS_DIAMETER_UM / float(um_per_px))
        return np.asarray(out[0], dtype=np.int32)
    raise StimageInputError(f"unknown external segmenter {method!r}")
