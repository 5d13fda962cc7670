"""Exports that re-import: QuPath cells (read_qupath), OME-Zarr labels + heatmaps (ome-zarr-py), summaries."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stimage_nb.interpretation import (
    export_qupath_nuclei,
    nuclei_from_qupath,
    plot_spot,
    plot_summary,
    summarise,
    value_column,
    write_attribution_ome_zarr,
)


def test_qupath_cells_reimport_with_their_attributions(tmp_path, attr_c6, c6):
    from stimage_nb.qupath import read_qupath

    path = export_qupath_nuclei(attr_c6, tmp_path / "C6.nuclei.geojson")
    objs = read_qupath(path)
    per = attr_c6.per_nucleus()
    p = objs.points
    assert len(p) == len(per) and set(p.index) == set(per.index) and set(per.index) <= set(attr_c6.nuclei.ids)
    assert (p["object_type"] == "cell").all() and (p["nucleus_geometry"] != "").all()
    g0 = attr_c6.genes[0]
    for g in attr_c6.genes:
        got = objs.measurements.loc[per.index, value_column(g)].to_numpy()
        assert np.array_equal(got, per[value_column(g)].to_numpy(np.float32))
    cls = p.loc[per.index, "classification"].to_numpy()
    assert np.array_equal(cls == f"SHAP+ {g0}", per[value_column(g0)].to_numpy() > 0)
    assert "Nucleus: Area µm^2" in objs.measurements.columns
    assert all(len(c) == 3 for c in objs.class_colours.values())  # every class carries a colour (QuPath 0.4+)
    # the outlines come back as the same nuclei
    back = nuclei_from_qupath(path, image=c6.image)
    assert np.allclose(back.table.loc[per.index, "area_um2"], attr_c6.nuclei.table.loc[per.index, "area_um2"],
                       rtol=0.2, atol=3)
    # the file is a FeatureCollection in the form QuPath imports (both type keys, list measurements)
    f = json.loads(path.read_text())["features"][0]
    assert f["properties"]["objectType"] == f["properties"]["object_type"] == "cell"
    assert isinstance(f["properties"]["measurements"], list) and f["nucleusGeometry"]["type"] == "Polygon"


def test_ome_zarr_labels_and_heatmaps_reread_with_ome_zarr_py(tmp_path, attr_c6, c6):
    from stimage_nb.io.ome_zarr import read_heatmaps, read_labels, read_prediction_ome_zarr

    store = write_attribution_ome_zarr(attr_c6, tmp_path / "C6.attributions.ome.zarr", c6.image, base_level=2)
    labels = read_labels(store)
    lab = labels["nuclei"]
    per = attr_c6.per_nucleus()
    assert len(lab.properties) == len(per)
    ids = {p["id"]: v for v, p in lab.properties.items()}
    assert set(ids) == set(per.index)
    g = attr_c6.genes[1]
    nid = per.index[len(per) // 2]
    assert lab.properties[ids[nid]][value_column(g)] == pytest.approx(per.loc[nid, value_column(g)], rel=1e-6)
    # the label image holds the nucleus at its centroid (store level 0 = source level 2)
    x, y = attr_c6.nuclei.table.loc[nid, ["x", "y"]] / 4.0
    arr = np.asarray(lab.levels[0][int(y) - 2:int(y) + 3, int(x) - 2:int(x) + 3])
    assert ids[nid] in arr
    # one label level per image level, each of its shape, the nucleus where the level's downsample puts it
    import zarr

    grp = zarr.open_group(str(store), mode="r")
    img_ds = [d["path"] for d in grp.attrs["multiscales"][0]["datasets"]]
    lab_ms = grp["labels/nuclei"].attrs["multiscales"][0]["datasets"]
    assert len(lab_ms) == len(img_ds) >= 2
    for li, d in enumerate(lab_ms):
        assert grp["labels/nuclei"][d["path"]].shape == grp[img_ds[li]].shape[1:]
    ds1 = lab_ms[1]["coordinateTransformations"][0]["scale"][0] / lab_ms[0]["coordinateTransformations"][0]["scale"][0]
    c1 = np.asarray(grp["labels/nuclei"][lab_ms[1]["path"]][int(y / ds1) - 2:int(y / ds1) + 3,
                                                              int(x / ds1) - 2:int(x / ds1) + 3])
    assert ids[nid] in c1
    hm = read_heatmaps(store)
    assert hm.channels == [f"SHAP{s} {gg}" for gg in attr_c6.genes for s in ("+", "-")]
    assert hm.colours[:2] == ["FF0000", "0000FF"]
    v0 = hm.levels[0][:, :, :].compute() if hasattr(hm.levels[0], "compute") else np.asarray(hm.levels[0])
    assert np.isnan(v0).any() and np.nanmax(v0) > 0 and np.nanmin(v0) >= 0
    meta = read_prediction_ome_zarr(store)["attrs"]["stimage_nb"]
    assert meta["kind"] == "attributions" and meta["genes"] == list(attr_c6.genes)


def test_summaries_by_morphology_and_cell_type(attr_c6, c6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarise(attr_c6)
    assert set(s.correlation["gene"]) == set(attr_c6.genes)
    n = len(attr_c6.per_nucleus())
    assert s.correlation["spearman"].between(-1, 1).all() and (s.correlation["n_nuclei"] == n).all()
    m = s.morphology
    assert set(m["quartile"]) == {1, 2, 3, 4} and (m.groupby(["gene", "feature"])["n_nuclei"].sum() == n).all()
    assert s.celltypes["n_spots"].sum() == len(attr_c6.genes) * len(attr_c6.spots)
    json.dumps(s.to_json())
    fig = plot_summary(s, attr_c6.genes[0])
    fig2 = plot_spot(attr_c6, "19x13", attr_c6.genes[0], c6.image)
    assert len(fig.axes) == 2 and len(fig2.axes) >= 2
    plt.close("all")
