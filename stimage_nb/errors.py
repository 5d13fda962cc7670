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
class TrainingDivergedError(StimageInputError, FloatingPointError):
    """The training loss became NaN or infinite: the settings (usually the learning rate) are too aggressive
    for these data. The message names the member, the epoch and the setting to lower."""


class DataUnavailableError(RuntimeError):
    """Public data was asked for but is neither on this machine nor downloadable now (offline, server
    down, a checksum that does not match). The message says what is missing and how to get it."""


#: Exit status of a command line that stopped on bad input, missing data or an unusable service.
EXIT_INPUT = 2
#: Exit status of a command line stopped by Ctrl-C (128 + SIGINT, the shell's convention).
EXIT_INTERRUPTED = 130
#: Exit status of an unexpected internal error (a bug: the message asks for a report).
EXIT_INTERNAL = 1


def one_line(text: object, limit: int = 600) -> str:
    """``text`` on one line (whitespace runs collapsed), at most ``limit`` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def describe_error(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit status a command line reports for ``exc``.

    The whole kind, not its examples: every error a user can cause (a wrong path, a corrupt or
    truncated file, a missing gene, no network, a dropped connection, a full disk) is reported in one
    line with exit status :data:`EXIT_INPUT` (2) and never as a traceback. Errors this package raises
    for bad input already name the file and the fix; errors raised by the libraries that read files
    (``OSError`` and its kin from Pillow, h5py, gzip; ``ValueError``/``KeyError`` from pandas, json,
    zarr) are prefixed with their type. Anything else is a bug: one line that says so, exit status
    :data:`EXIT_INTERNAL` (1); ``--verbose`` shows the traceback.
    """
    import errno
    import json
    import zlib

    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C); files are written atomically, so re-running the same command resumes " \
               "or redoes the step", EXIT_INTERRUPTED
    if isinstance(exc, (StimageInputError, WeightsUnavailableError, DataUnavailableError)):
        return one_line(exc), EXIT_INPUT
    # OMERO failures (connection lost, login, permission, not found) subclass omero.connection.OmeroError; matched
    # by name so that this bottom layer imports nothing above it.
    if any(c.__name__ == "OmeroError" for c in type(exc).__mro__):
        return one_line(exc), EXIT_INPUT
    if isinstance(exc, ImportError):  # an optional dependency that is not installed (the message names it)
        return one_line(exc), EXIT_INPUT
    if isinstance(exc, MemoryError):
        return "out of memory (MemoryError): use a smaller --batch-size, fewer sections at a time, or a " \
               "machine with more memory", EXIT_INPUT
    if isinstance(exc, OSError):
        where = exc.filename if getattr(exc, "filename", None) else None
        if exc.errno == errno.ENOSPC:
            return one_line(f"no space left on the device{f' writing {where}' if where else ''}: free some space "
                            "or point --out / STIMAGE_NB_CACHE elsewhere"), EXIT_INPUT
        if isinstance(exc, ConnectionError) or exc.__class__.__module__.startswith(("requests", "urllib3")):
            return one_line(f"network error ({type(exc).__name__}: {exc}); check the connection and run the "
                            "command again"), EXIT_INPUT
        if where and exc.strerror:
            return one_line(f"{where}: {exc.strerror}"), EXIT_INPUT
        return one_line(f"{type(exc).__name__}: {exc}"), EXIT_INPUT
    if isinstance(exc, (EOFError, zlib.error, UnicodeError, json.JSONDecodeError)):
        return one_line(f"a file is truncated or corrupt ({type(exc).__name__}: {exc})"), EXIT_INPUT
    if isinstance(exc, (ValueError, KeyError, IndexError, LookupError)):
        return one_line(f"{type(exc).__name__}: {exc}"), EXIT_INPUT
    return one_line(f"internal error ({type(exc).__name__}: {exc}); run again with --verbose for the traceback "
                    "and report it"), EXIT_INTERNAL
