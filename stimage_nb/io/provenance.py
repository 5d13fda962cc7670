"""Where a model's training sections came from, and finding them again.

A model trained on a manifest records the manifest's absolute path and, for every file of every
training section it read (image, counts, spots, cell-type proportions, QuPath annotations, a Visium
``outs/`` folder's matrix, positions and scale factors), its absolute path, size and sha256
(:func:`record_training_data`; stored in the model's ``ensemble.json`` and each prediction's
``uns["stimage_nb"]["training_data"]``).

:func:`locate_training_data` uses that record when a prediction is evaluated against another
manifest (another lab's cohort holds only its own sections): the baseline beside the model must be
trained on the model's own training sections, so they are looked for, in this order, in

1. a manifest the user names (``evaluate --train-manifest``),
2. the recorded manifest, where it still is,
3. the evaluation manifest, when it holds sections of the same names,

and a candidate is used only when its files are the recorded ones (same sha256): a section of
another lab that happens to be called ``C2`` is never mistaken for the training section ``C2``.
When none fits, :class:`~stimage_nb.errors.StimageInputError` says plainly what was tried and how
to fix it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from ..errors import StimageInputError

#: Manifest columns that name files a section is read from (``visium``: a Space Ranger ``outs/`` folder).
FILE_COLUMNS = ("image", "counts", "spots", "celltypes", "annotations", "visium")
#: Files whose absence does not make a section another one (the baseline's genes do not depend on them).
OPTIONAL_ROLES = ("celltypes",)
_VISIUM_FILES = ("filtered_feature_bc_matrix.h5", "spatial/scalefactors_json.json", "spatial/tissue_positions.csv",
                 "spatial/tissue_positions_list.csv", "spatial/tissue_positions.parquet")


@functools.lru_cache(maxsize=512)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (cached per path, size and modification time within a process)."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _resolve(base: Path, value) -> Path | None:
    if value is None or (isinstance(value, float) and value != value) or str(value).strip() in ("", "nan"):
        return None
    p = Path(str(value)).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def _read_rows(manifest: Path) -> pd.DataFrame:
    from .readers import read_manifest_table

    m = read_manifest_table(manifest)
    if "section" not in m.columns:
        raise StimageInputError(f"{manifest}: the manifest has no 'section' column.")
    return m.set_index("section", drop=False)


def section_files(manifest: str | os.PathLike, sections: Iterable[str] | None = None,
                  celltype_level: str = "major") -> dict[str, dict[str, Path]]:
    """The files each manifest row is read from: ``{section: {role: absolute path}}``.

    Roles are the :data:`FILE_COLUMNS` (a Visium folder expands to ``visium:<file>`` for its matrix,
    positions and scale factors), plus the default ``celltypes/<level>/<section>-proportion.tsv``
    beside the manifest that :func:`~stimage_nb.io.readers.read_manifest` falls back on. Only files
    that exist are listed.
    """
    manifest = Path(manifest).expanduser().resolve()
    m = _read_rows(manifest)
    base = manifest.parent
    names = list(m.index) if sections is None else [s for s in sections if s in m.index]
    out: dict[str, dict[str, Path]] = {}
    for name in names:
        row = m.loc[name]
        if isinstance(row, pd.DataFrame):  # duplicated section names: the first row, as read_manifest's .loc
            row = row.iloc[0]
        files: dict[str, Path] = {}
        for col in FILE_COLUMNS:
            p = _resolve(base, row.get(col)) if col in m.columns else None
            if p is None:
                continue
            if col == "visium":
                for rel in _VISIUM_FILES:
                    if (p / rel).is_file():
                        files[f"visium:{rel}"] = p / rel
            elif p.is_file():
                files[col] = p
        if "celltypes" not in m.columns and "visium" not in files:
            dflt = base / "celltypes" / celltype_level / f"{name}-proportion.tsv"
            if dflt.is_file():
                files["celltypes"] = dflt.resolve()
        out[str(name)] = files
    return out


def record_training_data(manifest: str | os.PathLike, sections: Sequence[str]) -> dict:
    """What a model records about its training data (JSON-able): the manifest and every file's sha256.

    ``{"manifest": abs path, "manifest_sha256": ..., "sections": [{"section", "patient", "files":
    [{"role", "path", "bytes", "sha256"}]}]}``.
    """
    manifest = Path(manifest).expanduser().resolve()
    rows = _read_rows(manifest)
    files = section_files(manifest, sections)
    recs = []
    for s in sections:
        patient = rows.loc[s, "patient"] if "patient" in rows.columns and s in rows.index else None
        if isinstance(patient, pd.Series):
            patient = patient.iloc[0]
        recs.append({"section": str(s), "patient": None if patient is None or str(patient) == "nan" else str(patient),
                     "files": [{"role": role, "path": str(p), "bytes": int(p.stat().st_size), "sha256": sha256_file(p)}
                               for role, p in sorted(files.get(s, {}).items())]})
    return {"manifest": str(manifest), "manifest_sha256": sha256_file(manifest), "sections": recs}


def record_from_json(value) -> dict | None:
    """The record from a model's meta (a dict) or a prediction's ``uns`` (a JSON string); ``None`` if absent."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return dict(value) if isinstance(value, dict) and value.get("sections") else None


def check_training_data(record: dict, manifest: str | os.PathLike, sections: Sequence[str] | None = None) -> str | None:
    """``None`` when ``manifest`` holds the recorded training sections (all, or ``sections``) with the
    recorded files (same size and sha256 for every role recorded), else the first difference, in words."""
    manifest = Path(manifest).expanduser()
    if not manifest.is_file():
        return f"{manifest} does not exist"
    want = {r["section"]: r for r in record.get("sections", []) if sections is None or r["section"] in sections}
    unrecorded = [s for s in (sections or []) if s not in want]
    if unrecorded:
        return f"the record names no files for sections {unrecorded}"
    found = section_files(manifest, list(want))
    missing = [s for s in want if s not in found]
    if missing:
        return f"{manifest} has no sections {missing}"
    for s, r in want.items():  # first the files both have (a different file is the telling difference) ...
        for f in r.get("files", []):
            p = found[s].get(f["role"])
            if p is not None and (p.stat().st_size != f.get("bytes", p.stat().st_size) or sha256_file(p) != f["sha256"]):
                return (f"{manifest}: section {s}'s {f['role']} {p} is not the file the model was trained on "
                        f"(sha256 {sha256_file(p)[:12]}…, recorded {f['sha256'][:12]}… for {f['path']})")
    for s, r in want.items():  # ... then files it lacks (cell-type tables are optional: the genes do not need them)
        for f in r.get("files", []):
            if f["role"] not in found[s] and f["role"] not in OPTIONAL_ROLES:
                return f"{manifest}: section {s} has no {f['role']} file (the model read {f['path']})"
    return None


@dataclass(frozen=True)
class TrainingData:
    """Where the training sections were found: the manifest, how it was chosen, whether its files were checked."""

    manifest: Path
    source: str        # "--train-manifest", "recorded manifest", "evaluation manifest"
    verified: bool     # every recorded file matched its sha256 (False: no record to check against)
    note: str = ""

    def to_dict(self) -> dict:
        return {"manifest": str(self.manifest), "source": self.source, "verified": self.verified,
                **({"note": self.note} if self.note else {})}


def locate_training_data(record: dict | None, train_sections: Sequence[str], *, evaluation_manifest,
                         train_manifest=None) -> TrainingData:
    """The manifest to read the model's training sections from (see the module docstring).

    Raises
    ------
    StimageInputError
        No candidate holds the training sections with the recorded files; the message lists what was
        tried and suggests ``--train-manifest``.
    """
    train_sections = list(train_sections)
    tried: list[str] = []
    if train_manifest is not None:
        tm = Path(train_manifest).expanduser()
        if not tm.is_file():
            raise StimageInputError(f"{tm}: training manifest not found (--train-manifest).")
        if record is None:
            return TrainingData(tm, "--train-manifest", False, "the model records no training files to check against")
        why = check_training_data(record, tm, train_sections)
        if why is None:
            return TrainingData(tm, "--train-manifest", True)
        raise StimageInputError(f"--train-manifest {tm} does not hold the model's training data: {why}. Name the "
                                "manifest the model was trained with.")
    if record is not None:
        if record.get("manifest"):
            rec_manifest = Path(record["manifest"])
            why = check_training_data(record, rec_manifest, train_sections)
            if why is None:
                return TrainingData(rec_manifest, "recorded manifest", True)
        else:
            why = "the model was trained from Sections in memory, with no manifest"
        tried.append(f"the recorded manifest: {why}")
    ev = Path(evaluation_manifest)
    if record is not None:
        why = check_training_data(record, ev, train_sections)
        if why is None:
            return TrainingData(ev, "evaluation manifest", True)
        tried.append(f"the evaluation manifest: {why}")
    else:  # a model from before training files were recorded: sections of the same names, unchecked
        have = set(section_files(ev, train_sections))
        if set(train_sections) <= have:
            return TrainingData(ev, "evaluation manifest", False,
                                "the model records no training files; sections matched by name only")
        tried.append(f"the evaluation manifest {ev} has no sections {sorted(set(train_sections) - have)} and the "
                     "model records no training manifest (trained before it was recorded, or from Sections in memory)")
    raise StimageInputError(f"cannot find the model's training sections {train_sections} to train the baseline on: "
                            + "; ".join(tried) + ". Pass --train-manifest PATH (the manifest the model was trained "
                            "with, with the same files).")


def record_sections(sections) -> dict:
    """The record for Sections given in memory (no manifest): each one's image and counts file, where known."""
    from .. import _keys as K

    recs = []
    for s in sections:
        files = {}
        if s.image_path is not None and Path(s.image_path).is_file():
            files["image"] = Path(s.image_path).resolve()
        counts = (s.adata.uns.get(K.UNS) or {}).get("counts")
        if counts and Path(str(counts)).is_file():
            files["counts"] = Path(str(counts)).resolve()
        recs.append({"section": s.name, "patient": None if s.patient is None else str(s.patient),
                     "files": [{"role": r, "path": str(p), "bytes": int(p.stat().st_size), "sha256": sha256_file(p)}
                               for r, p in sorted(files.items())]})
    return {"manifest": None, "manifest_sha256": None, "sections": recs}
