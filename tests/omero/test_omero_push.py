"""Push: a real section's prediction as ROIs, OMERO.tables and files; batching, id mapping, replace, resume."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from stimage_nb import _keys as K
from stimage_nb.errors import StimageInputError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch, omero_stack):
    monkeypatch.setenv("STIMAGE_NB_CACHE", str(tmp_path / "cache"))


def _saves(server):
    return [c[2] for c in server.calls if c[1] == "saveAndReturnIds"]


def _names(server, iid):
    from omero.rtypes import unwrap

    return sorted(unwrap(r.getName()) for r in server.rois.values() if unwrap(r.getImage().getId()) == iid)


def _read_table(sess, server, fid):
    from stimage_nb.omero.pull import Attachment, read_omero_table

    return read_omero_table(sess, Attachment(0, fid, "t", None, "OMERO.tables", 0, None))


def test_push_writes_rois_tables_and_files(server, session_on, c3_on_server, c3_pred, tmp_path):
    import anndata as ad
    from omero.rtypes import unwrap

    from stimage_nb._colours import class_colours
    from stimage_nb.omero import model as M
    from stimage_nb.omero import push as U
    from stimage_nb.omero.pull import download_file, pull_annotations

    iid = c3_on_server
    sess = session_on(server)
    res = U.push_predictions(sess, iid, c3_pred, batch_size=50, progress=False)
    n = c3_pred.n_obs
    assert res.plan.mode == "fresh" and res.rois_written == n == 180
    assert _saves(server) == [50, 50, 50, 30]                                  # batches of batch_size
    assert _names(server, iid) == sorted(c3_pred.obs_names)                     # one ROI per spot, by id
    # ids come back unordered, yet every spot maps to its own ROI
    by_id = {unwrap(r.getId()): r for r in server.rois.values()}
    assert all(unwrap(by_id[res.roi_ids[s]].getName()) == s for s in c3_pred.obs_names)
    names = list(c3_pred.obsm[K.CELLTYPE_MEAN].columns)
    colours = class_colours(names)
    i = 17
    roi = by_id[res.roi_ids[c3_pred.obs_names[i]]]
    sh = M.decode_shape(roi.copyShapes()[0])
    best = names[int(np.argmax(c3_pred.obsm[K.CELLTYPE_MEAN].to_numpy()[i]))]
    assert sh["kind"] == "ellipse" and sh["rx"] == pytest.approx(50.0 / 0.69)   # 100 µm spot at 0.69 µm/px
    assert (sh["x"], sh["y"]) == pytest.approx(tuple(c3_pred.obsm[K.SPATIAL][i]))
    assert sh["fill"] == (*colours[best], U.FILL_ALPHA) and sh["text"].startswith(f"{best} p=")
    tag = M.parse_tag(unwrap(roi.getDescription()))
    assert (tag["run"], tag["image"], tag["ns"]) == ("test-run", str(iid), M.NS_ROI)
    # tables: the mean and both variances for all 50 genes, the cell types; Roi column = the ROI ids
    tname = f"stimage_nb test-run image{iid} {{}} 1of1"
    assert set(res.table_file_ids) == {tname.format(q) for q in ("mean", "aleatoric_var", "epistemic_var", "celltype")}
    mean = _read_table(sess, server, res.table_file_ids[tname.format("mean")])
    assert list(mean.columns[:5]) == ["Image", "Roi", "spot", "x", "y"] and list(mean.columns[5:]) == list(c3_pred.var_names)
    assert list(mean["spot"]) == list(c3_pred.obs_names) and (mean["Image"] == iid).all()
    assert list(mean["Roi"]) == [int(res.roi_ids[s]) for s in c3_pred.obs_names]
    assert np.allclose(mean.iloc[:, 5:].to_numpy(), c3_pred.X)
    epi = _read_table(sess, server, res.table_file_ids[tname.format("epistemic_var")])
    assert np.allclose(epi.iloc[:, 5:].to_numpy(), c3_pred.layers[K.EPISTEMIC])
    # files: the prediction itself and its QuPath GeoJSON, downloadable and readable
    anns = pull_annotations(sess, iid)
    files = {f.name: f for f in anns.files}
    assert set(files) >= {"C3.h5ad", "C3.geojson.gz"} and len([f for f in files.values() if f.is_table]) == 4
    h5 = download_file(sess, files["C3.h5ad"], tmp_path / "back.h5ad")
    back = ad.read_h5ad(h5)
    assert list(back.obs_names) == list(c3_pred.obs_names) and np.array_equal(back.X, c3_pred.X)
    gj = download_file(sess, files["C3.geojson.gz"], tmp_path / "back.geojson.gz")
    feats = json.loads(gzip.decompress(gj.read_bytes()))["features"]
    assert len(feats) == n and {f["properties"]["name"] for f in feats} == set(c3_pred.obs_names)
    # the run record says what was done
    rec = [m for m in anns.maps if m["ns"] == M.NS_RUN]
    assert len(rec) == 1 and dict(rec[0]["pairs"])["state"] == "complete" and dict(rec[0]["pairs"])["ROIs"] == "180"
    runs = U.list_runs(sess, iid)
    assert list(runs["run_id"]) == ["test-run"] and list(runs["state"]) == ["complete"]


def test_push_again_is_a_no_op_and_new_content_replaces(server, session_on, c3_on_server, c3_pred):
    from omero.rtypes import unwrap

    from stimage_nb.omero import push as U

    iid = c3_on_server
    sess = session_on(server)
    first = U.push_predictions(sess, iid, c3_pred, progress=False)
    n_saves, n_objs = len(_saves(server)), (len(server.rois), len(server.annotations), len(server.files))
    again = U.push_predictions(sess, iid, c3_pred, progress=False)
    assert again.plan.mode == "up-to-date" and again.rois_written == 0 and len(_saves(server)) == n_saves
    assert (len(server.rois), len(server.annotations), len(server.files)) == n_objs
    assert again.roi_ids.equals(first.roi_ids)
    # colouring by a gene is other content: the old objects are replaced, never duplicated
    gene = str(c3_pred.var_names[0])
    new = U.push_predictions(sess, iid, c3_pred, colour_by=gene, progress=False)
    assert new.plan.mode == "replace" and len(new.plan.delete["Roi"]) == 180
    assert _names(server, iid) == sorted(c3_pred.obs_names)
    assert (len(server.rois), len(server.annotations), len(server.files)) == n_objs
    texts = {unwrap(r.copyShapes()[0].getTextValue()) for r in server.rois.values()}
    assert all(t.startswith(f"{gene} ") and "(SD " in t for t in texts)
    assert not set(new.roi_ids).intersection(first.roi_ids)
    forced = U.push_predictions(sess, iid, c3_pred, colour_by=gene, force=True, progress=False)
    assert forced.plan.mode == "replace" and len(server.rois) == 180


@pytest.mark.parametrize("method,after,commit", [
    ("saveAndReturnIds", 1, True),      # the batch is stored, the reply is lost
    ("saveAndReturnIds", 2, False),     # the batch never arrives
    ("addData", 1, True),               # mid-table
    ("write", 1, False),                # uploading the second attachment (RawFileStore.write)
    ("initialize", 1, False),           # a table file exists but is not linked yet: found by name, deleted
])
def test_push_resumes_after_a_dropped_connection(server, session_on, c3_on_server, c3_pred, method, after, commit):
    """A reconnecting session resumes by itself: nothing lost, nothing duplicated, no orphan left behind."""
    from stimage_nb.omero import push as U

    iid = c3_on_server
    if method == "addData":
        server.faults.append({"method": "addData", "at": 2, "commit": commit})
    else:
        server.fail(method, after=after, commit=commit)
    res = U.push_predictions(session_on(server), iid, c3_pred, batch_size=40, progress=False)
    assert res.attempts == 2 and res.plan.mode == "resume"
    assert _names(server, iid) == sorted(c3_pred.obs_names)                   # exactly one ROI per spot
    assert len(server.tables) == 4 and all(t.n_rows == 180 for t in server.tables.values())
    assert len(server.annotations) == 1 + 4 + 2                               # record, tables, files
    linked = {a for _, a in server.image_links.values()}
    assert linked == set(server.annotations)                                  # every annotation on the image
    import omero.model

    assert set(server.files) == {a.getFile().getId().getValue() for a in server.annotations.values()
                                 if isinstance(a, omero.model.FileAnnotationI)}      # no orphaned file
    sent = sum(_saves(server))
    assert 180 <= sent <= 180 + 40                                             # at most one batch re-sent


def test_push_without_reconnect_fails_clearly_and_a_second_push_resumes(server, session_on, c3_on_server, c3_pred):
    from stimage_nb.omero import push as U
    from stimage_nb.omero.connection import OmeroConnectionError

    iid = c3_on_server
    server.fail("saveAndReturnIds", after=2, commit=True)
    with pytest.raises(OmeroConnectionError, match="run the same push again to resume"):
        U.push_predictions(session_on(server, reconnect=False), iid, c3_pred, batch_size=50, progress=False)
    assert len(server.rois) == 150
    plan = U.push_predictions(session_on(server), iid, c3_pred, batch_size=50, dry_run=True, progress=False)
    assert plan.mode == "resume" and plan.rois_to_write == 30 and plan.rois_kept == 150
    res = U.push_predictions(session_on(server), iid, c3_pred, batch_size=50, progress=False)
    assert res.rois_written == 30 and _names(server, iid) == sorted(c3_pred.obs_names)


def test_wide_predictions_are_split_under_the_column_limit(server, session_on, c3_on_server, her2st_manifest,
                                                         her2st_genes):
    from _predictions import make_prediction

    from stimage_nb.omero import push as U
    from stimage_nb.omero import tables as T
    from stimage_nb.omero.connection import OmeroError

    pred = make_prediction(her2st_manifest, "C3", genes=list(her2st_genes))       # all 769 genes
    sess = session_on(server)
    res = U.push_predictions(sess, c3_on_server, pred, attach_h5ad=False, attach_geojson=False, progress=False)
    widths = sorted(len(t.headers) for t in server.tables.values())
    assert len(server.tables) == 3 * 2 + 1 and max(widths) <= 500
    got = []
    for name, fid in res.table_file_ids.items():
        if " mean " in name:
            got += list(_read_table(sess, server, fid).columns[5:])
    assert got == list(pred.var_names)
    # the double refuses what OMERO.tables refuses: more than 1,000 columns in one table
    spec = T.TableSpec("too wide", "mean", [f"g{i}" for i in range(1001)], pred.n_obs,
                       lambda a, b: np.zeros((b - a, 1001)))
    ctx = sess.gateway.SERVICE_OPTS.copy()
    with pytest.raises(Exception, match="too large"):
        T.write_table(sess.gateway, spec, image_id=c3_on_server, spot_ids=list(pred.obs_names),
                      xy_full=np.asarray(pred.obsm[K.SPATIAL]), roi_ids=None, ctx=ctx)
    assert issubclass(OmeroError, RuntimeError)


def test_cells_get_tables_and_a_label_image_instead_of_rois(server, session_on, c3_on_server, c3_pred, tmp_path):
    import tifffile

    from stimage_nb.omero import push as U
    from stimage_nb.omero.pull import download_file, pull_annotations

    sess = session_on(server)
    res = U.push_predictions(sess, c3_on_server, c3_pred, max_rois=100, attach_h5ad=False, progress=False)
    assert len(server.rois) == 0 and res.rois_written == 0 and len(res.roi_ids) == 0
    assert all(t.headers[1][0] == "spot" for t in server.tables.values())       # no Roi column without ROIs
    anns = pull_annotations(sess, c3_on_server)
    lab = {f.name: f for f in anns.files}["C3.celltypes.ome.tif"]
    record = dict(next(m["pairs"] for m in anns.maps if m["ns"].endswith("/run")))
    assert record["label image values"].startswith("1=B-cells; 2=CAFs;") and "2 µm/px" in record["label image values"]
    path = download_file(sess, lab, tmp_path / "labels.ome.tif")
    with tifffile.TiffFile(path) as tf:
        img = tf.asarray()
        assert tf.is_ome and "PhysicalSizeX=\"2.0\"" in tf.ome_metadata
    assert img.shape == (int(np.ceil(9936 * 0.69 / 2)), int(np.ceil(9270 * 0.69 / 2)))
    best = np.argmax(c3_pred.obsm[K.CELLTYPE_MEAN].to_numpy(), axis=1) + 1
    x, y = (np.asarray(c3_pred.obsm[K.SPATIAL]) * 0.69 / 2).T.astype(int)
    assert np.array_equal(img[y, x], best)                     # each spot's centre has its predicted type
    assert set(np.unique(img)) <= set(range(0, 9)) and (img == 0).mean() > 0.5


def test_dry_run_writes_nothing_and_remove_run_is_clean(server, session_on, c3_on_server, c3_pred):
    from stimage_nb.omero import push as U

    sess = session_on(server)
    plan = U.push_predictions(sess, c3_on_server, c3_pred, dry_run=True, progress=False)
    assert plan.mode == "fresh" and plan.rois_to_write == 180 and len(plan.tables) == 4
    assert "180 to write" in str(plan) and not server.rois and not server.annotations and not _saves(server)
    U.push_predictions(sess, c3_on_server, c3_pred, progress=False)
    other = c3_pred.copy()
    other.uns[K.UNS] = dict(other.uns[K.UNS], run_id="other-run")
    U.push_predictions(sess, c3_on_server, other, attach_geojson=False, progress=False)
    assert len(server.rois) == 360
    assert U.remove_run(sess, c3_on_server, "test-run", dry_run=True) == {"Roi": 180, "Annotation": 7,
                                                                          "OriginalFile": 6}
    assert len(server.rois) == 360
    counts = U.remove_run(sess, c3_on_server, "test-run")
    assert counts["Roi"] == 180 and len(server.rois) == 180
    assert list(U.list_runs(sess, c3_on_server)["run_id"]) == ["other-run"]
    assert len(server.annotations) == 1 + 4 + 1 and len(server.files) == 5 and len(server.tables) == 4
    assert U.remove_run(sess, c3_on_server, "test-run") == {"Roi": 0, "Annotation": 0, "OriginalFile": 0}


def test_push_lands_in_the_image_group_and_checks_the_image(server, session_on, c3_pred, c3_image):
    """The image lives in another of the user's groups: objects are created there (OMERO refuses cross-group links)."""
    from conftest import lazy_image
    from omero.rtypes import rlong

    from stimage_nb.omero import model as M
    from stimage_nb.omero import push as U

    iid = server.add_image(None, um_per_px=0.69, group_id=5, levels=[lazy_image(c3_image.width, c3_image.height)])
    sess = session_on(server)
    U.push_predictions(sess, iid, c3_pred, attach_geojson=False, progress=False)
    assert set(server.roi_group.values()) == {5} and set(server.ann_group.values()) == {5}
    assert sess.gateway.SERVICE_OPTS.getOmeroGroup() is None                  # the session's context is restored
    import omero

    with pytest.raises(omero.SecurityViolation):                              # ...which the double enforces
        sess.gateway.getUpdateService().saveAndReturnIds([M.roi(iid, [M.point(1, 2)])], {"omero.group": "3"})
    wrong_um = server.add_image(None, um_per_px=0.25, levels=[lazy_image(c3_image.width, c3_image.height)])
    with pytest.raises(StimageInputError, match="right image"):
        U.push_predictions(sess, wrong_um, c3_pred, progress=False)
    small = server.add_image(None, um_per_px=0.69, levels=[lazy_image(2000, 2000)])
    with pytest.raises(StimageInputError, match="Wrong image id"):
        U.push_predictions(sess, small, c3_pred, progress=False)
    bad = c3_pred.copy()
    del bad.obsm[K.SPATIAL]
    with pytest.raises(StimageInputError, match="obsm"):
        U.push_predictions(sess, iid, bad, progress=False)
    with pytest.raises(StimageInputError, match="colour_by"):
        U.push_predictions(sess, iid, c3_pred, colour_by="NOT_A_GENE", progress=False)
    assert rlong(1).getValue() == 1


def test_the_live_round_trip_passes_on_the_double(server, session_on, he_crop, c3_pred):
    """The exact steps the live suite runs on a real server (tests/omero/round_trip.py), here on the double."""
    from round_trip import crop_prediction, round_trip

    crop, offset = he_crop
    iid = server.add_image(crop, name="stimage_nb-live-C3-crop", um_per_px=0.69)
    pred = crop_prediction(c3_pred, offset, (1400, 1100))
    assert pred.n_obs >= 5
    out = round_trip(session_on(server), iid, pred, crop)
    assert out["removed"]["Roi"] == pred.n_obs and not server.rois and not server.annotations and not server.files
