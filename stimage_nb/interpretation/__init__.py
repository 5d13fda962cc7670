"""Interpretation (placeholder while building)."""
from ._explain import explain, explain_tile, pixel_map
from ._nuclei import Nuclei, SegmentationParams, nuclei_from_qupath, segment_nuclei, segment_slide
from ._result import Attributions, read_attributions
