"""Exceptions raised for bad input.

Every error a user can cause by handing us the wrong thing is a :class:`StimageInputError`
(a ``ValueError``), and its message names the offending file and the fix.
"""

from __future__ import annotations


class StimageInputError(ValueError):
    """Input that cannot be used as given (wrong path, corrupt image, mismatched ids, ...)."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be obtained (offline, missing file)."""
