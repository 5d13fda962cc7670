"""Training: config/CLI, a real tiny run, resume after an interruption, cancellation, frozen path."""

from __future__ import annotations

import json
import threading

import _modelkit as kit
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stimage_nb.errors import StimageInputError
from stimage_nb.train import Callback, LossHistory, StopOnEvent, TrainConfig, TrainingCancelled, train


class _Interrupt(Callback):
    """Raise KeyboardInterrupt (as Ctrl-C or a killed kernel would) at the end of one epoch."""

    def __init__(self, member, epoch):
        self.member, self.epoch = member, epoch

    def on_epoch_end(self, state):
        if (state.member, state.epoch) == (self.member, self.epoch):
            raise KeyboardInterrupt


class _Count(Callback):
    def __init__(self):
        self.epochs, self.members = [], []

    def on_member_start(self, state):
        self.members.append(state.member)

    def on_epoch_end(self, state):
        self.epochs.append((state.member, state.epoch))


def _weights(run):
    return [load_file(str(run / f"member_{i}.safetensors")) for i in range(len(json.loads((run / "ensemble.json").read_text())["members"]))]


def _same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_config_from_cli_and_validation():
    from stimage_nb.cli import build_parser

    a = build_parser().parse_args(["train", "--manifest", "m.csv", "--genes", "g.txt", "--out", "o", "--members", "3",
                                   "--backbone", "test_resnet", "--epochs", "2", "--frozen", "--seed", "7",
                                   "--device", "cpu", "--weights", "none", "--val-sections", "C4"])
    cfg = TrainConfig.from_cli(a)
    default = TrainConfig()
    assert (cfg.members, cfg.backbone, cfg.epochs, cfg.frozen, cfg.seed, cfg.device) == (3, "test_resnet", 2, True, 7, "cpu")
    assert cfg.val_sections == ["C4"]
    assert (cfg.tile_um, cfg.out_px, cfg.lr) == (default.tile_um, default.out_px, default.lr)
    assert cfg.extractor == "timm"  # --backbone NAME --frozen: that backbone's frozen features
    a2 = build_parser().parse_args(["train", "--manifest", "m.csv", "--genes", "g.txt", "--out", "o"])
    assert TrainConfig.from_cli(a2) == TrainConfig()
    # the default is the offline recipe; --backbone NAME alone fine-tunes it with the fine-tuning defaults
    assert (default.frozen, default.extractor, default.rank, default.epochs, default.lr, default.weight_decay,
            default.stain, default.members) == (True, "kmeans+handcrafted", 8, 150, 3e-3, 1e-2, "macenko", 5)
    ft = TrainConfig.from_cli(build_parser().parse_args(["train", "--manifest", "m.csv", "--genes", "g.txt", "--out", "o",
                                                         "--backbone", "resnet18", "--weights", "none"]))
    assert (ft.frozen, ft.backbone, ft.rank, ft.stain, ft.epochs) == (False, "resnet18", 0, "macenko", 12)
    ex = TrainConfig.from_cli(build_parser().parse_args(["train", "--manifest", "m.csv", "--genes", "g.txt", "--out", "o",
                                                         "--extractor", "handcrafted", "--rank", "0", "--bagging",
                                                         "--stain", "none"]))
    assert (ex.frozen, ex.extractor, ex.rank, ex.bagging, ex.stain) == (True, "handcrafted", 0, True, "none")
    sz = TrainConfig.from_cli(build_parser().parse_args(["train", "--manifest", "m.csv", "--genes", "g.txt", "--out", "o",
                                                         "--batch-size", "64", "--lr", "1e-4", "--tile-um", "100",
                                                         "--out-px", "64"]))
    assert (sz.batch_size, sz.lr, sz.tile_um, sz.out_px, sz.frozen) == (64, 1e-4, 100.0, 64, True)
    pr = build_parser().parse_args(["predict", "--model", "r", "--manifest", "m.csv", "--out", "p", "--batch-size", "32"])
    assert pr.batch_size == 32
    with pytest.raises(StimageInputError, match="feature extractor"):
        TrainConfig(extractor="kmeans+sift")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(StimageInputError):
        TrainConfig(stain="reinhard")
    with pytest.raises(StimageInputError, match="unknown training settings"):
        TrainConfig.from_dict({"epochz": 3})


def test_tiny_run_writes_an_ensemble_and_histories():
    run = kit.tiny_run()
    cfg = json.loads((run / "ensemble.json").read_text())
    assert cfg["n_members"] == 3 and cfg["genes"] == kit.genes() and len(cfg["celltypes"]) == 8
    assert cfg["train_sections"] == ["C2", "C3"] and cfg["val_sections"] == ["C4"]
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["config"]["backbone"] == "test_resnet"
    for i in range(3):
        st = json.loads((run / "members" / f"m{i}" / "state.json").read_text())
        assert st["done"] and len(st["history"]) == 2
        assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in st["history"])
    # the bulky checkpoints are gone once the ensemble is saved; no pickle anywhere
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".safetensors"}
    assert not list((run / "members").rglob("*.safetensors"))
    # members differ (different seeds)
    w = _weights(run)
    assert not torch.equal(w[0]["nb.linear.weight"], w[1]["nb.linear.weight"])


def test_training_learns_on_real_data(tmp_path):
    """More epochs on the real tiles lower the training NLL below the per-gene-mean start."""
    secs = kit.sections(("C2", "C3", "C4"))
    hist = LossHistory()
    train(secs, genes=kit.genes(), out=tmp_path / "r", val_sections=["C4"],
          config=kit.tiny_config(members=1, epochs=6, lr=3e-3), callbacks=[hist], progress=False)
    tr = [r["train_loss"] for r in hist.rows]
    assert len(tr) >= 5 and min(tr[-3:]) < tr[0]


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    secs = kit.sections(("C2", "C3", "C4"))
    cfg = kit.tiny_config(members=2, epochs=3)
    kw = dict(genes=kit.genes(), val_sections=["C4"], config=cfg, progress=False)
    train(secs, out=tmp_path / "a", **kw)
    with pytest.raises(KeyboardInterrupt):
        train(kit.sections(("C2", "C3", "C4")), out=tmp_path / "b", callbacks=[_Interrupt(1, 0)], **kw)
    assert not (tmp_path / "b" / "ensemble.json").exists()
    st = json.loads((tmp_path / "b" / "members" / "m1" / "state.json").read_text())
    assert st["epoch"] == 0 and not st["done"]
    count = _Count()
    train(kit.sections(("C2", "C3", "C4")), out=tmp_path / "b", callbacks=[count], **kw)
    # member 0 was finished and is not retrained; member 1 continues with epochs 1 and 2
    assert count.epochs == [(1, 1), (1, 2)]
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    # running the same command again is a no-op that returns the saved ensemble
    again = _Count()
    ens = train(kit.sections(("C2", "C3", "C4")), out=tmp_path / "b", callbacks=[again], **kw)
    assert again.epochs == [] and ens.n_members == 2
    # another seed gives other weights; other settings in the same directory are refused
    with pytest.raises(StimageInputError, match="different settings.*seed"):
        train(kit.sections(("C2", "C3", "C4")), out=tmp_path / "b",
              **{**kw, "config": kit.tiny_config(members=2, epochs=3, seed=1)})


def _strict_json(path):
    """json.loads that refuses NaN/Infinity, as jq, JavaScript and other strict readers do."""
    def refuse(c):
        raise ValueError(f"{path.name}: non-standard JSON constant {c}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_run_without_validation_writes_strict_json_and_resumes(tmp_path):
    """No validation sections: the loss is NaN and the best score +inf. The state and ensemble JSON hold null
    there (readable by any JSON reader), and a resume reads null back as +inf/NaN: same weights."""
    kw = dict(genes=kit.genes(), val_sections=[], config=kit.tiny_config(members=1, epochs=2), progress=False)
    train(kit.sections(("C2", "C3")), out=tmp_path / "a", **kw)
    with pytest.raises(KeyboardInterrupt):
        train(kit.sections(("C2", "C3")), out=tmp_path / "b", callbacks=[_Interrupt(0, 0)], **kw)
    st = _strict_json(tmp_path / "b" / "members" / "m0" / "state.json")
    assert st["epoch"] == 0 and st["best_val"] is None and st["history"][0]["val_loss"] is None
    train(kit.sections(("C2", "C3")), out=tmp_path / "b", **kw)
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    st = _strict_json(tmp_path / "b" / "members" / "m0" / "state.json")
    assert st["done"] and [h["epoch"] for h in st["history"]] == [0, 1]
    ens = _strict_json(tmp_path / "b" / "ensemble.json")
    assert ens["members"][0]["best_val_loss"] is None  # +inf: nothing to keep by


def test_cancel_from_a_callback_then_resume(tmp_path):
    ev = threading.Event()

    class _SetAfterFirstEpoch(Callback):
        def on_epoch_end(self, state):
            if state.epoch == 0:
                ev.set()

    kw = dict(genes=kit.genes(), val_sections=["C4"], config=kit.tiny_config(members=1, epochs=2), progress=False)
    with pytest.raises(TrainingCancelled, match="resume"):
        train(kit.sections(), out=tmp_path / "c", callbacks=[_SetAfterFirstEpoch(), StopOnEvent(ev)], **kw)
    ens = train(kit.sections(), out=tmp_path / "c", **kw)
    st = json.loads((tmp_path / "c" / "members" / "m0" / "state.json").read_text())
    assert ens.n_members == 1 and [h["epoch"] for h in st["history"]] == [0, 1]


def test_frozen_backbone_fast_path_shares_features(tmp_path):
    kw = dict(genes=kit.genes(), val_sections=["C4"], progress=False)
    ens = train(kit.sections(), out=tmp_path / "f",
                config=kit.tiny_config(members=2, epochs=3, frozen=True, extractor="timm"), **kw)
    from stimage_nb.ensemble import Ensemble

    w = _weights(tmp_path / "f")
    assert not [k for k in w[0] if k.startswith("backbone.")]               # heads only in the member files
    (bfile,) = (tmp_path / "f").glob("backbone_*.safetensors")              # one frozen backbone, written once
    bb = load_file(str(bfile))
    assert not torch.equal(w[0]["nb.linear.weight"], w[1]["nb.linear.weight"])  # heads trained per member
    assert len(ens._groups()) == 1  # prediction computes the shared features once
    back = Ensemble.load(tmp_path / "f")
    assert back.members[0].backbone is back.members[1].backbone
    # the frozen backbone is the untrained one: same as a fresh frozen run's (one member: in its own file)
    ens2 = train(kit.sections(), out=tmp_path / "f2",
                 config=kit.tiny_config(members=1, epochs=1, frozen=True, extractor="timm"), **kw)
    w2 = _weights(tmp_path / "f2")
    assert bb and all(torch.equal(v, w2[0]["backbone." + k]) for k, v in bb.items())
    assert ens2.n_members == 1 and not list((tmp_path / "f2").glob("backbone_*"))


def test_bad_training_inputs(tmp_path):
    secs = kit.sections()
    with pytest.raises(StimageInputError, match="requested genes are not in the counts|missing"):
        train(secs, genes=kit.genes() + ["NOT_A_GENE"], out=tmp_path / "x", config=kit.tiny_config(), progress=False)
    with pytest.raises(StimageInputError, match="validation sections"):
        train(secs, genes=kit.genes(), out=tmp_path / "y", val_sections=["Z9"], config=kit.tiny_config(), progress=False)
    with pytest.raises(StimageInputError, match="cuda"):
        if torch.cuda.is_available():
            raise StimageInputError("cuda present; nothing to check")
        train(secs, genes=kit.genes(), out=tmp_path / "z", config=kit.tiny_config(device="cuda"), progress=False)


def test_mixed_backbones_and_hard_cell_labels(tmp_path):
    """Members may use different backbones; per-spot labels (no proportions) train the cell-type head."""
    from stimage_nb import _keys as K
    from stimage_nb.ensemble import Ensemble

    secs = kit.sections(("C2", "C3"))
    for s in secs:  # hard labels: the dominant cell type of each spot; NaN-free proportions removed
        props = s.adata.obsm.pop(K.CELLTYPE_PROPORTIONS)
        s.adata.obs[K.CELLTYPE_LABEL] = props.idxmax(axis=1).to_numpy()
    ens = train(secs, genes=kit.genes(), out=tmp_path / "mix", val_sections=["C3"],
                config=kit.tiny_config(backbone="test_resnet,test_efficientnet", members=2, epochs=1), progress=False)
    assert [m.backbone_name for m in ens.members] == ["test_resnet", "test_efficientnet"]
    assert set(ens.celltypes) == set(secs[0].adata.obs[K.CELLTYPE_LABEL]) | set(secs[1].adata.obs[K.CELLTYPE_LABEL])
    back = Ensemble.load(tmp_path / "mix")
    tiles = np.random.default_rng(0).integers(0, 255, (4, kit.OUT_PX, kit.OUT_PX, 3), dtype=np.uint8)
    a, b = ens.to("cpu").predict_tiles(tiles, stain_source=None), back.predict_tiles(tiles, stain_source=None)
    assert np.array_equal(a["mean"], b["mean"]) and np.all(a["epistemic_var"] > 0)


@pytest.mark.parametrize("drop", [False, True])
def test_a_run_refused_for_its_genes_leaves_nothing_behind(her2st_manifest, tmp_path, drop):
    """Genes the counts lack: the error names them (or, when dropping leaves none, says so, not 'no counts'),
    and the output folder is not created, so nothing half-written is left (not even the gene panel)."""
    genes = tmp_path / "genes.txt"
    genes.write_text("NOTAGENE1\nFAKEGENE2\n")
    out = tmp_path / "run"
    with pytest.raises(StimageInputError) as e:
        train(her2st_manifest, genes=str(genes), out=out, sections=["C4"], val_sections=["C5"],
              drop_missing_genes=drop, config=TrainConfig(epochs=1, members=1), progress=False)
    msg = str(e.value)
    assert ("none of the 2 requested genes" in msg) if drop else ("NOTAGENE1" in msg and "FAKEGENE2" in msg)
    assert "no section has counts" not in msg
    assert not out.exists()
