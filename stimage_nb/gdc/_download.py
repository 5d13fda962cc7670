"""Resumable, checksum-verified downloads from the GDC ``/data`` endpoint.

Layout (the same as the GDC Data Transfer Tool's, so its downloads are recognised): ``DEST/<file_id>/<file_name>``.
While a file is arriving it is ``<file_name>.partial``; an interrupted download (a dropped connection, a
killed process) resumes from the partial file's size with an HTTP ``Range`` request; a server that
ignores the range (answers 200) restarts the file from byte 0. A finished file is checked against the
size and md5 the GDC lists before it is renamed into place (atomic), so a file under its final name is
always complete and verified; one whose md5 differs is kept as ``<file_name>.md5-mismatch`` for
inspection, reported, and fetched again from scratch on the next run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from ..errors import StimageInputError
from ._client import GDCChecksumError, GDCClient, GDCError
from ._slides import read_manifest

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # hashing
_STREAM_CHUNK = 1 << 16  # a dropped connection loses at most one unwritten chunk, re-fetched by the resume


@dataclass(frozen=True)
class DownloadResult:
    """What happened to one file.

    ``status``: ``"downloaded"`` (fetched in this call), ``"present"`` (already complete: skipped) or
    ``"failed"`` (``error`` says why; the other files went on). ``resumed``: the transfer continued a
    partial file (from an earlier run or after a dropped connection) instead of starting over.
    """

    file_id: str
    file_name: str
    path: str
    status: str
    bytes_received: int = 0
    resumed: bool = False
    error: str = ""


@dataclass(frozen=True)
class DownloadReport:
    """The outcome of :func:`download` for every file of a manifest."""

    results: tuple[DownloadResult, ...]

    @property
    def ok(self) -> bool:
        return all(r.status != "failed" for r in self.results)

    @property
    def failed(self) -> list[DownloadResult]:
        return [r for r in self.results if r.status == "failed"]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(r) for r in self.results])

    def to_json(self) -> dict:
        return {"ok": self.ok, "results": [asdict(r) for r in self.results]}


def md5_file(path: str | os.PathLike) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _as_table(files) -> pd.DataFrame:
    if isinstance(files, (str, os.PathLike)):
        return read_manifest(files)
    if isinstance(files, pd.DataFrame):
        need = [c for c in ("file_id", "file_name", "md5sum", "file_size") if c not in files.columns]
        if need:
            raise StimageInputError(f"the slide table lacks {need} (use gdc.find_slides or a GDC manifest)")
        return files
    raise StimageInputError(f"download() takes a GDC manifest path or a slide table, not {type(files).__name__}")


def download(files, dest: str | os.PathLike, *, client: GDCClient | None = None, retries: int = 5,
             verify_existing: bool = False, progress: bool = True) -> DownloadReport:
    """Download the files of a GDC manifest (or of :func:`find_slides`' table) into ``dest``.

    Parameters
    ----------
    files
        Path to a GDC manifest (``id filename md5 size``), or a DataFrame with ``file_id, file_name,
        md5sum, file_size``.
    dest
        Folder; each file goes to ``dest/<file_id>/<file_name>``.
    retries
        Attempts per file after a dropped connection (each resumes where the last stopped).
    verify_existing
        Re-hash files already present (default: a file under its final name was verified when it arrived,
        so its size is checked only).
    progress
        A byte progress bar per file.

    Returns
    -------
    :class:`DownloadReport` (one :class:`DownloadResult` per file, failures included: one bad file does not
    stop the others).
    """
    table = _as_table(files)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    own = client is None
    client = client or GDCClient()
    results = []
    try:
        for row in table.itertuples(index=False):
            results.append(_download_one(client, str(row.file_id), str(row.file_name), str(row.md5sum).lower(),
                                         int(row.file_size), dest, retries=retries,
                                         verify_existing=verify_existing, progress=progress))
    finally:
        if own:
            client.close()
    return DownloadReport(tuple(results))


def _download_one(client: GDCClient, file_id: str, name: str, md5: str, size: int, dest: Path, *, retries: int,
                  verify_existing: bool, progress: bool) -> DownloadResult:
    import requests

    if not name or "/" in name or "\\" in name or name in (".", ".."):
        return DownloadResult(file_id, name, "", "failed", error=f"unsafe file name {name!r}")
    final = dest / file_id / name
    partial = final.with_name(name + ".partial")
    if final.is_file() and final.stat().st_size == size and (not verify_existing or md5_file(final) == md5):
        return DownloadResult(file_id, name, str(final), "present")
    final.parent.mkdir(parents=True, exist_ok=True)
    offset = partial.stat().st_size if partial.is_file() else 0
    if offset > size:
        log.warning("%s: partial file larger than the listed size; starting again", partial)
        partial.unlink()
        offset = 0
    resumed = offset > 0
    received = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=size, initial=offset, unit="B", unit_scale=True, desc=name[:40], leave=False)
    attempt = 0
    try:
        while offset < size:
            try:
                r = client.open_data(file_id, offset=offset)
            except GDCError as e:
                return DownloadResult(file_id, name, str(final), "failed", received, resumed, str(e))
            try:
                if r.status_code == 416:  # nothing left to send from this offset
                    break
                if r.status_code == 200 and offset > 0:
                    log.info("%s: the server ignored the Range request; downloading from the start", name)
                    offset = 0
                    mode = "wb"
                elif r.status_code == 206:
                    start = _content_range_start(r.headers.get("Content-Range"))
                    if start != offset:
                        return DownloadResult(file_id, name, str(final), "failed", received, resumed,
                                              f"the server answered a Range request for byte {offset} with "
                                              f"{r.headers.get('Content-Range')!r}")
                    mode = "ab"
                else:
                    mode = "wb" if offset == 0 else "ab"
                with open(partial, mode) as f:
                    for block in r.iter_content(_STREAM_CHUNK):
                        f.write(block)
                        offset += len(block)
                        received += len(block)
                        if bar is not None:
                            bar.update(len(block))
                        if offset > size:
                            break
            except (requests.RequestException, OSError) as e:
                attempt += 1
                if attempt > retries:
                    return DownloadResult(file_id, name, str(final), "failed", received, resumed,
                                          f"connection lost at byte {offset} of {size} after {retries} retries "
                                          f"({type(e).__name__}); run again to resume")
                log.info("%s: connection lost at byte %d (%s); resuming", name, offset, type(e).__name__)
                resumed = True
                time.sleep(min(0.2 * 2 ** attempt, 10))
                continue
            finally:
                r.close()
            if offset < size:  # the body ended early without an exception: resume
                attempt += 1
                if attempt > retries:
                    return DownloadResult(file_id, name, str(final), "failed", received, resumed,
                                          f"transfer ended at byte {offset} of {size}; run again to resume")
                resumed = True
    finally:
        if bar is not None:
            bar.close()
    got = partial.stat().st_size if partial.is_file() else 0
    if got != size:
        bad = _keep_bad(partial, name)
        return DownloadResult(file_id, name, str(final), "failed", received, resumed,
                              f"size {got} bytes, the GDC lists {size}; kept as {bad.name}, run again to re-fetch")
    digest = md5_file(partial)
    if digest != md5:
        bad = _keep_bad(partial, name)
        err = GDCChecksumError(f"md5 {digest} differs from the GDC's {md5}; kept as {bad.name}, run again to re-fetch")
        return DownloadResult(file_id, name, str(final), "failed", received, resumed, str(err))
    os.replace(partial, final)
    log.info("%s: %d bytes, md5 verified -> %s", name, size, final)
    return DownloadResult(file_id, name, str(final), "downloaded", received, resumed)


def _keep_bad(partial: Path, name: str) -> Path:
    bad = partial.with_name(name + ".md5-mismatch")
    os.replace(partial, bad)
    return bad


def _content_range_start(value: str | None) -> int | None:
    # "bytes 100-199/200"
    try:
        return int(value.split()[1].split("-")[0])
    except (AttributeError, IndexError, ValueError):
        return None


def downloaded_paths(slides: pd.DataFrame, dest: str | os.PathLike) -> pd.Series:
    """``dest/<file_id>/<file_name>`` of each row where that file is present (else NaN), as a ``path`` column."""
    dest = Path(dest)
    paths = [dest / str(f) / str(n) for f, n in zip(slides["file_id"], slides["file_name"])]
    return pd.Series([str(p) if p.is_file() else None for p in paths], index=slides.index, name="path")



def resolve_gdc_slide(file_id: str, dest: str | os.PathLike) -> Path:
    """Download one GDC file (a slide) into ``dest`` and return its path: the cohort's ``gdc:<uuid>`` resolver.

    Looks up the file's name, size and md5 at ``/files``, then :func:`download` (resumable, md5-verified) to
    ``dest/<file_id>/<file_name>``. The GDC endpoint is ``$STIMAGE_NB_GDC_API`` or the public API.

    Raises
    ------
    StimageInputError
        No GDC file has this id.
    GDCError
        The API cannot be reached, or the download failed (the message says why; a re-run resumes).
    """
    from ._client import filter_in
    from ._slides import SLIDE_FIELDS

    file_id = str(file_id).strip()
    with GDCClient() as client:
        hits = client.search("files", filter_in("files.file_id", [file_id]), SLIDE_FIELDS, max_hits=1)
        if not hits:
            raise StimageInputError(f"gdc:{file_id}: the GDC has no file with this id")
        h = hits[0]
        table = pd.DataFrame([{"file_id": h["file_id"], "file_name": h["file_name"], "md5sum": h["md5sum"],
                               "file_size": int(h["file_size"])}])
        res = download(table, dest, client=client, progress=False).results[0]
    if res.status == "failed":
        raise GDCError(f"gdc:{file_id}: {res.error}")
    return Path(res.path)
