"""Neighbourhood smoothing of predictions (stimage_nb.smoothing) on a synthetic grid (pure logic)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from stimage_nb import _keys as K
from stimage_nb.errors import StimageInputError
from stimage_nb.smoothing import smooth_prediction


def _grid(n=7, tile_um=100.0, um_per_px=0.5):
    yy, xx = np.mgrid[0:n, 0:n]
    xy = np.c_[xx.ravel(), yy.ravel()] * tile_um / um_per_px  # one tile apart, level-0 px
    X = np.arange(n * n * 2, dtype=np.float32).reshape(n * n, 2)
    a = ad.AnnData(X=X, obs=pd.DataFrame(index=[f"s{i}" for i in range(n * n)]), var=pd.DataFrame(index=["A", "B"]))
    a.obsm[K.SPATIAL] = xy.astype(np.float64)
    a.uns[K.UNS] = {"um_per_px": um_per_px, "tile_um": tile_um}
    return a


def test_default_radius_is_two_tiles_like_path2space():
    a = _grid()
    sm = smooth_prediction(a)
    centre = 3 * 7 + 3
    # radius 2 grid steps around an interior point: 13 points (distance 0, 1, sqrt 2, 2)
    assert sm.uns[K.UNS][K.UNS_SMOOTHING]["radius_um"] == 200.0
    yy, xx = np.mgrid[0:7, 0:7]
    nb = ((xx - 3) ** 2 + (yy - 3) ** 2 <= 4).ravel()
    assert nb.sum() == 13
    assert np.allclose(sm.X[centre], a.X[nb].mean(0))
    assert np.array_equal(sm.layers[K.UNSMOOTHED], a.X) and not np.allclose(a.X, sm.X)
    # a linear field is unchanged at interior points whose neighbourhood is symmetric
    assert np.allclose(sm.X[centre], a.X[centre])
    # the centre weight pulls towards the point itself; copy=False changes in place
    w = smooth_prediction(a, centre_weight=5.0)
    corner = 0
    k = 6  # (0,0),(1,0),(2,0),(0,1),(1,1),(0,2)
    m = sm.X[corner]
    assert np.allclose(w.X[corner], (k * m + 4 * a.X[corner]) / (k + 4), rtol=1e-5)
    b = a.copy()
    assert smooth_prediction(b, copy=False) is b and K.UNSMOOTHED in b.layers


def test_bad_inputs_are_clear():
    a = _grid()
    with pytest.raises(StimageInputError, match="centre_weight"):
        smooth_prediction(a, centre_weight=0)
    del a.uns[K.UNS]["tile_um"]
    with pytest.raises(StimageInputError, match="tile_um"):
        smooth_prediction(a)
    del a.uns[K.UNS]["um_per_px"]
    with pytest.raises(StimageInputError, match="um_per_px"):
        smooth_prediction(a, radius_um=100)
