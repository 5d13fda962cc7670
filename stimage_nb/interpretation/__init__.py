"""Interpretation: which nuclei (and which pixels) drive a predicted gene, measured to be faithful.

>>> from stimage_nb.ensemble import Ensemble                                       # doctest: +SKIP
>>> from stimage_nb import interpretation as ip
>>> ens = Ensemble.load("runs/c")
>>> attr = ip.explain(ens, section, genes=["EPCAM", "CD3D"], top_k=5)           # SHAP values of nuclei
>>> attr.explanation(attr.spots.index[0])                                          # a shap.Explanation
>>> faith = ip.faithfulness(attr, ens, section)                                    # deletion/insertion, sanity
>>> ip.summarise(attr).correlation                                                 # morphology vs attribution
>>> ip.export_qupath_nuclei(attr, "C3.nuclei.geojson")                            # QuPath cells "SHAP <gene>"

- **Nuclei** without downloaded weights (:func:`segment_nuclei` of an array, :func:`segment_slide` of a
  slide with its seams handled; colour deconvolution, threshold, distance-transform watershed,
  ``regionprops`` morphology in µm), from QuPath (:func:`nuclei_from_qupath`), or StarDist/Cellpose with
  the user's weights (``method=``).
- **Attributions** of the ensemble's predictive mean (:func:`explain` -> :class:`Attributions`): the
  nuclei and the background between them are the players of a ``shap`` game (permutation or
  partition explainer, LIME's surrogate over the same players, or expected gradients for timm
  backbones); :func:`pixel_map` for pixel-level maps.
- **Faithfulness** (:func:`faithfulness` -> :class:`Faithfulness`): deletion/insertion curves against
  random and size orders with bootstrap CIs, and the randomised-heads check.
- **Summaries** (:func:`summarise`, :func:`plot_summary`, :func:`plot_spot`) and **exports** (QuPath
  cells, OME-Zarr labels + heatmaps; the OMERO push lives in :mod:`stimage_nb.omero.attributions`).
- Command line: ``stimage-nb interpret`` (:mod:`._cli`). Guide: ``docs/interpretation.md``.
"""

from __future__ import annotations

# Names are imported on first use (as stimage_nb.widgets does): `stimage-nb --help` and the other
# commands do not pay for importing shap, numba and scikit-image.
_WHERE = {
    "add_cli": "._cli",
    **dict.fromkeys(["DEFAULT_MAX_EVALS", "METHODS", "choose_spots", "explain", "explain_tile", "pixel_map",
                     "spot_game"], "._explain"),
    **dict.fromkeys(["export_attributions", "export_qupath_nuclei", "nuclei_adata", "write_attribution_ome_zarr"],
                    "._export"),
    **dict.fromkeys(["Faithfulness", "faithfulness", "plot_curves"], "._faithfulness"),
    **dict.fromkeys(["NucleusMasker", "TileGame", "TilePredictor", "build_game", "is_differentiable",
                     "randomised_heads"], "._game"),
    **dict.fromkeys(["MORPHOLOGY", "Nuclei", "SegmentationParams", "hematoxylin_od", "nuclei_from_qupath",
                     "segment_nuclei", "segment_slide"], "._nuclei"),
    **dict.fromkeys(["Attributions", "additivity_error", "read_attributions", "value_column"], "._result"),
    **dict.fromkeys(["AttributionSummary", "plot_spot", "plot_summary", "summarise"], "._summary"),
}

__all__ = [
    # nuclei
    "Nuclei", "SegmentationParams", "segment_nuclei", "segment_slide", "nuclei_from_qupath", "hematoxylin_od",
    "MORPHOLOGY",
    # attributions
    "explain", "explain_tile", "pixel_map", "choose_spots", "spot_game", "Attributions", "read_attributions",
    "additivity_error", "value_column", "METHODS", "DEFAULT_MAX_EVALS",
    # the game behind them
    "TileGame", "build_game", "NucleusMasker", "TilePredictor", "is_differentiable", "randomised_heads",
    # faithfulness, summaries, exports
    "faithfulness", "Faithfulness", "plot_curves", "summarise", "AttributionSummary", "plot_summary", "plot_spot",
    "export_qupath_nuclei", "write_attribution_ome_zarr", "export_attributions", "nuclei_adata",
    # command line
    "add_cli",
]


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
