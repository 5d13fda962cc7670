"""Spatial types: clustering, assignment by the reference's statistics, neighbourhood enrichment."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stimage_nb import _keys as K


def _grid_pred(X, w=20):
    import anndata as ad

    n = X.shape[0]
    a = ad.AnnData(X=X.astype(np.float32), obs=pd.DataFrame(index=[f"p{i}" for i in range(n)]),
                   var=pd.DataFrame(index=[f"G{j}" for j in range(X.shape[1])]))
    a.obsm[K.SPATIAL] = np.stack([np.arange(n) % w, np.arange(n) // w], 1) * 50.0
    return a


def _two_kinds(rng, n, frac_a):
    """Predicted means of 'A' spots (genes 0-9 high) and 'B' spots (genes 10-19 high)."""
    kind = (np.arange(n) >= int(frac_a * n)).astype(int)
    base = np.full((n, 20), 5.0)
    base[kind == 0, :10] = 60.0
    base[kind == 1, 10:] = 60.0
    return rng.gamma(20, base / 20), kind


def test_types_found_assigned_and_enriched():
    from stimage_nb.cohort import fit_spatial_types, type_features

    rng = np.random.default_rng(0)
    XA, _ = _two_kinds(rng, 200, 0.5)
    XB, _ = _two_kinds(rng, 200, 0.2)
    genes = [f"G{j}" for j in range(20)]
    t = fit_spatial_types({"a": XA, "b": XB}, genes, n_pcs=5, resolution=0.2)
    assert len(t.names) == 2 and t.names == ("ST1", "ST2")
    # a slide with 90% 'A' (left part of the grid) and 10% 'B': assignment keeps the slide's own mix
    X, kind = _two_kinds(rng, 400, 0.9)
    a = _grid_pred(X)
    lab = t.assign(a)
    codes = np.asarray(lab.codes)
    agree = max((codes == kind).mean(), (codes != kind).mean())
    assert agree > 0.98
    f = type_features(a, lab, n_perms=100)
    fr = sorted([f["spatialtype_ST1"], f["spatialtype_ST2"]])
    assert fr == pytest.approx([0.1, 0.9], abs=0.02)
    # rows of A then a block of B: like neighbours like
    assert f["nhood_ST1_ST1"] > 2 and f["nhood_ST2_ST2"] > 2 and f["nhood_ST1_ST2"] < -2
    # the same points with shuffled positions: no enrichment
    a2 = a.copy()
    a2.obsm[K.SPATIAL] = a.obsm[K.SPATIAL][rng.permutation(a.n_obs)]
    f2 = type_features(a2, lab, n_perms=100)
    assert abs(f2["nhood_ST1_ST2"]) < 3
    # profiles say which genes make a type
    prof = t.to_frame()
    assert prof.shape == (2, 20) and set(prof.iloc[:, :10].mean(1).round(0) > 0) == {True, False}


def test_save_load_roundtrip_and_one_type_slides(tmp_path):
    from stimage_nb.cohort import SpatialTypes, fit_spatial_types, type_features
    from stimage_nb.errors import StimageInputError

    rng = np.random.default_rng(1)
    X, _ = _two_kinds(rng, 120, 0.5)
    t = fit_spatial_types({"a": X}, [f"G{j}" for j in range(20)], n_pcs=5, resolution=0.2)
    t.save(tmp_path / "t.npz")
    t2 = SpatialTypes.load(tmp_path / "t.npz")
    a = _grid_pred(X)
    assert (np.asarray(t.assign(a).codes) == np.asarray(t2.assign(a).codes)).all() and t2.params == t.params
    only = type_features(a, pd.Categorical.from_codes(np.zeros(a.n_obs, int), categories=list(t.names)))
    assert only["spatialtype_ST1"] == 1.0 and np.isnan(only["nhood_ST1_ST1"])
    with pytest.raises(StimageInputError, match="at least"):
        fit_spatial_types({"a": X[:5]}, [f"G{j}" for j in range(20)])
