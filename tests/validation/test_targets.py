"""Issue 11's targets, per held-out section and per held-out patient (ValidationResult.targets).

The records are built from known per-gene correlations (pure logic: the statistics are checked against
scipy's Wilcoxon test computed here by hand on the same numbers).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon

from stimage_nb.validation import ValidationResult, paired_test

GENES = [f"g{i}" for i in range(60)]


def _section(protocol, fold, section, acquisition, patient, ens, base, ens_cp, base_cp, coverage=0.88,
             err_epi=0.9, err_depth=1.1):
    """Records and per-gene rows of one scored (section, acquisition), as the runner writes them."""
    src = section.split("__")[0]
    info = {"protocol": protocol, "fold": fold, "train": "X", "held_out": patient, "section": section,
            "source_section": src, "acquisition": acquisition, "patient": patient, "platform": "st",
            "held_out_patient": True}
    rec = []

    def r(model, metric, target, value):
        rec.append({**info, "model": model, "metric": metric, "target": target,
                    "value": np.nan if value is None else float(value)})

    genes = []
    for target, e, b in (("log1p_counts", ens, base), ("log1p_cp10k", ens_cp, base_cp)):
        r("ensemble", "pearson_mean", target, np.mean(e))
        r("baseline", "pearson_mean", target, np.mean(b))
        pt = paired_test(e, b)
        r("ensemble-baseline", "delta_pearson_mean", target, pt["mean_difference"])
        r("ensemble-baseline", "wilcoxon_p_greater", target, pt["p_greater"])
        r("ensemble-baseline", "wilcoxon_p_two_sided", target, pt["p_two_sided"])
        for m, v in (("ensemble", e), ("baseline", b)):
            genes.append(pd.DataFrame({"protocol": protocol, "fold": fold, "section": section,
                                       "acquisition": acquisition, "model": m, "target": target, "gene": GENES,
                                       "pearson": v, "spearman": v, "lees_l": v, "ssim": v}))
    r("ensemble", "coverage_90", "counts", coverage)
    r("ensemble", "err80_by_epistemic_sd", "log1p_counts", err_epi)
    r("ensemble", "err80_by_predicted_depth", "log1p_counts", err_depth)
    return rec, pd.concat(genes, ignore_index=True)


def _result(parts):
    recs, genes = zip(*parts)
    return ValidationResult(records=pd.DataFrame([x for r in recs for x in r]),
                            per_gene=pd.concat(genes, ignore_index=True))


def _gain(rng, shift):
    """Per-gene r of a model ahead of the baseline by ``shift``, give or take 0.05 per gene."""
    b = rng.uniform(0.1, 0.5, len(GENES))
    return b + shift + rng.normal(0, 0.05, len(GENES)), b


def test_patient_targets_pool_a_patients_sections_into_one_paired_test():
    rng = np.random.default_rng(3)
    # the model is ahead by 0.005 on every gene, hidden in each section by gene-level noise of +-0.1 that
    # differs between the two sections (as tissue does): no section alone shows it, the patient does
    noise = rng.permutation(np.linspace(-0.1, 0.1, len(GENES)))
    b1, b2 = rng.uniform(0.1, 0.5, len(GENES)), rng.uniform(0.1, 0.5, len(GENES))
    e1, e2 = b1 + 0.005 + noise, b2 + 0.005 - noise
    cp = rng.uniform(0, 0.2, len(GENES))
    res = _result([
        _section("lopo", "test_C", "C1", "reference", "C", e1, b1, cp, cp - 0.01),
        _section("lopo", "test_C", "C2", "reference", "C", e2, b2, cp, cp - 0.01),
        # the acquisition protocol scores the same sections as scanned with the same models: counted once
        _section("acquisition", "lopo_test_C", "C1", "reference", "C", e1, b1, cp, cp - 0.01),
        _section("acquisition", "lopo_test_C", "C2", "reference", "C", e2, b2, cp, cp - 0.01),
    ])
    by_section = res.targets()
    assert len(by_section) == 2  # not 4: the as-scanned duplicates are dropped
    assert set(by_section["protocol"]) == {"lopo"}
    # per section, the small gains are not significant ...
    p_sec = [wilcoxon(e, b, alternative="greater").pvalue for e, b in ((e1, b1), (e2, b2))]
    assert all(p > 0.05 for p in p_sec), p_sec
    assert not by_section["beats_baseline"].any()
    # ... per patient, a gene's r is its mean over the patient's sections, and one test pairs the means
    by_patient = res.targets("patient")
    assert len(by_patient) == 1 and by_patient.loc[0, "n_sections"] == 2
    assert by_patient.loc[0, "sections"] == "C1,C2" and by_patient.loc[0, "protocol"] == "lopo"
    # folds read back in another order (load_result reads them by file name: acquisition_* first) count the same
    flipped = ValidationResult(records=res.records.iloc[::-1].reset_index(drop=True), per_gene=res.per_gene)
    assert set(flipped.targets()["protocol"]) == {"lopo"}
    assert flipped.targets("patient").loc[0, "p (ens > base)"] == pytest.approx(by_patient.loc[0, "p (ens > base)"])
    ref = wilcoxon((e1 + e2) / 2, (b1 + b2) / 2, alternative="greater").pvalue
    assert by_patient.loc[0, "p (ens > base)"] == pytest.approx(ref)
    assert by_patient.loc[0, "Δ ens−base"] == pytest.approx(np.mean((e1 + e2) / 2 - (b1 + b2) / 2))
    assert ref < 1e-6 and bool(by_patient.loc[0, "beats_baseline"]) is True
    met = res.targets_met("patient")
    assert met["beats_baseline"] == {"met": 1, "of": 1, "all": True}
    assert res.targets_met()["beats_baseline"]["of"] == 2


def test_patient_targets_need_coverage_and_sparsification_on_every_section_and_split_acquisitions():
    rng = np.random.default_rng(4)
    e, b = _gain(rng, 0.1)
    cp = rng.uniform(0, 0.2, len(GENES))
    res = _result([
        _section("lopo", "test_C", "C1", "reference", "C", e, b, cp, cp),
        _section("lopo", "test_C", "C2", "reference", "C", e, b, cp, cp, coverage=0.80, err_epi=1.2),
        _section("acquisition", "lopo_test_C", "C1__blur", "blur", "C", e, b, cp - 0.05, cp),
        _section("acquisition", "lopo_test_C", "C2__blur", "blur", "C", e, b, cp - 0.05, cp),
        _section("lopo", "test_B", "B1", "reference", "B", e, b, cp, cp),
    ])
    t = res.targets("patient").set_index(["patient", "acquisition"])
    assert sorted(t.index) == [("B", "reference"), ("C", "blur"), ("C", "reference")]
    assert t.loc[("C", "blur"), "sections"] == "C1,C2"  # named by the section as scanned
    # one section's coverage out of range fails the patient; the range is reported
    assert not t.loc[("C", "reference"), "coverage_ok"] and t.loc[("B", "reference"), "coverage_ok"]
    assert t.loc[("C", "reference"), "coverage 90% (min)"] == pytest.approx(0.80)
    assert t.loc[("C", "reference"), "epistemic ranks (sections)"] == "1/2"
    assert not t.loc[("C", "reference"), "epistemic_ranks"]
    # every gene worse on CP10k under the blur: significantly worse, so "not worse" fails
    assert t.loc[("C", "blur"), "Δ CP10k"] == pytest.approx(-0.05)
    assert not t.loc[("C", "blur"), "not_worse_cp10k"] and t.loc[("C", "reference"), "not_worse_cp10k"]
    met = res.targets_met("patient")
    assert met["not_worse_cp10k"] == {"met": 2, "of": 3, "all": False}
    assert met["epistemic_ranks"] == {"met": 1, "of": 2, "all": False}  # judged as scanned only
    assert met["coverage_90_range"] == [pytest.approx(0.80), pytest.approx(0.88)]


def test_targets_refuse_an_unknown_unit():
    res = _result([_section("lopo", "test_C", "C1", "reference", "C", np.ones(60) * 0.3, np.ones(60) * 0.2,
                            np.ones(60) * 0.1, np.ones(60) * 0.1)])
    with pytest.raises(ValueError, match="'section' or 'patient'"):
        res.targets("spot")
