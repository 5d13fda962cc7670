"""JupyterLab panels, driven through their widget models (no browser; see test_browser.py for that).

The viewer is fed a prediction AnnData built from a real bundled her2st section (tests/_predictions.py:
observed counts as the mean, the section's real cell-type proportions); the OMERO panel runs against
the BlitzGateway test double in tests/omero/; the training panel drives a real tiny model.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("anywidget")

import traitlets  # noqa: E402
from _predictions import make_prediction  # noqa: E402
from PIL import Image  # noqa: E402

from stimage_nb import _keys as K  # noqa: E402
from stimage_nb.errors import StimageInputError  # noqa: E402

GENES = ["ERBB2", "GNAS", "MYL12B", "FASN", "SCD"]


# ============================================================================ viewer
@pytest.fixture(scope="module")
def c3(her2st_manifest):
    from stimage_nb.io.readers import read_manifest

    return read_manifest(her2st_manifest, ["C3"], genes=GENES)[0]


@pytest.fixture(scope="module")
def pred(her2st_manifest):
    return make_prediction(her2st_manifest, "C3", genes=GENES)


@pytest.fixture()
def viewer(pred, c3, tmp_path):
    from stimage_nb.widgets import OverlayViewer

    return OverlayViewer(pred, observed=c3, export_dir=tmp_path)


def _values(v):
    return np.frombuffer(v.canvas.values, dtype=np.float32)


def test_viewer_shows_the_slide_pyramid(viewer, c3):
    info = viewer.canvas.image_info
    assert (info["width"], info["height"]) == (c3.image.width, c3.image.height)
    assert info["um_per_px"] == pytest.approx(0.69)
    assert len(info["levels"]) == c3.image.n_levels >= 4
    # the overview is a decodable image of the whole slide, at most 1024 px on its long side
    ov = Image.open(io.BytesIO(viewer.canvas.overview))
    assert max(ov.size) <= 1024 and ov.size[0] / ov.size[1] == pytest.approx(c3.image.width / c3.image.height, rel=0.02)
    # spots: one point per prediction row, radius = 100 µm spot / 0.69 µm/px / 2
    xy = np.frombuffer(viewer.canvas.points, dtype=np.float32).reshape(-1, 2)
    assert xy.shape == (c3.adata.n_obs, 2)
    np.testing.assert_allclose(xy, c3.xy, rtol=1e-5)
    assert viewer.canvas.radius_px == pytest.approx(100 / 0.69 / 2)


def test_tiles_are_served_from_the_pyramid(viewer, c3):
    canvas = viewer.canvas
    t = Image.open(io.BytesIO(canvas.tile(0, 4, 5)))
    assert t.size == (512, 512) and t.format == "JPEG"
    # the tile holds the same pixels as the level-0 region (JPEG: small error)
    ref = c3.image.read_region(4 * 512, 5 * 512, 512, 512, level=0).astype(float)
    assert np.abs(np.asarray(t, dtype=float) - ref).mean() < 6
    # edge tiles are cropped to the level, not padded
    lev = c3.image.n_levels - 2
    H, W = c3.image.level_shapes[lev]
    edge = Image.open(io.BytesIO(canvas.tile(lev, (W - 1) // 512, (H - 1) // 512)))
    assert edge.size == (W - (W - 1) // 512 * 512, H - (H - 1) // 512 * 512)
    with pytest.raises(ValueError):
        canvas.tile(0, 10_000, 0)
    # the browser's request message is answered with one message + one buffer per tile
    sent = []
    canvas.send = lambda content, buffers=None: sent.append((content, buffers))
    canvas._on_custom(canvas, {"type": "tiles", "tiles": [{"level": 1, "col": 0, "row": 0},
                                                         {"level": 99, "col": 0, "row": 0}]}, [])
    assert [m["level"] for m, _ in sent] == [1, 99]
    assert len(sent[0][1][0]) > 1000 and sent[1][1][0] == b""  # a bad request gets an empty tile


def test_gene_mode_and_opacity_change_what_is_drawn(viewer, pred):
    assert viewer.feature == "ERBB2" and viewer.mode == "mean"
    mean = _values(viewer).copy()
    np.testing.assert_allclose(mean, pred[:, "ERBB2"].X.ravel(), rtol=1e-6)
    viewer.mode = "epistemic"
    epi = _values(viewer)
    np.testing.assert_allclose(epi, np.sqrt(pred[:, "ERBB2"].layers[K.EPISTEMIC].ravel()), rtol=1e-5)
    assert viewer.mode_toggle.value == "epistemic" and "epistemic SD" in viewer.canvas.legend
    viewer.mode_toggle.value = "aleatoric"  # the control drives the trait too
    assert viewer.mode == "aleatoric"
    np.testing.assert_allclose(_values(viewer), np.sqrt(pred[:, "ERBB2"].layers[K.ALEATORIC].ravel()), rtol=1e-5)
    # gene search: a valid name switches the gene, an unknown one is ignored
    viewer.search.value = "FASN"
    assert viewer.feature == "FASN" and "FASN" in viewer.status
    viewer.search.value = "NOT_A_GENE"
    assert viewer.feature == "FASN"
    with pytest.raises(traitlets.TraitError):
        viewer.feature = "NOT_A_GENE"
    with pytest.raises(traitlets.TraitError):
        viewer.mode = "median"
    viewer.opacity_slider.value = 0.35
    assert viewer.canvas.opacity == pytest.approx(0.35)
    # colour range follows the data
    assert viewer.canvas.vmax > viewer.canvas.vmin


def test_celltype_layer_uses_total_variance_split(viewer, pred):
    ct = pred.obsm[K.CELLTYPE_MEAN].columns[0]
    viewer.kind_toggle.value = "cell type"
    assert viewer.kind == "cell type" and viewer.feature in pred.obsm[K.CELLTYPE_MEAN].columns
    viewer.show(ct, "mean")
    m = pred.obsm[K.CELLTYPE_MEAN][ct].to_numpy()
    s = pred.obsm[K.CELLTYPE_STD][ct].to_numpy()
    np.testing.assert_allclose(_values(viewer), m, rtol=1e-6)
    viewer.mode = "epistemic"
    np.testing.assert_allclose(_values(viewer), s, rtol=1e-6)
    viewer.mode = "aleatoric"
    ale = _values(viewer).astype(float)
    np.testing.assert_allclose(ale ** 2 + s ** 2, m * (1 - m), atol=1e-5)  # law of total variance
    viewer.mode = "observed"
    assert np.isfinite(_values(viewer)).sum() > 100


def test_observed_mode_aligns_by_spot_id(pred, c3, tmp_path):
    from stimage_nb.widgets import OverlayViewer

    shuffled = pred[::-1].copy()  # reversed order: the observed counts must follow the ids
    v = OverlayViewer(shuffled, observed=c3, export_dir=tmp_path, mode="observed")
    np.testing.assert_allclose(_values(v), c3.adata[shuffled.obs_names, "ERBB2"].X.toarray().ravel())
    # without observed data there is no observed mode
    v2 = OverlayViewer(pred, export_dir=tmp_path)
    assert "observed" not in v2.mode_toggle.options


def test_click_a_spot_shows_its_values(viewer, pred, c3):
    viewer.show("ERBB2", "mean")
    i = int(np.argmax(pred[:, "ERBB2"].X.ravel()))
    viewer.canvas.selected = i  # what a click in the browser sets
    info = viewer.spot_info
    assert info["spot"] == pred.obs_names[i] and info["feature"] == "ERBB2"
    assert info["mean"] == pytest.approx(float(pred[i, "ERBB2"].X[0, 0]))
    assert info["epistemic"] == pytest.approx(float(np.sqrt(pred[i, "ERBB2"].layers[K.EPISTEMIC][0, 0])), rel=1e-5)
    assert info["observed"] == pytest.approx(float(c3.adata[pred.obs_names[i], "ERBB2"].X.toarray()[0, 0]))
    assert len(info["top_celltypes"]) == 3 and pred.obs_names[i] in viewer.info.value
    # switching the gene updates the selected spot's values
    viewer.feature = "GNAS"
    assert viewer.spot_info["feature"] == "GNAS"
    assert viewer.select(pred.obs_names[0])["index"] == 0
    viewer.canvas.selected = -1  # a click on glass clears it
    assert viewer.spot_info == {}


def test_a_spot_shows_its_domain_shift_score(pred, tmp_path):
    from stimage_nb.widgets import OverlayViewer

    p = pred.copy()
    p.obs[K.DOMAIN_PERCENTILE] = np.linspace(0, 1, p.n_obs).astype(np.float32)
    v = OverlayViewer(p, export_dir=tmp_path)
    v.canvas.selected = p.n_obs - 1
    assert v.spot_info["domain_percentile"] == pytest.approx(1.0) and "unfamiliar" in v.info.value
    v.canvas.selected = 0
    assert v.spot_info["domain_percentile"] == 0.0 and "unfamiliar" not in v.info.value
    plain = OverlayViewer(pred, export_dir=tmp_path)
    assert "domain_percentile" not in plain.select(pred.obs_names[0])
    assert "domain shift" not in plain.mode_toggle.options


def test_domain_shift_mode_draws_the_score_on_a_fixed_scale(pred, tmp_path):
    """The score is a property of the tile: the same map for every gene and cell type, on 0-1."""
    from stimage_nb.widgets import OverlayViewer

    p = pred.copy()
    score = np.linspace(0.2, 0.7, p.n_obs).astype(np.float32)
    p.obs[K.DOMAIN_PERCENTILE] = score
    v = OverlayViewer(p, export_dir=tmp_path)
    assert "domain shift" in v.mode_toggle.options
    v.mode_toggle.value = "domain shift"
    assert v.mode == "domain shift" and "domain-shift percentile" in v.canvas.legend
    np.testing.assert_allclose(_values(v), score)
    assert (v.canvas.vmin, v.canvas.vmax) == (0.0, 1.0)  # not stretched to the data's range
    v.feature = "FASN"
    np.testing.assert_allclose(_values(v), score)
    v.canvas.selected = 3
    assert v.spot_info["domain_percentile"] == pytest.approx(score[3]) and "domain shift" not in v.spot_info
    v.mode = "mean"
    np.testing.assert_allclose(_values(v), p[:, "FASN"].X.ravel(), rtol=1e-6)


def test_export_button_writes_qupath_geojson(viewer, pred, tmp_path):
    viewer.export_button.click()
    out = tmp_path / "C3.geojson"
    assert viewer.last_export == str(out) and out.is_file()
    fc = json.loads(out.read_text())
    feats = fc["features"] if isinstance(fc, dict) else fc
    assert len(feats) == pred.n_obs
    assert "exported" in viewer.status


def test_export_failure_is_reported_not_raised(pred, c3, tmp_path):
    from stimage_nb.widgets import OverlayViewer

    def broken(_pred, _path):
        raise OSError("disk full")

    v = OverlayViewer(pred, observed=c3, export_dir=tmp_path, exporter=broken)
    v.export_button.click()
    assert v.last_export == "" and "disk full" in v.status


def test_push_without_server_is_a_dry_run(pred, c3, tmp_path):
    from stimage_nb.widgets import OverlayViewer

    calls = []

    def pusher(p, conn, image_id, dry_run):
        calls.append((conn, image_id, dry_run))
        return {"n_rois": p.n_obs, "table": "stimage_nb predictions"}

    v = OverlayViewer(pred, export_dir=tmp_path, pusher=pusher)
    assert "dry run" in v.push_button.description
    v.push_button.click()
    assert calls == [(None, None, True)]
    assert v.last_push["dry_run"] is True and v.last_push["n_rois"] == pred.n_obs
    assert "dry run" in v.status


def test_viewer_reads_h5ad_and_rejects_bad_input(pred, tmp_path):
    from stimage_nb.widgets import OverlayViewer

    p = tmp_path / "C3.h5ad"
    pred.write_h5ad(p)
    v = OverlayViewer(p)
    assert v.export_dir == tmp_path and v.features.genes == GENES
    with pytest.raises(StimageInputError, match="not found"):
        OverlayViewer(tmp_path / "missing.h5ad")
    bad = pred.copy()
    del bad.obsm[K.SPATIAL]
    with pytest.raises(StimageInputError, match="spatial"):
        OverlayViewer(bad)
    noimg = pred.copy()
    noimg.uns[K.UNS] = {k: v for k, v in noimg.uns[K.UNS].items() if k != "image"}
    with pytest.raises(StimageInputError, match="image"):
        OverlayViewer(noimg)


def test_js_ships_inside_the_package_without_network_imports():
    from stimage_nb.widgets.viewer import STATIC, SlideCanvas

    js = (STATIC / "viewer.js").read_text()
    assert "export default" in js
    # no import from anywhere: no CDN, no bare module specifiers
    assert not [ln for ln in js.splitlines() if ln.lstrip().startswith("import ")]
    assert "http://" not in js and "https://" not in js
    w = SlideCanvas()
    assert "export default" in w._esm and "stimage-viewer" in w._css
    # and is packaged into wheels (binder/postBuild installs a wheel, not the checkout)
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"widgets/static/*"' in pyproject


# ============================================================================ training panel
def _panel(manifest, out, **kw):
    from stimage_nb.widgets import TrainingPanel

    args = dict(out=out, train=["C4"], default_genes=8, backbone="test_resnet", members=1, epochs=3, out_px=32,
                device="cpu", config={"batch_size": 32, "stain": "none"})
    args.update(kw)
    return TrainingPanel(manifest, **args)


def test_training_panel_cancel_keeps_checkpoint_and_resumes(her2st_manifest, tmp_path):
    panel = _panel(her2st_manifest, tmp_path / "run")
    assert panel.state == "idle" and panel.cancel_button.disabled
    assert list(panel.genes.value) == panel.all_genes[:8] and "C4" in panel.sections.options
    empty_plot = panel.plot.value
    seen = []

    def cancel_after_first_epoch(change):
        seen.append(len(change["new"]))
        if len(change["new"]) == 1:
            panel.cancel()  # what the Cancel button does

    panel.observe(cancel_after_first_epoch, "history")
    panel.start_button.click()
    assert panel.join(timeout=300)
    panel.unobserve(cancel_after_first_epoch, "history")
    assert panel.state == "cancelled", panel.status
    assert "checkpoint" in panel.status and not panel.start_button.disabled
    ck = panel.checkpoints()
    assert ck[0]["epoch"] == 0 and not ck[0]["done"]  # epoch 0 finished and kept, run not done
    assert (tmp_path / "run" / "members" / "m0" / ck[0]["model_file"]).is_file()
    assert panel.plot.value != empty_plot  # the live loss curve was drawn
    assert panel.ensemble is None and not (tmp_path / "run" / "ensemble.json").exists()

    # Start again with the same settings: resumes after epoch 0 instead of starting over
    panel.start(block=True)
    assert panel.state == "finished", panel.status
    assert [r["epoch"] for r in panel.history] == [1, 2]
    assert np.isfinite([r["train_loss"] for r in panel.history]).all()
    assert panel.epochs_done == 3 and panel.progress.value == panel.progress.max == 3
    assert panel.ensemble is not None and panel.ensemble.genes == panel.all_genes[:8]
    assert (tmp_path / "run" / "ensemble.json").is_file()


def test_training_panel_reports_bad_settings(her2st_manifest, tmp_path):
    panel = _panel(her2st_manifest, tmp_path / "run")
    panel.genes.value = []
    panel.start_button.click()
    assert panel.state == "failed" and "gene" in panel.status and panel._thread is None
    panel.genes.value = panel.all_genes[:2]
    panel.sections.value = ("C4",)
    panel.validate.value = ("C4",)
    panel.start()
    assert panel.state == "failed" and "training section" in panel.status
    with pytest.raises(StimageInputError, match="manifest not found"):
        _panel(tmp_path / "nope.csv", tmp_path / "run")


def test_default_push_without_server_is_an_offline_plan(pred, tmp_path):
    """No connection: the viewer's push button works out what would be written, with no server."""
    from stimage_nb.omero.push import offline_push_plan
    from stimage_nb.widgets import OverlayViewer

    v = OverlayViewer(pred, export_dir=tmp_path)
    v.push_button.click()
    res = v.last_push
    assert res["dry_run"] is True and res["server"] is None and res["n_rois"] == pred.n_obs
    # one table per quantity plus the cell types, each within OMERO.tables' column limit
    assert [t[0].split()[2] for t in res["tables"]] == ["mean", "aleatoric_var", "epistemic_var", "celltype"]
    assert all(rows == pred.n_obs and cols <= 500 for _, rows, cols in res["tables"])
    assert "dry run" in v.status and "n_rois=180" in v.status
    # with a folder, the attachments are written for inspection
    plan = offline_push_plan(pred, out=tmp_path / "dry")
    assert sorted(Path(f).name for f in plan["files"]) == ["C3.geojson.gz", "C3.h5ad"]
    assert all(Path(f).stat().st_size > 1000 for f in plan["files"])


# ============================================================================ OMERO panel
PASSWORD = "s3cret-Pa55-word"


@pytest.fixture(scope="module")
def fake_omero(c3):
    """The BlitzGateway test double (tests/omero) holding one real H&E image (C3, 1/8 scale) with its
    180 spots as ellipse ROIs, in project 'her2st' / dataset 'patient C'."""
    pytest.importorskip("Ice", reason="omero-py / zeroc-ice not installed (bash .ci/install_omero.sh)")
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "omero"))
    from fake_omero import FakeOmeroServer

    from stimage_nb.omero import model as M

    lev = 3
    H, W = c3.image.level_shapes[lev]
    rgb = c3.image.read_region(0, 0, W, H, level=lev)
    ds = c3.image.downsamples[lev]
    server = FakeOmeroServer()
    pid = server.add_project("her2st")
    did = server.add_dataset("patient C", pid)
    iid = server.add_image(rgb, name="C3.jpg", um_per_px=c3.um_per_px * ds, dataset_id=did)
    r = 50.0 / (c3.um_per_px * ds)  # 100 µm spots
    rois = [M.roi(iid, [M.ellipse(float(x / ds), float(y / ds), r)], name=str(sid))
            for sid, (x, y) in zip(c3.adata.obs_names, c3.xy)]
    gw = server.gateway()
    gw.getUpdateService().saveAndReturnIds(rois)
    gw.close()
    yield {"server": server, "project": pid, "dataset": did, "image": iid, "rgb": rgb}
    server.close()


def _fake_connect(server, seen):
    from stimage_nb.omero.connection import OmeroAuthError

    def connect(host, port, user, password):
        seen.append(password)
        if password.reveal() != PASSWORD or user != "analyst":
            raise OmeroAuthError(f"logging in on {host}:{port}: login refused. Check the user name and password.")
        return server.gateway()

    return connect


def _all_widget_state(w) -> str:
    """Every synced value of a widget tree, as the browser (and a saved notebook) would see it."""
    parts = [json.dumps(w.get_state(), default=lambda o: repr(o))]
    for c in getattr(w, "children", ()):
        parts.append(_all_widget_state(c))
    return "\n".join(parts)


def test_omero_login_never_keeps_or_shows_the_password(fake_omero, tmp_path, caplog):
    import logging

    from stimage_nb.widgets import OmeroPanel

    caplog.set_level(logging.DEBUG)
    seen = []
    panel = OmeroPanel(host="omero.test", user="analyst", connect=_fake_connect(fake_omero["server"], seen),
                       dest=tmp_path)
    assert not panel.connected and "log in to omero.test" in panel.status
    # no password: nothing is attempted
    panel.login_button.click()
    assert not seen and "password" in panel.status
    # wrong password: refused, field cleared, the attempt shown without the secret
    panel.password.value = "wrong-" + PASSWORD
    panel.login_button.click()
    assert not panel.connected and "login failed" in panel.status and panel.password.value == ""
    # right password
    panel.password.value = PASSWORD
    panel.login_button.click()
    assert panel.connected, panel.status
    assert panel.password.value == "" and panel.password.disabled and not panel.logout_button.disabled
    assert [r["name"] for r in panel.projects] == ["her2st"]
    # the password went to connect() only as a Secret, and is nowhere to be seen
    assert [s.reveal() for s in seen] == ["wrong-" + PASSWORD, PASSWORD]
    assert PASSWORD not in repr(seen[-1]) and PASSWORD not in str(seen[-1])
    visible = "\n".join([_all_widget_state(panel), panel.status, panel.error, repr(panel.conn), caplog.text,
                         json.dumps(panel.projects)])
    assert PASSWORD not in visible
    panel.logout_button.click()
    assert not panel.connected and panel.projects == [] and not panel.login_button.disabled


def test_omero_browse_thumbnail_and_pull(fake_omero, tmp_path):
    from stimage_nb.widgets import OmeroPanel

    panel = OmeroPanel(fake_omero["server"].gateway(), dest=tmp_path)  # an existing connection: no login row
    assert panel.connected and panel.project_select.options[0][1] == fake_omero["project"]
    panel.project_select.value = fake_omero["project"]
    assert [d["name"] for d in panel.datasets] == ["patient C"]
    panel.dataset_select.value = fake_omero["dataset"]
    assert [i["id"] for i in panel.images] == [fake_omero["image"]] and panel.pull_button.disabled
    panel.image_select.value = fake_omero["image"]
    assert panel.image_id == fake_omero["image"] and not panel.pull_button.disabled
    h, w = fake_omero["rgb"].shape[:2]
    assert f"{w}×{h} px" in panel.image_info.value and "µm/px" in panel.image_info.value
    thumb = Image.open(io.BytesIO(panel.thumbnail))
    assert max(thumb.size) <= 192
    # the thumbnail is the slide: its mean colour matches the real pixels' (H&E pink, not blank)
    real = fake_omero["rgb"].reshape(-1, 3).mean(0)
    got = np.asarray(thumb.convert("RGB"), dtype=float).reshape(-1, 3).mean(0)
    assert np.abs(got - real).max() < 8

    panel.pull(block=True)
    assert panel.pull_state == "done", panel.status
    assert panel.progress.value == panel.progress.max and panel.progress.bar_style == "success"
    slide = panel.slide
    assert Path(panel.pulled_path).is_dir() and Path(panel.pulled_path).parent == tmp_path
    assert (slide.height, slide.width) == fake_omero["rgb"].shape[:2]
    np.testing.assert_array_equal(slide.read_region(100, 200, 64, 64), fake_omero["rgb"][200:264, 100:164])
    sec = panel.section
    assert sec is not None and sec.adata.n_obs == 180 and "180 observations" in panel.status
    assert abs(sec.diameter_um - 100) < 1

