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

    def targets(self, by: str = "section") -> pd.DataFrame:
        """Issue 11's targets on the held-out patients (leave-one-patient-out, as scanned and under every
        acquisition), one row per held-out section (``by="section"``) or per held-out patient
        (``by="patient"``) and acquisition:

        - ``beats_baseline``: the ensemble's per-gene Pearson r on log1p counts is higher than the ridge
          baseline's (Wilcoxon signed-rank across genes, one-sided p < 0.05);
        - ``not_worse_cp10k``: on depth-normalised expression it is not significantly worse (not: lower mean
          and two-sided p < 0.05);
        - ``coverage_ok``: the 90% predictive interval covers 0.85-0.95 of the counts;
        - ``epistemic_ranks``: keeping the 80% of spots with the smallest epistemic SD keeps less of the error
          than keeping those with the most predicted counts (the depth proxy).

        ``by="patient"`` is the unit the issue words its targets in ("every leave-one-patient-out direction
        and every acquisition"): a gene's r is the mean of its r over the patient's held-out sections and the
        Wilcoxon test pairs those means across genes (a paired test on all of the patient's tissue, not one
        per section); coverage and sparsification must hold on every one of the patient's sections (the
        columns give the range and the count). ``by="section"`` is stricter: one test per section.

        Raises
        ------
        ValueError
            ``by`` is neither ``"section"`` nor ``"patient"``.
        """
        if by not in ("section", "patient"):
            raise ValueError(f"targets(by=...) must be 'section' or 'patient', not {by!r}")
        t = self.table()
        if t.empty:
            return t
        t = t[t["protocol"].isin(["lopo", "acquisition"]) & t["held_out_patient"].astype(bool)].copy()
        # a section as scanned is scored by both protocols with the same models and tiles: count it once, as the
        # leave-one-patient-out row (whatever order the folds were run or read back in)
        t = t.assign(_o=(t["protocol"] != "lopo").astype(int)).sort_values("_o", kind="stable").drop(columns="_o")
        t = t.drop_duplicates(subset=["source_section", "acquisition", "train"] if "train" in t else
                              ["source_section", "acquisition"], keep="first")
        if by == "patient":
            return self._patient_targets(t)
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

    def _patient_targets(self, t: pd.DataFrame) -> pd.DataFrame:
        """:meth:`targets` ``by="patient"`` from the per-section rows ``t`` (already de-duplicated)."""
        from ._metrics import paired_test

        pg = self.per_gene
        lo, hi = COVERAGE_90_RANGE
        rows = []
        for (patient, acq), d in t.groupby(["patient", "acquisition"], sort=False):
            row = {"protocol": ",".join(dict.fromkeys(d["protocol"])), "fold": ",".join(dict.fromkeys(d["fold"])),
                   "patient": patient, "acquisition": acq,
                   "sections": ",".join(d["source_section"]), "n_sections": len(d)}
            for target, tag in (("log1p_counts", ""), ("log1p_cp10k", " CP10k")):
                r = {}
                for model in ("ensemble", "baseline"):
                    parts = []
                    for _, s in d.iterrows():
                        sel = pg[(pg["protocol"] == s["protocol"]) & (pg["fold"] == s["fold"])
                                 & (pg["section"] == s["section"]) & (pg["acquisition"] == s["acquisition"])
                                 & (pg["model"] == model) & (pg["target"] == target)]
                        # a gene constant in a section (or unscored) counts as r = 0, as per section
                        parts.append(sel.set_index("gene")["pearson"].astype(float))
                    r[model] = pd.concat(parts, axis=1).fillna(0.0).mean(axis=1) if parts else pd.Series(dtype=float)
                genes = r["ensemble"].index.union(r["baseline"].index)
                e = r["ensemble"].reindex(genes).fillna(0.0).to_numpy()
                b = r["baseline"].reindex(genes).fillna(0.0).to_numpy()
                pt = paired_test(e, b)
                row[f"ensemble r{tag}"] = float(e.mean()) if e.size else np.nan
                row[f"baseline r{tag}"] = float(b.mean()) if b.size else np.nan
                if tag:
                    row["Δ CP10k"] = pt["mean_difference"]
                    row["p CP10k (two-sided)"] = pt["p_two_sided"]
                else:
                    row["Δ ens−base"] = pt["mean_difference"]
                    row["p (ens > base)"] = pt["p_greater"]
            cov = d["coverage 90%"]
            row["coverage 90% (min)"], row["coverage 90% (max)"] = float(cov.min()), float(cov.max())
            ranks = d["err80 by epistemic SD"] < d["err80 by depth (proxy)"]
            row["epistemic ranks (sections)"] = f"{int(ranks.sum())}/{len(d)}"
            p_gt = row["p (ens > base)"]
            p_two = row["p CP10k (two-sided)"]
            row["beats_baseline"] = bool((row["Δ ens−base"] or 0) > 0 and p_gt is not None and p_gt < ALPHA)
            row["not_worse_cp10k"] = not ((row["Δ CP10k"] or 0) < 0 and p_two is not None and p_two < ALPHA)
            row["coverage_ok"] = bool(cov.between(lo, hi).all())
            row["epistemic_ranks"] = bool(ranks.all())
            rows.append(row)
        return pd.DataFrame(rows)

    def targets_met(self, by: str = "section") -> dict:
        """For each target of :meth:`targets`: met in how many of the held-out patients' sections (``by=
        "section"``) or of the held-out patients (``by="patient"``) as scanned and under the acquisitions; the
        sparsification target is judged as scanned. ``coverage_90_range``: the lowest and highest coverage of a
        held-out section."""
        t = self.targets(by)
        if t.empty:
            return {}
        out = {}
        for k in ("beats_baseline", "not_worse_cp10k", "coverage_ok", "epistemic_ranks"):
            v = t[k].astype(bool)
            out[k] = {"met": int(v.sum()), "of": int(len(v)), "all": bool(v.all())}
            if k == "epistemic_ranks":  # judged as scanned (the sparsification target is about the patient)
                ref = t["acquisition"] == "reference"
                out[k] = {"met": int(v[ref].sum()), "of": int(ref.sum()), "all": bool(v[ref].all())}
        cov = t["coverage 90%"] if by == "section" else pd.concat([t["coverage 90% (min)"], t["coverage 90% (max)"]])
        out["coverage_90_range"] = [float(np.nanmin(cov)), float(np.nanmax(cov))] if len(cov) else None
        return out
