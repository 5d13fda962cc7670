"""stimage_nb: spatial gene expression and cell types from H&E, with calibrated uncertainty.

Sub-namespaces: :mod:`stimage_nb.io` (sections, images, readers), :mod:`stimage_nb.tiles`,
:mod:`stimage_nb.train`, :mod:`stimage_nb.predict`, :mod:`stimage_nb.evaluate`,
:mod:`stimage_nb.plotting`, :mod:`stimage_nb.qupath`, :mod:`stimage_nb.omero`, :mod:`stimage_nb.widgets`.
"""

from __future__ import annotations

import os as _os

# OpenMP threads that spin while waiting make PyTorch 10-100x slower on a CPU shared with other
# processes (measured: test_resnet training step 1.3 ms/tile with 1 thread, 30-130 ms with 2
# spinning threads on a busy 2-core machine; 1.9 ms with passive waiting). Must precede `import torch`.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

from . import io  # noqa: E402
from .errors import StimageInputError, WeightsUnavailableError  # noqa: E402

__all__ = ["io", "StimageInputError", "WeightsUnavailableError", "__version__"]
