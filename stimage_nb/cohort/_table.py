"""The cohort table (one row per slide) and where each slide comes from.

A cohort table is a CSV with one row per slide:

=================  ==========================================================================================
``slide``          required. A local path (relative paths are relative to the CSV), ``omero:<image id>``
                   (pulled through :mod:`stimage_nb.omero` with the credentials of the environment:
                   ``OMERO_HOST``, ``OMERO_USER``, ``OMERO_PASSWORD`` or ``OMERO_SESSION_KEY``), or
                   ``gdc:<file uuid>`` (downloaded by the GDC resolver, below).
``patient_id``     required. Slides of one patient are averaged downstream (``stimage-nb outcomes``).
``slide_id``       optional. Names the outputs (``slides/<slide_id>.h5ad``); default: the file's stem,
                   ``omero-<id>`` or ``gdc-<uuid>``. Characters other than letters, digits, ``.``, ``_``, ``-``
                   become ``_``; ids must be unique.
``um_per_px``      optional. The scan's resolution when the file does not record it (JPEG/PNG).
``annotations``    optional. A QuPath GeoJSON of regions (e.g. a tumour outline) on that slide: grid points
                   get ``obs["region"]`` and ``--region`` averages the pseudo-bulk over them.
=================  ==========================================================================================

Resolvers (:func:`resolve_slide`): a scheme (``omero``, ``gdc``, or any other ``name:``) maps to a
function ``resolver(identifier: str, dest: pathlib.Path) -> pathlib.Path`` that makes the slide
available locally (downloading into ``dest`` and checking the download is its job) and returns its path.
``omero`` is built in. ``gdc`` is looked up as :data:`GDC_RESOLVER` (``"module:function"``: the GDC
client, :func:`stimage_nb.gdc.resolve_gdc_slide`) unless the caller passes ``resolvers={"gdc": fn}``
or the CLI ``--resolver gdc=module:function``. A resolver is given by value or as a ``"module:function"``
string, which cluster workers import by name.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd

from ..errors import StimageInputError

log = logging.getLogger(__name__)

REQUIRED = ("slide", "patient_id")
OPTIONAL = ("slide_id", "um_per_px", "annotations")
#: Where the GDC download hook lives (the GDC client, :mod:`stimage_nb.gdc`).
GDC_RESOLVER = "stimage_nb.gdc:resolve_gdc_slide"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class CohortSlide:
    """One row of a cohort table.

    Attributes
    ----------
    slide_id, patient_id
        Names (``slide_id`` is filesystem-safe and unique in the table).
    source
        Absolute local path, ``omero:<id>`` or ``<scheme>:<identifier>``.
    um_per_px
        The scan's µm/px when given in the table.
    annotations
        Absolute path of a QuPath GeoJSON, when given.
    extra
        The row's other columns (kept for the features table's provenance).
    """

    slide_id: str
    patient_id: str
    source: str
    um_per_px: float | None = None
    annotations: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        """``"file"`` for a local path, else the part before the first ``:``."""
        m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):(?!//|\\)(.+)$", self.source)
        if m and len(m.group(1)) > 1:  # a Windows drive letter is not a scheme
            return m.group(1).lower()
        return "file"

    @property
    def identifier(self) -> str:
        return self.source if self.scheme == "file" else self.source.split(":", 1)[1].strip()


def _blank(v) -> bool:
    return v is None or (isinstance(v, float) and pd.isna(v)) or str(v).strip() == ""


def _default_id(source: str) -> str:
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):(.+)$", source)
    if m and not m.group(2).startswith(("//", "\\")):
        return f"{m.group(1).lower()}-{m.group(2).strip()}"
    return Path(source).name.split(".")[0]


def read_cohort(path: str | os.PathLike) -> list[CohortSlide]:
    """Read and check a cohort table (module docstring).

    Raises
    ------
    StimageInputError
        A missing or unreadable file, missing columns, an empty table, a row without slide or patient,
        a bad ``um_per_px``, or duplicate slide ids. (A slide file that is missing or unreadable is
        *not* an error here: prediction records it for that slide and goes on.)
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise StimageInputError(f"{p}: cohort table not found.")
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001
        raise StimageInputError(f"{p}: cannot read the cohort CSV ({type(e).__name__}: {e}).") from e
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise StimageInputError(f"{p}: the cohort table lacks columns {missing}; it needs {list(REQUIRED)} "
                                f"(optional: {list(OPTIONAL)}), has {list(df.columns)}.")
    if df.empty:
        raise StimageInputError(f"{p}: the cohort table has no rows.")
    base = p.parent
    rows: list[CohortSlide] = []
    for i, r in df.iterrows():
        line = i + 2  # header is line 1
        src, pat = str(r["slide"]).strip(), str(r["patient_id"]).strip()
        if not src or not pat:
            raise StimageInputError(f"{p}, line {line}: every row needs a slide and a patient_id.")
        sid = str(r.get("slide_id", "")).strip() or _default_id(src)
        sid = _SAFE.sub("_", sid).strip("._") or f"slide{line}"
        um = None
        if not _blank(r.get("um_per_px")):
            try:
                um = float(r["um_per_px"])
            except ValueError:
                um = float("nan")
            if not (um > 0 and um < 1e3):
                raise StimageInputError(f"{p}, line {line}: um_per_px must be a positive number, not {r['um_per_px']!r}.")
        ann = None
        if not _blank(r.get("annotations")):
            a = Path(str(r["annotations"]).strip()).expanduser()
            ann = str(a if a.is_absolute() else (base / a).resolve())
        row = CohortSlide(sid, pat, src, um, ann, {k: r[k] for k in df.columns if k not in REQUIRED + OPTIONAL})
        if row.scheme == "file":
            f = Path(src).expanduser()
            row = CohortSlide(sid, pat, str(f if f.is_absolute() else (base / f).resolve()), um, ann, row.extra)
        rows.append(row)
    ids = pd.Index([r.slide_id for r in rows])
    if ids.has_duplicates:
        dup = ids[ids.duplicated()].unique().tolist()[:5]
        raise StimageInputError(f"{p}: duplicate slide ids {dup}; give each row a unique slide_id.")
    return rows


def load_resolver(spec: Callable | str) -> Callable:
    """A resolver function from a callable or a ``"module:function"`` string."""
    if callable(spec):
        return spec
    mod, _, fn = str(spec).partition(":")
    if not mod or not fn:
        raise StimageInputError(f"resolver {spec!r}: give it as module:function.")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise StimageInputError(f"resolver {spec!r} is not available ({type(e).__name__}: {e}).") from e


def _omero_resolver(identifier: str, dest: Path, *, um_per_px_wanted: float | None = None) -> Path:
    """``omero:<id>``: pull the image (at the coarsest server level still fine enough) into the cache."""
    from .. import omero

    try:
        image_id = int(identifier)
    except ValueError as e:
        raise StimageInputError(f"omero:{identifier}: an OMERO image id must be an integer.") from e
    with omero.connect(prompt=False) as conn:
        img = omero.pull_image(conn, image_id, target_um_per_px=um_per_px_wanted, progress=False)
    return Path(img.path)


def resolve_slide(slide: CohortSlide, *, dest: str | os.PathLike, resolvers: Mapping[str, Callable | str] | None = None,
                  um_per_px_wanted: float | None = None) -> tuple[Path, bool]:
    """Make a cohort slide available locally; returns ``(path, fetched)``.

    ``fetched`` is True when a resolver produced the file (a download the caller may delete after use).

    Raises
    ------
    StimageInputError
        A local file that does not exist, an unknown scheme, or a scheme whose resolver is not available
        (the message names the fix: ``resolvers={"gdc": ...}`` / ``--resolver gdc=module:function``).
    """
    scheme = slide.scheme
    if scheme == "file":
        p = Path(slide.source)
        if not p.exists():
            raise StimageInputError(f"{p}: slide file not found.")
        return p, False
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    table = dict(resolvers or {})
    if scheme == "omero" and "omero" not in table:
        return _omero_resolver(slide.identifier, dest, um_per_px_wanted=um_per_px_wanted), False
    if scheme == "gdc" and "gdc" not in table:
        try:
            fn = load_resolver(GDC_RESOLVER)
        except StimageInputError as e:
            raise StimageInputError(
                f"{slide.source}: GDC slides need a downloader, and {GDC_RESOLVER} is not available ({e}). "
                "Pass resolvers={'gdc': function(file_id, dest) -> path} (CLI: --resolver gdc=module:function), "
                "or download the slides and list their paths in the cohort table.") from None
    elif scheme in table:
        fn = load_resolver(table[scheme])
    else:
        raise StimageInputError(f"{slide.source}: unknown slide source {scheme!r}: use a path, omero:<id>, gdc:<uuid>, "
                                "or pass a resolver for it.")
    p = Path(fn(slide.identifier, dest))
    if not p.exists():
        raise StimageInputError(f"{slide.source}: the {scheme} resolver returned {p}, which does not exist.")
    return p, True
