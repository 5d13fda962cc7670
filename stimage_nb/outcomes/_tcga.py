"""Real TCGA outcome and bulk-expression tables, read through the data directory (``tcga/`` of the bundle).

- TCGA Pan-Cancer Clinical Data Resource (TCGA-CDR; Liu J. et al., Cell 173:400, 2018): curated
  endpoints OS, DSS, DFI, PFI (event 1/0, time in days) for 11,160 patients of 33 cancer types. For breast
  cancer the authors recommend PFI (follow-up is short for OS).
- TCGA-BRCA bulk RNA (PORPOISE; Chen R.J. et al., Cancer Cell 2022): one row per diagnostic slide, z-scored
  RNA-seq of 1,558 genes (cBioPortal), copy number (GISTIC, -2..2) of 1,333 genes, 21 mutations, overall
  survival in months with ``censorship`` (**1 = censored**).
- SurvPath's TCGA-BRCA metadata (Jaume G. et al., CVPR 2024): slides, OS/DSS/PFI, stage, subtype, grade,
  and 5-fold case splits.

When the bundle is absent, :func:`stimage_nb.datasets.fetch_tcga` downloads the same public files into the
cache (checksums verified).
"""

from __future__ import annotations

import functools
import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import StimageInputError

log = logging.getLogger(__name__)

ENDPOINTS = ("OS", "DSS", "DFI", "PFI")
_DAYS_PER_MONTH = 365.25 / 12


def _tcga_file(rel: str) -> Path:
    from ..datasets import fetch_tcga

    return fetch_tcga()[rel]


def stage_group(stage) -> float:
    """AJCC stage text (``"Stage IIB"``, ``"stage iia"``) -> 1..4 (I..IV); NaN for X, missing or discrepant."""
    if not isinstance(stage, str):
        return np.nan
    m = re.search(r"stage\s+(iv|iii|ii|i)(?![iv])", stage.strip().lower())
    return float({"i": 1, "ii": 2, "iii": 3, "iv": 4}[m.group(1)]) if m else np.nan


@functools.lru_cache(maxsize=2)
def _cdr_all() -> pd.DataFrame:
    return pd.read_excel(_tcga_file("cdr"), sheet_name="TCGA-CDR")


def tcga_cdr(cancer_type: str | None = "BRCA") -> pd.DataFrame:
    """The TCGA-CDR table of one cancer type (None: all 33), one row per patient.

    Returns
    -------
    DataFrame indexed by ``patient_id`` (``bcr_patient_barcode``) with ``cancer_type``, ``age`` (years),
    ``gender``, ``stage`` (AJCC text), ``stage_group`` (1-4), ``histology``, and for each endpoint E of
    :data:`ENDPOINTS` the columns ``E`` (1 = event) and ``E.time`` (days).
    """
    df = _cdr_all()
    if cancer_type is not None:
        df = df[df["type"] == cancer_type]
        if df.empty:
            types = sorted(_cdr_all()["type"].unique())
            raise StimageInputError(f"no TCGA-CDR patients of type {cancer_type!r}; types: {', '.join(types)}")
    out = pd.DataFrame({
        "cancer_type": df["type"].to_numpy(),
        "age": pd.to_numeric(df["age_at_initial_pathologic_diagnosis"], errors="coerce").to_numpy(),
        "gender": df["gender"].to_numpy(),
        "stage": df["ajcc_pathologic_tumor_stage"].to_numpy(),
        "stage_group": df["ajcc_pathologic_tumor_stage"].map(stage_group).to_numpy(),
        "histology": df["histological_type"].to_numpy(),
    }, index=pd.Index(df["bcr_patient_barcode"].astype(str), name="patient_id"))
    for e in ENDPOINTS:
        out[e] = pd.to_numeric(df[e], errors="coerce").to_numpy()
        out[f"{e}.time"] = pd.to_numeric(df[f"{e}.time"], errors="coerce").to_numpy()
    return out


def tcga_outcome(endpoint: str = "PFI", cancer_type: str = "BRCA", *, unit: str = "months") -> pd.DataFrame:
    """``time``/``event`` of a TCGA-CDR endpoint, indexed by ``patient_id``; missing and non-positive times dropped.

    ``unit``: ``"days"`` or ``"months"`` (days / 30.44).
    """
    if endpoint not in ENDPOINTS:
        raise StimageInputError(f"endpoint must be one of {ENDPOINTS}, not {endpoint!r}")
    if unit not in ("days", "months"):
        raise StimageInputError(f"unit must be 'days' or 'months', not {unit!r}")
    cdr = tcga_cdr(cancer_type)
    out = pd.DataFrame({"time": cdr[f"{endpoint}.time"], "event": cdr[endpoint]}).dropna()
    out = out[out["time"] > 0]
    if unit == "months":
        out["time"] = out["time"] / _DAYS_PER_MONTH
    out["event"] = out["event"].astype(int)
    return out


def clinical_covariates(cancer_type: str = "BRCA") -> pd.DataFrame:
    """The clinical baseline's covariates from the TCGA-CDR, indexed by ``patient_id``.

    ``age`` (years), ``stage_group`` (1-4, NaN unknown: imputed inside the training folds), and for BRCA
    ``lobular`` (1 = infiltrating lobular carcinoma, the main histological subtype besides ductal).
    """
    cdr = tcga_cdr(cancer_type)
    out = cdr[["age", "stage_group"]].astype(float).copy()
    if cancer_type == "BRCA":
        out["lobular"] = cdr["histology"].astype(str).str.contains("Lobular", case=False).astype(float)
    return out


@dataclass(frozen=True)
class TcgaBulk:
    """TCGA-BRCA bulk molecular data per patient (PORPOISE's table).

    Attributes
    ----------
    expression
        Patients x 1,558 genes: z-scored RNA-seq (cBioPortal), columns are gene symbols.
    cnv
        Patients x 1,333 genes: GISTIC copy-number calls (-2 deep loss ... 2 high-level amplification).
    mutations
        Patients x 21 genes: 1 = mutated.
    clinical
        ``age``, ``time`` (overall survival, months), ``event`` (1 = death; the table's ``censorship``
        inverted), ``oncotree_code``.
    slides
        One row per diagnostic slide: ``slide_id`` (GDC file name without ``.svs``), ``patient_id``.
    """

    expression: pd.DataFrame
    cnv: pd.DataFrame
    mutations: pd.DataFrame
    clinical: pd.DataFrame
    slides: pd.DataFrame


@functools.lru_cache(maxsize=1)
def tcga_brca_bulk() -> TcgaBulk:
    """Read TCGA-BRCA bulk expression, copy number, mutations and survival (:class:`TcgaBulk`).

    Read once per process and cached: the same object is returned each time, so copy a table before
    changing it in place.
    """
    path = _tcga_file("porpoise")
    with zipfile.ZipFile(path) as z:
        df = pd.read_csv(z.open(z.namelist()[0]))
    df = df.drop(columns=[c for c in df.columns if c.startswith("Unnamed")])
    slides = pd.DataFrame({"slide_id": df["slide_id"].astype(str).str.replace(r"\.svs$", "", regex=True),
                           "patient_id": df["case_id"].astype(str)})
    per = df.groupby("case_id", sort=True).first()
    per.index = pd.Index(per.index.astype(str), name="patient_id")

    def block(suffix: str) -> pd.DataFrame:
        cols = [c for c in per.columns if c.endswith(suffix)]
        b = per[cols].astype(float)
        b.columns = [c[: -len(suffix)] for c in cols]
        return b

    clinical = pd.DataFrame({"age": per["age"].astype(float), "time": per["survival_months"].astype(float),
                             "event": (1 - per["censorship"].astype(int)), "oncotree_code": per["oncotree_code"]})
    return TcgaBulk(expression=block("_rnaseq"), cnv=block("_cnv"), mutations=block("_mut"), clinical=clinical,
                    slides=slides)


def her2_amplification(bulk: TcgaBulk | None = None) -> pd.Series:
    """HER2 (ERBB2) amplification per patient: 1 where ERBB2's GISTIC call is 2 (high-level amplification).

    A molecular stand-in for clinical HER2 status (IHC 3+ / ISH), which the open TCGA tables do not hold.
    """
    bulk = bulk or tcga_brca_bulk()
    if "ERBB2" not in bulk.cnv.columns:
        raise StimageInputError("the copy-number table has no ERBB2 column")
    return (bulk.cnv["ERBB2"] >= 2).astype(int).rename("her2_amplified")


@dataclass(frozen=True)
class SurvPathBrca:
    """SurvPath's TCGA-BRCA tables: ``slides`` (one row per slide with OS/DSS/PFI in months and
    ``event_*`` = 1 - censorship), ``clinical`` (stage, subtype, grade per patient) and ``splits`` (five
    (train patient ids, test patient ids) pairs, usable as ``splits=`` of the nested CV)."""

    slides: pd.DataFrame
    clinical: pd.DataFrame
    splits: tuple


def tcga_brca_survpath() -> SurvPathBrca:
    meta = pd.read_csv(_tcga_file("survpath_meta"), index_col=0)
    slides = pd.DataFrame({"slide_id": meta["slide_id"].astype(str).str.replace(r"\.svs$", "", regex=True),
                           "patient_id": meta["case_id"].astype(str), "age": meta["age"],
                           "os_months": meta["survival_months"], "event_os": 1 - meta["censorship"],
                           "dss_months": meta["survival_months_dss"], "event_dss": 1 - meta["censorship_dss"],
                           "pfi_months": meta["survival_months_pfi"], "event_pfi": 1 - meta["censorship_pfi"],
                           "oncotree_code": meta["oncotree_code"]})
    clin = pd.read_csv(_tcga_file("survpath_clinical"), index_col=0)
    clin = clin.set_index(pd.Index(clin["case_id"].astype(str), name="patient_id")).drop(columns=["case_id"])
    splits = []
    for k in range(5):
        s = pd.read_csv(_tcga_file(f"survpath_split_{k}"), index_col=0)
        splits.append((s["train"].dropna().astype(str).tolist(), s["val"].dropna().astype(str).tolist()))
    return SurvPathBrca(slides=slides, clinical=clin, splits=tuple(splits))
