"""The default NB mean: a library size regressed from the image times a composition trained at the observed
library size, shrunk toward its mean (stimage_nb.models.library_size; pure logic on synthetic numbers, then a
real training run on her2st tiles)."""

from __future__ import annotations

import json

import _modelkit as kit
import numpy as np
import pytest
import torch

from stimage_nb.errors import StimageInputError
from stimage_nb.models.heads import NBHead
from stimage_nb.models.library_size import (
    ALPHAS,
    SHRINKAGE_GRID,
    cross_fitted_shrinkage,
    fit_library_size,
    held_out_loglik,
    log_library_size,
    set_library_size,
    shrink_composition,
)
from stimage_nb.tiles import extract_tiles
from stimage_nb.train import TrainConfig


def _synthetic(seed=0, n=300, F=12):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, F)) * rng.uniform(0.5, 3, F) + rng.normal(size=F)
    w = np.zeros(F)
    w[:3] = (0.4, -0.3, 0.2)
    sections = np.repeat(["a", "b", "c"], n // 3)
    depth = {"a": 5.0, "b": 7.5, "c": 6.0}  # sections sequenced to other depths
    y = X @ w + np.array([depth[s] for s in sections]) + rng.normal(scale=0.1, size=n)
    return X, y, sections, w


def test_the_library_size_regression_is_centred_per_section_and_folds_its_standardisation():
    X, y, sections, w = _synthetic()
    fit = fit_library_size(X, y, sections, sections, seed=3)
    assert fit.alpha in ALPHAS and fit.cv_r2 > 0.5 and fit.n == len(X)
    # the section depths are not learned from the image: the offset is the median section mean
    means = [y[sections == s].mean() for s in "abc"]
    assert fit.offset == pytest.approx(np.median(means))
    assert abs(fit.bias + (X.mean(0) @ fit.weight)) < 0.05  # centred targets
    assert np.corrcoef(fit.weight, w)[0, 1] > 0.95
    # members' bootstrap samples give other fits; the same seed the same fit
    other = fit_library_size(X, y, sections, sections, seed=4)
    again = fit_library_size(X, y, sections, sections, seed=3)
    assert not np.allclose(other.weight, fit.weight) and np.array_equal(again.weight, fit.weight)
    # a member's rows: the bootstrap draws only from them
    rows = np.arange(100)
    sub = fit_library_size(X, y, sections, sections, rows=rows, seed=3)
    assert sub.n == 100 and not np.allclose(sub.weight, fit.weight)
    with pytest.raises(ValueError):
        fit_library_size(X[:10], y, sections, sections)


def test_the_fit_sets_the_depth_head_and_the_offset_trains_only_the_rates():
    X, y, sections, _ = _synthetic()
    fit = fit_library_size(X, y, sections, sections)
    head = NBHead(X.shape[1], 5, rank=2, composition=True)
    counts = torch.poisson(torch.full((50, 5), 3.0))
    head.init_from_counts(counts)
    head.eval()
    set_library_size(head, fit)
    f = torch.tensor(X, dtype=torch.float32)
    log_mu = head(f)[0].detach()
    expected = X @ fit.weight + fit.bias + fit.offset
    assert np.allclose(torch.logsumexp(log_mu, 1).numpy(), expected, atol=1e-4)
    # with the observed library size the mean is a GLM offset on the rates: depth head unused
    lib = torch.linspace(1, 4, len(f))
    off = head(f, log_library=lib)[0].detach()
    eta = (head.linear(head.encoder(f)) + head.log_mean_bias).detach()
    assert torch.allclose(off, eta + (lib - head.log_total_bias)[:, None], atol=1e-5)
    with pytest.raises(ValueError):
        NBHead(X.shape[1], 5)(f, log_library=lib)
    with pytest.raises(ValueError):
        set_library_size(NBHead(X.shape[1], 5), fit)
    assert torch.allclose(log_library_size(torch.tensor([[0.0, 0.0], [2.0, 5.0]])),
                          torch.tensor([0.0, float(np.log(7.0))]))


def test_shrinking_the_composition_scales_its_deviations_from_the_mean():
    torch.manual_seed(0)
    head = NBHead(6, 8, rank=3, composition=True)
    with torch.no_grad():
        head.linear.weight.normal_(0, 1.0)
        head.encoder.bias.normal_(0, 1.0)
    head.eval()
    f = torch.randn(40, 6) + 0.5
    g = head.linear(head.encoder(f)).detach()
    before = head(f)[0].detach()
    shrink_composition(head, f, 1.0)
    assert torch.equal(head(f)[0], before)
    shrink_composition(head, f, 0.25)
    g2 = (head.linear(head.encoder(f)) + head.log_mean_bias).detach()
    gbar = g.mean(0)
    # eta(f) - eta(mean) is a quarter of what it was; the composition at the mean features is unchanged
    assert torch.allclose(g2 - g2.mean(0), 0.25 * (g - gbar), atol=1e-5)
    comp = torch.log_softmax(g2.mean(0), 0)
    assert torch.allclose(comp, torch.log_softmax(gbar + (head.log_mean_bias - 0.75 * gbar), 0), atol=1e-5)
    # the library size (the depth head) is untouched
    assert torch.allclose(torch.logsumexp(head(f)[0], 1), torch.logsumexp(before, 1), atol=1e-4)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError):
            shrink_composition(head, f, bad)


def test_per_gene_factors_shrink_each_gene_by_its_own():
    torch.manual_seed(1)
    head = NBHead(6, 4, rank=3, composition=True)
    with torch.no_grad():
        head.linear.weight.normal_()
    f = torch.randn(50, 6)
    s = np.array([1.0, 0.5, 0.0, 0.25])
    gbar = head.linear(head.encoder(f)).mean(0).detach()
    g_before = head.linear(head.encoder(f)).detach()
    b_before = head.log_mean_bias.detach().clone()
    shrink_composition(head, f, s)
    g_after = head.linear(head.encoder(f)).detach() + head.log_mean_bias.detach()
    st = torch.as_tensor(s, dtype=torch.float32)
    want = st * g_before + (1 - st) * gbar + b_before
    assert torch.allclose(g_after, want, atol=1e-5)
    assert torch.allclose(g_after[:, 2], g_after[0, 2].expand(50))  # factor 0: the gene's mean share everywhere
    one = NBHead(6, 4, rank=3, composition=True)
    one.load_state_dict(head.state_dict())
    with pytest.raises(ValueError):
        shrink_composition(one, f, np.array([1.0, 0.5]))  # one factor per gene
    with pytest.raises(ValueError):
        shrink_composition(one, f, np.array([1.0, 0.5, 1.2, 0.0]))


def test_cross_fitting_keeps_a_genes_real_signal_and_drops_its_noise():
    # 40 genes at the observed library size L (the GLM offset the head is trained with), each at L/40; the truth:
    # gene 0's rate follows feature 0 (times exp(0.8 f0 - 0.32), mean 1), every other gene is flat. The head
    # learned gene 0's dependence right and an invented dependence of gene 1 on feature 1 (noise it fitted).
    rng = np.random.default_rng(0)
    n, F, G = 3000, 4, 40
    f = torch.tensor(rng.normal(size=(n, F)), dtype=torch.float32)
    log_rate = torch.full((n, G), float(np.log(1 / G)))
    log_rate[:, 0] += 0.8 * f[:, 0] - 0.32
    lib = torch.tensor(rng.uniform(300, 1200, n), dtype=torch.float32)
    mu = lib[:, None] * torch.exp(log_rate)
    theta = 10.0
    torch.manual_seed(0)
    counts = torch.distributions.Poisson(torch.distributions.Gamma(theta, theta / mu).sample()).sample()
    head = NBHead(F, G, rank=0, composition=True)
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.bias.zero_()
        head.linear.weight[0, 0] = 0.8
        head.linear.weight[1, 1] = 0.6
        c = float(torch.log(lib.mean()))  # rates are at the mean library size, the offset is log L - c
        head.log_mean_bias.fill_(c + float(np.log(1 / G)))
        head.log_mean_bias[0] -= 0.32
        head.log_total_bias.fill_(c)
        head.log_theta.fill_(np.log(theta))
    ll = held_out_loglik(head, f[:1000], f[1000:], counts[1000:])
    assert ll.shape == (len(SHRINKAGE_GRID), G)
    applied, fitted = cross_fitted_shrinkage(ll, 0.5)
    assert fitted[0] >= 0.9 and fitted[1] <= 0.1  # the real signal kept, the noise shrunk away
    assert np.allclose(applied, 0.5 * fitted)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError):
            cross_fitted_shrinkage(ll, bad)
    with pytest.raises(ValueError):
        cross_fitted_shrinkage(ll[:3], 0.5)


def test_the_default_recipe_and_its_checks():
    cfg = TrainConfig()
    assert (cfg.composition, cfg.library_size, cfg.composition_shrinkage, cfg.composition_cv_scale) == \
        (True, "ridge", "cv", 0.25)
    assert TrainConfig(**cfg.to_dict()).to_dict() == cfg.to_dict()  # a recorded config is rebuilt as it was
    one = TrainConfig(composition_shrinkage=0.25)
    assert one.composition_cv_scale is None and TrainConfig(**one.to_dict()).composition_shrinkage == 0.25
    ft = TrainConfig(backbone="resnet18")
    assert (ft.frozen, ft.composition, ft.library_size, ft.composition_shrinkage) == (False, False, "joint", 1.0)
    assert TrainConfig(depth="section").library_size == "joint"
    assert TrainConfig(composition=False).composition_shrinkage == 1.0
    for bad in (dict(library_size="ridge", depth="section"), dict(library_size="ridge", composition=False),
                dict(library_size="ridge", backbone="resnet18"), dict(composition_shrinkage=0.0),
                dict(composition_shrinkage=2.0), dict(composition=False, composition_shrinkage=0.5),
                dict(library_size="joint", composition_shrinkage=0.5),  # applied only where the size is fitted
                dict(library_size="joint", composition_shrinkage="cv"), dict(composition_shrinkage="half"),
                dict(composition_cv_scale=0.0), dict(composition_shrinkage=0.5, composition_cv_scale=0.5),
                dict(library_size="observed")):
        with pytest.raises(StimageInputError):
            TrainConfig(**bad)
    from stimage_nb.cli import build_parser

    base = ["train", "--manifest", "m.csv", "--genes", "g.txt", "--out", "o"]
    c = TrainConfig.from_cli(build_parser().parse_args(base + ["--library-size", "ridge",
                                                               "--composition-shrinkage", "0.5"]))
    assert (c.library_size, c.composition_shrinkage) == ("ridge", 0.5)
    c = TrainConfig.from_cli(build_parser().parse_args(base + ["--composition-shrinkage", "cv",
                                                               "--composition-cv-scale", "0.5"]))
    assert (c.composition_shrinkage, c.composition_cv_scale) == ("cv", 0.5)
    with pytest.raises(StimageInputError, match="--depth section"):  # says which condition the user broke
        TrainConfig(library_size="ridge", depth="section")
    with pytest.raises(StimageInputError, match="fine-tuning"):
        TrainConfig(library_size="ridge", backbone="resnet18")


def test_training_on_real_tiles_regresses_the_library_size_per_member(tmp_path):
    from stimage_nb.ensemble import Ensemble
    from stimage_nb.train import train

    secs = kit.sections(("C2", "C3"))
    cfg = kit.tiny_frozen_config(members=3, epochs=8)
    assert cfg.composition_shrinkage == "cv"
    ens = train(secs, genes=kit.genes(), out=tmp_path / "run", val_sections=[], config=cfg, progress=False)
    info = [m["library_size"] for m in ens.meta["members"]]
    assert all(i["alpha"] in ALPHAS and i["composition_shrinkage"] == "cv" for i in info)
    # the per-gene factors were cross-fitted over the two sections (one head without each), then scaled
    rec = json.loads((tmp_path / "run" / "crossfit" / "gene_shrinkage.json").read_text())
    assert rec["groups"] == ["C2", "C3"] and rec["genes"] == list(ens.genes) and rec["scale"] == 0.25
    fitted, applied = np.array(rec["cross_fitted"]), np.array(rec["applied"])
    assert set(np.round(fitted, 2)) <= set(SHRINKAGE_GRID) and np.allclose(applied, 0.25 * fitted)
    assert not [p for p in (tmp_path / "run" / "crossfit").iterdir() if p.is_dir()]  # its heads are removed
    assert info[0]["composition_shrinkage_mean"] == pytest.approx(applied.mean(), abs=1e-4)
    assert len({round(i["bias"], 9) for i in info}) == 3  # each member its own bootstrap sample
    # predicted library sizes follow the observed ones on the training spots (the image explains depth)
    s = secs[1]
    t = extract_tiles(s.image, s.xy, 150.0, kit.OUT_PX)
    p = ens.predict_tiles(t)
    obs = np.asarray(s.adata.X.sum(1)).ravel()
    assert np.corrcoef(np.log(p["mean"].sum(1)), np.log(np.maximum(obs, 1)))[0, 1] > 0.3
    # the members disagree about depth: epistemic variance in every spot's total
    member_totals = [Ensemble([m], genes=ens.genes, celltypes=ens.celltypes, tile_um=ens.tile_um, out_px=ens.out_px,
                              stain=ens.stain).predict_tiles(t)["mean"].sum(1) for m in ens.members]
    assert np.std(member_totals, axis=0).min() > 0
    # a finished run is loaded as it was (the final weights, not the last training epoch)
    again = train(secs, genes=kit.genes(), out=tmp_path / "run", val_sections=[], config=cfg, progress=False)
    assert np.allclose(again.predict_tiles(t)["mean"], p["mean"], rtol=1e-5)
