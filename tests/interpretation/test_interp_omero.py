"""Nucleus attributions pushed to OMERO as polygon ROIs, against the test double of real Ice services
(``tests/omero/fake_omero.py``): batched, namespaced, re-push replaces, removable, other runs untouched."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "omero"))


@pytest.fixture
def server():
    pytest.importorskip("Ice", reason="omero-py / zeroc-ice not installed (bash .ci/install_omero.sh)")
    pytest.importorskip("omero.gateway")
    from fake_omero import FakeOmeroServer

    s = FakeOmeroServer()
    yield s
    s.close()


def _lazy(width, height):
    return np.broadcast_to(np.full((1, 1, 3), 230, np.uint8), (height, width, 3))


def test_push_writes_one_polygon_per_nucleus_and_replaces_on_change(server, attr_c6, c6):
    from stimage_nb.omero import model as M
    from stimage_nb.omero import push_attributions, remove_run
    from stimage_nb.omero.attributions import NS_ATTRIBUTIONS
    from stimage_nb.omero.pull import pull_rois

    iid = server.add_image(None, name="C6.jpg", um_per_px=c6.um_per_px, levels=[_lazy(c6.image.width, c6.image.height)])
    gw = server.gateway()
    # a ROI of someone else's run on the same image must survive everything below
    gw.getUpdateService().saveAndReturnIds([M.roi(iid, [M.point(10, 10)], name="keep me")])
    n = len(attr_c6.per_nucleus())
    dry = push_attributions(gw, iid, attr_c6, dry_run=True, progress=False)
    assert dry["mode"] == "fresh" and dry["to_write"] == n and server.roi_shapes_count() == 1
    res = push_attributions(gw, iid, attr_c6, batch_size=50, progress=False)
    assert res["mode"] == "fresh" and res["rois_written"] == n and res["run_id"].endswith(".shap")
    saves = [c for c in server.calls if c[1] == "saveAndReturnIds"]
    assert len(saves) >= -(-n // 50)  # batched
    rois = pull_rois(gw, iid)
    mine = rois[rois["roi_name"].isin(attr_c6.per_nucleus().index)]
    assert len(mine) == n and set(mine["kind"]) == {"polygon"}
    # each polygon is the nucleus outline, in full-resolution px
    r = mine.iloc[0]
    poly = attr_c6.nuclei.polygons[attr_c6.nuclei.ids.index(r["roi_name"])]
    assert np.allclose(np.asarray(r["geometry"]), poly, atol=0.01)
    assert "SHAP" in str(r["text"])
    # the run's record, namespaced
    from stimage_nb.omero.pull import pull_annotations

    recs = [m for m in pull_annotations(gw, iid).maps if m["ns"] == NS_ATTRIBUTIONS]
    assert len(recs) == 1 and dict(recs[0]["pairs"])["state"] == "complete"
    # again, same content: nothing to do
    again = push_attributions(gw, iid, attr_c6, progress=False)
    assert again["mode"] == "up-to-date" and again["rois_written"] == 0 and server.roi_shapes_count() == n + 1
    # coloured by another gene: replaced, not duplicated
    other = push_attributions(gw, iid, attr_c6, gene=attr_c6.genes[1], progress=False)
    assert other["mode"] == "replace" and other["deleted"]["Roi"] == n and server.roi_shapes_count() == n + 1
    # removed cleanly, the foreign ROI stays
    counts = remove_run(gw, iid, other["run_id"])
    assert counts["Roi"] == n and server.roi_shapes_count() == 1
    gw.close()


def test_push_refuses_the_wrong_image(server, attr_c6):
    from stimage_nb.errors import StimageInputError
    from stimage_nb.omero import push_attributions

    iid = server.add_image(None, name="other.svs", um_per_px=0.25, levels=[_lazy(2000, 2000)])
    with pytest.raises(StimageInputError, match="µm/px"):
        push_attributions(server.gateway(), iid, attr_c6, progress=False)
