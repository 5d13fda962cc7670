"""Exceptions raised for bad input.

Every error a user can cause by handing us the wrong thing is a :class:`StimageInputError`
(a ``ValueError``), and its message names the offending file and the fix.
"""

from __future__ import annotations


class StimageInputError(ValueError):
    """Input that cannot be used as given (wrong path, corrupt image, mismatched ids, ...)."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be obtained (offline, missing file)."""


class SlideReadError(StimageInputError):
    """A slide that cannot be read: a format no lazy reader handles, a truncated file, a tile that fails to decode.

    ``source`` is the file; ``level`` and ``box`` (x0, y0, x1, y1 in that level's pixels) say where, when
    a tile is at fault. A cohort run catches it per slide and goes on with the next one.
    """

    def __init__(self, message: str, *, source: str = "", level: int | None = None,
                 box: tuple[int, int, int, int] | None = None):
        super().__init__(message)
        self.source, self.level, self.box = source, level, box
