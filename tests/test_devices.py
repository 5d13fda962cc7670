"""The device policy, and the GPU's mixed-precision code path run on the CPU.

No GPU is lent to CI. ``STIMAGE_NB_CPU_FAST_PATHS=1`` makes the CPU take the code path a GPU takes
(bf16 autocast, channels_last tensors and weights), so these tests check that path's dtypes, memory
layouts, checkpoints and resume on real tiles, and that its predictions agree with float32 ones.
"""

from __future__ import annotations

import json

import _modelkit as kit
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_ensemble import _c4_tiles
from test_train import _Interrupt, _same, _weights

from stimage_nb.augment import to_float
from stimage_nb.devices import (
    CPU_FAST_PATHS_ENV,
    OUT_OF_MEMORY,
    autocast,
    channels_last,
    fast_paths,
    for_batches,
    resolve_device,
)
from stimage_nb.ensemble import Ensemble
from stimage_nb.errors import StimageInputError
from stimage_nb.train import train


@pytest.fixture
def gpu_path(monkeypatch):
    monkeypatch.setenv(CPU_FAST_PATHS_ENV, "1")


def _is_channels_last(t: torch.Tensor) -> bool:
    """Laid out NHWC (a tensor with one channel or a 1x1 plane is both layouts at once)."""
    trivial = t.ndim == 4 and (t.shape[1] == 1 or t.shape[2] * t.shape[3] == 1)
    return t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last) and (trivial or not t.is_contiguous())


def test_policy_is_off_on_the_cpu_and_on_with_the_switch(monkeypatch):
    monkeypatch.delenv(CPU_FAST_PATHS_ENV, raising=False)
    lin = torch.nn.Linear(8, 4)
    x = torch.rand(5, 8)
    assert not fast_paths("cpu") and not channels_last("cpu")
    with autocast("cpu"):
        assert lin(x).dtype == torch.float32
    assert not _is_channels_last(to_float(torch.zeros(2, 16, 16, 3, dtype=torch.uint8)))
    monkeypatch.setenv(CPU_FAST_PATHS_ENV, "1")
    assert fast_paths("cpu") and channels_last("cpu") and not channels_last("cpu", enabled=False)
    with autocast("cpu"):
        assert lin(x).dtype == torch.bfloat16
    with autocast("cpu", enabled=False):
        assert lin(x).dtype == torch.float32
    assert _is_channels_last(to_float(torch.zeros(2, 16, 16, 3, dtype=torch.uint8)))
    assert resolve_device("auto").type in ("cpu", "cuda") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(StimageInputError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(StimageInputError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_mixed_precision_prediction_agrees_with_float32(gpu_path, monkeypatch):
    tiles = _c4_tiles()
    monkeypatch.delenv(CPU_FAST_PATHS_ENV)
    ref = Ensemble.load(kit.tiny_run(), "cpu").predict_tiles(tiles)
    monkeypatch.setenv(CPU_FAST_PATHS_ENV, "1")
    ens = Ensemble.load(kit.tiny_run(), "cpu")
    convs = [m for m in ens.members[0].modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(_is_channels_last(c.weight) for c in convs)
    got = ens.predict_tiles(tiles)
    for k, v in got.items():
        assert v.dtype == np.float32 and np.isfinite(v).all(), k
    # bf16 really ran (not bit-identical), and it changes the predictions by far less than they vary
    assert not np.array_equal(got["mean"], ref["mean"])
    rel = np.abs(got["mean"] - ref["mean"]) / ref["mean"]
    assert np.median(rel) < 5e-3 and rel.max() < 0.05, (np.median(rel), rel.max())
    assert np.corrcoef(np.log(got["mean"]).ravel(), np.log(ref["mean"]).ravel())[0, 1] > 0.99
    assert np.abs(got["celltype_mean"] - ref["celltype_mean"]).max() < 0.02
    assert (got["epistemic_var"] >= 0).all() and (got["aleatoric_var"] >= got["mean"]).all()
    # the unchanged-input guarantee holds on this path too: identical members, exactly zero epistemic
    one = Ensemble([ens.members[0]] * 3, genes=ens.genes, celltypes=ens.celltypes, tile_um=ens.tile_um,
                   out_px=ens.out_px, stain=ens.stain).predict_tiles(tiles)
    assert np.all(one["epistemic_var"] == 0.0)


def test_fine_tuning_on_the_gpu_code_path_checkpoints_and_resumes(gpu_path, tmp_path):
    """Fine-tuning under bf16 autocast with channels_last weights: finite losses, float32 contiguous
    safetensors, a bit-identical resume after an interruption, a model that loads without the switch."""
    secs = lambda: kit.sections(("C2", "C3", "C4"))  # noqa: E731
    cfg = kit.tiny_config(members=2, epochs=2)
    kw = dict(genes=kit.genes(), val_sections=["C4"], config=cfg, progress=False)
    train(secs(), out=tmp_path / "a", **kw)
    with pytest.raises(KeyboardInterrupt):
        train(secs(), out=tmp_path / "b", callbacks=[_Interrupt(1, 0)], **kw)
    ck = json.loads((tmp_path / "b" / "members" / "m1" / "state.json").read_text())
    ck_w = load_file(str(tmp_path / "b" / "members" / "m1" / ck["model_file"]))
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in ck_w.values() if v.is_floating_point())
    train(secs(), out=tmp_path / "b", **kw)
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    for i in range(2):
        hist = json.loads((tmp_path / "a" / "members" / f"m{i}" / "state.json").read_text())["history"]
        assert len(hist) == 2 and all(np.isfinite([h["train_loss"], h["val_loss"], h["val_pearson"]]).all()
                                      for h in hist)
    w = _weights(tmp_path / "a")[0]
    assert all(v.dtype == torch.float32 for v in w.values() if v.is_floating_point())
    assert any(v.ndim == 4 for v in w.values())  # conv weights were saved (from channels_last params)


def test_frozen_default_recipe_on_the_gpu_code_path(gpu_path, tmp_path, monkeypatch):
    """The offline default (frozen k-means + handcrafted features) takes channels_last views under
    autocast; its features are computed in float32, so its predictions match the plain CPU run."""
    secs = lambda: kit.sections(("C2", "C3", "C4"))  # noqa: E731
    cfg = kit.tiny_frozen_config(members=1, epochs=3)
    kw = dict(genes=kit.genes(), val_sections=["C4"], config=cfg, progress=False)
    fast = train(secs(), out=tmp_path / "fast", **kw).predict_tiles(_c4_tiles())
    monkeypatch.delenv(CPU_FAST_PATHS_ENV)
    plain = train(secs(), out=tmp_path / "plain", **kw).predict_tiles(_c4_tiles())
    assert np.isfinite(fast["mean"]).all()
    np.testing.assert_allclose(fast["mean"], plain["mean"], rtol=1e-4)


# ------------------------------------------------------------------ running out of device memory
def _oom_above(limit: int, fn):
    """Wrap ``fn(x, ...)`` to raise the real out-of-memory error on batches larger than ``limit``
    (what a GPU raises; the CPU cannot be made to run out of memory safely in a test)."""
    calls = []

    def wrapped(x, *a, **k):
        calls.append(x.shape[0])
        if x.shape[0] > limit:
            raise OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 2.00 GiB")
        return fn(x, *a, **k)

    return wrapped, calls


def test_for_batches_halves_after_out_of_memory_and_keeps_going(caplog):
    seen = []

    def fn(i, j):
        if j - i > 8:
            raise OUT_OF_MEMORY("CUDA out of memory")
        seen.append((i, j))

    for_batches(fn, 50, 32, "cpu", "test")
    assert seen[0] == (0, 8) and all(j - i <= 8 for i, j in seen)
    assert [i for i, _ in seen] == list(range(0, 50, 8)) and seen[-1][1] == 50  # every item once, in order
    assert "retrying with 16" in caplog.text and "retrying with 8" in caplog.text
    with pytest.raises(StimageInputError, match="one tile does not fit"):
        for_batches(lambda i, j: (_ for _ in ()).throw(OUT_OF_MEMORY("oom")), 3, 4, "cpu", "test")
    with pytest.raises(ValueError):  # other errors are not swallowed
        for_batches(lambda i, j: (_ for _ in ()).throw(ValueError("bad")), 3, 4, "cpu", "test")


def test_prediction_retries_smaller_batches_with_the_same_result(caplog):
    tiles = _c4_tiles()
    ens = Ensemble.load(kit.tiny_run(), "cpu")
    ref = ens.predict_tiles(tiles, batch_size=64)
    for m in ens.members:
        m.features, calls = _oom_above(16, m.features)
    got = ens.predict_tiles(tiles, batch_size=64)
    assert "out of memory on cpu with batches of 64; retrying with 32" in caplog.text
    assert max(calls[-3:]) <= 16
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert ens.features(tiles, batch_size=64).shape == (len(tiles), ens.members[0].feat_dim)


def test_training_out_of_memory_names_the_fix(tmp_path, monkeypatch):
    from stimage_nb.models.model import STModel

    orig = STModel.features
    monkeypatch.setattr(STModel, "features",
                        lambda self, x: (_ for _ in ()).throw(OUT_OF_MEMORY("CUDA out of memory"))
                        if self.training else orig(self, x))
    with pytest.raises(StimageInputError, match=r"out of memory.*batches of 16.*--batch-size \(e.g. 8\)") as e:
        train(kit.sections(("C2", "C3", "C4")), genes=kit.genes(), out=tmp_path / "r", val_sections=["C4"],
              config=kit.tiny_config(members=1, epochs=1), progress=False)
    assert isinstance(e.value.__cause__, OUT_OF_MEMORY)
