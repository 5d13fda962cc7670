"""The pseudo-bulk's variance against a Monte-Carlo simulation of ensemble members and NB counts; smoothing.

Synthetic members are the only way to know the truth here: the test draws M members' means for n
spots, summarises them as the ensemble does (mean, aleatoric, epistemic), then simulates the assay —
one member for the whole slide, NB counts per spot — many times, and compares the variance of the
slide mean with the formulas.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stimage_nb import _keys as K

N_SPOTS, N_GENES, THETA = 60, 4, 5.0


def _members(rng, M, shared_sd, spot_sd):
    """(M, n, G) member means: a per-spot truth x a member-wide offset x member-and-spot noise."""
    base = rng.uniform(2, 30, (N_SPOTS, N_GENES))
    offset = np.exp(rng.normal(0, shared_sd, (M, 1, N_GENES)))
    noise = np.exp(rng.normal(0, spot_sd, (M, N_SPOTS, N_GENES)))
    return base[None] * offset * noise


def _prediction(mu_m):
    """A prediction AnnData summarising members as stimage_nb.ensemble does."""
    import anndata as ad

    var_m = mu_m + mu_m ** 2 / THETA
    a = ad.AnnData(X=mu_m.mean(0).astype(np.float64), obs=pd.DataFrame(index=[f"s{i}" for i in range(N_SPOTS)]),
                   var=pd.DataFrame(index=[f"G{j}" for j in range(N_GENES)]))
    a.layers[K.ALEATORIC] = var_m.mean(0)
    a.layers[K.EPISTEMIC] = mu_m.var(0)
    xy = np.stack(np.meshgrid(np.arange(10), np.arange(6)), -1).reshape(-1, 2) * 100.0
    a.obsm[K.SPATIAL] = xy
    a.uns[K.UNS] = {"section": "sim", "um_per_px": 1.0}
    return a


def _monte_carlo(rng, mu_m, reps=20000):
    """Variance of the slide mean of NB counts, one member drawn per replicate."""
    M = mu_m.shape[0]
    m = rng.integers(0, M, reps)
    mu = mu_m[m]                                   # (reps, n, G)
    y = rng.negative_binomial(THETA, THETA / (THETA + mu))
    return y.mean(1).var(0)


def _exact(mu_m):
    """Exact variance under the model: mean aleatoric / n + variance over members of the slide mean."""
    A = (mu_m + mu_m ** 2 / THETA).mean(0)
    return A.sum(0) / N_SPOTS ** 2 + mu_m.mean(1).var(0)


def test_correlated_member_errors_match_the_correlated_formula():
    from stimage_nb.cohort import pseudobulk

    rng = np.random.default_rng(0)
    mu_m = _members(rng, M=5, shared_sd=0.3, spot_sd=0.0)   # members differ by a slide-wide factor only
    pb = pseudobulk(_prediction(mu_m))
    mc = _monte_carlo(rng, mu_m)
    total = pb.var_aleatoric + pb.var_epistemic
    assert np.allclose(total, _exact(mu_m), rtol=1e-9)      # the formula is exact here
    assert np.allclose(total, mc, rtol=0.1)                 # and so is the simulation, within its error
    # assuming independent member errors would understate it many times over
    ind = pseudobulk(_prediction(mu_m), epistemic="independent")
    assert (ind.var_aleatoric + ind.var_epistemic < 0.3 * mc).all()


def test_independent_member_errors_match_the_independent_formula():
    from stimage_nb.cohort import pseudobulk

    rng = np.random.default_rng(1)
    mu_m = _members(rng, M=400, shared_sd=0.0, spot_sd=0.3)  # members' errors independent between spots
    ind = pseudobulk(_prediction(mu_m), epistemic="independent")
    mc = _monte_carlo(rng, mu_m)
    assert np.allclose(ind.var_aleatoric + ind.var_epistemic, mc, rtol=0.1)
    cor = pseudobulk(_prediction(mu_m))                       # the conservative bound holds, loosely
    assert (cor.var_aleatoric + cor.var_epistemic > 2 * mc).all()


def test_the_correlated_bound_is_never_exceeded():
    from stimage_nb.cohort import pseudobulk

    rng = np.random.default_rng(2)
    for shared, spot in [(0.1, 0.2), (0.3, 0.05), (0.0, 0.5)]:
        mu_m = _members(rng, M=5, shared_sd=shared, spot_sd=spot)
        pb = pseudobulk(_prediction(mu_m))
        assert (_exact(mu_m) <= pb.var_aleatoric + pb.var_epistemic + 1e-9).all()
        lo = pseudobulk(_prediction(mu_m), epistemic="independent")
        assert np.allclose(lo.var_aleatoric, pb.var_aleatoric)
        assert np.allclose(pb.mean, mu_m.mean((0, 1)))


def test_region_and_gene_selection():
    from stimage_nb.cohort import pseudobulk
    from stimage_nb.errors import StimageInputError

    rng = np.random.default_rng(3)
    a = _prediction(_members(rng, 3, 0.1, 0.1))
    a.obs[K.REGION] = pd.Categorical(["Tumor"] * 20 + [""] * 40)
    t = pseudobulk(a, region="tumo*", genes=["G1", "G3"])
    assert t.n_spots == 20 and t.genes == ("G1", "G3")
    assert np.allclose(t.mean, np.asarray(a.X)[:20][:, [1, 3]].mean(0))
    assert pseudobulk(a, region="stroma").n_spots == 0 and np.isnan(pseudobulk(a, region="stroma").mean).all()
    with pytest.raises(StimageInputError, match="NOPE"):
        pseudobulk(a, genes=["NOPE"])
    with pytest.raises(StimageInputError, match="epistemic"):
        pseudobulk(a, epistemic="sometimes")
    f = t.to_frame()
    assert list(f["gene"]) == ["G1", "G3"] and np.allclose(f["sd"] ** 2, f["var_aleatoric"] + f["var_epistemic"])


def test_smoothing_uses_the_grid_neighbours_and_propagates_variance():
    from stimage_nb.smoothing import smooth_prediction

    rng = np.random.default_rng(4)
    a = _prediction(_members(rng, 3, 0.1, 0.1))
    um = float(a.uns[K.UNS]["um_per_px"])
    step = float(np.median(np.diff(np.unique(np.asarray(a.obsm[K.SPATIAL])[:, 0])))) * um  # grid step, µm
    s = smooth_prediction(a, radius_um=1.5 * step)  # 1.5 grid steps: the 8 neighbours
    # an interior grid point (row 2, column 4) is the mean of its 3x3 block
    idx = [r * 10 + c for r in (1, 2, 3) for c in (3, 4, 5)]
    X = np.asarray(a.X)
    assert np.allclose(s.X[2 * 10 + 4], X[idx].mean(0), rtol=1e-5)
    assert np.allclose(s.layers[K.ALEATORIC][24], a.layers[K.ALEATORIC][idx].sum(0) / 81, rtol=1e-5)
    assert np.allclose(s.layers[K.EPISTEMIC][24], np.sqrt(a.layers[K.EPISTEMIC][idx]).mean(0) ** 2, rtol=1e-5)
    assert s.uns[K.UNS]["smoothing"]["mean_neighbours"] == pytest.approx(
        (4 * 4 + 2 * (8 + 4) * 6 + 32 * 9) / 60)  # corners 3, edges 5, interior 8 neighbours, self included
    ind = smooth_prediction(a, radius_um=1.5 * step, epistemic="independent")
    assert np.allclose(ind.layers[K.EPISTEMIC][24], a.layers[K.EPISTEMIC][idx].sum(0) / 81, rtol=1e-5)
    # a constant field stays constant; a radius reaching only the 4 nearest neighbours
    a.X = np.ones_like(X)
    s4 = smooth_prediction(a, radius_um=1.2 * step)
    assert np.allclose(s4.X, 1.0)
    assert s4.uns[K.UNS]["smoothing"]["radius_um"] == pytest.approx(1.2 * step)
    assert s4.uns[K.UNS]["smoothing"]["mean_neighbours"] < 5
