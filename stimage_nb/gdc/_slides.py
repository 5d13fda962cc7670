"""Find a project's slides and their cases on the GDC; read and write GDC manifests."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from ..atomic import write_csv
from ..errors import StimageInputError
from ._client import GDCClient, filter_in, filters_and

log = logging.getLogger(__name__)

SLIDE_FIELDS = ("file_id", "file_name", "md5sum", "file_size", "state", "data_format", "experimental_strategy",
                "access", "cases.case_id", "cases.submitter_id", "cases.project.project_id",
                "cases.samples.sample_type")
#: columns of :func:`find_slides`' table (also the cohort table's columns for GDC slides)
SLIDE_COLUMNS = ("slide_id", "patient_id", "case_id", "project_id", "file_id", "file_name", "md5sum", "file_size",
                 "state", "sample_type")
#: the GDC Data Transfer Tool's manifest columns (tab-separated, what the portal's "Manifest" button writes)
MANIFEST_COLUMNS = ("id", "filename", "md5", "size", "state")


def slides_filter(project: str | list[str], strategy: str = "Diagnostic Slide", access: str = "open") -> dict:
    """The GDC filter for a project's whole-slide images of one experimental strategy.

    ``strategy``: ``"Diagnostic Slide"`` (FFPE, the DX slides) or ``"Tissue Slide"`` (frozen, TS/BS).
    """
    projects = [project] if isinstance(project, str) else list(project)
    return filters_and(filter_in("cases.project.project_id", projects),
                       filter_in("files.data_type", ["Slide Image"]),
                       filter_in("files.experimental_strategy", [strategy]),
                       filter_in("files.access", [access]))


def find_slides(project: str | list[str], *, strategy: str = "Diagnostic Slide", client: GDCClient | None = None,
                max_slides: int | None = None) -> pd.DataFrame:
    """A project's slides with their cases, one row per slide file.

    Parameters
    ----------
    project
        GDC project id(s), e.g. ``"TCGA-BRCA"``.
    strategy
        ``"Diagnostic Slide"`` (default) or ``"Tissue Slide"``.
    client
        A :class:`GDCClient` (default: a new one on ``$STIMAGE_NB_GDC_API`` or the public API).
    max_slides
        Stop after this many (a quick look).

    Returns
    -------
    DataFrame with :data:`SLIDE_COLUMNS`: ``slide_id`` (the file name without ``.svs``),
    ``patient_id`` (the case's submitter id, e.g. ``TCGA-3C-AALI``), ``case_id`` (UUID), ``file_id``
    (UUID for ``/data``), ``md5sum``, ``file_size`` (bytes), ..., sorted by file name.

    Raises
    ------
    StimageInputError
        No slide matches (a misspelt project id, say).
    GDCError
        The API could not be reached or answered with an error.
    """
    own = client is None
    client = client or GDCClient()
    try:
        hits = client.search("files", slides_filter(project, strategy), SLIDE_FIELDS, sort="file_name:asc",
                             max_hits=max_slides)
    finally:
        if own:
            client.close()
    if not hits:
        raise StimageInputError(f"the GDC lists no open {strategy.lower()}s for project {project!r}; check the "
                                "project id (e.g. TCGA-BRCA) at https://portal.gdc.cancer.gov/projects")
    rows = []
    for h in hits:
        cases = h.get("cases") or [{}]
        if len(cases) > 1:
            log.warning("GDC file %s belongs to %d cases; using the first", h.get("file_id"), len(cases))
        c = cases[0]
        samples = c.get("samples") or [{}]
        name = str(h["file_name"])
        rows.append({
            "slide_id": name[:-4] if name.lower().endswith(".svs") else Path(name).stem,
            "patient_id": c.get("submitter_id"), "case_id": c.get("case_id"),
            "project_id": (c.get("project") or {}).get("project_id"),
            "file_id": h["file_id"], "file_name": name, "md5sum": h.get("md5sum"),
            "file_size": int(h["file_size"]) if h.get("file_size") is not None else None,
            "state": h.get("state"), "sample_type": samples[0].get("sample_type"),
        })
    return pd.DataFrame(rows, columns=list(SLIDE_COLUMNS))


def write_manifest(slides: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the GDC Data Transfer Tool manifest (``id filename md5 size state``, tab-separated) atomically.

    ``gdc-client download -m PATH`` reads it, and so does :func:`stimage_nb.gdc.download`.
    """
    missing = [c for c in ("file_id", "file_name", "md5sum", "file_size") if c not in slides.columns]
    if missing:
        raise StimageInputError(f"cannot write a GDC manifest: the slide table lacks {missing}")
    df = pd.DataFrame({"id": slides["file_id"], "filename": slides["file_name"], "md5": slides["md5sum"],
                       "size": slides["file_size"].astype("int64"),
                       "state": slides["state"] if "state" in slides else "released"})
    return write_csv(df, path, sep="\t")


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read a GDC manifest (as the portal or :func:`write_manifest` writes it).

    Returns a DataFrame with ``file_id, file_name, md5sum, file_size`` (+ ``state``).

    Raises
    ------
    StimageInputError
        The file is missing, not tab-separated, lacks a column, or has a size that is not a whole number.
    """
    path = Path(path)
    if not path.is_file():
        raise StimageInputError(f"{path}: GDC manifest not found")
    try:
        df = pd.read_csv(path, sep="\t", dtype=str)
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise StimageInputError(f"{path}: not a readable GDC manifest ({e})") from None
    missing = [c for c in ("id", "filename", "md5", "size") if c not in df.columns]
    if missing:
        raise StimageInputError(f"{path}: a GDC manifest needs tab-separated columns id, filename, md5, size "
                                f"(missing {missing}; found {list(df.columns)[:6]})")
    if df.empty:
        raise StimageInputError(f"{path}: the GDC manifest lists no files")
    size = pd.to_numeric(df["size"], errors="coerce")
    if size.isna().any() or (size < 0).any():
        bad = df.loc[size.isna() | (size < 0), "id"].tolist()[:3]
        raise StimageInputError(f"{path}: 'size' must be a byte count (rows {bad})")
    bad_name = df["filename"].fillna("").map(lambda s: (not s) or "/" in s or "\\" in s or s in (".", ".."))
    if bad_name.any():
        raise StimageInputError(f"{path}: file names must be plain names (rows {df.loc[bad_name, 'id'].tolist()[:3]})")
    return pd.DataFrame({"file_id": df["id"], "file_name": df["filename"], "md5sum": df["md5"].str.lower(),
                         "file_size": size.astype("int64"), "state": df.get("state")})
