"""Downloading a registered dataset with pooch: sha256 of every file, progress, retries, clear errors."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

from .._settings import ENV_DATA, cache_dir, data_dir
from ..atomic import write_text
from ..errors import DataUnavailableError, StimageInputError, one_line
from ._registry import DATASETS, HER2ST_SECTIONS, HER2ST_UM_PER_PX, DataFile, Dataset

log = logging.getLogger(__name__)
_PARTIAL = re.compile(r"tmp[a-z0-9_]{8}")

#: Attempts after the first when a download fails (dropped connection, truncated file, checksum).
RETRIES = 3
#: (connect, read) timeouts of each HTTP request, in seconds: a dead server never hangs a fetch.
TIMEOUT = (15.0, 60.0)


def default_dest() -> Path:
    """Where fetched data goes: ``$STIMAGE_NB_DATA`` when set, else ``<cache>/data`` (the data directory's fallback)."""
    env = os.environ.get(ENV_DATA)
    return Path(env).expanduser() if env else cache_dir() / "data"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _dataset(name: str) -> Dataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise StimageInputError(f"no dataset named {name!r}; known: {', '.join(DATASETS)} "
                                "(`stimage-nb fetch-data --list` describes them).") from None


def _gunzip_to(target: Path, expected: str | None):
    """A pooch processor: decompress the downloaded ``.gz`` into ``target`` atomically, check its sha256."""
    def process(fname: str, action: str, pooch) -> str:
        if target.is_file() and action == "fetch":
            return str(target)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with gzip.open(fname, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (OSError, EOFError) as e:
            tmp.unlink(missing_ok=True)
            Path(fname).unlink(missing_ok=True)  # a bad archive is not kept: the next fetch downloads it again
            raise DataUnavailableError(f"{fname}: the download is not a readable gzip file ({e}); nothing was kept, "
                                       "run the fetch again") from e
        got = _sha256(tmp)
        if expected and got != expected:
            log.warning("%s: the decompressed table differs from the offline bundle's (sha256 %s, bundle %s); "
                        "the source may have changed since the bundle was made", target, got[:12], expected[:12])
        os.replace(tmp, target)
        return str(target)
    return process


def _extract_processor(kind: str, extract_dir: str):
    import pooch

    return (pooch.Unzip if kind == "zip" else pooch.Untar)(extract_dir=extract_dir)


def _explain(ds: Dataset, f: DataFile, url: str, exc: BaseException, root: Path | None = None) -> str:
    """One line: which file, from where, what went wrong, and what to do."""
    import requests

    if isinstance(exc, ValueError) and "hash" in str(exc).lower():
        what = (f"its checksum does not match the registry ({one_line(exc, 300)}): the file on the server changed "
                "or was corrupted in transit; nothing was kept")
    elif isinstance(exc, requests.exceptions.HTTPError):
        what = f"the server answered {one_line(exc, 200)}"
    elif isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        what = "no connection (offline, a firewall, or the server is down)"
    else:
        what = f"{type(exc).__name__}: {one_line(exc, 200)}"
    where = f" under {root}" if root is not None else ""
    return (f"cannot download {ds.name} file {f.path} from {url}: {what}. Files already fetched{where} are kept, so "
            "running the same `stimage-nb fetch-data` command again resumes; offline, copy the dataset's files "
            f"there from a machine that has them, or point {ENV_DATA} at a folder that holds them")


def _fetch_file(ds: Dataset, f: DataFile, root: Path, bases: Sequence[str], *, progress: bool, retries: int) -> Path:
    """Fetch one file through pooch (trying each base URL in turn); returns its final path."""
    import pooch
    import requests

    target = root / f.path
    if f.gunzip and target.is_file():
        return target  # derived file present (a failed gunzip never leaves one behind)
    raw = root / ".downloads" / (f.path + ".gz") if f.gunzip else target
    rel = raw.relative_to(root).as_posix()
    known = f"sha256:{f.sha256}" if f.sha256 else None
    if f.gunzip:
        processor = _gunzip_to(target, f.sha256_processed)
    elif f.extract is not None:
        processor = _extract_processor("zip" if f.path.endswith(".zip") else "tar", f.extract)
    else:
        processor = None
    last: BaseException | None = None
    for base in bases:
        url = f"{base.rstrip('/')}/{f.remote}"
        p = pooch.create(path=root, base_url=base.rstrip("/") + "/", registry={rel: known}, urls={rel: url},
                         retry_if_failed=retries)
        try:
            out = p.fetch(rel, processor=processor, progressbar=progress,
                          downloader=pooch.HTTPDownloader(progressbar=progress, timeout=TIMEOUT))
            if f.gunzip:
                return Path(out)
            return target
        except (ValueError, requests.exceptions.RequestException) as e:
            last = e
            if base != bases[-1]:  # the last failure is the error itself: said once, not twice
                log.warning("%s: %s; trying the next mirror", url, one_line(e, 200))
        finally:
            _remove_partials(raw.parent)
    assert last is not None
    raise DataUnavailableError(_explain(ds, f, f"{bases[0].rstrip('/')}/{f.remote}", last, root)) from last


def _remove_partials(folder: Path) -> None:
    """pooch streams into ``tempfile.NamedTemporaryFile(dir=folder)`` (``tmpXXXXXXXX``) and removes it on any
    exception; this also clears one left by a killed process, so a folder never holds a partial download."""
    if folder.is_dir():
        for t in folder.iterdir():
            if _PARTIAL.fullmatch(t.name) and t.is_file():
                t.unlink(missing_ok=True)


def _prune_empty(root: Path, created: list[Path]) -> None:
    """Remove the empty folders under ``root`` (and those of ``created`` that stayed empty)."""
    if root.is_dir():
        for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()
            except OSError:
                pass  # not empty: it holds what was fetched
    for d in created:  # deepest first
        try:
            d.rmdir()
        except OSError:
            break


def fetch(name: str = "her2st", dest: str | os.PathLike | None = None, *, sections: Sequence[str] | None = None,
          base_url: str | None = None, progress: bool = True, retries: int = RETRIES) -> Path:
    """Download a registered dataset (see :data:`DATASETS`) into ``dest/<name>``; returns that folder.

    Each file goes through pooch: streamed into a temporary file, its sha256 checked against the
    registry (where one is known), then moved into place, so an interrupted or corrupt download
    leaves nothing behind and a second call fetches only what is missing or wrong. Failed downloads
    are retried ``retries`` times (dropped connections, truncated transfers, checksum mismatches);
    each request gives up after :data:`TIMEOUT` seconds without an answer.

    Parameters
    ----------
    name
        A dataset name (``stimage-nb fetch-data --list``).
    dest
        Parent folder (default :func:`default_dest`: ``$STIMAGE_NB_DATA`` or ``~/.cache/stimage_nb/data``).
    sections
        her2st only: a subset of ``B4, C2, C3, C4, C5, C6`` (default: all six).
    base_url
        Fetch from this URL instead of the dataset's source (a mirror, or a local server in tests);
        the dataset's ``url_env`` environment variable does the same.
    progress
        Progress bars (tqdm) while downloading.

    Raises
    ------
    DataUnavailableError
        A file cannot be downloaded (offline, server error, checksum mismatch); one line naming the
        file, the URL and what to do.
    StimageInputError
        An unknown dataset or section.
    """
    ds = _dataset(name)
    root = Path(dest).expanduser() if dest is not None else default_dest()
    root = root / ds.name
    files = list(ds.files)
    if sections is not None:
        if ds.name != "her2st":
            raise StimageInputError(f"dataset {ds.name!r} has no sections to choose from.")
        bad = [s for s in sections if s not in HER2ST_SECTIONS]
        if bad:
            raise StimageInputError(f"her2st has no sections {bad}; it has {list(HER2ST_SECTIONS)}.")
        files = [f for f in files if f.section in set(sections)]
    env_url = os.environ.get(ds.url_env) if ds.url_env else None
    bases = [base_url] if base_url else [env_url] if env_url else [ds.base_url, *ds.mirrors]
    new_dirs = [p for p in (root, *root.parents) if not p.exists()]
    root.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s (%s) into %s", ds.name, ds.size, root)
    try:
        for f in files:
            _fetch_file(ds, f, root, bases, progress=progress, retries=retries)
    except BaseException:
        _prune_empty(root, new_dirs)  # a failed first fetch leaves no empty folders behind
        raise
    if ds.name == "her2st":
        secs = list(sections) if sections is not None else list(HER2ST_SECTIONS)
        rows = ["section,patient,image,counts,spots,um_per_px"]
        rows += [f"{s},{HER2ST_SECTIONS[s][0]},images/{s}.jpg,counts/{s}.tsv.gz,spots/{s}_selection.tsv,"
                 f"{HER2ST_UM_PER_PX}" for s in secs]
        write_text(root / "sections.csv", "\n".join(rows) + "\n")
    elif ds.manifest:
        write_text(root / "sections.csv", "\n".join(ds.manifest) + "\n")
    shutil.rmtree(root / ".downloads", ignore_errors=True)
    return root


def fetch_her2st(dest: str | os.PathLike | None = None, sections: Sequence[str] | None = None, *,
                 base_url: str | None = None, progress: bool = True) -> Path:
    """The her2st manifest (``her2st/sections.csv``), fetched first when it is not on this machine.

    With ``dest=None`` the offline bundle is used when there is one (``$STIMAGE_NB_DATA`` or
    ``../shared/data``) and nothing is downloaded; otherwise the six public sections (or ``sections``)
    are fetched with :func:`fetch`. Raises :class:`~stimage_nb.errors.DataUnavailableError` (one line:
    what is missing and how to get it) when they can be neither found nor downloaded.
    """
    if dest is None:
        existing = data_dir(required=False) / "her2st" / "sections.csv"
        if existing.is_file():
            return existing
    return fetch("her2st", dest, sections=sections, base_url=base_url, progress=progress) / "sections.csv"


def list_datasets() -> list[dict]:
    """Every registered dataset as a dict (name, title, description, licence, citation, page, size,
    where the checksums come from, and each file's URL and sha256)."""
    return [d.to_dict() for d in DATASETS.values()]
