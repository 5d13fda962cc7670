"""Feature and clinical tables keyed by ``patient_id``: reading, checking, slides averaged per patient."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import StimageInputError

log = logging.getLogger(__name__)

PATIENT = "patient_id"
#: columns of a cohort features table that are bookkeeping, not features
ID_COLUMNS = ("patient_id", "slide_id", "slide", "section", "path", "image", "file_id", "file_name", "case_id",
              "omero_id", "status", "error", "n_spots", "n_points")
MAX_LEVELS = 12  # a text column with at most this many values is one-hot encoded


def read_table(path: str | os.PathLike, what: str = "table") -> pd.DataFrame:
    """Read a CSV/TSV (by extension) and check that it has a ``patient_id`` column.

    Raises
    ------
    StimageInputError
        Missing or unreadable file, an empty table, no ``patient_id`` column, empty patient ids.
    """
    path = Path(path)
    if not path.is_file():
        raise StimageInputError(f"{path}: {what} not found")
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    try:
        df = pd.read_csv(path, sep=sep)
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise StimageInputError(f"{path}: cannot read the {what} as {'TSV' if sep == chr(9) else 'CSV'} "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if df.empty:
        raise StimageInputError(f"{path}: the {what} has no rows")
    if PATIENT not in df.columns:
        raise StimageInputError(f"{path}: the {what} needs a '{PATIENT}' column (has {list(df.columns)[:8]})")
    ids = df[PATIENT]
    if ids.isna().any() or (ids.astype(str).str.strip() == "").any():
        raise StimageInputError(f"{path}: {int(ids.isna().sum())} rows of the {what} have no {PATIENT}")
    df[PATIENT] = ids.astype(str).str.strip()
    return df


def patient_features(table: pd.DataFrame, *, columns=None, source: str = "features") -> pd.DataFrame:
    """Patients x numeric features from a slide- or patient-level table (slides averaged per patient).

    Rows whose ``error`` column is non-empty (slides a cohort run could not predict) are dropped; bookkeeping
    columns (:data:`ID_COLUMNS`) are not features; a text column with at most :data:`MAX_LEVELS` values
    (e.g. a subtype call) becomes one 0/1 column per value (its mean per patient is the fraction of slides).

    Parameters
    ----------
    table
        With a ``patient_id`` column.
    columns
        Feature columns to keep: a list of names, or a regular expression (``re.search`` on the name).
        Default: all.

    Raises
    ------
    StimageInputError
        No feature column left, or an asked-for column is missing.
    """
    if PATIENT not in table.columns:
        raise StimageInputError(f"the {source} table needs a '{PATIENT}' column")
    df = table
    if "error" in df.columns:
        bad = df["error"].notna() & (df["error"].astype(str).str.strip() != "")
        if bad.any():
            log.warning("%d rows of the %s table carry an error and are left out", int(bad.sum()), source)
            df = df[~bad]
    feats = [c for c in df.columns if c not in ID_COLUMNS]
    if columns is not None:
        if isinstance(columns, str):
            rx = re.compile(columns)
            feats = [c for c in feats if rx.search(str(c))]
            if not feats:
                raise StimageInputError(f"no column of the {source} table matches {columns!r}")
        else:
            missing = [c for c in columns if c not in df.columns]
            if missing:
                raise StimageInputError(f"the {source} table lacks columns {missing[:5]}"
                                        + (f" (+{len(missing) - 5})" if len(missing) > 5 else ""))
            feats = list(columns)
    parts = [df[[PATIENT]]]
    dropped = []
    for c in feats:
        col = df[c]
        num = pd.to_numeric(col, errors="coerce")
        if col.notna().sum() and num.notna().sum() == col.notna().sum():
            parts.append(num.rename(c).to_frame())
        elif col.nunique(dropna=True) <= MAX_LEVELS:
            parts.append(pd.get_dummies(col, prefix=str(c), dtype=float))
        else:
            dropped.append(c)
    if dropped:
        log.warning("%s: non-numeric columns left out (too many distinct values): %s", source, dropped[:5])
    wide = pd.concat(parts, axis=1)
    if wide.shape[1] == 1:
        raise StimageInputError(f"the {source} table has no numeric feature column besides {list(ID_COLUMNS)[:4]}")
    out = wide.groupby(PATIENT, sort=True).mean()
    out.index.name = PATIENT
    const = out.columns[out.nunique(dropna=True) <= 1]
    if len(const) and len(const) < out.shape[1]:
        log.info("%s: %d constant columns left out", source, len(const))
        out = out.drop(columns=const)
    return out


def survival_outcome(table: pd.DataFrame, *, time_col: str = "time", event_col: str = "event",
                     source: str = "clinical") -> pd.DataFrame:
    """``time``/``event`` per patient from a clinical table (one row per patient; event 1 = event, 0 = censored).

    Rows with a missing time or event are left out (logged); times must be positive numbers.

    Raises
    ------
    StimageInputError
        A missing column, a non-numeric or non-positive time, an event other than 0/1, a patient listed
        twice with different outcomes, fewer than two events.
    """
    for c in (time_col, event_col):
        if c not in table.columns:
            raise StimageInputError(f"the {source} table has no column {c!r} (use --time-col/--event-col; "
                                    f"columns: {list(table.columns)[:8]})")
    df = table[[PATIENT, time_col, event_col]].copy()
    df.columns = [PATIENT, "time", "event"]
    miss = df["time"].isna() | df["event"].isna()
    if miss.any():
        log.warning("%d patients without %s/%s left out", int(miss.sum()), time_col, event_col)
        df = df[~miss]
    t = pd.to_numeric(df["time"], errors="coerce")
    if t.isna().any():
        raise StimageInputError(f"the {source} column {time_col!r} must be numeric (e.g. "
                                f"{df.loc[t.isna(), 'time'].iloc[0]!r} in patient {df.loc[t.isna(), PATIENT].iloc[0]})")
    if (t <= 0).any():
        raise StimageInputError(f"the {source} column {time_col!r} must be > 0 ({int((t <= 0).sum())} patients have "
                                f"{t[t <= 0].iloc[0]:g}; drop them or add a small offset)")
    ev = df["event"]
    if ev.dtype == object:
        ev = ev.astype(str).str.strip().str.lower().map({"1": 1, "0": 0, "true": 1, "false": 0, "1.0": 1, "0.0": 0})
    ev = pd.to_numeric(ev, errors="coerce")
    if ev.isna().any() or not ev.isin([0, 1]).all():
        raise StimageInputError(f"the {source} column {event_col!r} must be 1 (event) or 0 (censored); "
                                f"found {sorted(map(str, df['event'].unique()))[:5]}")
    out = pd.DataFrame({"time": t.astype(float).to_numpy(), "event": ev.astype(int).to_numpy()},
                       index=pd.Index(df[PATIENT], name=PATIENT))
    if out.index.has_duplicates:
        g = out.groupby(level=0)
        if (g.nunique() > 1).any(axis=None):
            raise StimageInputError(f"the {source} table lists patients twice with different outcomes, e.g. "
                                    f"{out.index[out.index.duplicated()][0]}")
        out = g.first()
    if out["event"].sum() < 2:
        raise StimageInputError(f"the {source} table has {int(out['event'].sum())} events; a survival model needs more")
    return out


def class_target(table: pd.DataFrame, target: str, *, source: str = "clinical") -> pd.Series:
    """A class label per patient (binary or several classes); missing labels left out.

    Raises
    ------
    StimageInputError
        Missing column, fewer than two classes, conflicting labels for one patient.
    """
    if target not in table.columns:
        raise StimageInputError(f"the {source} table has no column {target!r} (columns: {list(table.columns)[:8]})")
    s = table.set_index(PATIENT)[target]
    s = s[s.notna() & (s.astype(str).str.strip() != "")]
    if s.index.has_duplicates:
        if (s.groupby(level=0).nunique() > 1).any():
            raise StimageInputError(f"the {source} table gives patients two different {target!r} values, e.g. "
                                    f"{s.index[s.index.duplicated()][0]}")
        s = s.groupby(level=0).first()
    if s.nunique() < 2:
        raise StimageInputError(f"{target!r} has {s.nunique()} class(es) among the patients; a classifier needs two or more")
    if pd.api.types.is_float_dtype(s) and np.all(np.mod(s, 1) == 0):
        s = s.astype(int)
    s.index.name = PATIENT
    return s.rename(target)


def align(X: pd.DataFrame, y, *, what: str = "features and clinical tables"):
    """The patients both tables hold, in one order.

    Raises
    ------
    StimageInputError
        No patient in common (with examples of the ids on each side, which usually shows the mismatch).
    """
    common = X.index.intersection(y.index).sort_values()
    if len(common) == 0:
        raise StimageInputError(f"the {what} share no patient_id (e.g. {list(X.index[:2])} vs {list(y.index[:2])})")
    lost_x, lost_y = len(X) - len(common), len(y) - len(common)
    if lost_x or lost_y:
        log.info("%d patients in both; %d only in the features, %d only in the outcome", len(common), lost_x, lost_y)
    return X.loc[common], y.loc[common]
