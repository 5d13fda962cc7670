"""The OMERO round trip the live suite runs on a real server, kept separate so the double runs it too.

``round_trip(session, image_id, pred, pixels)``: pull the image and check its pixels, push a prediction,
read everything back (ROIs, tables, files, the run record), push again and see no duplicates, replace
with new content, pull the section (prediction ROIs skipped), remove the run and see nothing left.
"""

from __future__ import annotations

import numpy as np

from stimage_nb import _keys as K


def round_trip(sess, image_id: int, pred, pixels: np.ndarray | None = None, *, um_per_px: float | None = None) -> dict:
    from stimage_nb.omero import model as M
    from stimage_nb.omero import pull as P
    from stimage_nb.omero import push as U

    out = {}
    # 1. pull: a local OME-Zarr 0.4 pyramid with the server's pixels and pixel size
    img = P.pull_image(sess, image_id, progress=False, refresh=True, um_per_px=um_per_px)
    info = P.image_info(sess, image_id)
    assert (img.width, img.height) == (info.size_x, info.size_y)
    assert info.um_per_px is None or abs(img.um_per_px - info.um_per_px) < 1e-6
    if pixels is not None:
        assert np.array_equal(img.read_region(0, 0, img.width, img.height), pixels)
    run_id = str(pred.uns[K.UNS]["run_id"])
    U.remove_run(sess, image_id, run_id)                 # a clean start on a shared server
    # 2. push, then read it all back
    res = U.push_predictions(sess, image_id, pred, batch_size=100, progress=False)
    assert res.plan.mode == "fresh" and res.rois_written == pred.n_obs
    shapes = P.pull_rois(sess, image_id)
    ours = shapes[shapes["roi_description"].map(lambda d: (M.parse_tag(d) or {}).get("run") == run_id)]
    assert sorted(ours["roi_name"]) == sorted(map(str, pred.obs_names))
    assert dict(zip(ours["roi_name"], ours["roi_id"])) == {k: int(v) for k, v in res.roi_ids.items()}
    row = ours.set_index("roi_name").loc[str(pred.obs_names[0])]
    assert np.allclose([row["x"], row["y"]], np.asarray(pred.obsm[K.SPATIAL])[0] / pred.uns[K.UNS].get("image_scale", 1))
    anns = P.pull_annotations(sess, image_id)
    tables = {f.name: f for f in anns.files if f.is_table and f.ns == M.NS_TABLE}
    mean_name = next(n for n in tables if " mean " in n)
    mean = P.read_omero_table(sess, tables[mean_name], ctx=anns.ctx(sess.gateway))
    assert list(mean["spot"]) == list(map(str, pred.obs_names))
    assert list(mean["Roi"]) == [int(res.roi_ids[s]) for s in map(str, pred.obs_names)]
    genes = [c for c in mean.columns[5:]]
    X = pred[:, genes].X
    assert np.allclose(mean[genes].to_numpy(), np.asarray(X), rtol=1e-6)
    files = {f.name for f in anns.files if f.ns == M.NS_FILE}
    section = pred.uns[K.UNS]["section"]
    assert f"{section}.h5ad" in files
    runs = U.list_runs(sess, image_id)
    assert list(runs.loc[runs["run_id"] == run_id, "state"]) == ["complete"]
    out["pushed"] = res
    # 3. push again: nothing to do, nothing duplicated
    again = U.push_predictions(sess, image_id, pred, batch_size=100, progress=False)
    assert again.plan.mode == "up-to-date" and again.rois_written == 0
    n_after = len([d for d in P.pull_rois(sess, image_id)["roi_description"]
                   if (M.parse_tag(d) or {}).get("run") == run_id])
    assert n_after == pred.n_obs
    # 4. new content replaces the old objects
    gene = str(pred.var_names[0])
    rep = U.push_predictions(sess, image_id, pred, colour_by=gene, batch_size=100, progress=False)
    assert rep.plan.mode == "replace"
    shapes = P.pull_rois(sess, image_id)
    ours = shapes[shapes["roi_description"].map(lambda d: (M.parse_tag(d) or {}).get("run") == run_id)]
    assert len(ours) == pred.n_obs and ours["roi_name"].is_unique
    assert all(str(t).startswith(gene + " ") for t in ours["text"])
    # 5. a pulled section skips prediction ROIs unless asked
    sec = P.pull_section(sess, image_id, counts=None, progress=False, include_predictions=True, um_per_px=um_per_px)
    assert set(map(str, pred.obs_names)) <= set(sec.adata.obs_names)
    # 6. remove the run: nothing of it is left
    counts = U.remove_run(sess, image_id, run_id)
    assert counts["Roi"] == pred.n_obs
    assert U.remove_run(sess, image_id, run_id, dry_run=True) == {"Roi": 0, "Annotation": 0, "OriginalFile": 0}
    out["removed"] = counts
    return out


def crop_prediction(pred, offset, size):
    """The part of a prediction inside a crop of its image, with coordinates moved into the crop."""
    xy = np.asarray(pred.obsm[K.SPATIAL]) - np.asarray(offset, dtype=float)
    w, h = size
    r = pred.obs[K.DIAMETER_UM].to_numpy() / 2 / pred.uns[K.UNS]["um_per_px"]
    ok = (xy[:, 0] - r >= 0) & (xy[:, 1] - r >= 0) & (xy[:, 0] + r < w) & (xy[:, 1] + r < h)
    sub = pred[ok].copy()
    sub.obsm[K.SPATIAL] = xy[ok]
    sub.obs[K.PIXEL_X] = xy[ok, 0]
    sub.obs[K.PIXEL_Y] = xy[ok, 1]
    return sub
