"""Names that come from data and become identifiers elsewhere: one rule, reversible, checked up front.

Gene symbols, cell types and section names are data (``HLA-DRB1/3``, ``NK/T cells``, the her2st minor
tier's ``CAFs MSC/iCAF-like``), but they end up as identifiers in systems with their own rules:

=================  ====================================================================  ========================
target             refuses                                                               source of the rule
=================  ====================================================================  ========================
``omero_column``   ``/`` (the server rejects the whole table), NUL, ``""``, ``"."``      PyTables node names
``zarr_key``       ``/``, ``\\``, control characters, names of dots only, a ``__`` start   Zarr v2/v3 node names
``h5_key``         ``/``, NUL, ``"."``                                                   HDF5 link names (h5ad)
``file_name``      ``/ \\ : * ? " < > |``, control characters, dots only, a trailing     POSIX + Windows
                   dot or space, Windows device names (``CON``, ``NUL``, ``COM1``, ...)
``qupath_class``   ``:`` (QuPath splits derived classes on it), line breaks, leading or  ``PathClass.fromString``
                   trailing blanks (stripped)
=================  ====================================================================  ========================

The rule is percent-encoding (RFC 3986 style, UTF-8 bytes as ``%XX``) of exactly the characters a
target refuses, and then of every ``%`` too, so it is injective and :func:`original_name` (``unquote``)
maps every safe name back (a name that needs no change keeps its ``%``, e.g. ``B 50%``): ``NK/T cells`` → ``NK%2FT cells`` as an OMERO.table column and a zarr key,
unchanged as a QuPath class; ``T cells: CD8`` → ``T cells%3A CD8`` as a QuPath class. Names that need
no change stay as they are. :func:`name_mapping` does a whole list at once and returns a typed
result that says what changes, so a push shows it in its dry run before anything is written.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Iterable, Sequence
from urllib.parse import unquote

from .errors import StimageInputError

log = logging.getLogger(__name__)

_CONTROL = "".join(chr(i) for i in range(32)) + "\x7f"
_ENCODED = re.compile(r"%[0-9A-Fa-f]{2}")  # what urllib.parse.unquote decodes
#: Characters each target refuses (``%`` is always encoded too, so that decoding is exact).
REFUSED = {
    "omero_column": "/\x00",
    "zarr_key": "/\\" + _CONTROL,
    "h5_key": "/\x00",
    "file_name": '/\\:*?"<>|' + _CONTROL,
    "qupath_class": ":\n\r",
}
TARGETS = tuple(REFUSED)
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def _enc(ch: str) -> str:
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8"))


def safe_name(name: object, target: str) -> str:
    """``name`` as an identifier ``target`` accepts (see the module table); unchanged when it already is.

    Raises
    ------
    StimageInputError
        An empty name (no target accepts one) or an unknown target.
    """
    if target not in REFUSED:
        raise StimageInputError(f"unknown name target {target!r}; one of {TARGETS}")
    s = str(name)
    if s == "" or (target == "qupath_class" and not s.strip()):
        raise StimageInputError(f"an empty name cannot be a {target.replace('_', ' ')}")
    # A '%' is left alone in a name that needs no change and holds no '%XX' (so decoding leaves it as it is);
    # once anything is encoded, every '%' is too, which keeps decoding exact.
    plain = not _ENCODED.search(s)
    out = _encode(s, target, pct=not plain)
    if plain and out != s:
        out = _encode(s, target, pct=True)
    return out


def _encode(s: str, target: str, *, pct: bool) -> str:
    bad = REFUSED[target] + ("%" if pct else "")
    out = "".join(_enc(c) if c in bad else c for c in s)
    if target in ("zarr_key", "file_name", "h5_key", "omero_column") and set(out) == {"."}:
        out = _enc(".") + out[1:]                                  # "." and ".." are path steps, not names
    if target == "zarr_key" and out.startswith("__"):
        out = _enc("_") + out[1:]                                  # "__" prefixes are reserved by Zarr v3
    if target == "file_name":
        if out[-1] in ". ":
            out = out[:-1] + _enc(out[-1])                         # Windows drops a trailing dot or space
        if out.split(".")[0].upper() in _WINDOWS_DEVICES:
            out = _enc(out[0]) + out[1:]                           # CON, NUL.txt, ... name devices on Windows
    if target == "qupath_class":
        lead, trail = len(out) - len(out.lstrip()), len(out) - len(out.rstrip())
        if lead or trail:                                          # QuPath strips them: keep them as escapes
            out = "".join(map(_enc, out[:lead])) + out[lead:len(out) - trail] + "".join(map(_enc, out[len(out) - trail:]))
    return out


def original_name(safe: str) -> str:
    """The name :func:`safe_name` was given (percent-decoding; names that needed no change come back as they are)."""
    return unquote(str(safe))


def is_safe(name: object, target: str) -> bool:
    """Whether ``name`` needs no change to be a ``target`` identifier."""
    return safe_name(name, target) == str(name)


@dataclass(frozen=True)
class NameMapping:
    """Names and their safe forms for one target; ``renamed`` lists only the ones that change."""

    target: str
    original: tuple[str, ...]
    safe: tuple[str, ...]

    @property
    def renamed(self) -> dict[str, str]:
        """``{original: safe}`` of the names that change."""
        return {o: s for o, s in zip(self.original, self.safe) if o != s}

    def __getitem__(self, original: str) -> str:
        return self.safe[self.original.index(original)]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"original": self.original, "safe": self.safe,
                             "changed": [o != s for o, s in zip(self.original, self.safe)]})

    def to_json(self) -> str:
        return json.dumps({"target": self.target, "renamed": self.renamed}, ensure_ascii=False)

    def describe(self, what: str = "names") -> str:
        """One line for logs and dry runs: which names change, and how."""
        if not self.renamed:
            return f"all {len(self.original)} {what} are valid {self.target.replace('_', ' ')}s"
        shown = ", ".join(f"{o!r} -> {s!r}" for o, s in list(self.renamed.items())[:8])
        more = f" (+{len(self.renamed) - 8} more)" if len(self.renamed) > 8 else ""
        return (f"{len(self.renamed)} of {len(self.original)} {what} are not valid {self.target.replace('_', ' ')}s "
                f"and are written percent-encoded (stimage_nb.names; original_name() maps them back): {shown}{more}")


def name_mapping(names: Iterable[object], target: str) -> NameMapping:
    """The safe form of every name for ``target``; refuses duplicates (two columns of one name)."""
    orig = tuple(str(n) for n in names)
    dup = sorted({n for n in orig if orig.count(n) > 1})
    if dup:
        raise StimageInputError(f"duplicate names {dup[:5]}: each must be unique as a {target.replace('_', ' ')}")
    return NameMapping(target, orig, tuple(safe_name(n, target) for n in orig))


def check_names(names: Iterable[object], target: str, *, what: str = "names") -> NameMapping:
    """:func:`name_mapping`, with a warning naming what changes (for commands about to write)."""
    m = name_mapping(names, target)
    if m.renamed:
        log.warning("%s", m.describe(what))
    return m


def looks_encoded(name: str) -> bool:
    """Whether ``name`` holds a ``%XX`` escape that :func:`safe_name` would have written."""
    return bool(_ENCODED.search(str(name)))


def file_stem(name: object) -> str:
    """A section (or other) name as the stem of a file name: ``safe_name(name, "file_name")``."""
    return safe_name(name, "file_name")


def name_of_file(path, suffix: str) -> str:
    """The name a file was written for: its name without ``suffix``, decoded (the inverse of :func:`file_stem`)."""
    n = getattr(path, "name", str(path))
    return original_name(n[: -len(suffix)] if suffix and n.endswith(suffix) else n)


def make_unique(names: Sequence[str]) -> list[str]:
    """``names`` with repeats made unique by suffixes ``-1``, ``-2``, ... in order of appearance (the first
    keeps its name): ``["a", "b", "a"] -> ["a", "b", "a-1"]``."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            out.append(f"{n}-{seen[n]}")
        else:
            seen[n] = 0
            out.append(n)
    return out
