"""The runner on the real bundle (a small recipe): tidy records, reports, resumption, bad protocols."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stimage_nb.errors import StimageInputError
from stimage_nb.shifts import Shift
from stimage_nb.validation import RECORD_COLUMNS, validate, write_report
from stimage_nb.validation import _runner as R

TINY = dict(members=2, epochs=6, kmeans_k=8, kmeans_patches=2000, out_px=32, tile_um=150.0,
            background="white", depth="section", member_data="groups")
GENES = 24


@pytest.fixture(scope="module")
def genes(her2st_manifest):
    from stimage_nb.io.readers import read_manifest

    (c3,) = read_manifest(her2st_manifest, ["C3"])
    tot = np.asarray(c3.adata.X.sum(0)).ravel()
    return [c3.genes[i] for i in sorted(np.argsort(-tot)[:GENES])]


@pytest.fixture(scope="module")
def run(tmp_path_factory, her2st_manifest, genes):
    from stimage_nb.train import TrainConfig

    out = tmp_path_factory.mktemp("validate")
    kw = dict(out=out, protocol=["lopo", "acquisition"], genes=genes, sections=["B4", "C3"], patients=["B"],
              config=TrainConfig(**TINY), shifts=[Shift("scan_4um", um_per_px=4.0)], n_boot=20, progress=False)
    return validate(her2st_manifest, **kw), kw


def test_records_are_tidy_and_complete(run):
    res, _ = run
    df = res.to_frame()
    assert list(df.columns) == list(RECORD_COLUMNS)
    assert not df.duplicated(["protocol", "fold", "section", "model", "metric", "target"]).any()
    folds = set(zip(df["protocol"], df["fold"]))
    assert folds == {("lopo", "test_B"), ("acquisition", "lopo_test_B")}  # patients=["B"]: only B is held out
    assert set(df["model"]) >= {"ensemble", "single_member", "baseline", "ensemble-baseline"}
    assert set(df.loc[df["protocol"] == "acquisition", "section"]) == {"B4", "B4__scan_4um"}
    assert df["held_out_patient"].all() and set(df["train"]) == {"C3"}
    r = df[df["metric"] == "pearson_mean"]
    assert r["value"].between(-1, 1).all() and len(r) == 3 * 2 * 3  # 3 sections x 2 targets x 3 models
    # the paired difference is the difference of the two models' means
    t = res.table().set_index(["protocol", "section"])
    row = t.loc[("lopo", "B4")]
    assert row["Δ ens−base"] == pytest.approx(row["ensemble r"] - row["baseline r"])
    assert row["CI low"] <= row["Δ ens−base"] <= row["CI high"]
    assert 0 <= row["coverage 90%"] <= 1 and 0 <= row["p (ens > base)"] <= 1
    # the depth of the held-out patient is given: the predicted mean depth follows the observed one
    assert 0.5 < row["depth pred/obs"] < 2.0
    assert row["ensemble r"] != row["single member r"]
    cov = res.value("single_member", "coverage_90", "counts")
    assert len(cov) == 3
    kinds = {c["kind"] for c in res.curves}
    assert kinds == {"reliability", "pit_histogram", "sparsification"}
    pg = res.per_gene
    assert set(pg["model"]) == {"ensemble", "single_member", "baseline"} and pg["gene"].nunique() == GENES
    assert pg["lees_l"].between(-1.01, 1.01).all()


def test_report_folder(run, tmp_path):
    res, _ = run
    paths = write_report(res, tmp_path)
    for k in ("validation_csv", "table_csv", "targets_csv", "targets_patient_csv", "per_gene", "results_json", "report",
              "correlations_lopo", "calibration_lopo", "acquisition", "sparsification_lopo", "map_agreement"):
        assert paths[k].is_file() and paths[k].stat().st_size > 100, k
    text = paths["report"].read_text()
    assert "Leave one patient out" in text and "## Targets: held-out patients" in text and "![acquisitions]" in text
    assert "**Per held-out patient**" in text and "**Per held-out section**" in text
    # one row per held-out patient and acquisition, naming the patient's held-out sections as scanned
    tp = pd.read_csv(paths["targets_patient_csv"])
    ts = res.targets()
    assert len(tp) == ts.groupby(["patient", "acquisition"]).ngroups
    for _, r in tp.iterrows():
        secs = ts[(ts["patient"] == r["patient"]) & (ts["acquisition"] == r["acquisition"])]["source_section"]
        assert r["sections"].split(",") == list(secs) and r["n_sections"] == len(secs)
    back = json.loads(paths["results_json"].read_text())
    assert len(back["records"]) == len(res.records) and back["options"]["n_genes"] == GENES


def test_a_finished_fold_is_not_redone(run, her2st_manifest, monkeypatch):
    res, kw = run
    folds = sorted((kw["out"] / "folds").glob("*.json"))
    assert len(folds) == 2
    stamps = {f: f.stat().st_mtime_ns for f in folds}

    def boom(*a, **k):
        raise AssertionError("a finished fold was run again")

    monkeypatch.setattr(R, "_run_fold", boom)
    again = validate(her2st_manifest, **kw)
    assert {f: f.stat().st_mtime_ns for f in folds} == stamps
    assert again.to_frame().equals(res.to_frame())
    # one fold file gone: only that fold is redone, and its model is loaded, not retrained
    monkeypatch.undo()
    calls = []
    real = R._run_fold
    monkeypatch.setattr(R, "_run_fold", lambda split, ctx: calls.append(split.id) or real(split, ctx))
    import stimage_nb.train as T

    monkeypatch.setattr(T, "train", boom)
    gone = kw["out"] / "folds" / "lopo_test_B.json"
    gone.unlink()
    third = validate(her2st_manifest, **kw)
    assert calls == ["lopo:test_B"]
    assert stamps[folds[0]] == folds[0].stat().st_mtime_ns  # the acquisition fold untouched
    a, b = third.to_frame(), res.to_frame()
    assert np.allclose(a["value"].astype(float).fillna(-9), b["value"].astype(float).fillna(-9), atol=1e-9)


def test_a_protocol_the_manifest_cannot_support(her2st_manifest, tmp_path, capsys):
    from stimage_nb.cli import main

    with pytest.raises(StimageInputError, match="at least 2 patients"):
        validate(her2st_manifest, out=tmp_path, protocol="lopo", sections=["C3", "C4"], genes=["ERBB2"])
    (tmp_path / "g.txt").write_text("ERBB2\n")
    rc = main(["validate", "--manifest", str(her2st_manifest), "--sections", "C3,C4", "--protocol", "lopo",
               "--genes", str(tmp_path / "g.txt"), "--out", str(tmp_path / "v")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "at least 2 patients" in err and "Traceback" not in err
    assert not (tmp_path / "v" / "models").exists()
    rc = main(["validate", "--manifest", str(her2st_manifest), "--protocol", "kfold", "--out", str(tmp_path / "w")])
    assert rc == 2 and "unknown validation protocol" in capsys.readouterr().err
    # an empty --protocol (an unset shell variable) is refused, not read as "every protocol"
    rc = main(["validate", "--manifest", str(her2st_manifest), "--protocol", "", "--out", str(tmp_path / "w")])
    assert rc == 2 and "--protocol is empty" in capsys.readouterr().err
    rc = main(["validate", "--manifest", str(her2st_manifest), "--protocol", "lopo", "--n-boot", "-5",
               "--out", str(tmp_path / "w")])
    assert rc == 2 and "--n-boot" in capsys.readouterr().err
    # a gene list none of whose genes is measured: said as such, not "no counts"
    (tmp_path / "none.txt").write_text("NOTAGENE\nFOO2\n")
    with pytest.raises(StimageInputError, match="no section has counts of the 2 listed genes.*NOTAGENE"):
        validate(her2st_manifest, out=tmp_path / "x", protocol="lopo", genes=["NOTAGENE", "FOO2"])
    assert not (tmp_path / "w").exists()
