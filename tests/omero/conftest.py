"""Fixtures for the OMERO tests: real her2st data, the Ice-loopback server double, sessions on it."""

from __future__ import annotations

import numpy as np
import pytest

GENES_50 = 50


@pytest.fixture(scope="session")
def omero_stack():
    """omero-py and Ice, or skip (the client stack is installed by .ci/install_omero.sh)."""
    pytest.importorskip("Ice")
    pytest.importorskip("omero.gateway")
    import omero

    return omero


@pytest.fixture(scope="session")
def genes50(her2st_genes):
    return list(her2st_genes[:GENES_50])


@pytest.fixture(scope="session")
def c3_pred_base(her2st_manifest, genes50):
    """A contract prediction AnnData of the REAL section C3 (observed counts stand in for the mean)."""
    from _predictions import make_prediction

    return make_prediction(her2st_manifest, "C3", genes=genes50)


@pytest.fixture
def c3_pred(c3_pred_base):
    return c3_pred_base.copy()


@pytest.fixture(scope="session")
def c3_image(c3_pred_base):
    from stimage_nb import _keys as K
    from stimage_nb.io.image import open_image

    u = c3_pred_base.uns[K.UNS]
    return open_image(u["image"], um_per_px=u["um_per_px"])


@pytest.fixture(scope="session")
def he_crop(c3_image, c3_pred_base):
    """A real 1400 x 1100 px H&E crop of C3 around its spots (level 0), and its top-left corner."""
    from stimage_nb import _keys as K

    xy = np.asarray(c3_pred_base.obsm[K.SPATIAL])
    cx, cy = np.median(xy, axis=0)
    x0, y0 = int(cx) - 700, int(cy) - 550
    return c3_image.read_region(x0, y0, 1400, 1100, level=0), (x0, y0)


@pytest.fixture
def server(omero_stack):
    from fake_omero import FakeOmeroServer

    s = FakeOmeroServer()
    yield s
    s.close()


def lazy_image(width: int, height: int, channels: int = 3):
    """A read-only (height, width, channels) uint8 array that costs no memory (for push-only images)."""
    return np.broadcast_to(np.full((1, 1, channels), 230, np.uint8), (height, width, channels))


@pytest.fixture
def session_on(omero_stack):
    """``session_on(server)``: an OmeroSession on the double that reconnects by opening a new session."""
    from stimage_nb.omero.connection import OmeroSession, OmeroTarget

    made = []

    def make(server, reconnect: bool = True):
        s = OmeroSession(OmeroTarget("fake-omero.test", 4064), server.gateway(),
                         factory=server.gateway if reconnect else None)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def c3_on_server(server, c3_image):
    """Image id of a C3-sized image (0.69 µm/px) on the double, for pushes."""
    return server.add_image(None, name="C3.jpg", um_per_px=c3_image.um_per_px,
                            levels=[lazy_image(c3_image.width, c3_image.height)])
