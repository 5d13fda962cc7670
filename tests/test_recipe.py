"""The recipe options chosen with the validation harness: background handling, depth offsets and a given
section depth, the depth x composition NB head, members that leave a group out (real her2st tiles)."""

from __future__ import annotations

import _modelkit as kit
import numpy as np
import pytest
import torch

from stimage_nb.ensemble import Ensemble, rescale_to_depth
from stimage_nb.errors import StimageInputError
from stimage_nb.models.heads import NBHead
from stimage_nb.stain import whiten_background
from stimage_nb.tiles import extract_tiles
from stimage_nb.train import TrainConfig, _bag


def _tiles(name="C4"):
    s = kit.sections((name,))[0]
    return extract_tiles(s.image, s.xy, 150.0, kit.OUT_PX)


def test_composition_head_is_depth_times_composition():
    s = kit.sections(("C3",))[0]
    counts = torch.from_numpy(np.asarray(s.adata.X.todense(), dtype=np.float32))
    head = NBHead(16, counts.shape[1], rank=4, composition=True)
    head.init_from_counts(counts)
    f = torch.randn(len(counts), 16)
    log_mu, _ = head(f)
    # at initialisation: the gene means, whatever the features (weights ~0)
    assert torch.allclose(log_mu.mean(0), torch.log(counts.mean(0).clamp_min(1e-3)), atol=0.05)
    # the total of a spot is the depth head alone; the composition sums to one
    depth = (head.depth(f) + head.log_total_bias).squeeze(1)
    assert torch.allclose(torch.logsumexp(log_mu, 1), depth, atol=1e-4)
    with torch.no_grad():
        head.linear.weight.normal_(0, 1.0)
    log_mu2, _ = head(f)
    assert torch.allclose(torch.logsumexp(log_mu2, 1), depth, atol=1e-4)  # a new composition keeps the depth


def test_a_given_depth_rescales_each_negative_binomial_exactly():
    ens = Ensemble.load(kit.tiny_run(), "cpu")
    one = Ensemble([ens.members[0]], genes=ens.genes, celltypes=ens.celltypes, tile_um=ens.tile_um,
                   out_px=ens.out_px, stain=ens.stain)
    tiles = _tiles()
    p = one.predict_tiles(tiles)
    theta = p["mean"].astype(np.float64) ** 2 / (p["aleatoric_var"] - p["mean"]).astype(np.float64)
    q = one.predict_tiles(tiles, depth=123.0)
    f = q["depth_factor"]
    assert q["mean"].sum(1).mean() == pytest.approx(123.0, rel=1e-5)
    mu = f * p["mean"].astype(np.float64)
    assert np.allclose(q["mean"], mu, rtol=1e-5)
    assert np.allclose(q["aleatoric_var"], mu + mu ** 2 / theta, rtol=1e-4)  # same dispersion, new mean
    # the ensemble: epistemic scales with f^2, member outputs with the same f
    e = ens.predict_tiles(tiles, member=1)
    r = rescale_to_depth(e, 50.0)
    g = r["depth_factor"]
    assert np.allclose(r["epistemic_var"], g * g * e["epistemic_var"], rtol=1e-5)
    assert np.allclose(r["member_mean"], g * e["member_mean"], rtol=1e-5)
    assert not np.allclose(e["member_mean"], e["mean"])
    with pytest.raises(StimageInputError):
        rescale_to_depth(e, 0.0)


def test_a_black_background_is_the_glass_again():
    ens = Ensemble.load(kit.tiny_run(), "cpu")
    t = _tiles("C2")
    glass = t.min(-1) > 225
    assert 0.01 < glass.mean() < 0.9
    white, black = t.copy(), t.copy()
    white[glass], black[glass] = 255, 0
    ens.background = "white"
    a, b = ens.predict_tiles(white), ens.predict_tiles(black)
    assert np.allclose(a["mean"], b["mean"], rtol=1e-6)
    ens.background = "keep"
    c = ens.predict_tiles(black)
    assert not np.allclose(a["mean"], c["mean"], rtol=1e-3)
    assert np.array_equal(whiten_background(torch.from_numpy(black)).numpy(), whiten_background(black))


def test_depth_offsets_train_sections_of_other_depths_together(tmp_path):
    from stimage_nb.io.section import section_depth
    from stimage_nb.train import train

    secs = kit.sections(("B4", "C3"))
    d = {s.name: section_depth(s) for s in secs}
    assert d["C3"] > 2.5 * d["B4"]  # patient B was sequenced far shallower (30 genes, 40 spots here)
    cfg = kit.tiny_frozen_config(depth="section", background="white", members=2, epochs=30)
    ens = train(secs, genes=kit.genes(), out=tmp_path / "run", val_sections=[], config=cfg, progress=False)
    assert ens.reference_depth == pytest.approx(np.median(list(d.values())))
    assert ens.meta["section_depths"] == pytest.approx(d)
    # at the reference depth the predicted depth of each section is near the reference, not the section's own:
    # the offsets took the sequencing depth out of what the heads learned
    t = {s.name: extract_tiles(s.image, s.xy, 150.0, kit.OUT_PX) for s in secs}
    pb, pc = ens.predict_tiles(t["B4"]), ens.predict_tiles(t["C3"])
    ratio = pc["mean"].sum(1).mean() / pb["mean"].sum(1).mean()
    assert ratio < 0.5 * d["C3"] / d["B4"]
    loaded = Ensemble.load(tmp_path / "run")
    assert loaded.background == "white" and loaded.reference_depth == pytest.approx(ens.reference_depth)


def test_members_that_leave_a_group_out():
    cfg = TrainConfig(member_data="groups", members=4)
    group = np.repeat([0, 1, 2], 5)
    rows = [set(_bag(cfg, i, 15, group).tolist()) for i in range(4)]
    assert rows[0] == set(range(5, 15)) and rows[1] == set(range(5)) | set(range(10, 15))
    assert rows[3] == rows[0]  # four members, three groups: cycled
    assert set(_bag(TrainConfig(), 0, 15, group).tolist()) == set(range(15))
    for bad in (dict(background="grey"), dict(depth="spot"), dict(member_data="half")):
        with pytest.raises(StimageInputError):
            TrainConfig(**bad)


def test_the_train_command_reaches_the_recipe_options():
    from stimage_nb.cli import build_parser

    base = ["train", "--manifest", "m.csv", "--genes", "g.txt", "--out", "o"]
    cfg = TrainConfig.from_cli(build_parser().parse_args(base + ["--background", "keep", "--depth", "none",
                                                                 "--composition", "off", "--member-data", "groups"]))
    assert (cfg.background, cfg.depth, cfg.composition, cfg.member_data) == ("keep", "none", False, "groups")
    assert TrainConfig.from_cli(build_parser().parse_args(base)) == TrainConfig()


@pytest.mark.parametrize("kw, warns", [
    (dict(frozen=False, backbone="resnet18", weights="none"), True),  # fine-tuned from random weights
    (dict(frozen=True, extractor="kmeans+handcrafted", backbone="resnet18"), False),  # the backbone is not used
    (dict(frozen=True, extractor="timm", backbone="resnet18", weights="none"), True),
    (dict(frozen=False, backbone="resnet18", weights="pretrained"), False),
    (dict(frozen=True, extractor="timm", backbone="uni", weights="none"), True),  # a registered encoder too
])
def test_a_backbone_from_random_weights_is_said(kw, warns, caplog):
    from stimage_nb.train import _warn_random_weights

    with caplog.at_level("WARNING", logger="stimage_nb.train"):
        _warn_random_weights(TrainConfig(**kw))
    assert ("random weights" in caplog.text) is warns


def test_an_unknown_backbone_is_refused_before_anything_is_read_or_written(tmp_path):
    from stimage_nb.errors import StimageInputError
    from stimage_nb.train import train

    cfg = TrainConfig(backbone="nosuchmodel", members=1, epochs=1)
    with pytest.raises(StimageInputError, match="unknown timm backbone 'nosuchmodel'") as e:
        train(kit.sections(("C2",)), genes=kit.genes(), out=tmp_path / "run", config=cfg, progress=False)
    assert "similar: []" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_a_run_that_fails_on_its_input_leaves_nothing_that_blocks_the_corrected_command(tmp_path, monkeypatch):
    import stimage_nb.train as T
    from stimage_nb.errors import StimageInputError

    def boom(*a, **k):
        raise StimageInputError("the data is bad")
    monkeypatch.setattr(T, "_build_data", boom)  # fails after run.json was written
    cfg = kit.tiny_frozen_config(members=1, epochs=1)
    with pytest.raises(StimageInputError, match="the data is bad"):
        T.train(kit.sections(("C2",)), genes=kit.genes(), out=tmp_path / "run", config=cfg, progress=False)
    assert not (tmp_path / "run").exists()
    out = tmp_path / "kept"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a folder the user made is kept, and what was in it
    with pytest.raises(StimageInputError):
        T.train(kit.sections(("C2",)), genes=kit.genes(), out=out, config=cfg, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_refused_rerun_leaves_the_finished_runs_gene_panel_alone(tmp_path):
    from stimage_nb.train import train

    g1, g2 = tmp_path / "g1.txt", tmp_path / "g2.txt"
    g1.write_text("\n".join(kit.genes()) + "\n")
    g2.write_text("\n".join(kit.genes()[:5]) + "\n")
    cfg = kit.tiny_frozen_config(members=1, epochs=1)
    out = tmp_path / "run"
    train(kit.sections(("C2",)), genes=str(g1), out=out, val_sections=[], config=cfg, progress=False)
    panel = (out / "gene_panel.json").read_bytes()
    stamp = (out / "gene_panel.json").stat().st_mtime_ns
    with pytest.raises(StimageInputError, match="different settings"):
        train(kit.sections(("C2",)), genes=str(g2), out=out, val_sections=[], config=cfg, progress=False)
    assert (out / "gene_panel.json").read_bytes() == panel
    assert (out / "gene_panel.json").stat().st_mtime_ns == stamp


def test_simulated_acquisitions_are_views_of_the_training_tiles():
    """acquisition_views: the frozen default adds a coarser scan, a defocused JPEG and both restainings of every
    training tile as training views; shifted as read, then stain-normalised per section like any slide."""
    from stimage_nb.cli import build_parser
    from stimage_nb.shifts import TRAINING_SHIFTS, shift_tiles
    from stimage_nb.train_data import _build_data, _fit_normalizer, _raw_features

    assert TrainConfig().acquisition_views == ",".join(s.name for s in TRAINING_SHIFTS)
    assert TrainConfig(acquisition_views="none").acquisition_shifts() == []
    assert TrainConfig(frozen=False, backbone="resnet18").acquisition_views == ""
    assert [s.name for s in TrainConfig(acquisition_views=" scan_3um , jpeg_q30").acquisition_shifts()] == \
        ["scan_3um", "jpeg_q30"]
    assert TrainConfig(acquisition_views=list(TRAINING_SHIFTS)).acquisition_views == TrainConfig().acquisition_views
    assert TrainConfig(acquisition_views=" , ").acquisition_views == "" == TrainConfig(acquisition_views="").acquisition_views
    for bad, why in [(dict(frozen=False, backbone="resnet18", acquisition_views="scan_3um"), "fine-tuning"),
                     (dict(frozen=False, backbone="resnet18", acquisition_share=0.5), "fine-tuning"),
                     (dict(acquisition_views="scan_9um"), "unknown"),
                     (dict(acquisition_views="black_background"), "whole image"),
                     (dict(acquisition_views="reference"), "changes nothing"),
                     (dict(acquisition_views="acquisition"), "a whole set"),
                     (dict(acquisition_views="scan_3um,scan_3um"), "twice"),
                     (dict(acquisition_views="none", acquisition_share=0.3), "does nothing"),
                     (dict(acquisition_share=0.0), r"\(0, 1\]"), (dict(acquisition_share=1.5), r"\(0, 1\]"),
                     (dict(acquisition_share="abc"), "a number"), (dict(acquisition_share=True), "a number")]:
        with pytest.raises(StimageInputError, match=why) as e:
            TrainConfig(**bad)
        assert "--acquisition-" in str(e.value) and "\n" not in str(e.value)
    assert TrainConfig(acquisition_share="0.25").acquisition_share == 0.25
    base = ["train", "--manifest", "m.csv", "--genes", "g.txt", "--out", "o"]
    assert TrainConfig.from_cli(build_parser().parse_args(base + ["--acquisition-views", "none"])).acquisition_views == ""
    assert TrainConfig.from_cli(build_parser().parse_args(base + ["--acquisition-share", "0.5"])).acquisition_share == 0.5
    # an empty value on the command line (an unset shell variable) is refused, not read as "none"
    for empty in ("", " , "):
        with pytest.raises(StimageInputError, match="--acquisition-views is empty.*'none'"):
            TrainConfig.from_cli(build_parser().parse_args(base + ["--acquisition-views", empty]))

    secs = kit.sections(("C2", "C3"))
    genes = kit.genes()
    norm = _fit_normalizer(secs, 150.0, kit.OUT_PX, False)
    d = _build_data(secs, genes, [], 150.0, kit.OUT_PX, norm, torch.device("cpu"), False, shifts=TRAINING_SHIFTS)
    assert len(d.acquisitions) == len(TRAINING_SHIFTS) and d.um_per_px == pytest.approx(150.0 / kit.OUT_PX)
    assert all(a.shape == d.tiles.shape and a.dtype == torch.uint8 for a in d.acquisitions)
    # a restaining goes through the section's own stain normalisation: it mostly comes back to the tiles
    raw = torch.cat([torch.from_numpy(extract_tiles(s.image, s.xy, 150.0, kit.OUT_PX)) for s in secs])
    st = d.acquisitions[2].float()
    restained = torch.from_numpy(shift_tiles(raw.numpy(), TRAINING_SHIFTS[2], d.um_per_px)).float()
    assert (st - d.tiles.float()).abs().mean() < 0.5 * (restained - raw.float()).abs().mean()
    # features: view 0 is the tile itself, then one view per acquisition
    from stimage_nb.models.features import build_stack

    stack = build_stack("handcrafted")
    f = _raw_features(stack, d.tiles, views=1, batch_size=64, amp=False, acquisitions=d.acquisitions)
    assert f.shape[:2] == (1 + len(TRAINING_SHIFTS), len(d))
    assert torch.equal(f[0], _raw_features(stack, d.tiles, views=1, batch_size=64, amp=False)[0])
    # (the 4.5 µm/px scan is no coarser than these 4.7 µm/px test tiles: that view is the tile itself)
    assert torch.equal(f[1], f[0]) and not any(torch.allclose(f[k], f[0]) for k in (2, 3, 4))


def test_training_settings_out_of_range_are_refused_naming_the_flag():
    for bad, msg in [(dict(lr=-1.0), "--lr"), (dict(lr=float("nan")), "--lr"), (dict(lr=0), "--lr"),
                     (dict(lr=True), "--lr"), (dict(head_lr=float("inf")), "head_lr"),
                     (dict(weight_decay=-0.1), "weight_decay"), (dict(members=0), "--members"),
                     (dict(epochs=0), "--epochs"), (dict(batch_size=1), "--batch-size"), (dict(out_px=4), "--out-px")]:
        with pytest.raises(StimageInputError, match=msg) as e:
            TrainConfig(**bad)
        assert "\n" not in str(e.value)


def test_a_diverging_run_is_a_settings_error_that_names_the_learning_rate(tmp_path):
    """A loss that becomes NaN is the user's setting (exit 2 with the fix), not an internal error."""
    from stimage_nb.errors import TrainingDivergedError
    from stimage_nb.train import train

    cfg = kit.tiny_frozen_config(members=1, epochs=5, lr=1e9, acquisition_views="none")
    with pytest.raises(TrainingDivergedError, match=r"lower the learning rate \(--lr.*1e\+09") as e:
        train(kit.sections(("C2",)), genes=kit.genes(), out=tmp_path / "run", config=cfg, progress=False)
    assert isinstance(e.value, StimageInputError)


def test_views_are_drawn_uniformly_or_with_the_acquisition_share():
    from stimage_nb.train import _draw_views

    g = torch.Generator().manual_seed(0)
    assert TrainConfig().acquisition_share == 0.5 and TrainConfig(acquisition_views="none").acquisition_share is None
    uni = torch.bincount(_draw_views(TrainConfig(acquisition_share=0.8), 5, 50000, g), minlength=5) / 50000
    assert torch.allclose(uni, torch.full((5,), 0.2), atol=0.01)
    half = torch.bincount(_draw_views(TrainConfig(), 5, 50000, g), minlength=5) / 50000
    assert abs(half[0] - 0.5) < 0.01 and torch.allclose(half[1:], torch.full((4,), 0.125), atol=0.01)
    always = _draw_views(TrainConfig(acquisition_share=1.0), 5, 1000, g)
    assert (always >= 1).all()
    # eight dihedral views as scanned, then the acquisitions
    d8 = _draw_views(TrainConfig(frozen_views=8, acquisition_share=0.25), 12, 40000, g)
    assert abs((d8 >= 8).float().mean() - 0.25) < 0.01 and (d8 < 8).any()
    assert torch.equal(_draw_views(TrainConfig(acquisition_views="none"), 1, 10, g), torch.zeros(10, dtype=torch.long))
