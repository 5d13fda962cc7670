"""omero.model objects built and encoded without a server: shapes, colours, masks, tags, table plans."""

from __future__ import annotations

import time

import numpy as np
import pytest

from stimage_nb import _keys as K


@pytest.fixture(autouse=True)
def _stack(omero_stack):
    return omero_stack


def test_colours_match_omero_py_and_ezomero():
    pytest.importorskip("ezomero")
    from ezomero._gets import _int_to_rgba
    from ezomero._posts import _rgba_to_int
    from omero.gateway import ColorHolder

    from stimage_nb.omero import model as M

    for rgba in [(214, 39, 40, 140), (255, 255, 255, 255), (0, 0, 0, 0), (31, 119, 180, 255), (128, 0, 255, 1)]:
        v = M.rgba_to_int(*rgba)
        assert v == _rgba_to_int(rgba) == ColorHolder.fromRGBA(*rgba).getInt()
        assert -(2 ** 31) <= v < 2 ** 31                    # a signed Ice int
        assert M.int_to_rgba(v) == rgba
        if v:
            assert _int_to_rgba(v, True) == rgba


def test_spot_roi_encodes_and_decodes_with_omero_marshal():
    pytest.importorskip("omero_marshal")
    from omero_marshal import get_decoder, get_encoder

    from stimage_nb.omero import model as M

    e = M.ellipse(100.5, 200.25, 72.46, text="Tumor p=0.62", fill=(214, 39, 40, 140), stroke=(214, 39, 40, 255))
    r = M.roi(42, [e], name="12x5", description=M.run_tag("run-1", 42, "abc", state="x"))
    enc = get_encoder(r.__class__).encode(r)
    assert enc["Name"] == "12x5" and enc["Description"].startswith("stimage_nb:run=run-1;image=42;")
    sh = enc["shapes"][0]
    assert sh["@type"].endswith("#Ellipse") and (sh["X"], sh["Y"], sh["RadiusX"]) == (100.5, 200.25, 72.46)
    assert sh["Text"] == "Tumor p=0.62" and sh["FillColor"] == M.rgba_to_int(214, 39, 40, 140)
    assert sh["StrokeWidth"]["Unit"] == "PIXEL"
    back = get_decoder(enc["@type"]).decode(enc)
    s2 = back.copyShapes()[0]
    d = M.decode_shape(s2)
    assert d["kind"] == "ellipse" and (d["x"], d["y"], d["rx"]) == (100.5, 200.25, 72.46)
    assert d["fill"] == (214, 39, 40, 140) and d["text"] == "Tumor p=0.62"
    assert "Image" not in enc   # the JSON form leaves the image link out; the Ice form keeps it:
    assert r.getImage().getId().getValue() == 42 and not r.getImage().isLoaded()


def test_point_polygon_and_map_annotation():
    pytest.importorskip("omero_marshal")
    from omero_marshal import get_encoder

    from stimage_nb.omero import model as M

    p = M.point(3.0, 4.0, text="cell")
    d = M.decode_shape(p)
    assert (d["kind"], d["x"], d["y"], d["area"]) == ("point", 3.0, 4.0, 0.0)
    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float) + [-5.5, 2.0]
    poly = M.polygon(square, text="Tumor", stroke=(200, 0, 0, 255))
    d = M.decode_shape(poly)
    assert d["kind"] == "polygon" and d["area"] == pytest.approx(100.0) and (d["x"], d["y"]) == pytest.approx((-0.5, 7.0))
    assert np.allclose(M.parse_points("-5.5,2 1e1,-3.25E0"), [[-5.5, 2.0], [10.0, -3.25]])
    ann = M.map_annotation({"run_id": "r1", "genes": 769, "cell types": ["T", "B"]}, ns=M.NS_RUN, description="d")
    assert M.map_pairs(ann) == [("run_id", "r1"), ("genes", "769"), ("cell types", '["T", "B"]')]
    enc = get_encoder(ann.__class__).encode(ann)
    assert enc["Value"] == [["run_id", "r1"], ["genes", "769"], ["cell types", '["T", "B"]']] and enc["Namespace"] == M.NS_RUN


def test_run_tags_round_trip_and_run_id_checks():
    from stimage_nb.errors import StimageInputError
    from stimage_nb.omero import model as M

    tag = M.run_tag("20260101-a.b", 7, "fp1", state="done", obj="C3.h5ad")
    assert tag.startswith(M.run_tag_prefix("20260101-a.b", 7))
    assert M.parse_tag(tag) == {"run": "20260101-a.b", "image": "7", "fp": "fp1", "state": "done", "obj": "C3.h5ad"}
    assert M.parse_tag("a user's own description") is None
    for bad in ("", "has space", "semi;colon", "x" * 200, None):
        with pytest.raises(StimageInputError):
            M.check_run_id(bad)
    with pytest.raises(ValueError):
        M.run_tag("r", 1, "f", obj="a;b")


def test_masks_from_labels_equal_omero_rois_and_are_faster(c3_image):
    """Cell-like labels from a real H&E crop: the crop-per-label masks are byte-identical to omero-rois'."""
    pytest.importorskip("omero_rois")
    from omero_rois import masks_from_label_image
    from scipy import ndimage

    from stimage_nb.omero import model as M

    rgb = c3_image.read_region(4000, 4000, 512, 512)
    dark = rgb.mean(axis=2) < np.percentile(rgb.mean(axis=2), 20)      # haematoxylin-rich pixels
    lab, n = ndimage.label(ndimage.binary_opening(dark, iterations=1))
    assert n > 50
    t0 = time.perf_counter()
    ours = M.masks_from_labels(lab.astype(np.int32))
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = masks_from_label_image(lab.astype(np.int32))
    t_ref = time.perf_counter() - t0
    assert sorted(ours) == list(range(1, n + 1)) and len(ref) == n
    for i, m in enumerate(ref, start=1):
        o = ours[i]
        assert [o.getX().val, o.getY().val, o.getWidth().val, o.getHeight().val] == \
               [m.getX().val, m.getY().val, m.getWidth().val, m.getHeight().val]
        assert bytes(o.getBytes()) == bytes(bytearray(m.getBytes()))
        b, x0, y0 = M.decode_mask(o)
        assert np.array_equal(b, lab[y0:y0 + b.shape[0], x0:x0 + b.shape[1]] == i)
    assert t_ours < t_ref


def test_table_plan_respects_column_limit(c3_pred, her2st_manifest, her2st_genes):
    """769 genes x 3 quantities: every table <= max_columns, every gene exactly once per quantity."""
    from _predictions import make_prediction

    from stimage_nb.omero import tables as T

    pred = make_prediction(her2st_manifest, "C3", genes=list(her2st_genes))
    assert pred.n_vars == len(her2st_genes) == 769
    for max_cols, parts in ((500, 2), (300, 3), (1000, 1)):
        specs = T.plan_tables(pred, run_id="r", max_columns=max_cols, with_roi=True)
        for q in ("mean", "aleatoric_var", "epistemic_var"):
            qs = [s for s in specs if s.quantity == q]
            assert len(qs) == parts
            assert sum((s.columns for s in qs), []) == list(pred.var_names)
            assert all(s.n_columns <= max_cols for s in qs)
        ct = [s for s in specs if s.quantity == "celltype"][0]
        assert ct.columns[:2] == ["P(B-cells)", "P(CAFs)"] and ct.columns[-1].startswith("SD(")
    assert not [s for s in specs if s.quantity == "domain"]  # none without a domain-shift score
    pred.obs[K.DOMAIN_DISTANCE] = np.linspace(0.5, 3, pred.n_obs)
    pred.obs[K.DOMAIN_PERCENTILE] = np.linspace(0, 1, pred.n_obs)
    (dom,) = [s for s in T.plan_tables(pred, run_id="r", with_roi=True) if s.quantity == "domain"]
    assert dom.columns == [K.DOMAIN_DISTANCE, K.DOMAIN_PERCENTILE] and dom.name == "stimage_nb r domain 1of1"
    assert np.allclose(dom.values(3, 5), pred.obs[[K.DOMAIN_DISTANCE, K.DOMAIN_PERCENTILE]].to_numpy()[3:5])
    spec = T.plan_tables(pred, run_id="r", max_columns=500, with_roi=True)[0]
    cols = T.build_columns(spec, image_id=5, spot_ids=list(pred.obs_names), xy_full=np.asarray(pred.obsm[K.SPATIAL]),
                           roi_ids=np.arange(pred.n_obs) + 1000, start=10, stop=20)
    assert [type(c).__name__ for c in cols[:5]] == ["ImageColumn", "RoiColumn", "StringColumn", "DoubleColumn",
                                                     "DoubleColumn"]
    assert cols[1].values == list(range(1010, 1020)) and cols[2].values == list(pred.obs_names[10:20])
    j = pred.var_names.get_loc(spec.columns[0])
    assert cols[5].values == pytest.approx(pred.X[10:20, j].astype(float).tolist())
    assert all(type(v) is float for v in cols[5].values)        # Ice wants Python floats
    assert T.rows_per_batch(500) * 500 * 8 <= 8 << 20
