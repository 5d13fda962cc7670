"""JupyterLab panels (needs the ``jupyter`` extra: ipywidgets + anywidget).

- :class:`OverlayViewer` (:mod:`.viewer`): the slide with pan/zoom over its pyramid, predicted genes or
  cell types on top (mean / aleatoric / epistemic), opacity, gene search, spot values, QuPath export
  and OMERO push. Its canvas, :class:`SlideCanvas`, is an anywidget whose JavaScript ships in
  ``stimage_nb/widgets/static`` (no CDN).
- :class:`OmeroPanel` (:mod:`.omero_panel`): login (password never echoed or kept), project / dataset /
  image browser with thumbnails, pull as OME-Zarr with progress.
- :class:`TrainingPanel` (:mod:`.training_panel`): sections, genes, backbone, members, epochs; live loss
  curves; cancel keeps the last checkpoint.

Every panel reports through trait values (``status``, ...) so it can be tested without a browser.
"""

from __future__ import annotations

__all__ = ["OverlayViewer", "SlideCanvas", "OmeroPanel", "TrainingPanel"]

_WHERE = {"OverlayViewer": ".viewer", "SlideCanvas": ".viewer", "OmeroPanel": ".omero_panel",
          "TrainingPanel": ".training_panel"}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
