"""OME-Zarr prediction stores on a real bundled her2st section: NGFF 0.4 schema, ome-zarr-py round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from _predictions import GENES, make_prediction

from stimage_nb import _keys as K
from stimage_nb._colours import class_colours
from stimage_nb.errors import StimageInputError
from stimage_nb.export import export_predictions
from stimage_nb.io.image import SlideImage, open_image
from stimage_nb.io.ome_zarr import (
    QUANTITY_COLOURS,
    Shapes,
    read_heatmaps,
    read_labels,
    read_prediction_ome_zarr,
    write_prediction_ome_zarr,
)

SCHEMAS = Path(__file__).parent / "ngff_schemas" / "0.4"
BASE_LEVEL = 2  # a light store: the section's pyramid from level 2 (2.76 µm/px) down


def _validator(name: str):
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    res = []
    for p in SCHEMAS.glob("*.schema"):
        s = json.loads(p.read_text())
        res.append((s["$id"], Resource.from_contents(s, default_specification=__import__(
            "referencing.jsonschema", fromlist=["DRAFT202012"]).DRAFT202012)))
    schema = json.loads((SCHEMAS / name).read_text())
    return Draft202012Validator(schema, registry=Registry().with_resources(res))


@pytest.fixture(scope="module")
def pred(her2st_manifest):
    return make_prediction(her2st_manifest, "C3")


@pytest.fixture(scope="module")
def store(pred, her2st_manifest, tmp_path_factory):
    pdir = tmp_path_factory.mktemp("pred")
    pred.write_h5ad(pdir / "C3.h5ad")
    out = tmp_path_factory.mktemp("oz")
    paths = export_predictions(pdir, "ome-zarr", out, genes=["ERBB2", "FASN"], manifest=her2st_manifest,
                               base_level=BASE_LEVEL, progress=False)
    assert paths == [out / "C3.ome.zarr"]
    return paths[0]


@pytest.fixture(scope="module")
def source_image(pred):
    return open_image(pred.uns[K.UNS]["image"], um_per_px=0.69)


def test_store_validates_against_ngff_04_schemas(store):
    image, label, strict_image, strict_label = (_validator(n) for n in (
        "image.schema", "label.schema", "strict_image.schema", "strict_label.schema"))
    root = dict(zarr.open_group(str(store), mode="r").attrs)
    strict_image.validate(root)
    labels = json.loads((store / "labels" / ".zattrs").read_text())["labels"]
    assert labels == ["spots", "cell_types"]
    for name in labels:
        attrs = json.loads((store / "labels" / name / ".zattrs").read_text())
        strict_image.validate(attrs)
        strict_label.validate(attrs)
        assert attrs["image-label"]["version"] == "0.4" and attrs["image-label"]["source"] == {"image": "../../"}
        # the spec: a label image has as many levels as its image
        assert len(attrs["multiscales"][0]["datasets"]) == len(root["multiscales"][0]["datasets"])
    heat = json.loads((store / "heatmaps" / ".zattrs").read_text())
    strict_image.validate(heat)
    # and the schema does catch a broken store
    bad = json.loads(json.dumps(root))
    del bad["multiscales"][0]["axes"]
    assert not image.is_valid(bad)
    bad_label = {"image-label": {"version": "0.4", "colors": [{"label-value": 1, "rgba": [300, 0, 0, 255]}]}}
    assert not label.is_valid(bad_label)
    assert not strict_label.is_valid({"image-label": {"version": "0.4"}})  # colours are required


def test_store_is_an_ome_zarr_models_v04_image(store):
    from ome_zarr_models.v04 import Image

    img = Image.from_zarr(zarr.open_group(str(store), mode="r"))
    assert len(img.attributes.multiscales[0].datasets) >= 3


def test_image_pyramid_is_the_section_from_the_chosen_level(store, source_image):
    img = SlideImage(store)
    assert img.n_levels == source_image.n_levels - BASE_LEVEL
    assert img.um_per_px == pytest.approx(0.69 * 2 ** BASE_LEVEL, rel=1e-3)
    assert (img.height, img.width) == source_image.level_shapes[BASE_LEVEL]
    np.testing.assert_array_equal(img.read_region(500, 600, 64, 48),
                                  source_image.read_region(500, 600, 64, 48, level=BASE_LEVEL))


def test_labels_read_back_with_ome_zarr_reader(store, pred, source_image):
    labels = read_labels(store)  # ome_zarr.reader.Reader underneath
    assert set(labels) == {"spots", "cell_types"}
    P = pred.obsm[K.CELLTYPE_MEAN]
    names = list(P.columns)
    cls = np.asarray(names)[P.to_numpy().argmax(1)]
    colours = class_colours(names)
    spots = labels["spots"]
    assert sorted(spots.properties) == list(range(1, pred.n_obs + 1))
    assert [spots.properties[i + 1]["id"] for i in range(pred.n_obs)] == list(pred.obs_names)
    assert [spots.properties[i + 1]["class"] for i in range(pred.n_obs)] == list(cls)
    assert [spots.properties[i + 1]["ERBB2 mean"] for i in range(pred.n_obs)] == \
        pred[:, "ERBB2"].X.ravel().astype(float).tolist()
    for i in range(pred.n_obs):
        assert spots.colors[i + 1] == tuple(colours[cls[i]]) + (255,)
    assert spots.colors[0] == (0, 0, 0, 0)
    ct = labels["cell_types"]
    assert {v: p["class"] for v, p in ct.properties.items()} == {k + 1: n for k, n in enumerate(names)}
    assert sum(p["n_observations"] for p in ct.properties.values()) == pred.n_obs
    assert {v: c[:3] for v, c in ct.colors.items() if v} == {k + 1: colours[n] for k, n in enumerate(names)}
    n_levels = source_image.n_levels - BASE_LEVEL
    assert len(spots.levels) == len(ct.levels) == n_levels
    for lev in range(n_levels):
        assert spots.levels[lev].shape == source_image.level_shapes[BASE_LEVEL + lev]
    assert spots.scales[0] == pytest.approx([0.69 * 4, 0.69 * 4], rel=1e-3)


def test_label_pixels_sit_on_the_spots(store, pred):
    lab = read_labels(store)
    spots = np.asarray(lab["spots"].levels[0])
    types = np.asarray(lab["cell_types"].levels[0])
    ds = 2 ** BASE_LEVEL
    r = 100.0 / 2 / 0.69 / ds  # spot radius in store pixels
    P = pred.obsm[K.CELLTYPE_MEAN].to_numpy()
    present = np.unique(spots)
    assert len(present) == pred.n_obs + 1  # every spot drawn, plus background
    for i in (0, 57, 123, pred.n_obs - 1):
        yy, xx = np.nonzero(spots == i + 1)
        np.testing.assert_allclose([xx.mean() + 0.5, yy.mean() + 0.5], pred.obsm[K.SPATIAL][i] / ds, atol=0.5)
        assert len(xx) == pytest.approx(np.pi * r * r, rel=0.06)
        assert (types[yy, xx] == P[i].argmax() + 1).all()
    assert ((spots == 0) == (types == 0)).all()
    # coarser levels are rasterised directly: all spots are still present
    assert len(np.unique(np.asarray(lab["spots"].levels[-1]))) == pred.n_obs + 1


def test_heatmaps_hold_the_predictions_with_a_documented_scale(store, pred):
    h = read_heatmaps(store)
    assert h.channels == ["ERBB2 mean", "ERBB2 aleatoric SD", "ERBB2 epistemic SD",
                          "FASN mean", "FASN aleatoric SD", "FASN epistemic SD"]
    assert h.colours == [QUANTITY_COLOURS[q] for q in ("mean", "aleatoric SD", "epistemic SD")] * 2
    lvl = h.attrs["stimage_nb"]["image_level"]
    ds = 2 ** (BASE_LEVEL + lvl)
    assert 100.0 / 0.69 / ds >= 16  # the default level keeps a spot at least 16 px wide
    assert h.scales[0][1] == pytest.approx(0.69 * ds, rel=1e-3)
    mean = h.channel("ERBB2 mean")
    epi = h.channel("ERBB2 epistemic SD")
    xy = np.round(pred.obsm[K.SPATIAL] / ds).astype(int)
    want = pred[:, "ERBB2"].X.ravel()
    np.testing.assert_array_equal(mean[xy[:, 1], xy[:, 0]], want)
    np.testing.assert_array_equal(epi[xy[:, 1], xy[:, 0]],
                                  np.sqrt(pred[:, "ERBB2"].layers[K.EPISTEMIC].ravel()).astype(np.float32))
    assert np.isnan(mean[0, 0]) and np.isnan(mean).mean() > 0.3  # NaN = no observation, not 0
    start, end = h.windows[0]
    assert start == 0 and end == pytest.approx(float(np.percentile(want, 99)), rel=1e-6)
    scale = h.attrs["stimage_nb"]["colour_scale"][0]
    assert scale["channel"] == "ERBB2 mean" and "linear" in scale["ramp"] and scale["end"] == end


def test_read_prediction_store_and_rewrite_is_idempotent(store, pred, source_image):
    r = read_prediction_ome_zarr(store)
    assert isinstance(r["image"], SlideImage) and r["attrs"]["stimage_nb"]["section"] == "C3"
    before = {p.relative_to(store): p.read_bytes() for p in store.rglob(".zattrs")}
    write_prediction_ome_zarr(pred, store, source_image, base_level=BASE_LEVEL, genes=["ERBB2", "FASN"],
                              progress=False)
    after = {p.relative_to(store): p.read_bytes() for p in store.rglob(".zattrs")}
    assert before == after
    assert not list(store.parent.glob("*.tmp-*")) and not list(store.parent.glob("*.old-*"))


def test_wrong_image_or_genes_are_refused(pred, tmp_path, data_dir):
    other = open_image(data_dir / "fixtures" / "wsi" / "cmu_small_region.svs")  # 2220 x 2967: spots fall outside
    with pytest.raises(StimageInputError, match="of the 180 predicted observations.*lie outside"):
        write_prediction_ome_zarr(pred, tmp_path / "x.ome.zarr", other, progress=False)
    with pytest.raises(StimageInputError, match="NOPE"):
        write_prediction_ome_zarr(pred, tmp_path / "x.ome.zarr", genes=["NOPE"], base_level=4, progress=False)
    assert not (tmp_path / "x.ome.zarr").exists()


def test_cell_polygons_are_rasterised_as_polygons():
    """Pure geometry: a triangle and a disc on a small canvas."""
    tri = np.array([[10, 10], [50, 10], [10, 50], [10, 10]], float)
    s = Shapes(xy=[[30, 30], [80, 80]], radius=[0, 10], polygons=[tri, None])
    a = s.render(1.0, 100, 0, 100)
    assert (a == 1).sum() == pytest.approx(800, rel=0.1)  # triangle area 40*40/2
    assert (a == 2).sum() == pytest.approx(np.pi * 100, rel=0.1)
    half = s.render(2.0, 50, 0, 50)
    assert set(np.unique(half)) == {0, 1, 2}
    strip = s.render(1.0, 100, 60, 100)  # a strip only sees what crosses it
    assert set(np.unique(strip)) == {0, 2}


def test_exported_geometry_matches_qupath_export(pred, tmp_path):
    """The same spot is a disc of the same size in both exports (QuPath px = OME-Zarr level-0 px here)."""
    from stimage_nb.qupath import export_qupath

    f = json.loads(export_qupath(pred, tmp_path / "C3.geojson", genes=GENES[:1]).read_text())["features"][5]
    ring = np.asarray(f["geometry"]["coordinates"][0])
    from stimage_nb.io.ome_zarr import observation_shapes

    img = open_image(pred.uns[K.UNS]["image"], um_per_px=0.69)
    sh = observation_shapes(pred, img, 0)
    np.testing.assert_allclose(sh.xy[5], (ring.min(0) + ring.max(0)) / 2, atol=0.01)
    assert sh.radius[5] == pytest.approx((ring.max(0) - ring.min(0))[0] / 2, abs=0.01)


def test_add_label_array_to_a_real_image(tmp_path, data_dir):
    """A segmentation given as an array: pyramid matching the image, colours/properties per value."""
    from stimage_nb.io.ome_zarr import add_label_array

    src = open_image(data_dir / "fixtures" / "wsi" / "cmu_small_region.svs")
    rgb = src.read_region(0, 0, 1100, 700)
    from stimage_nb.io.ngff import write_ome_zarr

    store = write_ome_zarr(rgb, tmp_path / "crop.ome.zarr", um_per_px=src.um_per_px, min_size=256)
    tissue = (rgb.mean(2) < 200).astype(np.uint16)  # 1 = tissue
    tissue[:100, :100] = 7  # a second label
    add_label_array(store, "tissue", tissue, colors={1: (0, 200, 0), 7: (0, 0, 255, 128)},
                    properties={1: {"class": "tissue"}, 7: {"class": "corner", "area_px": 10000}})
    lab = read_labels(store)["tissue"]
    img = SlideImage(store)
    assert [tuple(a.shape) for a in lab.levels] == img.level_shapes
    np.testing.assert_array_equal(np.asarray(lab.levels[0]), tissue)
    np.testing.assert_array_equal(np.asarray(lab.levels[1]), tissue[1::2, 1::2][:img.level_shapes[1][0], :img.level_shapes[1][1]])
    assert lab.colors[1] == (0, 200, 0, 255) and lab.colors[7] == (0, 0, 255, 128)
    assert lab.properties == {1: {"class": "tissue"}, 7: {"class": "corner", "area_px": 10000}}
    attrs = json.loads((store / "labels" / "tissue" / ".zattrs").read_text())
    _validator("strict_image.schema").validate(attrs)
    _validator("strict_label.schema").validate(attrs)
    with pytest.raises(StimageInputError, match="differs from the image"):
        add_label_array(store, "bad", tissue[:10])
