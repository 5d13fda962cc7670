"""Atomic file writes: a reader sees the old file or the whole new one, never half of one.

Every file the package writes for a user (tables, JSON records, figures, model weights, manifests) goes
through :func:`atomic_path`: the writer fills a hidden temporary file beside the target
(``.NAME.tmp-PID-ID.SUFFIX``, on the same filesystem, keeping the suffix so that writers which choose the format
from it — matplotlib, pandas, tifffile — still do), which then replaces the target with ``os.replace`` (atomic
on POSIX and Windows). If the writer raises (or is interrupted), the temporary file is removed and the target is
left as it was, so a re-run starts clean. The new file gets the permissions an ordinary ``open()`` would give
under the process's umask, even where the writing library creates its files private (safetensors writes
0600).

Streaming writers that resume a partial file (downloads) and directory stores (OME-Zarr) have their own
protocols (:mod:`stimage_nb.datasets`, :mod:`stimage_nb.io.ngff`); this module is for whole files.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_atomic", "write_text", "write_json", "write_csv", "save_figure", "FILE_MODE"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Permissions of a new file: what ``open(path, "w")`` gives under the umask the package was imported with.
FILE_MODE = 0o666 & ~_umask()
_ids = itertools.count()


def _temp_name(path: Path) -> Path:
    suffix = path.suffix
    stem = path.name[: -len(suffix)] if suffix else path.name
    return path.with_name(f".{stem}.tmp-{os.getpid()}-{next(_ids)}{suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike, *, mkdir: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on leaving the block it replaces ``path``.

    Parameters
    ----------
    path
        The file to write. Its folder is created when ``mkdir``.

    On an exception inside the block the temporary file is removed, ``path`` is untouched and the exception
    propagates. Example::

        with atomic_path(out / "table.csv") as tmp:
            df.to_csv(tmp, index=False)
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            pass
        raise


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary path and move it to ``path`` (:func:`atomic_path`); returns ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def finite_or_none(o):
    """``o`` with every non-finite float (NaN, ±inf; Python or numpy) replaced by ``None`` and dict keys made
    strings, recursively through dicts, lists and tuples: what strict JSON can hold."""
    import numpy as np

    if isinstance(o, dict):
        return {str(k): finite_or_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite_or_none(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    return o


def write_json(path: str | os.PathLike, obj, *, strict: bool = False, **dumps_kwargs) -> Path:
    """Write ``json.dumps(obj, **dumps_kwargs)`` (``indent=1`` unless given) to ``path`` atomically.

    ``strict``: non-finite floats are written as ``null`` (:func:`finite_or_none`), so any JSON reader (``jq``,
    JavaScript, ``json.loads(..., parse_constant=...)``) can read the file. The object is serialised before
    anything is written, so an object JSON cannot hold raises (``TypeError``/``ValueError``) with the old file
    intact."""
    dumps_kwargs.setdefault("indent", 1)
    if strict:
        obj = finite_or_none(obj)
        dumps_kwargs["allow_nan"] = False
    return write_text(path, json.dumps(obj, **dumps_kwargs))


def write_csv(df, path: str | os.PathLike, **to_csv_kwargs) -> Path:
    """Write a pandas DataFrame with ``df.to_csv(tmp, index=False, **to_csv_kwargs)`` atomically."""
    to_csv_kwargs.setdefault("index", False)
    return write_atomic(path, lambda tmp: df.to_csv(tmp, **to_csv_kwargs))


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically (format from the suffix, ``bbox_inches="tight"``) and close it."""
    import matplotlib.pyplot as plt

    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight"))
    finally:
        plt.close(fig)
