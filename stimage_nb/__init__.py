"""stimage_nb: spatial gene expression and cell types from H&E, with calibrated uncertainty.

Sub-namespaces: :mod:`stimage_nb.io` (sections, images, readers), :mod:`stimage_nb.tiles`,
:mod:`stimage_nb.train`, :mod:`stimage_nb.predict`, :mod:`stimage_nb.evaluate`,
:mod:`stimage_nb.plotting`, :mod:`stimage_nb.qupath`, :mod:`stimage_nb.omero`, :mod:`stimage_nb.widgets`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import io  # noqa: E402
from .errors import StimageInputError, WeightsUnavailableError  # noqa: E402

__all__ = ["io", "StimageInputError", "WeightsUnavailableError", "__version__"]
