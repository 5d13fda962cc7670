"""The typed result of :func:`stimage_nb.validation.validate`: tidy records, tables and the target checks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

#: Columns of the tidy table: one row per fold x section x model x metric (x target).
RECORD_COLUMNS = ("protocol", "fold", "train", "held_out", "section", "source_section", "acquisition", "patient",
                  "platform", "held_out_patient", "model", "metric", "target", "value")
#: The coverage the 90% interval must reach on every held-out patient and acquisition (issue 11 §3).
COVERAGE_90_RANGE = (0.85, 0.95)
ALPHA = 0.05
KEYS = ["protocol", "fold", "section", "source_section", "acquisition", "patient", "held_out_patient"]


@dataclass(frozen=True)
class ValidationResult:
    """What :func:`~stimage_nb.validation.validate` measured.

    Attributes
    ----------
    records
        The tidy table (:data:`RECORD_COLUMNS`): one row per fold x held-out section (x acquisition) x model
        (``ensemble``, ``single_member``, ``baseline``, or a comparison ``a-b``) x metric x target.
    per_gene
        One row per fold x section x model x target x gene: Pearson, Spearman, Lee's L, SSIM.
    curves
        Reliability curves, PIT histograms and sparsification curves (dicts with the record keys).
    splits
        The folds that were run.
    skipped
        Protocols the manifest could not support (``protocol="all"``), with the reason.
    options, timings
        How it was run (recipe, genes, depth handling, ...) and the seconds per fold and in all.
    out
        The folder holding the models and the per-fold files.
    """

    records: pd.DataFrame
    per_gene: pd.DataFrame
    curves: tuple = ()
    splits: tuple = ()
    skipped: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    out: str = ""

    # ------------------------------------------------------------------ views
    def to_frame(self) -> pd.DataFrame:
        """The tidy per-fold table (a copy), columns :data:`RECORD_COLUMNS`."""
        if self.records.empty:
            return pd.DataFrame(columns=list(RECORD_COLUMNS))
        return self.records[list(RECORD_COLUMNS)].copy()

    def to_json(self) -> str:
        """Options, timings, folds, skipped protocols, records and curves as JSON (per-gene rows left out)."""
        from ..evaluate import _clean, _json_default

        d = {"options": self.options, "timings": self.timings, "splits": [s.to_dict() for s in self.splits],
             "skipped": self.skipped, "records": self.to_frame().to_dict(orient="records"),
             "curves": list(self.curves)}
        return json.dumps(_clean(d), indent=1, default=_json_default, allow_nan=False)

    def value(self, model: str, metric: str, target: str | None = None) -> pd.DataFrame:
        """The records of one model and metric (and target), one row per fold x section x acquisition."""
        r = self.records
        sel = (r["model"] == model) & (r["metric"] == metric)
        if target is not None:
            sel &= r["target"] == target
        return r[sel]

    def table(self) -> pd.DataFrame:
        """One row per fold x held-out section x acquisition, the headline numbers side by side."""
        r = self.records
        if r.empty:
            return pd.DataFrame()
        cols = {
            "ensemble r": ("ensemble", "pearson_mean", "log1p_counts"),
            "single member r": ("single_member", "pearson_mean", "log1p_counts"),
            "baseline r": ("baseline", "pearson_mean", "log1p_counts"),
            "Δ ens−base": ("ensemble-baseline", "delta_pearson_mean", "log1p_counts"),
            "CI low": ("ensemble-baseline", "bootstrap_ci_low", "log1p_counts"),
            "CI high": ("ensemble-baseline", "bootstrap_ci_high", "log1p_counts"),
            "p (ens > base)": ("ensemble-baseline", "wilcoxon_p_greater", "log1p_counts"),
            "ensemble r CP10k": ("ensemble", "pearson_mean", "log1p_cp10k"),
            "baseline r CP10k": ("baseline", "pearson_mean", "log1p_cp10k"),
            "Δ CP10k": ("ensemble-baseline", "delta_pearson_mean", "log1p_cp10k"),
            "p CP10k (two-sided)": ("ensemble-baseline", "wilcoxon_p_two_sided", "log1p_cp10k"),
            "coverage 50%": ("ensemble", "coverage_50", "counts"),
            "coverage 90%": ("ensemble", "coverage_90", "counts"),
            "single member coverage 90%": ("single_member", "coverage_90", "counts"),
            "Lee's L ens": ("ensemble", "lees_l_mean", "log1p_counts"),
            "Lee's L base": ("baseline", "lees_l_mean", "log1p_counts"),
            "SSIM ens": ("ensemble", "ssim_mean", "log1p_counts"),
            "SSIM base": ("baseline", "ssim_mean", "log1p_counts"),
            "err80 by epistemic SD": ("ensemble", "err80_by_epistemic_sd", "log1p_counts"),
            "err80 by SD": ("ensemble", "err80_by_sd", "log1p_counts"),
            "err80 by depth (proxy)": ("ensemble", "err80_by_predicted_depth", "log1p_counts"),
            "cell types r ens": ("ensemble", "celltype_pearson_mean", "celltypes"),
            "cell types r base": ("baseline", "celltype_pearson_mean", "celltypes"),
            "depth pred/obs": None,
        }
        base = r[KEYS].drop_duplicates().set_index(KEYS)
        out = base.copy()
        for name, spec in cols.items():
            if spec is None:
                continue
            v = self.value(*spec).set_index(KEYS)["value"]
            out[name] = v[~v.index.duplicated()].reindex(out.index)
        dp = self.value("ensemble", "predicted_depth", "counts").set_index(KEYS)["value"]
        do = self.value("ensemble", "observed_depth", "counts").set_index(KEYS)["value"]
        out["depth pred/obs"] = (dp / do).reindex(out.index)
        return out.reset_index()

    def targets(self) -> pd.DataFrame:
        """Issue 11's targets, per held-out section of another patient (leave-one-patient-out, as scanned and
        under every acquisition):

        - ``beats_baseline``: the ensemble's per-gene Pearson r on log1p counts is higher than the ridge
          baseline's (Wilcoxon signed-rank across genes, one-sided p < 0.05);
        - ``not_worse_cp10k``: on depth-normalised expression it is not significantly worse (not: lower mean
          and two-sided p < 0.05);
        - ``coverage_ok``: the 90% predictive interval covers 0.85-0.95 of the counts;
        - ``epistemic_ranks``: keeping the 80% of spots with the smallest epistemic SD keeps less of the error
          than keeping those with the most predicted counts (the depth proxy).
        """
        t = self.table()
        if t.empty:
            return t
        t = t[t["protocol"].isin(["lopo", "acquisition"]) & t["held_out_patient"].astype(bool)].copy()
        # a section as scanned is scored by both protocols with the same models and tiles: count it once
        t = t.drop_duplicates(subset=["source_section", "acquisition", "train"] if "train" in t else
                              ["source_section", "acquisition"], keep="first")
        p_worse = t["p CP10k (two-sided)"].fillna(1.0)
        t["beats_baseline"] = (t["Δ ens−base"] > 0) & (t["p (ens > base)"].fillna(1.0) < ALPHA)
        t["not_worse_cp10k"] = ~((t["Δ CP10k"] < 0) & (p_worse < ALPHA))
        lo, hi = COVERAGE_90_RANGE
        t["coverage_ok"] = t["coverage 90%"].between(lo, hi)
        t["epistemic_ranks"] = t["err80 by epistemic SD"] < t["err80 by depth (proxy)"]
        keep = KEYS + ["ensemble r", "baseline r", "Δ ens−base", "p (ens > base)", "Δ CP10k", "p CP10k (two-sided)",
                       "coverage 90%", "err80 by epistemic SD", "err80 by depth (proxy)", "beats_baseline",
                       "not_worse_cp10k", "coverage_ok", "epistemic_ranks"]
        return t[keep].reset_index(drop=True)

    def targets_met(self) -> dict:
        """For each target of :meth:`targets`: met in how many of the held-out patient sections and acquisitions."""
        t = self.targets()
        if t.empty:
            return {}
        out = {}
        for k in ("beats_baseline", "not_worse_cp10k", "coverage_ok", "epistemic_ranks"):
            v = t[k].astype(bool)
            out[k] = {"met": int(v.sum()), "of": int(len(v)), "all": bool(v.all())}
            if k == "epistemic_ranks":  # judged as scanned (the sparsification target is about the patient)
                ref = t["acquisition"] == "reference"
                out[k] = {"met": int(v[ref].sum()), "of": int(ref.sum()), "all": bool(v[ref].all())}
        cov = t["coverage 90%"]
        out["coverage_90_range"] = [float(np.nanmin(cov)), float(np.nanmax(cov))] if len(cov) else None
        return out
