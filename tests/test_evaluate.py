"""Metrics, calibration and the end-to-end evaluation, on real her2st counts.

Predictions here are hand-made from the REAL observed counts of the bundled sections (the model is
tested elsewhere): predicting the counts themselves must give r = 1, a spot-shuffled copy r ~ 0, and
counts drawn from the stated negative binomial must be covered at the nominal rates.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stimage_nb import _keys as K
from stimage_nb import evaluate as E
from stimage_nb.errors import StimageInputError


@pytest.fixture(scope="module")
def c6(her2st_manifest, her2st_genes):
    from stimage_nb.io.readers import read_manifest

    (s,) = read_manifest(her2st_manifest, ["C6"], genes=her2st_genes)
    return s


@pytest.fixture(scope="module")
def c6_counts(c6):
    return c6.adata.X.toarray().astype(np.float64)


# ----------------------------------------------------------------------------- correlations
def test_observed_counts_as_prediction_give_r_1(c6_counts, her2st_genes):
    df, summ = E.score_genes(c6_counts, c6_counts, her2st_genes)
    for t in E.TARGETS:
        for m in ("pearson", "spearman"):
            s = summ[t][m]
            assert s["n_genes"] == len(her2st_genes) == 769
            defined = s["n_genes"] - s["n_undefined"]
            assert defined > 700
            # undefined genes count as 0 in the mean; every defined gene has r = 1
            assert s["mean"] == pytest.approx(defined / s["n_genes"], abs=1e-9)
            assert s["n_r_gt_0.3"] == defined
    assert len(df) == 2 * 769 and set(df["target"]) == set(E.TARGETS)
    assert np.nanmin(df["pearson"]) == pytest.approx(1.0, abs=1e-9)


def test_shuffled_prediction_gives_r_near_0(c6_counts, her2st_genes):
    rng = np.random.default_rng(1)
    _, summ = E.score_genes(c6_counts[rng.permutation(len(c6_counts))], c6_counts, her2st_genes)
    for t in E.TARGETS:
        assert abs(summ[t]["pearson"]["mean"]) < 0.05
        assert abs(summ[t]["spearman"]["mean"]) < 0.05
        assert summ[t]["pearson"]["n_r_gt_0.3"] < 10


def test_depth_only_prediction_scores_on_counts_not_on_cp10k(c6_counts, her2st_genes):
    """A prediction that knows only each spot's depth does well on log1p counts, not after normalisation."""
    depth = c6_counts.sum(1, keepdims=True)
    gene_mean = c6_counts.mean(0, keepdims=True) / depth.mean()
    pred = (depth + 1) * gene_mean  # rank-1: depth x average profile (+1: C6 has a spot with no panel counts)
    _, summ = E.score_genes(pred, c6_counts, her2st_genes)
    assert summ["log1p_counts"]["pearson"]["mean"] > 0.3
    # depth-normalised prediction is constant per gene -> undefined -> 0
    assert abs(summ["log1p_cp10k"]["pearson"]["mean"]) < 0.05


def test_transform_targets():
    Y = np.array([[0, 1, 9], [10, 0, 10]], dtype=float)
    np.testing.assert_allclose(E.transform(Y, "log1p_counts"), np.log1p(Y))
    cp = np.expm1(E.transform(Y, "log1p_cp10k"))
    np.testing.assert_allclose(cp.sum(1), [1e4, 1e4])
    with pytest.raises(ValueError):
        E.transform(Y, "raw")


def test_constant_columns_are_undefined_and_count_as_zero():
    obs = np.array([[1.0, 0, 2], [2, 0, 3], [3, 0, 1], [4, 0, 5]])
    pred = np.array([[1.0, 1, 7], [2, 2, 7], [3, 3, 7], [4, 4, 7]])
    p, s = E.correlations(pred, obs)
    assert p[0] == pytest.approx(1.0) and np.isnan(p[1]) and np.isnan(p[2])
    summ = E.summarize(p)
    assert summ["n_undefined"] == 2 and summ["mean"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- calibration
def test_nb_logpmf_and_cdf_match_scipy():
    from scipy.stats import nbinom, poisson

    y = np.array([0, 1, 3, 10, 40])
    m = np.array([0.5, 2.0, 3.0, 8.0, 30.0])
    v = m + m ** 2 / np.array([0.7, 2.0, 5.0, 10.0, 3.0])
    r = m ** 2 / (v - m)
    np.testing.assert_allclose(E.nb_logpmf(y, m, v), nbinom.logpmf(y, r, r / (r + m)), rtol=1e-10)
    np.testing.assert_allclose(E.nb_cdf(y, m, v), nbinom.cdf(y, r, r / (r + m)), rtol=1e-10)
    # variance <= mean: Poisson
    np.testing.assert_allclose(E.nb_logpmf(y, m, m * 0.9), poisson.logpmf(y, m), rtol=1e-10)
    assert (E.nb_cdf(y - 100, m, v) == 0).all()


def test_calibrated_nb_sample_has_nominal_coverage(c6_counts):
    """Counts drawn from the predictive NB are covered at 50% / 90%; aleatoric alone under-covers."""
    rng = np.random.default_rng(0)
    m = c6_counts + 0.5            # real expression levels as the predictive means
    size = 4.0
    var = m + m ** 2 / size
    y = rng.negative_binomial(size, size / (size + m))
    ale, epi = 0.6 * var, 0.4 * var
    full = E.calibration(y, m, ale, epi)
    assert full["coverage_50"] == pytest.approx(0.5, abs=0.01)
    assert full["coverage_90"] == pytest.approx(0.9, abs=0.01)
    np.testing.assert_allclose(full["curve"]["empirical"], full["curve"]["nominal"], atol=0.015)
    # the naive quantile interval over-covers discrete counts
    assert full["interval_coverage_50"] > 0.55 and full["interval_coverage_90"] >= 0.9
    alea = E.calibration(y, m, ale, None)
    assert alea["coverage_50"] < full["coverage_50"] - 0.02
    assert alea["coverage_90"] < full["coverage_90"] - 0.02
    assert alea["nll"] > full["nll"]
    # ignoring the overdispersion (Poisson: variance = mean) under-covers badly
    pois = E.calibration(y, m, m, None)
    assert pois["coverage_90"] < full["coverage_90"] - 0.04 and pois["nll"] > alea["nll"]


def test_uncertainty_ranking_finds_the_noisy_genes_and_spots(c6_counts):
    """Real expression levels as means; observations with gene- and spot-dependent noise. An SD that
    tracks the noise ranks it; an SD unrelated to the noise is no better than a random choice."""
    rng = np.random.default_rng(1)
    m = c6_counts.mean(0, keepdims=True) * (c6_counts.sum(1, keepdims=True) / c6_counts.sum(1).mean()) + 0.5
    n, g = m.shape
    gene_noise = np.where(np.arange(g) % 2 == 0, 0.1, 2.0)     # every other gene is very noisy
    spot_noise = np.where(np.arange(n) < n // 4, 3.0, 0.2)      # a quarter of the spots are very noisy
    noise = gene_noise[None, :] * spot_noise[:, None]
    y = np.round(np.expm1(np.log1p(m) + rng.normal(0, 1, m.shape) * noise * 0.5)).clip(0)
    sd_log = noise * 0.5
    var = (sd_log * (1 + m)) ** 2                               # the stated log-scale SD, in count variance
    good = E.uncertainty_ranking(y, m, 0.5 * var, 0.5 * var)
    assert good["genes"]["spearman_relative_sd_vs_r"] < -0.5
    assert good["genes"]["mean_r_most_certain_0.5"] > good["genes"]["mean_r_all"] + 0.1
    assert good["spots"]["error_retained_0.8_by_sd"] < 0.75
    assert good["spots"]["error_retained_0.8_oracle"] <= good["spots"]["error_retained_0.8_by_sd"]
    assert good["spots"]["spearman_sd_vs_abs_error_median"] > 0.3
    shuffled = var[rng.permutation(n)][:, rng.permutation(g)]
    bad = E.uncertainty_ranking(y, m, shuffled, np.zeros_like(var))
    assert bad["spots"]["error_retained_0.8_by_sd"] == pytest.approx(1.0, abs=0.08)
    assert abs(bad["genes"]["spearman_relative_epistemic_sd_vs_r"] or 0.0) < 0.2  # epistemic 0: undefined
    assert bad["spots"]["error_retained_0.8_oracle"] < 0.8


# ----------------------------------------------------------------------------- cell types
def test_celltype_metrics_perfect_and_wrong(c6):
    obs = c6.adata.obsm[K.CELLTYPE_PROPORTIONS]
    perfect = E.celltype_metrics(obs.copy(), obs)
    assert perfect["mae"] == pytest.approx(0, abs=1e-7)
    assert perfect["js_divergence"] == pytest.approx(0, abs=1e-6)
    assert perfect["dominant_agreement"] == 1.0
    assert all(v == pytest.approx(1.0) for v in perfect["pearson"].values() if v is not None)
    shuffled = obs.sample(frac=1.0, random_state=0).set_axis(obs.index)
    bad = E.celltype_metrics(shuffled, obs)
    assert bad["js_divergence"] > 0.05 and bad["mae"] > 0.01
    assert abs(bad["pearson_summary"]["mean"]) < 0.3
    # columns in another order and an extra column are aligned by name
    reordered = obs[obs.columns[::-1]].assign(Extra=0.0)
    assert E.celltype_metrics(reordered, obs)["mae"] == pytest.approx(0, abs=1e-7)


# ----------------------------------------------------------------------------- end to end
GENES = 30


def _prediction(section, mean, *, train_sections, genes=None, tile_um=150.0, out_px=32, var_scale=1.0):
    import anndata as ad

    a = section.adata
    genes = list(a.var_names) if genes is None else list(genes)
    mean = np.asarray(mean, dtype=np.float32)
    var = (mean + mean ** 2 / 3.0) * var_scale
    p = ad.AnnData(X=mean, obs=a.obs[[K.PIXEL_X, K.PIXEL_Y, K.DIAMETER_UM]].copy(),
                   var=pd.DataFrame(index=genes))
    p.layers[K.ALEATORIC] = (0.7 * var).astype(np.float32)
    p.layers[K.EPISTEMIC] = (0.3 * var).astype(np.float32)
    p.obsm[K.SPATIAL] = np.asarray(a.obsm[K.SPATIAL])
    ct = a.obsm[K.CELLTYPE_PROPORTIONS]
    p.obsm[K.CELLTYPE_MEAN] = ct.astype(np.float32)
    p.obsm[K.CELLTYPE_STD] = (ct * 0 + 0.01).astype(np.float32)
    p.uns[K.UNS] = {"section": section.name, "patient": section.patient, "image": str(section.image_path),
                    "um_per_px": float(section.um_per_px), "image_scale": 1.0, "train_sections": list(train_sections),
                    "genes": genes, "celltypes": list(ct.columns), "tile_um": tile_um, "out_px": out_px,
                    "backbone": "hand-made", "n_members": 1, "run_id": "test", "weights_sha256": "0" * 64,
                    "version": "0", "created": "2026-01-01T00:00:00"}
    return p


@pytest.fixture(scope="module")
def small_case(tmp_path_factory, data_dir, her2st_genes):
    """A manifest (C5 train, C6 held out, B4 without counts) and a prediction dir for C6 and B4."""
    from stimage_nb.io.readers import read_manifest

    tmp = tmp_path_factory.mktemp("eval")
    src = pd.read_csv(data_dir / "her2st" / "sections.csv", dtype=str)
    base = data_dir / "her2st"
    for c in ("image", "counts", "spots"):
        src[c] = [str(base / v) for v in src[c]]
    src.loc[src["section"] == "B4", "counts"] = ""
    (tmp / "celltypes").symlink_to(base / "celltypes")  # the proportion tables beside the manifest
    manifest = tmp / "sections.csv"
    src.to_csv(manifest, index=False)
    genes = her2st_genes[:GENES]
    c6, b4 = read_manifest(manifest, ["C6", "B4"], genes=genes)
    Y = c6.adata.X.toarray()
    rng = np.random.default_rng(0)
    pred_dir = tmp / "pred"
    pred_dir.mkdir()
    # a good prediction: the observed counts with multiplicative noise
    _prediction(c6, (Y + 0.5) * rng.lognormal(0, 0.3, Y.shape), train_sections=["C5"]).write_h5ad(pred_dir / "C6.h5ad")
    # B4 has no counts in this manifest (read without them, so zero genes): skipped with a note
    _prediction(b4, np.ones((b4.adata.n_obs, GENES)), genes=genes, train_sections=["C5"]).write_h5ad(pred_dir / "B4.h5ad")
    return manifest, pred_dir, genes


def test_evaluate_end_to_end_with_baseline(small_case, tmp_path):
    manifest, pred_dir, genes = small_case
    out = tmp_path / "eval"
    res = E.evaluate(pred_dir, manifest, out=out, progress=False)
    # files, strict JSON
    text = (out / "metrics.json").read_text()
    assert "NaN" not in text
    on_disk = json.loads(text)
    assert on_disk["sections"].keys() == res["sections"].keys() == {"C6"}
    assert "no counts" in res["skipped"]["B4"]
    for f in ("correlation_log1p_counts.png", "correlation_log1p_cp10k.png", "calibration.png",
              "uncertainty_ranking.png"):
        assert (out / "figures" / f).stat().st_size > 5000
    c6 = res["sections"]["C6"]
    assert c6["n_spots"] == 178 and c6["n_genes"] == GENES
    assert c6["train_sections"] == ["C5"] and c6["held_out_patient"] is False
    # the noisy-counts prediction is far better than the baseline on the same spots
    m = c6["model"]["genes"]["log1p_counts"]["pearson"]["mean"]
    b = c6["baseline"]["genes"]["log1p_counts"]["pearson"]["mean"]
    assert m > 0.8 and -0.2 < b < 0.8 and c6["comparison"]["log1p_counts"]["model_beats_baseline"] is True
    assert c6["baseline"]["train_sections"] == ["C5"] and c6["baseline"]["out_px"] == 32
    assert "celltypes" in c6["baseline"] and c6["model"]["celltypes"]["mae"] == pytest.approx(0, abs=1e-6)
    cal = c6["model"]["calibration"]
    for k in ("coverage_50", "coverage_90", "nll", "interval_coverage_50"):
        assert np.isfinite(cal[k])
    assert cal["coverage_90"] >= cal["aleatoric_only"]["coverage_90"]
    ur = c6["model"]["uncertainty_ranking"]
    assert ur["spots"]["error_retained_0.8_oracle"] < ur["spots"]["error_retained_0.8_by_sd"]
    assert -1 <= ur["genes"]["spearman_relative_sd_vs_r"] <= 1 and 0 < ur["genes"]["mean_r_all"] <= 1
    # per-gene table: 2 models x 2 targets x genes
    pg = pd.read_csv(out / "metrics_per_gene.csv")
    assert len(pg) == 2 * 2 * GENES
    assert set(pg["model"]) == {"model", "baseline"} and set(pg["gene"]) == set(genes)
    # the baseline's log1p score equals the baseline module's own evaluation
    from stimage_nb.baseline import evaluate_baseline
    from stimage_nb.io.readers import read_manifest

    tr, te = read_manifest(manifest, ["C5", "C6"], genes=genes)
    ref = evaluate_baseline([tr], [te], tile_um=150.0, out_px=32)["C6"].mean()
    assert b == pytest.approx(ref, abs=1e-6)
    assert res["summary"]["model_beats_baseline_every_section"] is True
    by_target = res["summary"]["model_beats_baseline_every_section_by_target"]
    assert set(by_target) == {"log1p_counts", "log1p_cp10k"}
    assert by_target["log1p_cp10k"] is c6["comparison"]["log1p_cp10k"]["model_beats_baseline"]


def test_evaluate_without_baseline_writes_into_pred_dir(small_case, tmp_path):
    import shutil

    manifest, pred_dir, _ = small_case
    pd2 = tmp_path / "pred"
    shutil.copytree(pred_dir, pd2)
    res = E.evaluate(pd2, manifest, baseline=False, figures=False, progress=False)
    assert (pd2 / "metrics.json").is_file() and not (pd2 / "figures").exists()
    assert "baseline" not in res["sections"]["C6"] and "comparison" not in res["sections"]["C6"]
    # idempotent: a second run gives the same numbers
    res2 = E.evaluate(pd2, manifest, baseline=False, figures=False, progress=False)
    assert res2["sections"] == res["sections"]


def test_training_section_is_flagged(small_case, tmp_path):
    import anndata as ad

    manifest, pred_dir, _ = small_case
    d = tmp_path / "pred"
    d.mkdir()
    a = ad.read_h5ad(pred_dir / "C6.h5ad")
    a.uns[K.UNS]["train_sections"] = ["C6", "C5"]
    a.write_h5ad(d / "C6.h5ad")
    res = E.evaluate(d, manifest, baseline=False, figures=False, progress=False)
    assert "not held-out" in res["sections"]["C6"]["warning"]


def test_bad_inputs(small_case, tmp_path):
    import anndata as ad

    manifest, pred_dir, _ = small_case
    with pytest.raises(StimageInputError, match="not found"):
        E.evaluate(tmp_path / "nope", manifest)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StimageInputError, match="no <section>.h5ad"):
        E.evaluate(tmp_path / "empty", manifest)
    a = ad.read_h5ad(pred_dir / "C6.h5ad")
    d = tmp_path / "nolayers"
    d.mkdir()
    b = a.copy()
    del b.layers[K.EPISTEMIC]
    b.write_h5ad(d / "C6.h5ad")
    with pytest.raises(StimageInputError, match="epistemic_var"):
        E.evaluate(d, manifest, baseline=False)
    d = tmp_path / "ids"
    d.mkdir()
    c = a.copy()
    c.obs_names = [f"spot{i}" for i in range(c.n_obs)]
    c.write_h5ad(d / "C6.h5ad")
    with pytest.raises(StimageInputError, match="spot ids match"):
        E.evaluate(d, manifest, baseline=False)


def test_cli_evaluate(small_case, tmp_path):
    from stimage_nb.cli import main

    manifest, pred_dir, _ = small_case
    out = tmp_path / "cli"
    assert main(["evaluate", "--pred", str(pred_dir), "--manifest", str(manifest), "--out", str(out),
                 "--no-baseline"]) == 0
    assert json.loads((out / "metrics.json").read_text())["sections"]["C6"]["n_spots"] == 178
    assert main(["evaluate", "--pred", str(tmp_path / "missing"), "--manifest", str(manifest)]) == 2
