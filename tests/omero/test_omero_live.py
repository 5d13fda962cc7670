"""Live round trip against a real OMERO server (``pytest -m omero``); skipped unless one is named.

Environment: ``OMERO_HOST`` (and ``OMERO_PORT``, ``OMERO_USER``, ``OMERO_PASSWORD`` or
``OMERO_SESSION_KEY``; ``OMERO_SECURE``). ``OMERO_TEST_IMAGE`` may name an image of the her2st section C3
imported as in ``.ci/omero/README.md``; otherwise the test creates a small image from a real C3 crop
(``BlitzGateway.createImageFromNumpySeq``), runs the round trip on it and deletes it afterwards.
Start a local server with ``docker compose -f .ci/omero/docker-compose.yml up -d``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from stimage_nb import _keys as K

pytestmark = [pytest.mark.omero,
              pytest.mark.skipif(not os.environ.get("OMERO_HOST"),
                                 reason="no OMERO server: set OMERO_HOST, OMERO_USER, OMERO_PASSWORD (see "
                                        ".ci/omero/README.md)")]


@pytest.fixture(scope="module")
def live(omero_stack):
    from stimage_nb.omero import connect

    sess = connect(prompt=False)
    yield sess
    sess.close()


def _create_image(gw, rgb: np.ndarray, um_per_px: float, name: str) -> int:
    """A new OMERO image from an (h, w, 3) uint8 array with its physical pixel size."""
    import omero.model
    from omero.model.enums import UnitsLength

    planes = (rgb[:, :, c] for c in range(3))
    img = gw.createImageFromNumpySeq(planes, name, sizeZ=1, sizeC=3, sizeT=1,
                                     description="stimage_nb live test (safe to delete)")
    px = gw.getQueryService().get("Pixels", img.getPrimaryPixels().getId(), gw.SERVICE_OPTS)
    px.setPhysicalSizeX(omero.model.LengthI(um_per_px, UnitsLength.MICROMETER))
    px.setPhysicalSizeY(omero.model.LengthI(um_per_px, UnitsLength.MICROMETER))
    gw.getUpdateService().saveObject(px, gw.SERVICE_OPTS)
    return int(img.getId())


def test_live_round_trip(live, he_crop, c3_pred, c3_image, tmp_path, monkeypatch):
    from round_trip import crop_prediction, round_trip

    monkeypatch.setenv("STIMAGE_NB_CACHE", str(tmp_path / "cache"))
    given = os.environ.get("OMERO_TEST_IMAGE")
    created = None
    um = None
    if given:   # C3.jpg imported as in .ci/omero/README.md (a JPEG records no pixel size: give C3's)
        iid, pred, pixels, um = int(given), c3_pred, None, c3_image.um_per_px
    else:
        crop, offset = he_crop
        created = iid = _create_image(live.gateway, crop, c3_image.um_per_px, "stimage_nb-live-C3-crop")
        pred, pixels = crop_prediction(c3_pred, offset, crop.shape[1::-1]), crop
        assert pred.n_obs >= 5
    pred.uns[K.UNS] = dict(pred.uns[K.UNS], run_id="live-test-run")
    try:
        out = round_trip(live, iid, pred, pixels, um_per_px=um)
        assert out["removed"]["Roi"] == pred.n_obs
    finally:
        if created is not None:
            live.gateway.deleteObjects("Image", [created], deleteAnns=True, deleteChildren=True, wait=True)


def test_live_wrong_password_and_unknown_image(live, monkeypatch):
    from stimage_nb.omero import connect
    from stimage_nb.omero.connection import OmeroAuthError, OmeroNotFoundError
    from stimage_nb.omero.pull import image_info

    with pytest.raises(OmeroNotFoundError):
        image_info(live, 2 ** 40)
    if not os.environ.get("OMERO_USER"):
        pytest.skip("OMERO_USER not set")
    monkeypatch.delenv("OMERO_SESSION_KEY", raising=False)
    with pytest.raises(OmeroAuthError) as e:
        connect(password="definitely-not-the-password", prompt=False)
    assert "definitely-not-the-password" not in str(e.value)
