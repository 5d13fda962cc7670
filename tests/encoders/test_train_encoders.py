"""Frozen foundation features in the default training path, on real her2st tiles with encoder stand-ins."""

from __future__ import annotations

import json

import _modelkit as kit
import numpy as np
import pytest
from conftest import save_layouts, standin

from stimage_nb.cli import main
from stimage_nb.ensemble import Ensemble
from stimage_nb.errors import StimageInputError
from stimage_nb.models import encoders as E
from stimage_nb.train import TrainConfig, train


def test_registered_encoders_train_frozen_at_their_own_tiles():
    uni = TrainConfig(backbone="uni", weights="uni.safetensors")
    assert (uni.frozen, uni.extractor, uni.out_px, uni.tile_um) == (True, "timm", 224, 112.0)
    assert (uni.rank, uni.epochs) == (8, 150)  # the frozen recipe's heads
    assert TrainConfig(backbone="uni", out_px=112).tile_um == 56.0  # keeps the encoder's µm/px
    assert (TrainConfig(backbone="uni", tile_um=150).out_px, TrainConfig(backbone="uni", tile_um=150).tile_um) == (224, 150)
    assert TrainConfig(backbone="conch").out_px == 448
    ft = TrainConfig(backbone="uni", frozen=False)
    assert (ft.frozen, ft.extractor, ft.out_px) == (False, "", 224)
    # plain timm names keep their old meaning and defaults
    r18 = TrainConfig(backbone="resnet18")
    assert (r18.frozen, r18.out_px, r18.tile_um) == (False, 112, 150.0)
    assert (TrainConfig().out_px, TrainConfig().tile_um) == (112, 150.0)
    two = TrainConfig(backbone="uni,virchow2", weights="a.safetensors,b_dir")
    assert two.weights_for("virchow2") == "b_dir" and two.weights_for("uni") == "a.safetensors"
    with pytest.raises(StimageInputError, match="different tiles"):
        TrainConfig(backbone="uni,conch")
    assert TrainConfig(backbone="uni,conch", tile_um=112, out_px=224).tile_um == 112
    with pytest.raises(StimageInputError, match="one weights entry per backbone"):
        TrainConfig(backbone="uni,virchow2", weights="a,b,c")
    from stimage_nb.cli import build_parser

    a = build_parser().parse_args(["train", "--manifest", "m", "--genes", "g", "--out", "o", "--backbone", "uni",
                                   "--weights", "w", "--finetune"])
    assert TrainConfig.from_cli(a).frozen is False
    a = build_parser().parse_args(["train", "--manifest", "m", "--genes", "g", "--out", "o", "--backbone", "h0-mini",
                                   "--weights", "w", "--out-px", "112"])
    c = TrainConfig.from_cli(a)
    assert (c.frozen, c.out_px, c.tile_um) == (True, 112, 56.0)
    assert TrainConfig.from_dict(c.to_dict()) == c


@pytest.fixture(scope="module")
def standin_run(tmp_path_factory):
    """A 2-member ensemble whose members differ by encoder (UNI and H0-mini stand-ins from their HF folders)."""
    root = tmp_path_factory.mktemp("enc_run")
    folders = {}
    for name in ("uni", "h0-mini"):
        e = E.get_encoder(name)
        folders[name] = save_layouts(e, standin(e, seed=1), root / name)["folder"]
    cfg = TrainConfig(backbone="uni,h0-mini", weights=f"{folders['uni']},{folders['h0-mini']}", members=2, epochs=3,
                      device="cpu")
    secs = kit.sections(("C2", "C3", "C4"), n=24)
    out = root / "run"
    ens = train(secs, genes=kit.genes()[:12], out=out, val_sections=["C4"], config=cfg, progress=False)
    return ens, out, folders, secs


def test_members_differ_by_encoder_and_the_run_records_the_preprocessing(standin_run):
    ens, out, folders, _ = standin_run
    cfg = json.loads((out / "ensemble.json").read_text())
    assert (cfg["tile_um"], cfg["out_px"]) == (112.0, 224)
    assert [m["extractor"]["timm"]["name"] for m in cfg["members"]] == ["uni", "h0-mini"]
    for name in ("uni", "h0-mini"):
        entry, rec = E.get_encoder(name), cfg["encoders"][name]
        pre = rec["preprocessing"]
        assert pre["mean"] == list(entry.mean) and pre["std"] == list(entry.std)
        assert (pre["tile_um"], pre["out_px"], pre["um_per_px"]) == (112.0, 224, 0.5)
        assert (pre["encoder_input_px"], pre["encoder_um_per_px"]) == (entry.input_px, entry.um_per_px)
        wfile = folders[name] / entry.weights_files[0]
        assert rec["weights"]["sha256"] == E.sha256_of(wfile) and rec["weights"]["files"] == {wfile.name: E.sha256_of(wfile)}
        assert rec["frozen"] is True and rec["output"] == entry.output
    # each member normalises its input with its own encoder's mean/std
    m_uni, m_h0 = (ens.members[i].backbone.branches["timm"] for i in (0, 1))
    assert np.allclose(m_uni.mean.flatten().numpy(), E.get_encoder("uni").mean)
    assert np.allclose(m_h0.mean.flatten().numpy(), E.get_encoder("h0-mini").mean)
    assert ens.members[1].backbone.num_features == 2 * 96  # H0-mini: CLS + mean patch token
    assert cfg["members"][0]["weights"] == str(folders["uni"]) and cfg["members"][1]["weights"] == str(folders["h0-mini"])
    assert cfg.get("domain")  # the domain-shift score is fitted on member 0's foundation features


def test_saved_run_reloads_without_the_original_weights(standin_run, tmp_path):
    """The frozen encoder is saved once per encoder in the run; prediction needs neither the hub nor the files."""
    import shutil

    from stimage_nb.predict import predict_section

    ens, out, folders, secs = standin_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    for f in folders.values():
        shutil.move(str(f), str(f) + ".gone")
    try:
        back = Ensemble.load(copy)
        a, b = predict_section(ens, secs[2], progress=False), predict_section(back, secs[2], progress=False)
    finally:
        for f in folders.values():
            shutil.move(str(f) + ".gone", str(f))
    assert np.allclose(a.X, b.X, rtol=1e-5) and np.allclose(a.layers["epistemic_var"], b.layers["epistemic_var"], rtol=1e-4)
    assert len(list(copy.glob("backbone_*.safetensors"))) + sum(1 for m in json.loads(
        (copy / "ensemble.json").read_text())["members"] if not m.get("backbone_file")) == 2


def test_cli_bad_encoder_weights_exit_2_with_one_line(tmp_path, capsys):
    m = "../shared/data/her2st/sections.csv"
    g = tmp_path / "g.txt"
    g.write_text("\n".join(kit.genes()[:3]))
    rc = main(["train", "--manifest", m, "--genes", str(g), "--out", str(tmp_path / "o"), "--backbone", "uni",
               "--weights", str(tmp_path / "missing.safetensors"), "--sections", "C2,C3,C4", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not found" in err and len(err.splitlines()) == 1
    ct = E.get_encoder("ctranspath")
    f = save_layouts(ct, standin(ct), tmp_path / "ct")["safetensors"]
    rc = main(["train", "--manifest", m, "--genes", str(g), "--out", str(tmp_path / "o2"), "--backbone", "uni",
               "--weights", str(f), "--sections", "C2,C3,C4", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "'ctranspath'" in err and len(err.splitlines()) == 1
