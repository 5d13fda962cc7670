"""PAM50-like calls by correlation to centroids, on a small SYNTHETIC centroid table (the published
centroids are not shipped: see stimage_nb/cohort/_subtype.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stimage_nb.errors import StimageInputError


def _centroids(rng, genes, k=3):
    return pd.DataFrame(rng.normal(0, 1, (len(genes), k)), index=genes, columns=["LumA", "Basal", "Her2"][:k])


def test_samples_drawn_around_centroids_are_called_by_them(tmp_path):
    from stimage_nb.cohort import read_centroids, subtype_calls

    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(30)] + ["ORC6"]
    cen = _centroids(rng, genes)
    truth = rng.integers(0, 3, 24)
    # expression on the count scale whose log2, median-centred, is the centroid plus noise
    logx = cen.to_numpy().T[truth] * 1.5 + rng.normal(0, 0.4, (24, len(genes))) + 5.0
    expr = pd.DataFrame(2 ** logx - 1, index=[f"s{i}" for i in range(24)], columns=genes)
    expr["EXTRA"] = 1.0  # genes without a centroid are ignored
    f = tmp_path / "centroids.tsv"
    c2 = cen.rename(index={"ORC6": "ORC6L"})  # an old symbol, as in the publication
    c2.index.name = "gene"
    c2.to_csv(f, sep="\t")
    got = read_centroids(f)
    assert "ORC6" in got.index and got.shape == (31, 3)
    calls = subtype_calls(expr, got)
    assert (calls.calls.to_numpy() == cen.columns.to_numpy()[truth]).mean() >= 0.95
    assert len(calls.genes) == 31 and "EXTRA" not in calls.genes
    t = calls.to_frame()
    assert list(t.columns) == ["pam50_call", "pam50_margin", "pam50_LumA", "pam50_Basal", "pam50_Her2"]
    assert (t["pam50_margin"] >= 0).all() and t[["pam50_LumA", "pam50_Basal", "pam50_Her2"]].abs().max().max() <= 1
    # shuffled genes break it: the calls depend on the genes' identity, not on chance
    shuffled = expr.copy()
    shuffled.columns = list(rng.permutation(genes)) + ["EXTRA"]
    assert (subtype_calls(shuffled, got).calls.to_numpy() == cen.columns.to_numpy()[truth]).mean() < 0.8


def test_errors(tmp_path):
    from stimage_nb.cohort import read_centroids, subtype_calls

    rng = np.random.default_rng(1)
    cen = _centroids(rng, [f"G{i}" for i in range(12)])
    with pytest.raises(StimageInputError, match="only 5 genes"):
        subtype_calls(pd.DataFrame(1.0, index=["a", "b", "c"], columns=[f"G{i}" for i in range(5)]), cen)
    with pytest.raises(StimageInputError, match="3 samples"):
        subtype_calls(pd.DataFrame(1.0, index=["a"], columns=list(cen.index)), cen)
    one = subtype_calls(pd.DataFrame(rng.uniform(1, 9, (1, 12)), index=["a"], columns=list(cen.index)), cen, center=None)
    assert one.calls["a"] in set(cen.columns)
    with pytest.raises(StimageInputError, match="not found"):
        read_centroids(tmp_path / "none.tsv")
    bad = tmp_path / "bad.csv"
    bad.write_text("gene,LumA\nG1,0.5\n")
    with pytest.raises(StimageInputError, match="two subtype columns"):
        read_centroids(bad)
    bad.write_text("gene,LumA,Basal\nG1,0.5,x\n")
    with pytest.raises(StimageInputError, match="numbers"):
        read_centroids(bad)
