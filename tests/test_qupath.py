"""QuPath GeoJSON export/import against the golden files and real bundled her2st sections."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest
from _predictions import GENES, make_prediction

from stimage_nb import _keys as K
from stimage_nb._colours import class_colours
from stimage_nb.cli import main
from stimage_nb.errors import StimageInputError
from stimage_nb.qupath import Region, assign_regions, export_qupath, import_qupath, read_qupath, restrict_to_regions

ACCEPTED = {  # file: (n annotations, object types of the points, classes, measurement names)
    "A_canonical": (1, ["detection", "cell", "detection"], ["Tumor", "Immune: T cell", ""],
                    {"GAPDH", "EPCAM", "pred_std", "nan_gene", "p_T", "x"}),
    "B_legacy_list": (0, ["detection"], ["Tumor"], {"GAPDH", "EPCAM"}),
    "D_class_string_barelist": (0, ["detection"], ["Tumor"], {"a"}),
    "E_bool_measure": (0, ["detection"], [""], {"ok"}),
    "E2_null_measure": (0, ["detection"], [""], {"ok"}),
    "F_nonuuid_id": (0, ["detection"], [""], {"a"}),
    "G_multipolygon_typealias": (0, ["detection"], [""], {"a"}),
    "H_dual_compat": (0, ["detection", "cell"], ["Tumor", "T cell"], {"GAPDH", "EPCAM", "p_T"}),
    "H2_dual_colorRGB": (0, ["detection", "cell"], ["Tumor", "T cell"], {"GAPDH", "EPCAM", "p_T"}),
}


@pytest.fixture(scope="module")
def golden(data_dir):
    return data_dir / "fixtures" / "qupath"


@pytest.fixture(scope="module")
def pred(her2st_manifest):
    return make_prediction(her2st_manifest, "C3")


@pytest.fixture(scope="module")
def exported(pred, tmp_path_factory):
    return export_qupath(pred, tmp_path_factory.mktemp("qp") / "C3.geojson")


def _features(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as fh:
        return json.load(fh)["features"]


# ---------------------------------------------------------------- export form
def test_export_has_the_structure_of_H_dual_compat(exported, golden, pred):
    gold = json.loads((golden / "H_dual_compat.geojson").read_text())["features"][0]  # the ellipse detection
    feats = _features(exported)
    assert len(feats) == pred.n_obs
    colours = class_colours(list(pred.obsm[K.CELLTYPE_MEAN].columns))
    for f in feats:
        assert set(gold) <= set(f) and set(gold["geometry"]) <= set(f["geometry"])
        assert set(gold["properties"]) <= set(f["properties"])
        assert f["geometry"]["type"] == "Polygon" and f["geometry"]["isEllipse"] is True
        ring = np.asarray(f["geometry"]["coordinates"][0])
        assert ring.shape == (17, 2) and (ring[0] == ring[-1]).all()
        p = f["properties"]
        assert p["objectType"] == p["object_type"] == "detection"
        cl = p["classification"]
        assert cl["name"] in colours and cl["color"] == list(colours[cl["name"]])
        assert isinstance(p["measurements"], list)
        assert all(set(m) == {"name", "value"} and isinstance(m["value"], (int, float)) for m in p["measurements"])
    names = [m["name"] for m in feats[0]["properties"]["measurements"]]
    n_ct = pred.obsm[K.CELLTYPE_MEAN].shape[1]
    assert len(names) == 3 * len(GENES) + 2 * n_ct
    assert names[:3] == ["ERBB2: mean", "ERBB2: aleatoric SD", "ERBB2: epistemic SD"]
    assert "P(Epithelial)" in names and "P(Epithelial) SD" in names
    assert [f["properties"]["name"] for f in feats] == list(pred.obs_names)
    assert len({f["id"] for f in feats}) == len(feats)  # stable UUIDs, one per spot


def test_spot_geometry_is_in_full_resolution_pixels(exported, pred):
    f = _features(exported)[3]
    ring = np.asarray(f["geometry"]["coordinates"][0])
    centre = (ring.min(0) + ring.max(0)) / 2
    np.testing.assert_allclose(centre, pred.obsm[K.SPATIAL][3], atol=0.01)
    radius_px = 100.0 / 2 / 0.69  # 100 µm legacy ST spot on a 0.69 µm/px scan
    np.testing.assert_allclose((ring.max(0) - ring.min(0)) / 2, radius_px, atol=0.01)


def test_lower_resolution_prediction_is_scaled_back_to_full_resolution(her2st_manifest, exported, tmp_path):
    low = make_prediction(her2st_manifest, "C3", image_scale=0.25)  # predicted on a 4x smaller image
    assert low.obsm[K.SPATIAL][:, 0].max() < 2500
    out = export_qupath(low, tmp_path / "C3_low.geojson")
    a, b = _features(out), _features(exported)
    for fa, fb in zip(a[:20], b[:20]):
        np.testing.assert_allclose(fa["geometry"]["coordinates"], fb["geometry"]["coordinates"], atol=0.011)


# ---------------------------------------------------------------- round trip
def test_round_trip_ids_classes_and_float32_values(exported, pred):
    back = import_qupath(exported).adata
    assert list(back.obs_names) == list(pred.obs_names)
    P = pred.obsm[K.CELLTYPE_MEAN]
    assert (back.obs[K.CLASSIFICATION].to_numpy() == P.columns[P.to_numpy().argmax(1)]).all()
    assert (back.obs[K.OBJECT_TYPE] == "detection").all()
    assert list(back.var_names) == list(pred.var_names)
    np.testing.assert_array_equal(back.X, pred.X)  # float32 written in its shortest exact form
    for layer in (K.ALEATORIC, K.EPISTEMIC):  # exported as SD, read back as SD**2
        np.testing.assert_array_equal(np.sqrt(back.layers[layer]).astype(np.float32),
                                      np.sqrt(pred.layers[layer]).astype(np.float32))
        np.testing.assert_allclose(back.layers[layer], pred.layers[layer], rtol=5e-7)
    pd.testing.assert_frame_equal(back.obsm[K.CELLTYPE_MEAN], P, check_names=False)
    pd.testing.assert_frame_equal(back.obsm[K.CELLTYPE_STD], pred.obsm[K.CELLTYPE_STD], check_names=False)
    np.testing.assert_allclose(back.obsm[K.SPATIAL], pred.obsm[K.SPATIAL], atol=1e-6)
    colours = back.uns[K.UNS][K.CLASS_COLOURS]
    assert colours == {k: list(v) for k, v in class_colours(P.columns).items() if k in colours}


def test_domain_shift_score_is_exported_and_comes_back(pred, tmp_path):
    p = pred.copy()
    rng = np.random.default_rng(1)
    p.obs[K.DOMAIN_DISTANCE] = rng.uniform(0.5, 4, p.n_obs).astype(np.float32)
    p.obs[K.DOMAIN_PERCENTILE] = rng.uniform(0, 1, p.n_obs).astype(np.float32)
    out = export_qupath(p, tmp_path / "d.geojson")
    m = {x["name"]: x["value"] for x in _features(out)[7]["properties"]["measurements"]}
    assert m["Domain shift percentile"] == pytest.approx(float(p.obs[K.DOMAIN_PERCENTILE].iloc[7]), rel=1e-6)
    back = import_qupath(out).adata
    assert np.array_equal(back.obs.loc[p.obs_names, K.DOMAIN_DISTANCE].to_numpy(), p.obs[K.DOMAIN_DISTANCE].to_numpy())
    assert K.MEASUREMENTS not in back.obsm  # not left behind as a plain measurement


def test_reexport_of_an_import_is_identical(exported, tmp_path):
    back = import_qupath(exported).adata
    again = export_qupath(back, tmp_path / "again.geojson")
    fa, fb = _features(exported), _features(again)
    assert [f["properties"] for f in fa] == [f["properties"] for f in fb]
    assert [f["geometry"] for f in fa] == [f["geometry"] for f in fb]
    assert [f["id"] for f in fa] == [f["id"] for f in fb]


def test_gzip_export_imports_the_same(pred, exported, tmp_path):
    gz = export_qupath(pred, tmp_path / "C3.geojson.gz")
    assert gz.read_bytes()[:2] == b"\x1f\x8b" and gz.stat().st_size < exported.stat().st_size / 3
    a, b = import_qupath(gz).adata, import_qupath(exported).adata
    np.testing.assert_array_equal(a.X, b.X)
    assert list(a.obs_names) == list(b.obs_names)


def test_gene_selection_and_file_size_limit(pred, exported, tmp_path):
    sel = export_qupath(pred, tmp_path / "two.geojson", genes=["FASN", "ERBB2"], celltypes=False)
    names = [m["name"] for m in _features(sel)[0]["properties"]["measurements"]]
    assert names == ["FASN: mean", "FASN: aleatoric SD", "FASN: epistemic SD",
                     "ERBB2: mean", "ERBB2: aleatoric SD", "ERBB2: epistemic SD"]
    full = exported.stat().st_size
    limit_mb = full * 0.88 / 1e6  # the outlines and cell types alone take ~2/3 of the file
    lim = export_qupath(pred, tmp_path / "limited.geojson", max_mb=limit_mb)
    assert lim.stat().st_size <= limit_mb * 1e6
    kept = import_qupath(lim).adata.var_names
    assert 0 < len(kept) < len(GENES) and list(kept) == GENES[:len(kept)]  # genes dropped from the end
    with pytest.raises(StimageInputError, match="max_mb"):
        export_qupath(pred, tmp_path / "tiny.geojson", max_mb=0.01)
    assert not (tmp_path / "tiny.geojson").exists()
    with pytest.raises(StimageInputError, match="NOPE"):
        export_qupath(pred, tmp_path / "bad.geojson", genes=["ERBB2", "NOPE"])


def test_cells_with_nuclei_keep_their_outlines(golden, tmp_path):
    sec = import_qupath(golden / "H_dual_compat.geojson")
    a = sec.adata
    assert list(a.obs[K.OBJECT_TYPE]) == ["detection", "cell"]
    out = export_qupath(a, tmp_path / "cells.geojson")
    gold = json.loads((golden / "H_dual_compat.geojson").read_text())["features"]
    feats = _features(out)
    for g, f in zip(gold, feats):
        assert f["properties"]["objectType"] == f["properties"]["object_type"] == g["properties"]["objectType"]
        assert f["geometry"] == g["geometry"]
        assert f.get("nucleusGeometry") == g.get("nucleusGeometry")
        assert f["properties"]["classification"] == g["properties"]["classification"]
        got = {m["name"]: m["value"] for m in f["properties"]["measurements"]}
        for m in g["properties"]["measurements"]:
            assert got[m["name"]] == pytest.approx(m["value"], rel=1e-7)


# ---------------------------------------------------------------- import of the golden files
@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_import_every_file_qupath_accepts(golden, name):
    n_ann, types, classes, meas = ACCEPTED[name]
    objs = read_qupath(golden / f"{name}.geojson")
    assert len(objs.regions) == n_ann
    assert list(objs.points[K.OBJECT_TYPE]) == types
    assert list(objs.points[K.CLASSIFICATION]) == classes
    assert set(objs.measurements.columns) == meas
    a = import_qupath(golden / f"{name}.geojson").adata
    assert a.n_obs == len(types) and a.obs_names.is_unique


def test_golden_details(golden):
    a = read_qupath(golden / "A_canonical.geojson")
    assert a.points.index[0] == "spot_AAACAAGTATCTCCCA-1"  # the stable id lives in `name`
    assert a.points.index[1] == "8c910088-d41f-42a5-9d58-8fb4a9b0cf46"  # else the UUID
    assert np.isnan(a.measurements.loc["spot_AAACAAGTATCTCCCA-1", "nan_gene"])  # the string "NaN"
    assert a.measurements.loc["spot_AAACAAGTATCTCCCA-1", "GAPDH"] == np.float32(3.21)
    np.testing.assert_allclose(a.points.loc["spot_AAACAAGTATCTCCCA-1", ["x", "y"]].astype(float), [100, 100], atol=1e-6)
    assert a.points.iloc[1][K.NUCLEUS_GEOMETRY]  # the cell's nucleus is kept
    assert a.regions[0].label == "Region*" and a.regions[0].colour == (0, 200, 0)
    b = read_qupath(golden / "B_legacy_list.geojson")
    assert b.class_colours["Tumor"] == (200, 0, 0)  # from colorRGB -3670016
    e = read_qupath(golden / "E_bool_measure.geojson")
    assert list(e.measurements.columns) == ["ok"]  # the boolean measurement is dropped, as in QuPath
    f = read_qupath(golden / "F_nonuuid_id.geojson")
    assert f.points.index[0] == "spot_42"
    g = read_qupath(golden / "G_multipolygon_typealias.geojson")
    np.testing.assert_allclose(g.points[["x", "y"]].to_numpy(float)[0], [125, 100], atol=1e-6)


def test_class_without_colour_is_refused_like_qupath(golden):
    with pytest.raises(StimageInputError, match=r"C_class_nocolor.*no colour.*\"color\": \[r, g, b\]"):
        read_qupath(golden / "C_class_nocolor.geojson")


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid GeoJSON"),
    ('{"type": "Polygon", "coordinates": []}', "expected a GeoJSON FeatureCollection"),
    ('[{"type": "Feature", "properties": {"objectType": "detection"}}]', "no usable geometry"),
    ('[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, '
     '"properties": {"objectType": "detection", "measurements": {"a": "high"}}}]', "non-numeric value 'high'"),
    ('[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, '
     '"properties": {"objectType": "blob"}}]', "unknown object type"),
    ('[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, '
     '"properties": {"classification": {"name": "T", "color": "red"}}}]', "unreadable color"),
])
def test_other_rejected_forms_name_the_file_and_the_fix(tmp_path, text, match):
    p = tmp_path / "bad.geojson"
    p.write_text(text)
    with pytest.raises(StimageInputError, match=match) as e:
        read_qupath(p)
    assert "bad.geojson" in str(e.value)


# ---------------------------------------------------------------- annotations -> regions
def _annotation(name, cls, colour, ring):
    return {"type": "Feature", "id": "0c5d3a55-0000-4000-8000-000000000000",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "annotation", "name": name,
                           "classification": {"name": cls, "color": colour}}}


@pytest.fixture(scope="module")
def annotations(pred, tmp_path_factory):
    """A 'Tumor' annotation over the left half of real section C3 with an 'Ignore*' hole-like box inside."""
    xy = pred.obsm[K.SPATIAL]
    xm = float(np.median(xy[:, 0]))
    y0, y1 = float(xy[:, 1].min() - 200), float(xy[:, 1].max() + 200)
    x0 = float(xy[:, 0].min() - 200)
    ym = float(np.median(xy[:, 1]))
    tumour = [[x0, y0], [xm, y0], [xm, y1], [x0, y1], [x0, y0]]
    ignore = [[x0, y0], [xm, y0], [xm, ym], [x0, ym], [x0, y0]]
    fc = {"type": "FeatureCollection", "features": [
        _annotation("left", "Tumor", [200, 0, 0], tumour), _annotation("fold", "Ignore*", [180, 180, 180], ignore)]}
    p = tmp_path_factory.mktemp("ann") / "C3_annotations.geojson"
    p.write_text(json.dumps(fc))
    return p, xm, ym


def test_annotations_label_and_restrict_spots(pred, annotations):
    path, xm, ym = annotations
    regions = read_qupath(path).regions
    assert [r.label for r in regions] == ["Tumor", "Ignore*"] and all(isinstance(r, Region) for r in regions)
    a = pred.copy()
    lab = assign_regions(a, regions).astype(str).to_numpy()
    x, y = a.obsm[K.SPATIAL][:, 0], a.obsm[K.SPATIAL][:, 1]
    left, top = x < xm, y < ym
    assert ((lab == "Ignore*") == (left & top)).all()  # the smaller annotation wins where they overlap
    assert ((lab == "Tumor") == (left & ~top)).all()
    assert ((lab == "") == ~left).all()
    kept = restrict_to_regions(a, path)
    assert kept.n_obs == int((left & ~top).sum()) > 10
    assert set(kept.obs[K.REGION]) == {"Tumor"}
    # a prediction made on a 4x smaller image: regions (full-res px) still land on the same spots
    low = make_prediction_like(a, 0.25)
    assert (assign_regions(low, regions).astype(str).to_numpy() == lab).all()
    with pytest.raises(StimageInputError, match="none of the"):
        restrict_to_regions(a, path, include=["Stroma"])


def make_prediction_like(a, scale):
    b = a.copy()
    b.obsm[K.SPATIAL] = a.obsm[K.SPATIAL] * scale
    b.uns[K.UNS] = dict(a.uns[K.UNS], image_scale=scale)
    return b


def test_restrict_a_real_section_for_training(her2st_manifest, annotations):
    from stimage_nb.io.readers import read_manifest

    path, xm, ym = annotations
    sec = read_manifest(her2st_manifest, ["C3"], genes=GENES)[0]
    sub = restrict_to_regions(sec, path, include=["tumor"])
    assert type(sub) is type(sec) and sub.name == "C3"
    x, y = sec.xy[:, 0], sec.xy[:, 1]
    assert sub.adata.n_obs == int(((x < xm) & (y >= ym)).sum())
    assert sub.adata.n_vars == len(GENES) and sub.image_path == sec.image_path


# ---------------------------------------------------------------- CLI
def test_cli_export_and_import(pred, tmp_path, capsys, annotations):
    pdir = tmp_path / "pred"
    pdir.mkdir()
    pred.write_h5ad(pdir / "C3.h5ad")
    out = tmp_path / "qp"
    assert main(["export", "--pred", str(pdir), "--format", "qupath", "--out", str(out), "--genes", "ERBB2,FASN",
                 "--gzip", "--no-progress"]) == 0
    f = out / "C3.geojson.gz"
    assert str(f) in capsys.readouterr().out
    back = import_qupath(f).adata
    assert list(back.var_names) == ["ERBB2", "FASN"]
    np.testing.assert_array_equal(back.X, pred[:, ["ERBB2", "FASN"]].X)
    assert main(["import-qupath", str(f), str(annotations[0]), "--out", str(tmp_path / "imp")]) == 0
    text = capsys.readouterr().out
    assert "C3: 180 objects" in text and "2 annotations" in text
    assert (tmp_path / "imp" / "C3.h5ad").is_file()
    assert main(["import-qupath", str(tmp_path / "missing.geojson")]) == 2
    assert "missing.geojson" in capsys.readouterr().err


def test_manifest_annotations_column_restricts_training_and_prediction(her2st_manifest, annotations, tmp_path):
    """A manifest row may name a QuPath GeoJSON: read_manifest (used by train and predict) keeps its spots."""
    from stimage_nb.io.readers import read_manifest

    path, xm, ym = annotations
    m = pd.read_csv(her2st_manifest, dtype=str)
    for col in ("image", "counts", "spots"):
        m[col] = [str(her2st_manifest.parent / v) for v in m[col]]
    m["annotations"] = [str(path) if s == "C3" else "" for s in m["section"]]
    man = tmp_path / "annotated.csv"
    m.to_csv(man, index=False)
    c3, c4 = read_manifest(man, ["C3", "C4"], genes=GENES, celltype_level="major")
    x, y = c3.xy[:, 0], c3.xy[:, 1]
    assert c3.adata.n_obs == int(((x < xm) & (y >= ym)).sum())  # Ignore* and unannotated spots dropped
    assert set(c3.adata.obs[K.REGION]) == {"Tumor"} and K.REGIONS in c3.adata.uns[K.UNS]
    assert c4.adata.n_obs == 184 and K.REGION not in c4.adata.obs  # no annotations: untouched
