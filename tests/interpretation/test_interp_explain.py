"""Attributions of the predictive mean to nuclei on real held-out spots (her2st C6)."""

from __future__ import annotations

import numpy as np
import pytest

from stimage_nb.errors import StimageInputError
from stimage_nb.interpretation import (
    Attributions,
    additivity_error,
    build_game,
    explain,
    is_differentiable,
    pixel_map,
    randomised_heads,
    read_attributions,
    spot_game,
)
from stimage_nb.interpretation._game import BACKGROUND, player_hierarchy


def test_partition_values_are_additive_and_start_from_the_predicted_mean(attr_c6, frozen_ens, c6):
    """Owen values over nuclei + background sum to f(tile) - f(all masked); f(tile) is what predict_section
    writes for the spot (same tiles, same Macenko step with the section's stain estimate)."""
    from stimage_nb.predict import predict_section

    a = attr_c6
    assert isinstance(a, Attributions) and a.method == "partition" and a.output == "log_mean"
    assert additivity_error(a) < 1e-6
    pred = predict_section(frozen_ens, c6, progress=False)
    for spot in a.spots.index:
        for g in a.genes:
            assert a.spots.loc[spot, f"prediction:{g}"] == pytest.approx(np.log(float(pred[spot, g].X[0, 0])), abs=1e-5)
    e = a.explanation(a.spots.index[0])  # a real shap.Explanation
    import shap

    assert isinstance(e, shap.Explanation) and e.values.shape == (a.spots.iloc[0]["n_nuclei"] + 1, 2)
    assert e.feature_names[-1] == BACKGROUND
    assert np.allclose(e.values.sum(0) + e.base_values,
                       a.spots.iloc[0][[f"prediction:{g}" for g in a.genes]].to_numpy(dtype=float))
    assert np.isfinite(e.data).all() and (e.data > 0).all()  # player areas (µm²)
    # nuclei are real: tens per 100 µm tile; the record keeps every nucleus touching a tile (players + slivers)
    assert (a.spots["n_nuclei"] >= 20).all()
    players = set(a.values["player"]) - {BACKGROUND}
    assert players <= set(a.nuclei.ids) and len(players) >= 0.9 * len(a.nuclei)


def test_permutation_and_lime_over_the_same_players(frozen_ens, c6, attr_c6):
    spot = "19x13"
    perm = explain(frozen_ens, c6, genes=frozen_ens.genes[:1], spots=[spot], method="permutation", max_evals=300,
                   nuclei=attr_c6.nuclei, progress=False)
    assert additivity_error(perm) < 1e-6
    lime = explain(frozen_ens, c6, genes=frozen_ens.genes[:1], spots=[spot], method="lime", max_evals=200,
                   nuclei=attr_c6.nuclei, progress=False)
    assert additivity_error(lime) is None  # LIME is not additive, and says so
    pp, pv = perm.matrix(spot)
    lp, lv = lime.matrix(spot)
    ap, av = attr_c6.matrix(spot)
    assert pp == lp == ap  # the same nuclei and background are the players of every explainer
    # the explainers agree on which nuclei matter most (same model, same game)
    from scipy.stats import spearmanr

    assert spearmanr(pv[:-1, 0], av[:-1, 0])[0] > 0.3
    assert spearmanr(lv[:-1, 0], pv[:-1, 0])[0] > 0.2


def test_explainers_run_on_timm_backbones_too(timm_ens, her2st_manifest):
    """The model-agnostic game and the gradient explainer on a differentiable timm ensemble; expected
    gradients from the all-masked tile are additive up to their sampling noise."""
    from stimage_nb.io.readers import read_manifest

    sec = read_manifest(her2st_manifest, ["C6"], genes=timm_ens.genes)[0]
    assert is_differentiable(timm_ens)
    g = explain(timm_ens, sec, genes=timm_ens.genes[:2], top_k=1, method="gradient", max_evals=32, progress=False)
    spot = g.spots.index[0]
    players, vals = g.matrix(spot)
    total = g.spots.loc[spot, [f"prediction:{x}" for x in g.genes]].to_numpy(float) - \
        g.spots.loc[spot, [f"base:{x}" for x in g.genes]].to_numpy(float)
    assert np.allclose(vals.sum(0), total, atol=0.25 * np.abs(total).max() + 1e-3)
    p = explain(timm_ens, sec, genes=timm_ens.genes[:1], spots=[spot], method="partition", max_evals=60,
                nuclei=g.nuclei, progress=False)
    assert additivity_error(p) < 1e-6
    with pytest.raises(StimageInputError, match="log_share"):  # the gradient module explains log_mean/mean only
        explain(timm_ens, sec, genes=timm_ens.genes[:1], spots=[spot], method="gradient", output="log_share",
                nuclei=g.nuclei, progress=False)


def test_gradient_module_averages_as_predict_tiles_does(timm_ens, her2st_manifest):
    """The gradient explainer's model (EnsembleMeanModule) is the ensemble's predictive mean: plain, in a
    published model's group order (``meta["mean_groups"]``), and over regression members (point values,
    e.g. an imported Path2Space model), whose log is refused with a clear error; the randomised-heads
    copy of such an ensemble re-draws its regression heads and keeps the background handling."""
    import torch

    from stimage_nb.ensemble import Ensemble
    from stimage_nb.interpretation._explain import _float_tiles
    from stimage_nb.interpretation._game import EnsembleMeanModule, TilePredictor
    from stimage_nb.io.readers import read_manifest
    from stimage_nb.models.model import STModel
    from stimage_nb.tiles import extract_tiles

    sec = read_manifest(her2st_manifest, ["C6"], genes=timm_ens.genes)[0]
    tiles = extract_tiles(sec.image, sec.xy[:4], timm_ens.tile_um, timm_ens.out_px, cache=False)
    idx = np.arange(3)
    geo = dict(genes=timm_ens.genes, tile_um=timm_ens.tile_um, out_px=timm_ens.out_px)

    def both(ens, output):
        with torch.no_grad():
            mod = EnsembleMeanModule(ens, idx, output)(_float_tiles(ens, tiles, None)).numpy()
        ref = ens.predict_tiles(tiles, stain_source=None)["mean"][:, idx]
        return mod, (np.log(ref) if output == "log_mean" else ref)

    grouped = Ensemble(timm_ens.members, celltypes=timm_ens.celltypes, meta={"mean_groups": [[0], [1, 2]]}, **geo)
    for ens in (timm_ens, grouped):
        for output in ("log_mean", "mean"):
            mod, ref = both(ens, output)
            assert np.allclose(mod, ref, rtol=1e-4, atol=1e-5), (output, np.abs(mod - ref).max())
    assert not np.allclose(both(grouped, "mean")[1], both(timm_ens, "mean")[1])  # the order matters here

    m0 = timm_ens.members[0]
    torch.manual_seed(0)
    reg = [STModel(m0.backbone, len(timm_ens.genes), 0, backbone_name=m0.backbone_name, head="mlp", hidden=16).eval()
           for _ in range(2)]
    for m in reg:  # a positive bias keeps the ReLU outputs away from 0
        torch.nn.init.constant_(m.mlp.layer1[0].bias, 1.0)
    reg_ens = Ensemble(reg, celltypes=[], background="white", **geo)
    mod, ref = both(reg_ens, "mean")
    assert np.allclose(mod, ref, rtol=1e-4, atol=1e-5) and (ref > 0).all()
    with pytest.raises(StimageInputError, match="point values"):
        TilePredictor(reg_ens, timm_ens.genes[:1], None, output="log_mean")
    rnd = randomised_heads(reg_ens, seed=3)
    assert rnd.background == "white" and not rnd.has_distribution
    assert not np.allclose(rnd.predict_tiles(tiles, stain_source=None)["mean"][:, idx], ref)


def test_gradient_needs_a_differentiable_model(frozen_ens, c6):
    assert not is_differentiable(frozen_ens)
    with pytest.raises(StimageInputError, match="differentiable"):
        explain(frozen_ens, c6, genes=frozen_ens.genes[:1], top_k=1, method="gradient", progress=False)


def test_bad_requests_get_clear_errors(frozen_ens, c6):
    with pytest.raises(StimageInputError, match="not predicted by this model"):
        explain(frozen_ens, c6, genes=["NOTAGENE"], top_k=1, progress=False)
    with pytest.raises(StimageInputError, match="not among its"):
        explain(frozen_ens, c6, genes=frozen_ens.genes[:1], spots=["99x99"], progress=False)
    with pytest.raises(StimageInputError, match="choose the spots"):
        explain(frozen_ens, c6, genes=frozen_ens.genes[:1], progress=False)
    with pytest.raises(StimageInputError, match="explainer must be"):
        explain(frozen_ens, c6, genes=frozen_ens.genes[:1], top_k=1, method="kernel", progress=False)


def test_masking_paints_players_with_the_neutral_fill(frozen_ens, c6, attr_c6):
    game = spot_game(frozen_ens, c6, "19x13", attr_c6.nuclei)
    P = game.n_players
    assert P == attr_c6.spots.loc["19x13", "n_nuclei"] + 1
    assert game.player_names == attr_c6.matrix("19x13")[0]  # the recorded nuclei rebuild the same game
    none = np.zeros((1, P), bool)
    # with every player masked the tile is the fill colour; with all present it is the prediction's tile
    assert np.abs(game.compose(none)[0].astype(int) - game.fill.astype(int)).max() <= 1
    from stimage_nb.tiles import extract_tiles

    i = list(c6.adata.obs_names).index("19x13")
    ref = extract_tiles(c6.image, c6.xy[i:i + 1], frozen_ens.tile_um, frozen_ens.out_px, cache=False)
    assert np.array_equal(game.tile(), ref)
    # masking one nucleus changes only the pixels near it
    z = np.ones((1, P), bool)
    z[0, 0] = False
    diff = np.any(game.compose(z)[0] != game.tile()[0], axis=2)
    assert 0 < diff.sum() < 0.05 * diff.size
    # the fill is tissue-coloured, not glass
    assert game.fill.astype(int).sum() < 3 * 235
    # the partition tree: nuclei grouped by position, the background joined at the root
    L = player_hierarchy(np.random.default_rng(0).uniform(0, 100, (7, 2)))
    assert L.shape == (7, 4) and L[-1, 1] == 7 and L[-1, 3] == 8


def test_randomised_heads_change_the_model_not_the_original(frozen_ens, c6):
    from stimage_nb.tiles import extract_tiles

    t = extract_tiles(c6.image, c6.xy[:4], frozen_ens.tile_um, frozen_ens.out_px)
    before = frozen_ens.predict_tiles(t)["mean"]
    rnd = randomised_heads(frozen_ens, seed=1)
    after = rnd.predict_tiles(t)["mean"]
    assert not np.allclose(before, after)
    assert np.array_equal(frozen_ens.predict_tiles(t)["mean"], before)  # the original is untouched
    assert rnd.members[0].backbone is frozen_ens.members[0].backbone  # frozen features shared, not copied


def test_attributions_round_trip(tmp_path, attr_c6):
    d = attr_c6.write(tmp_path / "C6")
    b = read_attributions(d)
    assert b.genes == attr_c6.genes and b.method == attr_c6.method and b.section == "C6"
    assert np.allclose(b.values["value"], attr_c6.values["value"])
    assert list(b.spots.index) == list(attr_c6.spots.index)
    assert b.nuclei.ids == attr_c6.nuclei.ids
    assert all(np.allclose(p, q, atol=0.01) for p, q in zip(b.nuclei.polygons, attr_c6.nuclei.polygons))
    assert b.to_json()["max_additivity_error"] < 1e-5
    with pytest.raises(StimageInputError, match="attributions.json"):
        read_attributions(tmp_path)


def test_pixel_map_of_a_frozen_model_is_additive(frozen_ens, c6, attr_c6):
    from stimage_nb.interpretation._explain import section_stain_source

    game = spot_game(frozen_ens, c6, "14x21", attr_c6.nuclei)
    src = section_stain_source(frozen_ens, c6)
    e = pixel_map(frozen_ens, game, frozen_ens.genes[:1], src, max_evals=120)
    assert e.values.shape == (frozen_ens.out_px, frozen_ens.out_px, 1)
    full = attr_c6.spots.loc["14x21", f"prediction:{frozen_ens.genes[0]}"]
    assert e.values.sum() + e.base_values[0] == pytest.approx(full, abs=1e-5)


def test_build_game_from_qupath_nuclei(frozen_ens, c6, attr_c6, tmp_path):
    """Nuclei from a QuPath export are players like segmented ones (ids kept)."""
    from stimage_nb.interpretation import export_qupath_nuclei, nuclei_from_qupath

    path = export_qupath_nuclei(attr_c6, tmp_path / "n.geojson")
    nuc = nuclei_from_qupath(path, image=c6.image)
    i = list(c6.adata.obs_names).index("12x20")
    g = build_game(c6.image, "12x20", *c6.xy[i], tile_um=frozen_ens.tile_um, out_px=frozen_ens.out_px, nuclei=nuc)
    assert set(g.nucleus_ids) == set(attr_c6.matrix("12x20")[0][:-1])
