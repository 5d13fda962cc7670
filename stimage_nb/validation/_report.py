"""Writing a :class:`~stimage_nb.validation.ValidationResult`: tables, figures and ``report.md``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import save_figure, write_atomic, write_csv, write_text

log = logging.getLogger(__name__)

PROTOCOL_TITLES = {
    "loso": "Leave one section out",
    "lopo": "Leave one patient out (every direction)",
    "cross_platform": "Cross-platform",
    "acquisition": "Acquisition (held-out patients' sections re-made)",
}


def _f(v, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)) or (isinstance(v, float) and np.isnan(v)):
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "**no**"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{v:.{nd}f}"


def _p(v) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    return "<1e-4" if v < 1e-4 else f"{v:.3f}"


def _md_table(df: pd.DataFrame, cols: list[str], fmt: dict | None = None) -> list[str]:
    fmt = fmt or {}
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(fmt.get(c, _f)(r[c]) if not isinstance(r[c], str) else r[c]
                                       for c in cols) + " |")
    return lines


HEADLINE = ["section", "ensemble r", "single member r", "baseline r", "Δ ens−base", "95% CI", "p (ens > base)",
            "ensemble r CP10k", "baseline r CP10k", "p CP10k (two-sided)", "coverage 50%", "coverage 90%",
            "Lee's L ens", "Lee's L base", "SSIM ens", "SSIM base"]


_TARGET_NAMES = {"beats_baseline": "ensemble beats the ridge baseline on log1p counts (Wilcoxon across genes, "
                                   "one-sided p < 0.05)",
                 "not_worse_cp10k": "not significantly worse than the baseline on depth-normalised expression",
                 "coverage_ok": "90% interval covers 0.85–0.95 of the counts",
                 "epistemic_ranks": "sparsification by the epistemic SD beats the depth proxy (as scanned)"}
PATIENT_TARGET_COLUMNS = ["patient", "acquisition", "sections", "ensemble r", "baseline r", "Δ ens−base",
                          "p (ens > base)", "ensemble r CP10k", "baseline r CP10k", "p CP10k (two-sided)",
                          "coverage 90% (min)", "coverage 90% (max)", "epistemic ranks (sections)", "beats_baseline",
                          "not_worse_cp10k", "coverage_ok", "epistemic_ranks"]


def _headline(t: pd.DataFrame) -> pd.DataFrame:
    t = t.copy()
    t["95% CI"] = [f"{_f(a)} … {_f(b)}" for a, b in zip(t["CI low"], t["CI high"])]
    return t


def readme_table(result, *, protocols=("lopo", "acquisition")) -> str:
    """The headline table for the README: leave-one-patient-out as scanned, then the acquisitions (mean over
    the held-out patients' sections), generated from ``result`` (``benchmarks/validate_her2st.py --readme``)."""
    t = _headline(result.table())
    lines = []
    if "lopo" in protocols:
        d = t[(t["protocol"] == "lopo") & (t["acquisition"] == "reference")].copy()
        d["section"] = [f"{s} (train {tr})" for s, tr in zip(d["section"], _train_of(result, d))]
        cols = ["section", "ensemble r", "single member r", "baseline r", "Δ ens−base", "95% CI", "p (ens > base)",
                "ensemble r CP10k", "baseline r CP10k", "p CP10k (two-sided)", "coverage 90%",
                "err80 by epistemic SD", "err80 by depth (proxy)"]
        lines += _md_table(d, cols, {"p (ens > base)": _p, "p CP10k (two-sided)": _p})
    if "acquisition" in protocols:
        a = t[t["protocol"] == "acquisition"]
        if len(a):
            order = list(dict.fromkeys(a["acquisition"]))
            g = a.groupby("acquisition", sort=False)
            agg = g.agg(**{"ensemble r": ("ensemble r", "mean"), "baseline r": ("baseline r", "mean"),
                           "ensemble r CP10k": ("ensemble r CP10k", "mean"),
                           "baseline r CP10k": ("baseline r CP10k", "mean"),
                           "coverage 90% (min)": ("coverage 90%", "min"), "coverage 90% (max)": ("coverage 90%", "max")})
            beats = g.apply(lambda d: f"{int(((d['Δ ens−base'] > 0) & (d['p (ens > base)'] < 0.05)).sum())}/{len(d)}",
                            include_groups=False)
            agg["sections ens > base (p<0.05)"] = beats
            agg = agg.reindex(order).reset_index()
            lines += ["", "Acquisitions (mean over the held-out patients' sections; coverage: range over them):", ""]
            lines += _md_table(agg, ["acquisition", "ensemble r", "baseline r", "ensemble r CP10k", "baseline r CP10k",
                                     "coverage 90% (min)", "coverage 90% (max)", "sections ens > base (p<0.05)"])
    tp = result.targets("patient")
    if len(tp):
        mp, ms = result.targets_met("patient"), result.targets_met("section")
        tp = tp.assign(sections=[s if n == 1 else f"{n} sections" for s, n in zip(tp["sections"], tp["n_sections"])])
        lines += ["", "Targets per held-out patient and acquisition (a gene's r averaged over the patient's held-out "
                  "sections, one Wilcoxon test across genes; coverage and sparsification on every section). Met: "
                  + "; ".join(f"{k} {mp[k]['met']}/{mp[k]['of']}" for k in _TARGET_NAMES)
                  + ". Per held-out section (one test each, stricter): "
                  + "; ".join(f"{k} {ms[k]['met']}/{ms[k]['of']}" for k in _TARGET_NAMES) + ".", ""]
        lines += _md_table(tp, ["patient", "acquisition", "sections", "Δ ens−base", "p (ens > base)", "Δ CP10k",
                                "p CP10k (two-sided)", "coverage 90% (min)", "coverage 90% (max)",
                                "beats_baseline", "not_worse_cp10k", "coverage_ok", "epistemic_ranks"],
                           {"p (ens > base)": _p, "p CP10k (two-sided)": _p})
    return "\n".join(lines) + "\n"


def _train_of(result, d: pd.DataFrame) -> list[str]:
    tr = result.records.drop_duplicates(["fold", "protocol"]).set_index(["protocol", "fold"])["train"]
    return [tr.get((p, f), "") for p, f in zip(d["protocol"], d["fold"])]


def write_report(result, out: str | os.PathLike, *, figures: bool = True) -> dict:
    """Write ``result`` into ``out``: ``validation.csv`` (the tidy table), ``metrics_per_gene.parquet``,
    ``table.csv`` (one row per held-out section), ``targets.csv`` and ``targets_by_patient.csv``
    (:meth:`~stimage_nb.validation.ValidationResult.targets` by section and by patient), ``results.json``, ``figures/*.png`` and
    ``report.md``. Returns ``{name: path}``. Every file is written atomically."""
    from . import _figures as F

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"validation_csv": write_csv(result.to_frame(), out / "validation.csv"),
             "table_csv": write_csv(result.table(), out / "table.csv"),
             "targets_csv": write_csv(result.targets(), out / "targets.csv"),
             "targets_patient_csv": write_csv(result.targets("patient"), out / "targets_by_patient.csv")}
    write_atomic(out / "metrics_per_gene.parquet", lambda tmp: result.per_gene.to_parquet(tmp, index=False))
    paths["per_gene"] = out / "metrics_per_gene.parquet"
    write_text(out / "results.json", result.to_json())
    paths["results_json"] = out / "results.json"
    figs = {}
    protos = list(dict.fromkeys(result.records["protocol"])) if len(result.records) else []
    if figures and protos:
        fdir = out / "figures"
        fdir.mkdir(exist_ok=True)
        for p in protos:
            if p == "acquisition":
                figs["acquisition"] = save_figure(F.acquisition_summary(result), fdir / "acquisition.png")
            else:
                figs[f"correlations_{p}"] = save_figure(F.correlations_by_fold(result, p), fdir / f"correlations_{p}.png")
                figs[f"calibration_{p}"] = save_figure(F.calibration_panels(result, p), fdir / f"calibration_{p}.png")
        if "lopo" in protos:
            figs["sparsification_lopo"] = save_figure(F.sparsification_panels(result, "lopo"),
                                                   fdir / "sparsification_lopo.png")
        figs["map_agreement"] = save_figure(F.map_agreement(result), fdir / "map_agreement.png")
    paths.update(figs)
    text = report_markdown(result, {k: os.path.relpath(v, out) for k, v in figs.items()})
    write_text(out / "report.md", text)
    paths["report"] = out / "report.md"
    return {k: Path(v) for k, v in paths.items()}


def report_markdown(result, figs: dict) -> str:
    """The text of ``report.md``."""
    o = result.options
    cfg = o.get("config", {})
    L: list[str] = []
    w = L.append
    w("# Validation report\n")
    w(f"Manifest `{o.get('manifest')}`; {len(o.get('sections', []))} sections; {o.get('n_genes')} genes; "
      f"protocols {o.get('protocol')}; {len(result.splits)} folds; wall time "
      f"{result.timings.get('wall_seconds', float('nan')) / 60:.1f} min (folds read back from earlier runs "
      "take no time).\n")
    w("- **Models**, all on the same tiles in the same run: the **ensemble** "
      f"({cfg.get('members')} members, extractor `{cfg.get('extractor')}`, background `{cfg.get('background')}`, "
      f"depth `{cfg.get('depth')}`, member data `{cfg.get('member_data')}`), its **first member alone**, and the "
      "**ridge baseline** on 40 handcrafted colour/texture features of the same tiles.")
    w(f"- **Depth**: `{o.get('depth')}` ("
      + ("each held-out section's mean counts per spot is given to the model, which predicts at that depth"
         if o.get("depth") == "observed" else "predictions at the training depth") + ").")
    w("- A **fold** trains on some sections and scores others that no part of training saw. Patients, not "
      "spots, are held out: neighbouring spots of one section share tissue, staining and sequencing run, so a "
      "spot-level split measures memory, not generalisation.")
    if result.skipped:
        w("- Not run (the manifest cannot support them): " + "; ".join(f"`{k}`: {v}" for k, v in result.skipped.items()))
    w("")
    t = _headline(result.table())
    for p in dict.fromkeys(t["protocol"]):
        w(f"## {PROTOCOL_TITLES.get(p, p)}\n")
        d = t[t["protocol"] == p]
        if p == "acquisition":
            d = d.copy()
            d["section"] = [f"{s}" for s in d["section"]]
            w(_acq_text())
            L.extend(_md_table(d, ["section"] + HEADLINE[1:5] + ["p (ens > base)", "ensemble r CP10k", "baseline r CP10k",
                                                              "coverage 90%", "single member coverage 90%"],
                               {"p (ens > base)": _p}))
            if "acquisition" in figs:
                w(f"\n![acquisitions]({figs['acquisition']})\n")
        else:
            d = d.copy()
            if p == "lopo":
                d["section"] = [f"{s} (held-out patient {h})" for s, h in zip(d["section"], d["held_out"])] \
                    if "held_out" in d else d["section"]
            L.extend(_md_table(d, HEADLINE, {"p (ens > base)": _p, "p CP10k (two-sided)": _p}))
            for k in (f"correlations_{p}", f"calibration_{p}"):
                if k in figs:
                    w(f"\n![{k}]({figs[k]})\n")
        w("")
    tg = result.targets()
    if len(tg):
        met = result.targets_met()
        w("## Targets: held-out patients, as scanned and under every acquisition\n")
        tp = result.targets("patient")
        mp = result.targets_met("patient")
        w("**Per held-out patient** (the unit the targets are stated in: every leave-one-patient-out direction under every "
          "acquisition; a gene's r is its mean over the patient's held-out sections, and one Wilcoxon test "
          "pairs them across genes; coverage and sparsification must hold on every section):\n")
        for k, lab in _TARGET_NAMES.items():
            m = mp[k]
            w(f"- {lab}: **{m['met']}/{m['of']}**" + (" — met" if m["all"] else " — **not met everywhere**"))
        w("")
        L.extend(_md_table(tp, PATIENT_TARGET_COLUMNS, {"p (ens > base)": _p, "p CP10k (two-sided)": _p}))
        w("")
        w("**Per held-out section** (stricter: one test per section):\n")
        for k, lab in _TARGET_NAMES.items():
            m = met[k]
            w(f"- {lab}: **{m['met']}/{m['of']}**" + (" — met" if m["all"] else " — **not met everywhere**"))
        if met.get("coverage_90_range"):
            lo, hi = met["coverage_90_range"]
            w(f"- 90% coverage ranged {lo:.3f}–{hi:.3f}.")
        w("")
        L.extend(_md_table(tg, ["fold", "section", "acquisition", "Δ ens−base", "p (ens > base)", "Δ CP10k",
                                "p CP10k (two-sided)", "coverage 90%", "err80 by epistemic SD",
                                "err80 by depth (proxy)", "beats_baseline", "not_worse_cp10k", "coverage_ok",
                                "epistemic_ranks"], {"p (ens > base)": _p, "p CP10k (two-sided)": _p}))
        w("")
    if "sparsification_lopo" in figs:
        w("## Does the uncertainty say which spots to trust?\n")
        w("Per gene, spots are ranked by the model's uncertainty and only the most certain are kept; the curve "
          "is the mean |log1p error| of the kept spots over that of all spots (1 = a random choice). The depth "
          "proxy keeps the spots with the most predicted counts; the oracle ranks by the error itself. An "
          "epistemic curve below the proxy's means the members' disagreement points at the spots the model "
          "gets wrong on a new patient.\n")
        w(f"![sparsification]({figs['sparsification_lopo']})\n")
    if "map_agreement" in figs:
        w("## Agreement of the maps\n")
        w("Lee's L (esda) is a spatially smoothed correlation of the predicted and observed maps of a gene (k = 6 "
          "neighbours); SSIM (scikit-image) compares the two maps rasterised on the spot grid, each scaled to "
          "[0, 1]. Both are 1 for the same map.\n")
        w(f"![maps]({figs['map_agreement']})\n")
    w("## How to read calibration\n")
    w("A 90% predictive interval should contain 90% of the observed counts: *coverage 90%* far below 0.9 means "
      "over-confident intervals (a U-shaped PIT histogram), above means too wide (a hump). The reliability curve "
      "puts every level side by side; on the diagonal is calibrated. Counts are discrete, so coverage uses the "
      "randomised PIT (Czado et al. 2009) in expectation.\n")
    w("## Seconds per fold\n")
    for k, v in result.timings.items():
        if isinstance(v, dict):
            w(f"- `{k}`: " + ", ".join(f"{a} {b}" for a, b in v.items()))
    w("")
    return "\n".join(L)


def _acq_text() -> str:
    return ("Each held-out patient's section is re-made as another acquisition would have made it "
            "(`stimage_nb.shifts`: coarser scans down to 4 µm/px, defocus, restaining, JPEG, a black masked "
            "background, combinations; only the box around the spots is re-made) and predicted by the same "
            "fold's models, unchanged.\n")
