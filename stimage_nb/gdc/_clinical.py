"""Clinical data of a project's cases from the GDC ``/cases`` endpoint, as an outcome table.

Overall survival is derived from the GDC data model's fields: ``demographic.vital_status``
(``"Dead"``/``"Alive"``), ``demographic.days_to_death``, and the last contact, the largest of
``diagnoses.days_to_last_follow_up`` and ``follow_ups.days_to_follow_up``. For TCGA prefer the curated
endpoints of the TCGA Pan-Cancer Clinical Data Resource (Liu et al., Cell 2018;
:func:`stimage_nb.outcomes.tcga_cdr`), which fixes inconsistencies in these raw fields and adds the
progression-free interval the authors recommend for breast cancer.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ..errors import StimageInputError
from ._client import GDCClient, filter_in

log = logging.getLogger(__name__)

CASE_FIELDS = ("case_id", "submitter_id", "project.project_id", "demographic.vital_status",
               "demographic.days_to_death", "demographic.gender", "demographic.age_at_index",
               "diagnoses.age_at_diagnosis", "diagnoses.days_to_last_follow_up", "diagnoses.ajcc_pathologic_stage",
               "diagnoses.primary_diagnosis", "diagnoses.tumor_grade", "follow_ups.days_to_follow_up")
CLINICAL_COLUMNS = ("patient_id", "case_id", "project_id", "vital_status", "days_to_death", "days_to_last_contact",
                    "time", "event", "age", "gender", "stage", "primary_diagnosis")


def _num(v) -> float:
    try:
        return float(v) if v is not None else np.nan
    except (TypeError, ValueError):
        return np.nan


def _first(items: list[dict], key: str):
    for it in items:
        v = it.get(key)
        if v not in (None, "", "not reported", "Not Reported", "unknown"):
            return v
    return None


def case_row(hit: dict) -> dict:
    """One GDC case hit -> one row of :data:`CLINICAL_COLUMNS` (time in days, event 1 = death)."""
    demo = hit.get("demographic") or {}
    if isinstance(demo, list):  # older releases returned a list
        demo = demo[0] if demo else {}
    diags = hit.get("diagnoses") or []
    fups = hit.get("follow_ups") or []
    vital = demo.get("vital_status")
    death = _num(demo.get("days_to_death"))
    contacts = [_num(d.get("days_to_last_follow_up")) for d in diags] + [_num(f.get("days_to_follow_up")) for f in fups]
    contacts = [c for c in contacts if np.isfinite(c)]
    last = max(contacts) if contacts else np.nan
    if vital == "Dead":
        event, time = 1.0, death if np.isfinite(death) else np.nan
    elif vital == "Alive":
        event, time = 0.0, last
    else:
        event, time = np.nan, np.nan
    age_days = _num(_first(diags, "age_at_diagnosis"))
    age = age_days / 365.25 if np.isfinite(age_days) else _num(demo.get("age_at_index"))
    return {
        "patient_id": hit.get("submitter_id"), "case_id": hit.get("case_id"),
        "project_id": (hit.get("project") or {}).get("project_id"), "vital_status": vital,
        "days_to_death": death, "days_to_last_contact": last, "time": time, "event": event, "age": age,
        "gender": demo.get("gender"), "stage": _first(diags, "ajcc_pathologic_stage"),
        "primary_diagnosis": _first(diags, "primary_diagnosis"),
    }


def fetch_clinical(project: str | list[str], *, client: GDCClient | None = None, patients=None) -> pd.DataFrame:
    """Clinical table of a project's cases: one row per patient, overall survival as ``time``/``event``.

    Parameters
    ----------
    project
        GDC project id(s), e.g. ``"TCGA-BRCA"``.
    client
        A :class:`GDCClient` (default: a new one).
    patients
        Only these case submitter ids (``TCGA-XX-XXXX``).

    Returns
    -------
    DataFrame with :data:`CLINICAL_COLUMNS`; ``time`` in days (death, else last contact), ``event`` 1 = died,
    0 = alive at last contact, NaN when the vital status is not reported; ``age`` in years at diagnosis.

    Raises
    ------
    StimageInputError
        No case matches. :class:`~stimage_nb.gdc.GDCError` when the API fails.
    """
    projects = [project] if isinstance(project, str) else list(project)
    clauses = [filter_in("project.project_id", projects)]
    if patients is not None:
        clauses.append(filter_in("submitter_id", list(patients)))
    flt = {"op": "and", "content": clauses}
    own = client is None
    client = client or GDCClient()
    try:
        hits = client.search("cases", flt, CASE_FIELDS, sort="submitter_id:asc")
    finally:
        if own:
            client.close()
    if not hits:
        raise StimageInputError(f"the GDC lists no cases for project {project!r}")
    df = pd.DataFrame([case_row(h) for h in hits], columns=list(CLINICAL_COLUMNS))
    n_missing = int(df["event"].isna().sum())
    if n_missing:
        log.info("%d of %d cases have no vital status; their event is NaN", n_missing, len(df))
    return df
