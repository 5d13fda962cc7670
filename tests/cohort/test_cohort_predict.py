"""Cohort prediction on a Dask LocalCluster over REAL slides: the bundle's SVS and two her2st section
images predicted as whole slides, beside a truncated copy of the SVS (a corrupt slide)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from _modelkit import tiny_run

pytest.importorskip("distributed")

GRID_UM = 300.0  # coarse grid: a few hundred points over a her2st section, fast on 2 cores


def _cohort_csv(data_dir, tmp):
    svs = data_dir / "fixtures" / "wsi" / "cmu_small_region.svs"
    bad = tmp / "slides" / "truncated.svs"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(svs.read_bytes()[: svs.stat().st_size // 3])
    imgs = data_dir / "her2st" / "images"
    # a pathologist's tumour outline on the SVS: its left half (QuPath GeoJSON, level-0 pixels)
    ann = tmp / "cmu_tumour.geojson"
    ann.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1110, 0], [1110, 2967],
                                                                             [0, 2967], [0, 0]]]},
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}}]}))
    p = tmp / "cohort.csv"
    pd.DataFrame({"slide": [str(svs), str(imgs / "C3.jpg"), str(imgs / "B4.jpg"), "slides/truncated.svs"],
                  "patient_id": ["P1", "C", "B", "P2"], "slide_id": ["cmu", "C3", "B4", "bad"],
                  "um_per_px": ["", "0.69", "0.69", ""],
                  "annotations": [ann.name, "", "", ""]}).to_csv(p, index=False)
    return p, bad


def _opts():
    from stimage_nb.cluster import ClusterOptions

    return ClusterOptions(n_workers=2, processes=False)


@pytest.fixture(scope="module")
def cohort_run(data_dir, tmp_path_factory):
    from stimage_nb.cohort import FeatureOptions, predict_cohort

    tmp = tmp_path_factory.mktemp("cohort")
    csv, bad = _cohort_csv(data_dir, tmp)
    res = predict_cohort(tiny_run(), csv, tmp / "out", grid_um=GRID_UM, cluster_options=_opts(),
                         features=FeatureOptions(n_perms=50), progress=False)
    return res, csv, bad, tmp / "out"


def test_good_slides_complete_and_the_corrupt_one_is_recorded(cohort_run):
    from stimage_nb.io.prediction import read_prediction

    res, _, bad, out = cohort_run
    st = res.status.set_index("slide_id")
    assert list(st.index) == ["cmu", "C3", "B4", "bad"]
    assert (st.loc[["cmu", "C3", "B4"], "status"] == "done").all()
    assert st.loc["bad", "status"] == "failed"
    err = st.loc["bad", "error"]
    assert "truncated.svs" in err and "\n" not in err and "Traceback" not in err
    assert not (out / "slides" / "bad.h5ad").exists()
    # the records on disk say the same, and status.csv lists every slide
    assert json.loads((out / "status" / "bad.json").read_text())["error"] == err
    assert pd.read_csv(out / "status.csv")["slide_id"].tolist() == ["cmu", "C3", "B4", "bad"]
    for sid in ("cmu", "C3", "B4"):
        a = read_prediction(out / "slides" / f"{sid}.h5ad", strict=True)
        assert a.n_obs == st.loc[sid, "n_spots"] > 0
        assert a.uns["stimage_nb"]["patient"] == st.loc[sid, "patient_id"]
        # a grid GRID_UM apart over the tissue, in level-0 pixels of that slide
        xy = np.asarray(a.obsm["spatial"])
        um = a.uns["stimage_nb"]["um_per_px"]
        steps = np.diff(np.unique(np.round(xy[:, 0], 3)))
        assert np.allclose(steps[steps < 1.5 * GRID_UM / um], GRID_UM / um, atol=0.01)
    # a her2st section holds more tissue than the small SVS region
    assert st.loc["C3", "n_spots"] > st.loc["cmu", "n_spots"]


def test_features_table(cohort_run):
    from stimage_nb.io.prediction import read_prediction

    res, _, _, out = cohort_run
    f = pd.read_csv(out / "features.csv").set_index("slide_id")
    assert list(f.index) == ["cmu", "C3", "B4", "bad"]
    assert f.loc["bad", "status"] == "failed" and "truncated.svs" in f.loc["bad", "error"]
    a = read_prediction(out / "slides" / "C3.h5ad")
    pb = f.filter(like="pb_")
    assert list(pb.columns) == [f"pb_{g}" for g in a.var_names]
    assert pb.loc["bad"].isna().all() and pb.loc[["cmu", "C3", "B4"]].notna().all().all()
    # pseudo-bulk = the mean predicted expression over the slide's points
    assert np.allclose(pb.loc["C3"].to_numpy(), np.asarray(a.X).mean(0), rtol=1e-5)
    # cell-type composition: mean probabilities, which sum to one
    ct = f.filter(like="celltype_")
    assert ct.shape[1] == len(a.obsm["celltype_mean"].columns)
    assert np.allclose(ct.loc[["cmu", "C3", "B4"]].sum(1), 1.0, atol=1e-4)
    # spatial types: fractions sum to one; enrichment z-scores for the slides with several types
    stf = f.filter(like="spatialtype_")
    assert stf.shape[1] >= 2 and np.allclose(stf.loc[["cmu", "C3", "B4"]].sum(1), 1.0)
    nh = f.filter(like="nhood_")
    assert nh.loc["C3"].notna().any() and nh.loc["bad"].isna().all()
    assert res.features.spatial_types.names == tuple(c.replace("spatialtype_", "") for c in stf.columns)
    # the pseudo-bulk's uncertainty, gene by gene, in the long table
    long = pd.read_csv(out / "pseudobulk.csv")
    c3 = long[long.slide_id == "C3"].set_index("gene")
    assert np.allclose(c3.loc[list(a.var_names), "mean"], pb.loc["C3"].to_numpy(), rtol=1e-5)
    assert (c3["var_epistemic"] >= 0).all() and (c3["sd"] > 0).all()
    assert np.allclose(c3["sd"] ** 2, c3["var_aleatoric"] + c3["var_epistemic"], rtol=1e-5)
    assert (out / "spatial_types.npz").is_file() and (out / "features.json").is_file()


def test_a_second_run_redoes_nothing_and_a_changed_file_is_retried(cohort_run, data_dir):
    from stimage_nb.cohort import predict_cohort

    res, csv, bad, out = cohort_run
    slides = out / "slides"
    before = {p.name: p.stat().st_mtime_ns for p in list(slides.glob("*.h5ad")) + list((out / "status").glob("*.json"))}
    again = predict_cohort(tiny_run(), csv, out, grid_um=GRID_UM, cluster_options=_opts(), features=False,
                           progress=False)
    assert again.ran == () and set(again.skipped) == {"cmu", "C3", "B4", "bad"}
    after = {p.name: p.stat().st_mtime_ns for p in list(slides.glob("*.h5ad")) + list((out / "status").glob("*.json"))}
    assert after == before
    assert again.status.set_index("slide_id").loc["bad", "status"] == "failed"
    # the corrupt file is replaced by the complete slide: only that one is predicted again
    shutil.copyfile(data_dir / "fixtures" / "wsi" / "cmu_small_region.svs", bad)
    third = predict_cohort(tiny_run(), csv, out, grid_um=GRID_UM, cluster_options=_opts(), features=False,
                           progress=False)
    assert third.ran == ("bad",)
    assert third.status.set_index("slide_id").loc["bad", "status"] == "done"
    assert {p.name: p.stat().st_mtime_ns for p in slides.glob("*.h5ad") if p.name != "bad.h5ad"} == \
        {k: v for k, v in before.items() if k.endswith(".h5ad")}


def test_cli_cohort_predict_and_bad_tables(cohort_run, tmp_path, capsys):
    from stimage_nb.cli import main

    res, csv, _, out = cohort_run
    rc = main(["cohort", "predict", "--model", str(tiny_run()), "--slides", str(csv), "--out", str(out),
               "--grid-um", str(GRID_UM), "--workers", "1", "--no-features"])
    text = capsys.readouterr().out
    n_failed = int(re.search(r"(\d+) failed ->", text).group(1))  # an earlier test may have repaired the corrupt one
    assert rc == (2 if n_failed else 0) and "of 4 slides done" in text and "predicted now" in text
    missing = tmp_path / "missing.csv"  # a slide that fails: the run goes on, then exits 2 naming how many failed
    missing.write_text(f"slide,patient_id\n{tmp_path / 'nope.svs'},P1\n")
    rc = main(["cohort", "predict", "--model", str(tiny_run()), "--slides", str(missing), "--out", str(tmp_path / "m"),
               "--grid-um", str(GRID_UM), "--workers", "1", "--no-features"])
    cap = capsys.readouterr()
    assert rc == 2 and "nope" in cap.out and "slide file not found" in cap.out
    errors = [ln for ln in cap.err.splitlines() if ": error:" in ln]  # (the progress bar shares stderr)
    assert len(errors) == 1 and "1 of 1 slides failed" in errors[0] and "--retry-failed" in errors[0]
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,patient\nx.svs,P1\n")
    rc = main(["cohort", "predict", "--model", str(tiny_run()), "--slides", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "patient_id" in err and len(err.strip().splitlines()) == 1
    dup = tmp_path / "dup.csv"
    dup.write_text("slide,patient_id\na/s1.svs,P1\nb/s1.svs,P2\n")
    assert main(["cohort", "predict", "--model", str(tiny_run()), "--slides", str(dup), "--out", str(tmp_path / "o")]) == 2
    assert "duplicate slide ids ['s1']" in capsys.readouterr().err
    assert main(["cohort", "predict", "--model", str(tmp_path), "--slides", str(csv), "--out", str(tmp_path / "o")]) == 2
    assert "not a trained model directory" in capsys.readouterr().err
    assert main(["cohort", "predict", "--model", str(tiny_run()), "--slides", str(csv), "--out", str(bad)]) == 2
    assert "must be a directory" in capsys.readouterr().err
    assert main(["cohort", "predict", "--model", str(tiny_run()), "--slides", str(csv), "--out", str(tmp_path / "o"),
                 "--genes", "hvg:100"]) == 2
    assert "fixed panel" in capsys.readouterr().err
    assert main(["cohort", "predict", "--model", str(tiny_run()), "--slides", str(csv), "--out", str(tmp_path / "o"),
                 "--scheduler", "yarn"]) == 2
    assert "unknown scheduler 'yarn'" in capsys.readouterr().err


def test_cli_cohort_features_of_existing_predictions(cohort_run, tmp_path):
    from stimage_nb.cli import main

    _, _, _, out = cohort_run
    assert main(["cohort", "features", "--pred", str(out / "slides"), "--out", str(tmp_path), "--no-spatial-types"]) == 0
    f = pd.read_csv(tmp_path / "features.csv").set_index("slide_id")
    assert set(f.index) >= {"cmu", "C3", "B4"} and f.loc["C3", "patient_id"] == "C"
    ref = pd.read_csv(out / "features.csv").set_index("slide_id")
    assert np.allclose(f.loc["C3"].filter(like="pb_").astype(float), ref.loc["C3"].filter(like="pb_").astype(float))


def test_pseudobulk_over_an_annotated_region(cohort_run):
    from stimage_nb.cohort import FeatureOptions, cohort_features
    from stimage_nb.io.prediction import read_prediction

    _, _, _, out = cohort_run
    a = read_prediction(out / "slides" / "cmu.h5ad")
    inside = a.obs["region"].astype(str).to_numpy() == "Tumor"
    x = np.asarray(a.obsm["spatial"])[:, 0]
    assert inside.any() and (~inside).any() and (x[inside] < 1110).all() and (x[~inside] >= 1110).all()
    preds = {s: out / "slides" / f"{s}.h5ad" for s in ("cmu", "C3")}
    f = cohort_features(preds, options=FeatureOptions(region="tumo*", spatial_types=False))
    t = f.table
    assert t.loc["cmu", "n_spots_region"] == inside.sum() and t.loc["C3", "n_spots_region"] == 0
    assert np.allclose(t.loc["cmu"].filter(like="pb_").astype(float), np.asarray(a.X)[inside].mean(0), rtol=1e-5)
    assert t.loc["C3"].filter(like="pb_").isna().all() and "C3" in f.params["notes"]["region"]
    # the long table holds both the tissue and the region
    assert set(f.pseudobulk[f.pseudobulk.slide_id == "cmu"]["region"]) == {"tissue", "tumo*"}


def test_feature_options_fail_before_any_prediction(tmp_path):
    from stimage_nb.cohort import FeatureOptions
    from stimage_nb.errors import StimageInputError

    for kw, msg in [({"genes": "hvg:2000"}, "fixed panel"), ({"genes": "nope"}, "neither a gene panel"),
                    ({"epistemic": "x"}, "epistemic"), ({"pam50_centroids": str(tmp_path / "c.tsv")}, "not found"),
                    ({"smooth_um": -1}, "positive")]:
        with pytest.raises(StimageInputError, match=msg):
            FeatureOptions(**kw)
