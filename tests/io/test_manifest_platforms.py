"""Platforms in one manifest, the Section's platform field, and predicting other platforms with an ST model."""

from __future__ import annotations

import subprocess
import sys

import _modelkit as kit
import _platform_data as D
import numpy as np
import pandas as pd
import pytest

from stimage_nb import _keys as K
from stimage_nb.errors import StimageInputError
from stimage_nb.io import Section, read_manifest, read_visium
from stimage_nb.io.section import make_section_adata


def _her2st_row(her2st_manifest, name="C3"):
    h = pd.read_csv(her2st_manifest, dtype=str).set_index("section").loc[name]
    base = her2st_manifest.parent
    return {"section": name, "patient": h["patient"], "image": str(base / h["image"]), "counts": str(base / h["counts"]),
            "spots": str(base / h["spots"]), "um_per_px": h["um_per_px"]}


def _xenium_h5ad_row(data_dir, name="lung", **kw):
    xen = D.xenium_fixture(data_dir)
    return {"section": name, "patient": "NCBI858", "platform": "xenium", "outs": str(xen / "NCBI858.h5ad"),
            "image": str(xen / "NCBI858.jpg"), "um_per_px": str(D.XENIUM_HE_UM), "xy_columns": "y_pixel,x_pixel",
            "spot_diameter_um": "10", **kw}


@pytest.fixture(scope="module")
def mixed(data_dir, her2st_manifest, tmp_path_factory):
    """her2st (legacy ST), Visium SR1 (old `visium` column) and SR3 (parquet), Visium HD, Xenium outs/ and
    the Xenium h5ad as cells and as 100 µm pseudo-spots: one manifest, relative paths where they can be."""
    tmp = tmp_path_factory.mktemp("mixed")
    sr3 = D.visium_variant(data_dir, tmp, "parquet")
    xo = D.xenium_outs(data_dir, tmp)
    np.savetxt(tmp / "he_alignment.csv", D.alignment_matrix(), delimiter=",")
    rows = [_her2st_row(her2st_manifest),
            {"section": "heart", "patient": "H1", "visium": str(data_dir / "fixtures" / "visium_1.0.0")},
            {"section": "heart_sr3", "patient": "H1", "platform": "visium", "outs": sr3.name},
            {"section": "hd", "patient": "C", "outs": str(D.hd_field_case(data_dir)), "bin_um": "8"},
            {"section": "lung_outs", "patient": "NCBI858", "outs": xo.name,
             "image": str(D.xenium_fixture(data_dir) / "NCBI858.jpg"), "alignment": "he_alignment.csv"},
            _xenium_h5ad_row(data_dir),
            _xenium_h5ad_row(data_dir, "lung_ps100", pseudospot_um="100"),
            _xenium_h5ad_row(data_dir, "lung_ps55sq", pseudospot_um="55", pseudospot_lattice="square")]
    man = tmp / "mixed.csv"
    pd.DataFrame(rows).to_csv(man, index=False)
    return man


def test_a_manifest_mixing_platforms_reads_in_one_call(mixed, data_dir):
    secs = {s.name: s for s in read_manifest(mixed)}
    assert {n: s.platform for n, s in secs.items()} == {
        "C3": "st", "heart": "visium", "heart_sr3": "visium", "hd": "visium_hd", "lung_outs": "xenium",
        "lung": "xenium", "lung_ps100": "xenium", "lung_ps55sq": "xenium"}
    for s in secs.values():
        assert s.adata.uns[K.UNS][K.PLATFORM] == s.platform
    units = {n: s.adata.uns[K.UNS][K.OBS_UNIT] for n, s in secs.items()}
    assert units == {"C3": "spot", "heart": "spot", "heart_sr3": "spot", "hd": "bin", "lung_outs": "cell",
                     "lung": "cell", "lung_ps100": "pseudospot", "lung_ps55sq": "pseudospot"}
    assert secs["C3"].adata.n_obs == 180 and secs["C3"].diameter_um == 100.0
    ref = read_visium(data_dir / "fixtures" / "visium_1.0.0")
    for n in ("heart", "heart_sr3"):
        assert secs[n].patient == "H1"
        np.testing.assert_array_equal(secs[n].xy, ref.xy)
    assert secs["hd"].adata.n_obs == 576
    np.testing.assert_allclose(secs["lung_outs"].xy, secs["lung"].xy, atol=1e-6)
    assert secs["lung"].adata.n_obs == 200 and secs["lung"].patient == "NCBI858"
    ps = secs["lung_ps100"].adata.uns[K.UNS][K.PSEUDOSPOT]
    assert ps["diameter_um"] == 100.0 and ps["lattice"] == "hex" and ps["source_unit"] == "cell"
    assert secs["lung_ps55sq"].adata.uns[K.UNS][K.PSEUDOSPOT]["lattice"] == "square"
    assert secs["lung_ps100"].adata.X.sum() <= secs["lung"].adata.X.sum()
    from stimage_nb.io import manifest_platforms

    assert manifest_platforms(mixed) == {n: s.platform for n, s in secs.items()}  # the same, without reading data
    # a subset by name, in the order asked
    assert [s.name for s in read_manifest(mixed, ["lung_ps100", "C3"])] == ["lung_ps100", "C3"]


@pytest.mark.parametrize("row,msg", [
    (dict(platform="nanopore"), r"section lung, column platform\): unknown platform 'nanopore'; use one of"),
    (dict(platform=""), r"section lung is an AnnData \(NCBI858.h5ad\); say which platform"),
    (dict(image=""), r"section lung is an AnnData \(NCBI858.h5ad\) and needs its H&E in the column image"),
    (dict(xy_columns="y_pixel"), r"xy_columns must name two obs columns"),
    (dict(pseudospot_um="-5"), r"section lung, column pseudospot_um: '-5' is not a positive number"),
    (dict(pseudospot_um="100", pseudospot_lattice="tri"), r"pseudospot_lattice: 'tri' is not hex or square"),
    (dict(outs="nowhere/outs"), r"nowhere/outs: platform output \(column outs\) of section lung not found"),
])
def test_manifest_platform_rows_bad_input(data_dir, tmp_path, row, msg):
    man = tmp_path / "m.csv"
    pd.DataFrame([_xenium_h5ad_row(data_dir, **row)]).to_csv(man, index=False)
    with pytest.raises(StimageInputError, match=msg):
        read_manifest(man)


def test_manifest_platform_disagreements(data_dir, tmp_path, her2st_manifest):
    vis = data_dir / "fixtures" / "visium_1.0.0"
    cases = [
        ([{"section": "heart", "platform": "xenium", "outs": str(vis)}],
         r"visium_1.0.0: section heart: the column platform says 'xenium', but the folder is a visium output"),
        ([{"section": "x", "visium": str(D.xenium_outs(data_dir, tmp_path))}],
         r"section x: the column visium names a xenium folder; use the column outs"),
        ([{"section": "heart", "outs": str(vis), "visium": str(vis)}], r"section heart names both outs and visium"),
        ([{"section": "p", "outs": str(her2st_manifest)}], r"sections.csv: column outs of section p must name an output"),
        ([{"section": "e", "outs": str(tmp_path)}], r"section e: not a Space Ranger \(Visium\), Visium HD or Xenium"),
        ([{"section": "heart", "outs": str(vis)}, {"section": "heart", "outs": str(vis)}],
         r"every row needs a unique section name \(empty or repeated: \['heart'\]\)"),
        ([{"section": "heart", "outs": str(vis)}, {**_her2st_row(her2st_manifest), "platform": "visum"}],
         r"section C3, column platform\): unknown platform 'visum'"),
        ([{**_her2st_row(her2st_manifest), "platform": "xenium"}],
         r"section C3 \(xenium\) in the spots-table layout: give the cell/bin diameter in the column spot_diameter_um"),
    ]
    for rows, msg in cases:
        man = tmp_path / "m.csv"
        pd.DataFrame(rows).to_csv(man, index=False)
        with pytest.raises(StimageInputError, match=msg):
            read_manifest(man)


def test_section_platform_field(her2st_manifest, data_dir, tmp_path):
    """A keyword field with a default: positional construction still works; copies, subsets and gene
    selections keep the platform; it is always recorded in uns."""
    (c3,) = read_manifest(her2st_manifest, ["C3"], genes=kit.genes())
    assert c3.platform == "st" and c3.adata.uns[K.UNS][K.PLATFORM] == "st" and "platform='st'" in repr(c3)
    sub = c3.subset(np.arange(10))
    assert sub.platform == "st" and sub.adata.n_obs == 10 and sub.adata.uns[K.UNS][K.PLATFORM] == "st"
    a = make_section_adata(["a", "b"], [[0, 0], [1, 1]], 55.0)
    bare = Section("bare", a, None, 0.5, "P")  # positional, as older callers build it
    assert bare.platform == "unknown" and a.uns[K.UNS][K.PLATFORM] == "unknown"
    again = Section("again", c3.adata.copy(), c3.image_path, c3.um_per_px, c3.patient)
    assert again.platform == "st"  # an AnnData that records its platform keeps it
    v = Section("v", make_section_adata(["a"], [[0, 0]], 55.0), platform="Visium")
    assert v.platform == "visium"
    from stimage_nb.shifts import STANDARD_SHIFTS, shift_section

    assert shift_section(c3, STANDARD_SHIFTS[0], tmp_path).platform == "st"  # identity: a renamed copy
    heart = read_visium(data_dir / "fixtures" / "visium_1.0.0")
    scan2 = shift_section(heart, STANDARD_SHIFTS[1], tmp_path)  # a new image at 2x the pixel size
    assert scan2.platform == "visium" and scan2.um_per_px == pytest.approx(2 * heart.um_per_px)


# ---------------------------------------------------------------------------------------- prediction
def test_st_model_predicts_xenium_pseudospots_and_cells(data_dir, tmp_path):
    """A model trained on her2st (legacy ST) rows predicts the Xenium fixture at a matched scale (100 µm
    pseudo-spots) and per cell (a tile centred on each cell) through predict_manifest; the provenance says
    which platform was predicted and which the model was trained on."""
    from stimage_nb.io.prediction import read_prediction
    from stimage_nb.predict import predict_manifest

    run = kit.tiny_run()
    man = tmp_path / "xenium.csv"
    pd.DataFrame([_xenium_h5ad_row(data_dir, "lung_ps100", pseudospot_um="100"),
                  _xenium_h5ad_row(data_dir, "lung_cells")]).to_csv(man, index=False)
    paths = predict_manifest(run, man, tmp_path / "pred", device="cpu", progress=False)
    ps_sec, cell_sec = read_manifest(man)
    pred = {p.stem: read_prediction(p) for p in paths}
    a, c = pred["lung_ps100"], pred["lung_cells"]
    assert list(a.obs_names) == list(ps_sec.adata.obs_names) and a.n_vars == len(kit.genes())
    np.testing.assert_allclose(a.obsm[K.SPATIAL], ps_sec.xy)
    assert list(c.obs_names) == list(cell_sec.adata.obs_names) and c.n_obs == 200
    for p, unit in ((a, "pseudospot"), (c, "cell")):
        u = p.uns[K.UNS]
        assert u["platform"] == "xenium" and u["obs_unit"] == unit and list(u["train_platforms"]) == ["st"]
        assert np.isfinite(p.X).all() and (p.X > 0).all()
        assert (p.layers[K.ALEATORIC] > 0).all()
    assert a.uns[K.UNS]["pseudospot_um"] == 100.0 and c.uns[K.UNS]["pseudospot_um"] == 0.0
    np.testing.assert_allclose(c.obsm[K.SPATIAL], cell_sec.xy)  # one tile centred on each cell
    assert a.X.std(axis=0).max() > 0 and c.X.std(axis=0).max() > 0  # the tiles differ, so do the predictions


def test_cli_names_a_bad_platform_in_one_line(data_dir, tmp_path):
    man = tmp_path / "m.csv"
    pd.DataFrame([_xenium_h5ad_row(data_dir, platform="xenum")]).to_csv(man, index=False)
    r = subprocess.run([sys.executable, "-m", "stimage_nb.cli", "predict", "--model", str(kit.tiny_run()), "--manifest",
                        str(man), "--out", str(tmp_path / "p"), "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "unknown platform 'xenum'" in err[0], r.stderr


def test_bins_predicted_one_by_one_are_told_how_to_aggregate(data_dir, tmp_path, caplog):
    """Visium HD bins without pseudospot_um are predicted per bin, with a warning that names the model's spot
    size; with pseudospot_um they are predicted as pseudo-spots of that size."""
    import logging

    from stimage_nb.io.prediction import read_prediction
    from stimage_nb.predict import predict_manifest

    run = kit.tiny_run()
    man = tmp_path / "hd.csv"
    outs = str(D.hd_field_case(data_dir))
    pd.DataFrame([{"section": "hd", "outs": outs}, {"section": "hd_ps", "outs": outs, "pseudospot_um": "100"}]
                 ).to_csv(man, index=False)
    with caplog.at_level(logging.WARNING, logger="stimage_nb.predict"):
        paths = predict_manifest(run, man, tmp_path / "pred", device="cpu", progress=False)
    warn = [r.getMessage() for r in caplog.records if "bins one by one" in r.getMessage()]
    assert len(warn) == 1 and warn[0].startswith("hd: predicting 576 visium_hd bins") and "pseudospot_um=100" in warn[0]
    hd, ps = (read_prediction(p) for p in paths)
    assert hd.n_obs == 576 and hd.uns[K.UNS]["obs_unit"] == "bin"
    assert ps.uns[K.UNS]["obs_unit"] == "pseudospot" and 0 < ps.n_obs < 576 / 20


def test_sections_command_lists_what_each_row_yields(mixed, tmp_path):
    """`stimage-nb sections`: the same reading as train/predict, one line per section, JSON beside."""
    import json

    from stimage_nb.io.summary import summarize_manifest

    summ = summarize_manifest(mixed, ["C3", "hd", "lung", "lung_ps100"])
    f = summ.to_frame()
    assert list(f.index) == ["C3", "hd", "lung", "lung_ps100"]
    assert f.loc["C3", ["platform", "obs_unit", "n_obs"]].tolist() == ["st", "spot", 180]
    assert f.loc["hd", ["platform", "obs_unit", "n_obs", "diameter_um"]].tolist() == ["visium_hd", "bin", 576, 8.0]
    assert f.loc["lung_ps100", "pseudospot_um"] == 100.0 and f.loc["lung", "n_genes"] == 338
    out = tmp_path / "s.json"
    r = subprocess.run([sys.executable, "-m", "stimage_nb.cli", "sections", "--manifest", str(mixed), "--sections",
                        "hd,lung", "--json", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[2].startswith("hd") and "visium_hd" in lines[2] and "xenium" in lines[3]
    assert [s["platform"] for s in json.loads(out.read_text())["sections"]] == ["visium_hd", "xenium"]
    bad = tmp_path / "bad.csv"
    bad.write_text("section,outs,platform\nx,nowhere,visium\n")
    r = subprocess.run([sys.executable, "-m", "stimage_nb.cli", "sections", "--manifest", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "nowhere: platform output (column outs) of section x not found" in r.stderr
