"""The image and tile caches: a size limit with least-recently-used eviction, and ``stimage-nb cache``.

Under :func:`stimage_nb._settings.cache_dir` live

- ``images/``: OME-Zarr pyramids of flat JPEG/PNG files (converted once) and copies made on request
  (:mod:`stimage_nb.io.convert`); slides themselves are read in place and never copied here unasked;
- ``tiles/``: tile arrays (``.npy``) of training and spot prediction (:mod:`stimage_nb.tiles`).

Each entry's modification time is its last use (:func:`touch` on every hit). After a new entry is
written, :func:`enforce_limit` removes the least recently used entries of both kinds until the total
is under the limit (``$STIMAGE_NB_CACHE_MAX_GB``, default :data:`DEFAULT_MAX_GB` GB; ``0`` = no
limit). Entries used in the last :data:`GRACE_S` seconds are kept even then (another process may be
reading them). Half-written entries (``*.tmp-<pid>``) are not counted; ``cache clear`` removes them.
Other folders of the cache (downloaded data, OMERO pulls) are shown by ``cache info`` but never evicted.

CLI (registered by :func:`add_cli`)::

    stimage-nb cache info              # sizes, entries, the limit
    stimage-nb cache clear [--kind images|tiles|all]
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .._settings import cache_dir
from ..errors import StimageInputError

log = logging.getLogger(__name__)

KINDS = ("images", "tiles")
ENV_MAX = "STIMAGE_NB_CACHE_MAX_GB"
DEFAULT_MAX_GB = 20.0
GRACE_S = 600.0


@dataclass(frozen=True)
class CacheEntry:
    """One cached item: ``kind`` (images/tiles), ``path``, ``bytes`` on disk, ``last_used`` (epoch s)."""

    kind: str
    path: str
    bytes: int
    last_used: float


@dataclass(frozen=True)
class CacheInfo:
    """What the cache holds: its ``root``, ``limit_bytes`` (0 = none), the managed ``entries`` (most recently
    used first) and the sizes of ``other`` folders it does not manage."""

    root: str
    limit_bytes: int
    entries: tuple[CacheEntry, ...]
    other: dict

    @property
    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    def by_kind(self) -> dict[str, tuple[int, int]]:
        """``{kind: (entries, bytes)}``."""
        out = {k: (0, 0) for k in KINDS}
        for e in self.entries:
            n, b = out[e.kind]
            out[e.kind] = (n + 1, b + e.bytes)
        return out

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([asdict(e) for e in self.entries], columns=["kind", "path", "bytes", "last_used"])

    def to_json(self) -> str:
        return json.dumps({"root": self.root, "limit_bytes": self.limit_bytes, "total_bytes": self.total_bytes,
                           "by_kind": self.by_kind(), "other": self.other,
                           "entries": [asdict(e) for e in self.entries]}, indent=1)


def limit_bytes() -> int:
    """The size limit from ``$STIMAGE_NB_CACHE_MAX_GB`` (GB; 0 or ``none`` = no limit)."""
    v = os.environ.get(ENV_MAX, "").strip().lower()
    if v in ("", None):
        return int(DEFAULT_MAX_GB * 2**30)
    if v in ("none", "off", "unlimited"):
        return 0
    try:
        gb = float(v)
    except ValueError as e:
        raise StimageInputError(f"{ENV_MAX}={v!r}: give the cache limit in GB (e.g. 20), or 0 for none.") from e
    if gb < 0:
        raise StimageInputError(f"{ENV_MAX}={v!r}: the cache limit cannot be negative.")
    return int(gb * 2**30)


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(p):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _is_partial(name: str) -> bool:
    return ".tmp-" in name or ".old-" in name or ".trash-" in name


def entries(root: Path | None = None) -> list[CacheEntry]:
    """The managed entries, most recently used first (partial ones excluded)."""
    root = Path(root) if root is not None else cache_dir()
    out = []
    for kind in KINDS:
        d = root / kind
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if _is_partial(p.name):
                continue
            try:
                out.append(CacheEntry(kind, str(p), _size(p), p.stat().st_mtime))
            except OSError:  # removed meanwhile
                continue
    return sorted(out, key=lambda e: -e.last_used)


def info(root: Path | None = None) -> CacheInfo:
    """A :class:`CacheInfo` of the cache."""
    root = Path(root) if root is not None else cache_dir()
    other = {p.name: _size(p) for p in sorted(root.iterdir()) if p.is_dir() and p.name not in KINDS} \
        if root.is_dir() else {}
    return CacheInfo(str(root), limit_bytes(), tuple(entries(root)), other)


def touch(path: str | os.PathLike) -> None:
    """Mark a cache entry as just used."""
    try:
        os.utime(path, None)
    except OSError:
        pass


def _remove(p: Path) -> None:
    trash = p.with_name(f"{p.name}.trash-{os.getpid()}")
    try:
        os.replace(p, trash)  # atomic: no reader sees half an entry under the real name
    except OSError:
        return
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def enforce_limit(keep: Iterable[str | os.PathLike] = (), *, limit: int | None = None, grace_s: float | None = None,
                  root: Path | None = None) -> list[CacheEntry]:
    """Remove least-recently-used entries until the cache is within ``limit`` bytes; returns what was removed.

    ``keep`` (the entry just written) and entries used in the last ``grace_s`` seconds (default
    :data:`GRACE_S`) are never removed.
    """
    limit = limit_bytes() if limit is None else int(limit)
    grace_s = GRACE_S if grace_s is None else float(grace_s)
    if limit <= 0:
        return []
    es = entries(root)
    total = sum(e.bytes for e in es)
    if total <= limit:
        return []
    keep = {str(Path(k).resolve()) for k in keep}
    now = time.time()
    removed = []
    for e in reversed(es):  # least recently used first
        if total <= limit:
            break
        if str(Path(e.path).resolve()) in keep or now - e.last_used < grace_s:
            continue
        _remove(Path(e.path))
        total -= e.bytes
        removed.append(e)
    if removed:
        log.info("cache over its %.1f GB limit: removed %d least recently used entries (%.1f MB)",
                 limit / 2**30, len(removed), sum(e.bytes for e in removed) / 2**20)
    if total > limit:
        log.warning("cache holds %.1f GB, over its %.1f GB limit, in entries used in the last %.0f s; set %s higher",
                    total / 2**30, limit / 2**30, grace_s, ENV_MAX)
    return removed


def clear(kinds: Sequence[str] = KINDS, root: Path | None = None) -> tuple[int, int]:
    """Remove every entry of ``kinds`` (and half-written leftovers); returns (entries, bytes) removed."""
    root = Path(root) if root is not None else cache_dir()
    n = b = 0
    for kind in kinds:
        if kind not in KINDS:
            raise StimageInputError(f"unknown cache kind {kind!r}; choose from {list(KINDS)} or 'all'.")
        d = root / kind
        if not d.is_dir():
            continue
        for p in list(d.iterdir()):
            sz = _size(p)
            if not _is_partial(p.name):
                _remove(p)
            elif p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n, b = n + 1, b + sz
    return n, b


# ---------------------------------------------------------------------- CLI
def _gb(b: int) -> str:
    return f"{b / 2**30:.2f} GB" if b >= 2**28 else f"{b / 2**20:.1f} MB"


def _cmd_cache(a) -> int:
    if a.action == "info":
        ci = info()
        if a.json:
            print(ci.to_json())
            return 0
        lim = "none" if ci.limit_bytes == 0 else _gb(ci.limit_bytes)
        print(f"cache: {ci.root}  (limit {lim}, {ENV_MAX}; least recently used entries are evicted)")
        for kind, (n, b) in ci.by_kind().items():
            print(f"  {kind:<8} {n:>6} entries  {_gb(b)}")
        print(f"  {'total':<8} {len(ci.entries):>6} entries  {_gb(ci.total_bytes)}")
        for name, b in ci.other.items():
            print(f"  {name + '/':<8} {_gb(b)} (not managed: never evicted)")
        return 0
    kinds = KINDS if a.kind == "all" else (a.kind,)
    n, b = clear(kinds)
    print(f"removed {n} entries ({_gb(b)}) of {', '.join(kinds)} from {cache_dir()}")
    return 0


def add_cli(subparsers) -> None:
    """Register ``stimage-nb cache info|clear`` on the sub-command parser."""
    p = subparsers.add_parser("cache", help="show or clear the image and tile caches (size limit: "
                                            f"${ENV_MAX}, least recently used entries evicted)")
    p.add_argument("action", choices=["info", "clear"])
    p.add_argument("--kind", choices=[*KINDS, "all"], default="all", help="clear: which entries (default all)")
    p.add_argument("--json", action="store_true", help="info: as JSON, with every entry")
    p.set_defaults(func=_cmd_cache)
