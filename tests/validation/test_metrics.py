"""The harness's statistics against reference implementations and hand-computable cases."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from stimage_nb.evaluate import calibration, pit_histogram
from stimage_nb.validation import (
    bootstrap_mean_r_difference,
    lees_l,
    map_ssim,
    paired_test,
    spatial_weights,
    spot_grid,
)


def test_wilcoxon_matches_scipy_and_an_exact_case():
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(0)
    a = rng.normal(0.3, 0.1, 200)
    b = a - rng.normal(0.02, 0.05, 200)
    res = paired_test(a, b)
    ref = wilcoxon(a, b)
    assert res["p_two_sided"] == pytest.approx(ref.pvalue) and res["statistic"] == pytest.approx(ref.statistic)
    assert res["mean_difference"] == pytest.approx(np.mean(a - b))
    # ten genes, every one better: the exact one-sided p is 1 / 2^10
    res = paired_test(np.arange(1, 11) / 10 + 0.01, np.arange(1, 11) / 10 - np.arange(1, 11) / 100)
    assert res["p_greater"] == pytest.approx(1 / 1024)
    assert res["p_two_sided"] == pytest.approx(2 / 1024)
    # NaN (an undefined correlation) counts as r = 0, as in evaluate.summarize
    assert paired_test([np.nan, 0.5], [0.0, 0.4])["mean_difference"] == pytest.approx(0.05)
    assert paired_test([0.1, 0.2], [0.1, 0.2])["p_two_sided"] is None  # all ties: no test


def _lee_reference(x, y, W):
    """Lee (2001), eq. 18, written out: L = n / sum_i (sum_j v_ij)^2 * sum_i (V x~)_i (V y~)_i / (|x~| |y~|)."""
    V = W.toarray() if sp.issparse(W) else np.asarray(W)
    xc, yc = x - x.mean(), y - y.mean()
    n = len(x)
    num = n * np.sum((V @ xc) * (V @ yc))
    den = np.sum(V.sum(1) ** 2) * np.sqrt(np.sum(xc ** 2)) * np.sqrt(np.sum(yc ** 2))
    return num / den


def test_lees_l_is_pearson_with_identity_weights_and_matches_lee_2001():
    rng = np.random.default_rng(1)
    n, g = 120, 70
    xy = rng.uniform(0, 1000, (n, 2))
    obs = rng.normal(size=(n, g))
    pred = obs + rng.normal(size=(n, g))
    L_id = lees_l(pred, obs, sp.identity(n, format="csr"))
    r = [np.corrcoef(pred[:, j], obs[:, j])[0, 1] for j in range(g)]
    assert np.allclose(L_id, r)
    W = spatial_weights(xy)
    assert np.allclose(np.asarray(W.sum(1)).ravel(), 1.0) and np.all(W.diagonal() > 0)  # row-standardised, self in
    L = lees_l(pred, obs, W, chunk=16)
    assert np.allclose(L, [_lee_reference(pred[:, j], obs[:, j], W) for j in range(g)])
    # a smooth field shared by both maps scores higher than independent noise
    field = np.sin(xy[:, :1] / 200.0) + np.cos(xy[:, 1:] / 200.0)
    smooth = lees_l(field + 0.3 * rng.normal(size=(n, 1)), field + 0.3 * rng.normal(size=(n, 1)), W)[0]
    noise = lees_l(rng.normal(size=(n, 1)), rng.normal(size=(n, 1)), W)[0]
    assert smooth > 0.5 > abs(noise)


def test_map_ssim_is_skimage_on_the_rasterised_grid(her2st_manifest):
    from skimage.metrics import structural_similarity

    from stimage_nb.io.readers import read_manifest

    (c3,) = read_manifest(her2st_manifest, ["C3"], genes=["ERBB2", "KRT19"])
    xy = c3.xy
    cells, shape = spot_grid(xy, c3.adata.obs)
    assert len({tuple(c) for c in cells}) == len(cells)  # one legacy ST spot per cell of its array
    binned, _ = spot_grid(xy)  # without the array coordinates: centres binned at the spot pitch
    assert len({tuple(c) for c in binned}) > 0.9 * len(cells)
    obs = np.log1p(np.asarray(c3.adata.X.todense()))
    rng = np.random.default_rng(2)
    pred = obs + rng.normal(0, 0.5, obs.shape)
    got = map_ssim(pred, obs, xy, spots=c3.adata.obs)
    assert map_ssim(obs, obs, xy, spots=c3.adata.obs) == pytest.approx([1.0, 1.0])
    for j in range(2):  # the same number computed by hand from skimage on the spot grid
        A, B = np.zeros(shape), np.zeros(shape)
        a = (pred[:, j] - pred[:, j].min()) / np.ptp(pred[:, j])
        b = (obs[:, j] - obs[:, j].min()) / np.ptp(obs[:, j])
        A[cells[:, 0], cells[:, 1]] = a
        B[cells[:, 0], cells[:, 1]] = b
        _, S = structural_similarity(A, B, win_size=3, data_range=1.0, full=True)
        mask = np.zeros(shape, bool)
        mask[cells[:, 0], cells[:, 1]] = True
        assert got[j] == pytest.approx(S[mask].mean())
        assert got[j] < 0.99


def test_bootstrap_ci_brackets_the_difference():
    rng = np.random.default_rng(3)
    obs = rng.normal(size=(150, 40))
    good = obs + rng.normal(0, 0.7, obs.shape)
    bad = obs + rng.normal(0, 1.5, obs.shape)
    res = bootstrap_mean_r_difference(good, bad, obs, n_resamples=200, seed=0)
    assert res["ci_low"] < res["difference"] < res["ci_high"]
    assert res["ci_low"] > 0  # clearly better: the interval excludes 0
    same = bootstrap_mean_r_difference(good, good, obs, n_resamples=50)
    assert same["difference"] == 0 and same["ci_low"] == same["ci_high"] == 0


def test_pit_histogram_is_flat_when_calibrated_and_u_shaped_when_too_narrow():
    rng = np.random.default_rng(4)
    mu = rng.uniform(0.5, 30, (400, 50))
    theta = 3.0
    y = rng.negative_binomial(theta, theta / (theta + mu))
    var = mu + mu ** 2 / theta
    h = pit_histogram(y, mu, var)
    assert h.sum() == pytest.approx(1.0) and np.abs(h - 0.1).max() < 0.01
    narrow = pit_histogram(y, mu, mu)  # Poisson intervals for overdispersed counts: over-confident
    assert narrow[0] > 0.15 and narrow[-1] > 0.15 and narrow[4:6].mean() < 0.08
    assert calibration(y, mu, var)["coverage_90"] == pytest.approx(0.9, abs=0.01)
