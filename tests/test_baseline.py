"""The handcrafted ridge baseline, on the real bundled her2st sections."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stimage_nb import _keys as K
from stimage_nb._settings import data_dir, her2st_manifest
from stimage_nb.baseline import (
    FEATURE_NAMES,
    RidgeBaseline,
    _folds,
    evaluate_baseline,
    handcrafted_features,
    per_gene_pearson,
)
from stimage_nb.errors import StimageInputError
from stimage_nb.io.readers import read_gene_list, read_manifest
from stimage_nb.tiles import section_tiles

TILE_UM, OUT_PX = 150.0, 48  # small tiles keep the tests fast; same geometry for fit and predict


@pytest.fixture(scope="module")
def sections():
    genes = read_gene_list(data_dir() / "her2st" / "genes_stimage_her2st.txt")[:200]
    return {s.name: s for s in read_manifest(her2st_manifest(), ["C3", "C4", "C5", "C6"], genes=genes)}


@pytest.fixture(scope="module")
def tiles(sections):
    return {n: section_tiles(s, tile_um=TILE_UM, out_px=OUT_PX) for n, s in sections.items()}


def test_features_deterministic_finite_and_named(tiles):
    t = tiles["C6"][:40]
    f1 = handcrafted_features(t)
    f2 = handcrafted_features(t.copy(), chunk=7)  # chunking must not change anything
    assert f1.shape == (40, len(FEATURE_NAMES)) and 30 <= len(FEATURE_NAMES) <= 45
    assert np.isfinite(f1).all()
    np.testing.assert_array_equal(f1, f2)
    # real tissue varies: no feature is constant across 40 real spots
    assert (f1.std(0) > 0).all(), [n for n, s in zip(FEATURE_NAMES, f1.std(0)) if s == 0]


def test_features_blank_and_single_tile():
    white = np.full((2, 32, 32, 3), 255, np.uint8)
    black = np.zeros((32, 32, 3), np.uint8)
    fw, fb = handcrafted_features(white), handcrafted_features(black)
    assert np.isfinite(fw).all() and np.isfinite(fb).all() and fb.shape == (1, len(FEATURE_NAMES))
    i = FEATURE_NAMES.index
    assert fw[0, i("tissue_frac")] == 0 and fw[0, i("dark_frac")] == 0
    assert fb[0, i("dark_frac")] == 1 and fb[0, i("od_sum_mean")] > fw[0, i("od_sum_mean")]


def test_features_follow_hematoxylin(tiles):
    """Spots with more dark nuclear pixels have more hematoxylin: the stain deconvolution is wired right."""
    f = handcrafted_features(np.concatenate([tiles["C4"], tiles["C5"]]))
    i = FEATURE_NAMES.index
    r = np.corrcoef(f[:, i("nuclear_frac")], f[:, i("hema_mean")])[0, 1]
    assert r > 0.5


def test_bad_tiles_raise():
    with pytest.raises(StimageInputError, match="RGB"):
        handcrafted_features(np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(StimageInputError, match="too small"):
        handcrafted_features(np.zeros((3, 4, 4, 3), np.uint8))
    with pytest.raises(RuntimeError, match="not fitted"):
        RidgeBaseline().predict(np.zeros((1, 32, 32, 3), np.uint8))


def test_per_gene_pearson_matches_numpy_and_zero_for_constant():
    rng = np.random.default_rng(0)
    p, o = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    o[:, 2] = 4.0  # constant gene
    r = per_gene_pearson(p, o)
    assert r[2] == 0
    np.testing.assert_allclose(r[:2], [np.corrcoef(p[:, j], o[:, j])[0, 1] for j in range(2)])


def test_folds_never_split_a_section():
    g = np.array(["a"] * 5 + ["b"] * 4 + ["c"] * 6)
    for tr, va in _folds(g):
        assert len(set(g[va])) == 1 and set(g[va]).isdisjoint(g[tr])


def test_baseline_beats_constant_on_held_out_section(sections, tiles):
    train = ["C3", "C4", "C5"]
    X = np.concatenate([tiles[n] for n in train])
    Y = np.concatenate([sections[n].adata.X.toarray() for n in train])
    g = np.concatenate([[n] * sections[n].adata.n_obs for n in train])
    rb = RidgeBaseline().fit(X, Y, g, genes=sections["C3"].genes)
    assert rb.alpha_ in rb.alphas and len(rb.cv_scores_) == len(rb.alphas)
    obs = np.log1p(sections["C6"].adata.X.toarray())
    pred = rb.predict(tiles["C6"])
    assert pred.shape == obs.shape
    r = per_gene_pearson(pred, obs)
    # a constant predictor scores r = 0 on every gene; the same model fed the tiles in a shuffled order
    # (right image statistics, wrong spots) must score about 0 too, so the signal is spot-specific
    assert r.mean() > 0.15, r.mean()
    perm = np.random.default_rng(0).permutation(len(obs))
    r_shuffled = per_gene_pearson(pred[perm], obs)
    assert abs(r_shuffled.mean()) < 0.05 and (r > r_shuffled).mean() > 0.8


def test_fit_sections_and_celltypes(sections):
    train = [sections[n] for n in ("C3", "C5", "C6")]
    rb = RidgeBaseline(tile_um=TILE_UM, out_px=OUT_PX).fit(train)
    assert rb.genes == train[0].genes and rb.celltypes == train[0].celltypes and len(rb.celltypes) == 8
    pred = rb.predict_sections([sections["C4"]])["C4"]
    assert pred.obs_names == list(sections["C4"].adata.obs_names)
    assert (pred.counts >= 0).all()
    ct = pred.celltypes
    assert isinstance(ct, pd.DataFrame) and (ct.to_numpy() >= 0).all()
    np.testing.assert_allclose(ct.sum(1), 1.0, atol=1e-9)
    truth = sections["C4"].adata.obsm[K.CELLTYPE_PROPORTIONS]
    # tumour epithelium vs stroma is visible in H&E colour/texture (r ~ 0.7 at 112 px tiles)
    r = {c: np.corrcoef(ct[c], truth[c])[0, 1] for c in ct.columns}
    assert r["Epithelial"] > 0.4 and np.mean(list(r.values())) > 0.2, r


def test_evaluate_baseline_and_bad_sections(sections):
    df = evaluate_baseline([sections["C3"], sections["C4"]], [sections["C6"]], tile_um=TILE_UM, out_px=OUT_PX)
    assert list(df.columns) == ["C6"] and len(df) == 200 and df["C6"].mean() > 0.1
    empty = sections["C6"].subset(np.ones(sections["C6"].adata.n_obs, bool))
    empty.adata = empty.adata[:, :0].copy()
    with pytest.raises(StimageInputError, match="no counts"):
        RidgeBaseline().fit([empty])
