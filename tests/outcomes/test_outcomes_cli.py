"""``stimage-nb outcomes`` on real TCGA-BRCA tables, and every kind of bad table -> one line, exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _outcome_data  # noqa: E402

from stimage_nb.cli import main  # noqa: E402

# fixtures (a module, not a conftest.py: tests/omero imports its conftest by name)
bulk = _outcome_data.bulk  # a fixture
os_outcome = _outcome_data.os_outcome  # a fixture
os_subset = _outcome_data.os_subset  # a fixture

GENES = ["GATA3", "CD3D", "EPCAM", "CDH1", "CXCL13", "ERBB2", "BCL2", "EGFR", "AURKA", "CD8A", "PDGFRB", "COL1A1"]
FAST = ["--folds", "3", "--inner-folds", "2", "--bootstrap", "20", "--random-sets", "2"]


@pytest.fixture(scope="module")
def tables(bulk, os_subset, tmp_path_factory):
    """A slide-level features table (two rows for some patients, as a cohort run writes) and a clinical table."""
    d = tmp_path_factory.mktemp("tables")
    ids = os_subset.index[:300]
    genes = [g for g in GENES if g in bulk.expression.columns]
    feats = bulk.expression.loc[ids, genes].reset_index()
    slides = bulk.slides[bulk.slides["patient_id"].isin(ids)]
    feats = slides.merge(feats, on="patient_id")  # one row per slide: the patient's values
    feats.loc[feats.index[:3], "error"] = "corrupt slide"  # failed slides are left out
    feats.to_csv(d / "features.csv", index=False)
    clin = pd.DataFrame({"patient_id": ids, "time": os_subset.loc[ids, "time"].to_numpy(),
                         "event": os_subset.loc[ids, "event"].to_numpy(),
                         "age": bulk.clinical.loc[ids, "age"].to_numpy(),
                         "her2": (bulk.cnv.loc[ids, "ERBB2"] >= 2).astype(int).to_numpy()})
    clin.to_csv(d / "clinical.csv", index=False)
    return d


def test_survival_run_writes_results_tables_and_figures(tables, tmp_path, capsys):
    out = tmp_path / "surv"
    args = ["outcomes", "--features", str(tables / "features.csv"), "--clinical", str(tables / "clinical.csv"),
            "--out", str(out), "--columns", "GATA3,AURKA,BCL2,CD8A,EGFR", "--covariates", "age", *FAST]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "model: Harrell's C" in text and "clinical:" in text and "random sets (n=2)" in text
    res = json.loads((out / "results.json").read_text())
    m = res["model"]
    feats = pd.read_csv(tables / "features.csv")
    n_ok = feats.loc[feats["error"].isna(), "patient_id"].nunique()  # patients whose slides all failed are out
    assert res["task"] == "survival" and m["n_patients"] == n_ok and 290 < n_ok < 300 and m["n_features"] == 5
    assert m["harrell_c"]["low"] <= m["harrell_c"]["value"] <= m["harrell_c"]["high"]
    assert len(m["folds"]) == 3 and all("harrell_c_low" in f and "uno_c" in f for f in m["folds"])
    assert set(res["baselines"]) == {"clinical", "clinical + model"} and res["random_sets"]["n"] == 2
    assert res["inputs"]["n_pool_features"] == len([g for g in GENES if g in pd.read_csv(tables / "features.csv")])
    for f in ("comparison.csv", "folds.csv", "predictions.csv", "coefficients.csv", "figures/km_risk_groups.png",
              "figures/comparison.png"):
        assert (out / f).is_file(), f
    pred = pd.read_csv(out / "predictions.csv")
    assert len(pred) == n_ok and set(pred["risk_group"]) == {"high", "low"}
    # a re-run replaces the set; nothing half-written is left behind
    assert main(args) == 0
    assert not list(out.glob(".*tmp*")) and json.loads((out / "results.json").read_text())["model"] == m


def test_classification_run(tables, tmp_path, capsys):
    out = tmp_path / "her2"
    assert main(["outcomes", "--features", str(tables / "features.csv"), "--clinical", str(tables / "clinical.csv"),
                 "--out", str(out), "--target", "her2", *FAST, "--random-sets", "0"]) == 0
    assert "model: ROC AUC" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "classification" and res["model"]["classes"] == ["0", "1"]
    assert 0.5 < res["model"]["roc_auc"]["value"] <= 1 and (out / "figures" / "roc.png").is_file()
    assert res["clinical_baseline"].startswith("not run")


def _bad(tmp_path, name, df):
    p = tmp_path / name
    df.to_csv(p, index=False)
    return str(p)


def test_bad_tables_fail_with_one_line(tables, tmp_path, capsys):
    F, C = str(tables / "features.csv"), str(tables / "clinical.csv")
    clin = pd.read_csv(C)
    feats = pd.read_csv(F)
    cases = [
        ([ "--features", str(tmp_path / "nope.csv"), "--clinical", C], "features table not found"),
        (["--features", _bad(tmp_path, "f1.csv", feats.drop(columns=["patient_id"])), "--clinical", C],
         "needs a 'patient_id' column"),
        (["--features", F, "--clinical", _bad(tmp_path, "c1.csv", clin.drop(columns=["time"]))], "no column 'time'"),
        (["--features", F, "--clinical", _bad(tmp_path, "c2.csv", clin.assign(time="long"))], "must be numeric"),
        (["--features", F, "--clinical", _bad(tmp_path, "c3.csv", clin.assign(time=clin["time"] - 1000))], "must be > 0"),
        (["--features", F, "--clinical", _bad(tmp_path, "c4.csv", clin.assign(event=2))], "must be 1 (event) or 0"),
        (["--features", F, "--clinical", _bad(tmp_path, "c5.csv", clin.assign(patient_id="P" + clin["patient_id"]))],
         "share no patient_id"),
        (["--features", _bad(tmp_path, "f2.csv", feats.assign(event=1)), "--clinical", C], "holds the outcome column"),
        (["--features", F, "--clinical", C, "--columns", "^NOPE"], "matches '^NOPE'"),
        (["--features", F, "--clinical", C, "--covariates", "stage"], "no covariate column(s) ['stage']"),
        (["--features", F, "--clinical", C, "--times", "a,b"], "--times must be numbers"),
        (["--features", F, "--clinical", _bad(tmp_path, "c6.csv", clin.assign(her2=1)), "--target", "her2"],
         "1 class(es)"),
        (["--features", F, "--clinical", C, "--folds", "1"], "at least 2"),
        (["--features", _bad(tmp_path, "f3.csv", feats[["patient_id", "slide_id"]]), "--clinical", C],
         "no numeric feature column"),
    ]
    for args, msg in cases:
        rc = main(["outcomes", *args, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert rc == 2, (args, err)
        assert err.count("\n") == 0 and msg in err, (msg, err)
    assert not (tmp_path / "o" / "results.json").exists()


def test_patient_features_averages_slides_and_encodes_calls():
    from stimage_nb.outcomes import patient_features

    t = pd.DataFrame({"patient_id": ["a", "a", "b", "c"], "slide_id": ["a1", "a2", "b1", "c1"],
                      "GATA3": [1.0, 3.0, 5.0, np.nan], "subtype": ["LumA", "LumB", "Her2", "LumA"],
                      "error": [None, None, None, "unreadable"]})
    X = patient_features(t)
    assert list(X.index) == ["a", "b"]  # c's only slide failed
    assert X.loc["a", "GATA3"] == 2.0 and X.loc["a", "subtype_LumA"] == 0.5 and X.loc["b", "subtype_Her2"] == 1.0
