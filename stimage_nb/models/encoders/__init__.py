"""Pathology foundation encoders: a registry of the field's published models, built from timm, loaded offline.

``stimage-nb encoders`` lists them. Each :class:`Encoder` entry records the timm architecture and its
arguments, the input size, normalisation, magnification (µm/px), output pooling, checkpoint layout,
licence/gating and where the weights come from (values from the model cards, cited per entry).

- :func:`load_encoder` (what ``--backbone NAME --weights PATH`` uses): build an entry and load a local
  ``.safetensors``/``.bin`` file or a downloaded Hugging Face folder without any network access.
- :func:`find_encoder` / :func:`get_encoder` / :func:`list_encoders`: the registry.
- :func:`identify`: which registered encoder a state dict seems to belong to.
- :func:`meta_module`, :func:`standin_overrides`, :func:`to_published_layout`: shapes without memory,
  small stand-ins of each family, and the published key layout (fixtures, tests, benchmarks).
"""

from ._arch import (
    AttentionalPooler,
    ConchVisual,
    ConvStem,
    EncoderModule,
    build_module,
    meta_module,
    parameter_count,
    standin_overrides,
)
from ._load import check_weights, load_encoder
from ._registry import ENCODERS, LAYOUTS, OUTPUTS, Encoder, find_encoder, get_encoder, list_encoders
from ._weights import (
    WeightsSource,
    identify,
    provenance,
    read_shapes,
    read_tensors,
    resolve_weights,
    sha256_of,
    to_published_layout,
    to_timm_layout,
)

__all__ = [
    "ENCODERS",
    "LAYOUTS",
    "OUTPUTS",
    "AttentionalPooler",
    "ConchVisual",
    "ConvStem",
    "Encoder",
    "EncoderModule",
    "WeightsSource",
    "build_module",
    "check_weights",
    "find_encoder",
    "get_encoder",
    "identify",
    "list_encoders",
    "load_encoder",
    "meta_module",
    "parameter_count",
    "provenance",
    "read_shapes",
    "read_tensors",
    "resolve_weights",
    "sha256_of",
    "standin_overrides",
    "to_published_layout",
    "to_timm_layout",
]
