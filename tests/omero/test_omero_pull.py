"""Pull: real H&E pixels through the RawPixelsStore contract into OME-Zarr 0.4; ROIs + counts into a Section."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stimage_nb import _keys as K
from stimage_nb.errors import StimageInputError

BULK_NS = "openmicroscopy.org/omero/bulk_annotations"   # where OMERO tools put per-ROI tables


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch, omero_stack):
    monkeypatch.setenv("STIMAGE_NB_CACHE", str(tmp_path / "cache"))


def _tile_calls(server):
    return [c for c in server.calls if c[1] == "getTile"]


def test_omero_py_getTiles_and_our_reader_agree_with_the_source(server, session_on, he_crop):
    """omero-py's own PixelsWrapper.getTiles, run against the double's RawPixelsStore, returns the real pixels."""
    from stimage_nb.omero import pull as P

    crop, _ = he_crop
    iid = server.add_image(crop, um_per_px=0.69)
    sess = session_on(server)
    img = sess.gateway.getObject("Image", iid)
    px = img.getPrimaryPixels()
    tiles = [(0, c, 0, (130, 70, 300, 200)) for c in range(3)]
    planes = list(px.getTiles(tiles))                                # omero-py's code
    for c, plane in enumerate(planes):
        assert plane.dtype == np.uint8 and np.array_equal(plane, crop[70:270, 130:430, c])
    info = P.image_info(sess, iid)
    store = P._open_store(sess, info)
    ours = P.read_block(store, [0, 1, 2], 130, 70, 300, 200, info.pixels_type)
    store.close()
    assert np.array_equal(ours, crop[70:270, 130:430])
    # 16-bit pixels travel big-endian; both decoders must agree on the byte order
    deep = crop.astype(np.uint16) * 257 + 3
    iid16 = server.add_image(deep, um_per_px=0.69, n_levels=1)
    px16 = sess.gateway.getObject("Image", iid16).getPrimaryPixels()
    plane = px16.getTile(0, 2, 0, (5, 6, 50, 40))
    assert plane.dtype == np.uint16 and np.array_equal(plane, deep[6:46, 5:55, 2])
    info16 = P.image_info(sess, iid16)
    st = P._open_store(sess, info16)
    assert np.array_equal(P.read_block(st, [2], 5, 6, 50, 40, "uint16")[:, :, 0], deep[6:46, 5:55, 2])
    st.close()


def test_pull_image_is_exact_ngff_04_and_cached(server, session_on, he_crop, tmp_path):
    import zarr

    from stimage_nb.io.image import SlideImage
    from stimage_nb.io.ngff import write_ome_zarr
    from stimage_nb.omero import pull as P

    crop, _ = he_crop
    iid = server.add_image(crop, um_per_px=0.69, tile=(256, 256))
    sess = session_on(server)
    img = P.pull_image(sess, iid, progress=False)
    assert isinstance(img, SlideImage) and (img.width, img.height) == (1400, 1100)
    assert img.um_per_px == pytest.approx(0.69)
    assert np.array_equal(img.read_region(0, 0, 1400, 1100), crop)
    # the same NGFF 0.4 / Zarr v2 layout and lower levels as write_ome_zarr of the same pixels
    assert (img.path / ".zattrs").is_file() and not (img.path / "zarr.json").exists()
    attrs = json.loads((img.path / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 0.69, 0.69]
    assert attrs["omero"]["rdefs"]["model"] == "color"
    ref = write_ome_zarr(crop, tmp_path / "ref.ome.zarr", 0.69)
    gp, gr = zarr.open_group(str(img.path), mode="r"), zarr.open_group(str(ref), mode="r")
    assert sorted(gp.array_keys()) == sorted(gr.array_keys()) == ["0", "1", "2"]
    for k in gr.array_keys():
        assert gp[k].chunks == gr[k].chunks and np.array_equal(gp[k][:], gr[k][:])
    src = P.pulled_source(img.path)
    assert src["image_id"] == iid and src["image_scale"] == 1.0 and src["server_level"] == 0
    n = len(_tile_calls(server))
    assert n == 3 * 3 * 3   # 3 channels x 3 bands of 512 rows x 3 requests (the 256-px server tiles, in 512s)
    again = P.pull_image(sess, iid, progress=False)
    assert again.path == img.path and len(_tile_calls(server)) == n       # a second pull reads no pixels


def test_pull_resumes_after_a_dropped_connection(server, session_on, he_crop):
    from stimage_nb.omero import pull as P
    from stimage_nb.omero.connection import OmeroConnectionError

    crop, _ = he_crop
    iid = server.add_image(crop, um_per_px=0.69)
    server.fail("getTile", after=12, commit=False)         # dies in the middle of the second band (9 calls each)
    with pytest.raises(OmeroConnectionError, match="resume"):
        P.pull_image(session_on(server, reconnect=False), iid, progress=False)
    final = P.pulled_image_path("fake-omero.test", iid, 0)
    prog = json.loads((final.with_name(final.name + ".partial") / "pull-progress.json").read_text())
    assert prog["bands_done"] == [0]
    before = len(_tile_calls(server))
    img = P.pull_image(session_on(server), iid, progress=False)           # a new connection resumes
    second = _tile_calls(server)[before:]
    assert {c[2][3] for c in second} == {512, 1024}                         # only bands 2 and 3 were read
    assert len(second) == 2 * 9 and np.array_equal(img.read_region(0, 0, 1400, 1100), crop)
    # with a reconnecting session the same drop is survived inside one call
    iid2 = server.add_image(crop, um_per_px=0.69)
    server.fail("getTile", after=2)
    img2 = P.pull_image(session_on(server), iid2, progress=False)
    assert np.array_equal(img2.read_region(0, 0, 1400, 1100), crop)


def test_pull_a_server_resolution_level(server, session_on, he_crop):
    """target_um_per_px reads the coarsest fine-enough server level; setResolutionLevel counts from the smallest."""
    from stimage_nb.omero import pull as P

    crop, _ = he_crop
    iid = server.add_image(crop, um_per_px=0.69, n_levels=3)
    lvl1 = server.images[iid].levels[1]
    img = P.pull_image(session_on(server), iid, target_um_per_px=1.5, progress=False)
    assert (img.height, img.width) == lvl1.shape[:2] == (550, 700)
    assert img.um_per_px == pytest.approx(1.38) and np.array_equal(img.read_region(0, 0, 700, 550), lvl1)
    assert ("RawPixelsStore", "setResolutionLevel", 1) in server.calls      # 3 levels: level 1 is index 3-1-1
    assert all(c[2][0] == 1 for c in _tile_calls(server))
    assert P.pulled_source(img.path)["image_scale"] == 0.5


def test_pull_image_errors(server, session_on, he_crop):
    from stimage_nb.omero import pull as P
    from stimage_nb.omero.connection import OmeroNotFoundError

    crop, _ = he_crop
    sess = session_on(server)
    with pytest.raises(OmeroNotFoundError, match="999999"):
        P.pull_image(sess, 999999, progress=False)
    other = server.add_image(crop, group_id=9)                               # a group the user is not in
    with pytest.raises(OmeroNotFoundError):
        P.image_info(sess, other)
    nosize = server.add_image(crop, um_per_px=None)
    with pytest.raises(StimageInputError, match="um_per_px"):
        P.pull_image(sess, nosize, progress=False)
    assert P.pull_image(sess, nosize, um_per_px=0.5, progress=False).um_per_px == 0.5
    fluo = server.add_image(np.zeros((64, 64, 5), np.uint8))
    with pytest.raises(StimageInputError, match="5 channels"):
        P.pull_image(sess, fluo, progress=False)


# ------------------------------------------------------------------------------ sections
def _annotate(server, sess, iid, c3_pred, offset, *, table: bool = True, region: bool = True):
    """Put C3's real spots inside the crop as ellipse ROIs, a tumour polygon and a per-ROI counts table."""
    import omero.grid

    from stimage_nb.omero import model as M
    from stimage_nb.omero import pull as P

    gw = sess.gateway
    ctx = gw.SERVICE_OPTS.copy()
    ctx.setOmeroGroup(server.images[iid].group_id)
    xy = np.asarray(c3_pred.obsm[K.SPATIAL]) - offset
    H, W = server.images[iid].levels[0].shape[:2]
    inside = (xy[:, 0] > 0) & (xy[:, 1] > 0) & (xy[:, 0] < W) & (xy[:, 1] < H)
    names = list(c3_pred.obs_names[inside])
    r = 50.0 / 0.69
    rois = [M.roi(iid, [M.ellipse(x, y, r, text=n)], name=n) for n, (x, y) in zip(names, xy[inside])]
    if region:
        rois.append(M.roi(iid, [M.polygon(np.array([[0, 0], [W / 2, 0], [W / 2, H], [0, H]]), text="Tumor",
                                          stroke=(200, 0, 0, 255))], name="tumour region"))
    gw.getUpdateService().saveAndReturnIds(rois, ctx)
    counts = None
    if table:
        shapes = P.pull_rois(sess, iid)
        rid = dict(zip(shapes["roi_name"], shapes["roi_id"]))
        sec = c3_pred.uns["_section"]
        counts = sec.loc[names]
        res = gw.c.sf.sharedResources()
        t = res.newTable(1, "counts.h5", ctx)
        cols = [omero.grid.RoiColumn("Roi", "", [int(rid[n]) for n in names])]
        cols += [omero.grid.DoubleColumn(g, "", counts[g].astype(float).tolist()) for g in counts.columns]
        t.initialize(cols)
        t.addData(cols)
        fid = t.getOriginalFile().getId().getValue()
        t.close()
        gw.getUpdateService().saveAndReturnObject(M.image_link(iid, M.file_annotation_ref(fid, ns=BULK_NS)), ctx)
    return names, xy[inside], counts


@pytest.fixture
def c3_counts_pred(c3_pred, her2st_manifest, genes50):
    from stimage_nb.io.readers import read_manifest

    sec = read_manifest(her2st_manifest, ["C3"], genes=genes50)[0]
    c3_pred.uns["_section"] = pd.DataFrame(sec.adata.X.toarray(), index=sec.adata.obs_names, columns=genes50)
    return c3_pred


def test_pull_section_from_rois_and_an_omero_table(server, session_on, he_crop, c3_counts_pred):
    """A training Section entirely from OMERO objects: real spots, their real counts, a tumour region."""
    from stimage_nb.io.section import Section
    from stimage_nb.omero import pull as P

    crop, offset = he_crop
    iid = server.add_image(crop, name="C3.jpg", um_per_px=0.69)
    sess = session_on(server)
    names, xy, counts = _annotate(server, sess, iid, c3_counts_pred, offset)
    assert len(names) >= 8
    sec = P.pull_section(sess, iid, progress=False)
    assert isinstance(sec, Section) and sec.name == "C3" and sec.image.width == 1400
    a = sec.adata
    assert list(a.obs_names) == names                                         # ROI names are the ids
    assert np.allclose(a.obsm[K.SPATIAL], xy) and np.allclose(a.obs[K.DIAMETER_UM], 100.0)
    assert list(a.var_names) == list(counts.columns)
    assert np.array_equal(a.X.toarray(), counts.to_numpy(np.float32))          # the real counts, row by row
    left = xy[:, 0] < 700
    assert list(a.obs[K.REGION].astype(str)) == ["Tumor" if v else "" for v in left]
    assert a.uns[K.UNS]["omero"]["image_id"] == iid and a.uns[K.UNS]["image_scale"] == 1.0
    assert sec.platform == "unknown" and a.uns[K.UNS]["source"] == "omero"  # no `platform` map annotation
    assert a.uns[K.UNS]["counts"].startswith("omero://fake-omero.test/annotation/")
    # the tiles of a pulled section are the same physical content as the local image's
    t_local = sec.image.read_physical(*a.obsm[K.SPATIAL][0], 150.0, 64)
    assert t_local.shape == (64, 64, 3) and t_local.std() > 5
    # at a coarser server level the points follow (image_scale), the counts do not change
    low = P.pull_section(sess, iid, target_um_per_px=1.38, progress=False)
    assert low.adata.uns[K.UNS]["image_scale"] == 0.5 and low.um_per_px == pytest.approx(1.38)
    assert np.allclose(low.adata.obsm[K.SPATIAL], xy * 0.5)
    assert np.array_equal(low.adata.X.toarray(), a.X.toarray())


def test_pull_section_from_an_attached_tsv_and_skips_pushed_predictions(server, session_on, he_crop,
                                                                          c3_counts_pred, tmp_path):
    from stimage_nb.omero import model as M
    from stimage_nb.omero import pull as P

    crop, offset = he_crop
    iid = server.add_image(crop, name="C3.jpg", um_per_px=0.69)
    sess = session_on(server)
    names, xy, _ = _annotate(server, sess, iid, c3_counts_pred, offset, table=False, region=False)
    counts = c3_counts_pred.uns["_section"].loc[names]
    tsv = tmp_path / "C3_counts.tsv.gz"
    counts.to_csv(tsv, sep="\t", compression="gzip")
    gw = sess.gateway
    fa = gw.createFileAnnfromLocalFile(str(tsv), mimetype="text/tab-separated-values")   # omero-py's upload
    ctx = gw.SERVICE_OPTS.copy()
    gw.getUpdateService().saveObject(M.image_link(iid, __import__("omero").model.FileAnnotationI(fa.getId(), False)),
                                     ctx)
    # a stimage_nb prediction ROI on the same image must not become an observation
    tag = M.run_tag("old-run", iid, "f")
    gw.getUpdateService().saveAndReturnIds([M.roi(iid, [M.ellipse(5, 5, 3)], name="pred-roi", description=tag)], ctx)
    comment = __import__("omero").model.CommentAnnotationI()
    comment.setTextValue(__import__("omero").rtypes.rstring("scanned 2019, re-stained"))
    gw.getUpdateService().saveAndReturnObject(M.image_link(iid, comment), ctx)
    gw.getUpdateService().saveAndReturnObject(
        M.image_link(iid, M.map_annotation({"patient": "C", "stain": "H&E", "platform": "ST"}, ns="lab/metadata")), ctx)
    sec = P.pull_section(sess, iid, progress=False)
    assert list(sec.adata.obs_names) == names and "pred-roi" not in sec.adata.obs_names
    assert sec.patient == "C" and sec.adata.uns[K.UNS]["patient"] == "C"
    assert sec.platform == "st" and sec.adata.uns[K.UNS]["platform"] == "st"
    kept = json.loads(sec.adata.uns[K.UNS]["omero"]["annotations"])
    assert [c["text"] for c in kept["comments"]] == ["scanned 2019, re-stained"]
    assert ["stain", "H&E"] in kept["maps"][0]["pairs"]
    assert np.array_equal(sec.adata.X.toarray(), counts.to_numpy(np.float32))
    anns = P.pull_annotations(sess, iid)
    assert [f.name for f in anns.files] == ["C3_counts.tsv.gz"]
    with pytest.raises(StimageInputError, match="point ROIs carry no size"):
        pts = server.add_image(crop, um_per_px=0.69)
        gw.getUpdateService().saveAndReturnIds([M.roi(pts, [M.point(10, 10)], name="p1")], ctx)
        P.pull_section(sess, pts, progress=False)
    ok = P.pull_section(sess, pts, diameter_um=55.0, progress=False)
    assert list(ok.adata.obs[K.DIAMETER_UM]) == [55.0] and not ok.has_counts


def test_pull_section_of_cell_masks(server, session_on, c3_image):
    """Cells outlined as mask ROIs (real nuclei of a C3 crop) become observations sized by their area."""
    from scipy import ndimage

    from stimage_nb.omero import model as M
    from stimage_nb.omero import pull as P

    rgb = c3_image.read_region(4000, 4000, 512, 512)
    dark = rgb.mean(axis=2) < np.percentile(rgb.mean(axis=2), 20)
    lab, n = ndimage.label(ndimage.binary_opening(dark, iterations=1))
    sizes = ndimage.sum(np.ones_like(lab), lab, index=range(1, n + 1))
    keep = [i + 1 for i in np.argsort(-sizes)[:20]]                       # the 20 largest nuclei
    masks = M.masks_from_labels(np.where(np.isin(lab, keep), lab, 0).astype(np.int32))
    iid = server.add_image(rgb, name="nuclei.tif", um_per_px=0.69)
    sess = session_on(server)
    ctx = sess.gateway.SERVICE_OPTS.copy()
    sess.gateway.getUpdateService().saveAndReturnIds(
        [M.roi(iid, [masks[i]], name=f"cell-{i}") for i in keep], ctx)
    sec = P.pull_section(sess, iid, counts=None, progress=False)
    a = sec.adata
    assert sorted(a.obs_names) == sorted(f"cell-{i}" for i in keep) and set(a.obs["shape_kind"]) == {"mask"}
    for i in keep:
        cy, cx = ndimage.center_of_mass(lab == i)
        area = float((lab == i).sum())
        row = a.obs.loc[f"cell-{i}"]
        assert (row[K.PIXEL_X], row[K.PIXEL_Y]) == pytest.approx((cx + 0.5, cy + 0.5))
        assert row[K.DIAMETER_UM] == pytest.approx(2 * np.sqrt(area / np.pi) * 0.69)
