"""Ensemble uncertainty decomposition and safetensors + JSON persistence (real tiles, tiny trained members)."""

from __future__ import annotations

import copy
import functools
import json

import _modelkit as kit
import numpy as np
import pytest
import torch

from stimage_nb.ensemble import Ensemble
from stimage_nb.errors import StimageInputError
from stimage_nb.tiles import extract_tiles


@functools.lru_cache(maxsize=None)
def _c4_tiles() -> np.ndarray:
    s = kit.sections(("C4",))[0]
    return extract_tiles(s.image, s.xy, 150.0, kit.OUT_PX)


@pytest.fixture(scope="module")
def ens():
    return Ensemble.load(kit.tiny_run(), "cpu")


def test_identical_members_have_exactly_zero_epistemic_variance(ens):
    m = ens.members[1]
    same = Ensemble([m, copy.deepcopy(m), copy.deepcopy(m), copy.deepcopy(m), copy.deepcopy(m)], genes=ens.genes,
                    celltypes=ens.celltypes, tile_um=ens.tile_um, out_px=ens.out_px, stain=ens.stain)
    single = Ensemble([m], genes=ens.genes, celltypes=ens.celltypes, tile_um=ens.tile_um, out_px=ens.out_px,
                      stain=ens.stain)
    p, p1 = same.predict_tiles(_c4_tiles()), single.predict_tiles(_c4_tiles())
    assert np.all(p["epistemic_var"] == 0.0) and np.all(p["celltype_std"] == 0.0)
    assert np.all(p["aleatoric_var"] > 0)
    assert np.array_equal(p["mean"], p1["mean"]) and np.array_equal(p["aleatoric_var"], p1["aleatoric_var"])


def test_different_seeds_give_positive_epistemic_variance_and_the_mixture_decomposition(ens):
    tiles = _c4_tiles()
    p = ens.predict_tiles(tiles)
    assert np.all(p["epistemic_var"] > 0)
    assert np.all(p["celltype_std"].sum(1) > 0)
    assert np.allclose(p["celltype_mean"].sum(1), 1.0, atol=1e-5)
    # recompute from the members: mean of means, mean of NB variances, variance of means
    from stimage_nb.augment import to_float

    x = to_float(ens.stain.transform(tiles))
    mus, vs = [], []
    with torch.no_grad():
        for m in ens.members:
            o = m(x)
            mu, th = torch.exp(o.log_mu.double()), torch.exp(o.log_theta.double())
            mus.append(mu)
            vs.append(mu + mu ** 2 / th)
    mus = torch.stack(mus)
    assert np.allclose(p["mean"], mus.mean(0).numpy(), rtol=1e-5)
    assert np.allclose(p["aleatoric_var"], torch.stack(vs).mean(0).numpy(), rtol=1e-5)
    assert np.allclose(p["epistemic_var"], mus.var(0, correction=0).numpy(), rtol=1e-4, atol=1e-12)
    # the predictive mean is on the count scale of the training data (per-gene means of C2+C3)
    tr = np.concatenate([s.adata.X.toarray() for s in kit.sections(("C2", "C3"))])
    ratio = p["mean"].mean(0) / np.maximum(tr.mean(0), 1e-3)
    assert np.median(ratio) > 0.3 and np.median(ratio) < 3


def test_save_load_round_trip_is_identical_on_cpu(ens, tmp_path):
    d = ens.save(tmp_path / "copy")
    back = Ensemble.load(d, "cpu")
    tiles = _c4_tiles()
    a, b = ens.predict_tiles(tiles), back.predict_tiles(tiles)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    cfg = json.loads((d / "ensemble.json").read_text())
    for key in ("genes", "celltypes", "tile_um", "out_px", "um_per_px_handling", "stain_normalization", "versions",
                "train_sections", "members", "weights_sha256", "run_id"):
        assert key in cfg, key
    assert cfg["stain_normalization"]["method"] == "macenko" and len(cfg["stain_normalization"]["target_he"]) == 3
    assert {"torch", "timm", "stimage_nb"} <= set(cfg["versions"])
    assert cfg["members"][0]["backbone"] == "test_resnet" and len(cfg["members"][0]["sha256"]) == 64
    assert sorted(p.name for p in d.iterdir()) == ["domain.safetensors", "ensemble.json"] + [
        f"member_{i}.safetensors" for i in range(3)]  # fine-tuned members: each its own backbone
    assert cfg["domain"]["reference"] == "validation sections C4" and "domain_distance" in a


def test_load_refuses_corrupt_or_unfinished_models(ens, tmp_path):
    d = ens.save(tmp_path / "m")
    f = d / "member_1.safetensors"
    f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(StimageInputError, match="sha256"):
        Ensemble.load(d)
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "run.json").write_text("{}")
    with pytest.raises(StimageInputError, match="resume"):
        Ensemble.load(tmp_path / "unfinished")
    with pytest.raises(StimageInputError, match="trained on 32 px tiles"):
        ens.predict_tiles(np.zeros((2, 48, 48, 3), np.uint8))


def test_a_shared_backbone_is_written_once_and_shared_after_loading(ens, tmp_path):
    """Members on one frozen backbone (e.g. a foundation model): one backbone file, heads-only members."""
    from safetensors.torch import load_file, save_file

    members = [copy.deepcopy(m) for m in ens.members]
    for m in members[1:]:
        m.backbone = members[0].backbone
    shared = Ensemble(members, genes=ens.genes, celltypes=ens.celltypes, tile_um=ens.tile_um, out_px=ens.out_px,
                      stain=ens.stain)
    d = shared.save(tmp_path / "shared")
    bfiles = sorted(d.glob("backbone_*.safetensors"))
    assert len(bfiles) == 1 and sorted(p.name for p in d.glob("member_*")) == [f"member_{i}.safetensors" for i in range(3)]
    for i in range(3):
        assert not [k for k in load_file(str(d / f"member_{i}.safetensors")) if k.startswith("backbone.")]
    back = Ensemble.load(d, "cpu")
    assert back.members[1].backbone is back.members[0].backbone is back.members[2].backbone
    tiles = _c4_tiles()
    a, b = shared.predict_tiles(tiles), back.predict_tiles(tiles)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert np.all(a["epistemic_var"] > 0)  # the heads still differ
    # re-saving the same ensemble keeps one backbone file; a tampered one is refused
    back.save(d)
    assert sorted(d.glob("backbone_*.safetensors")) == bfiles
    bfiles[0].write_bytes(bfiles[0].read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(StimageInputError, match="sha256"):
        Ensemble.load(d)
    # a format-1 directory (each member file holding its whole model) still loads
    cfg = json.loads((d / "ensemble.json").read_text())
    cfg["format_version"] = 1
    for i, e in enumerate(cfg["members"]):
        e.pop("file")
        save_file({k: v.contiguous() for k, v in members[i].state_dict().items()}, str(d / f"v1_{i}.safetensors"))
        e.pop("backbone_file"), e.pop("backbone_file_sha256"), e.pop("sha256")
        e["file"] = f"v1_{i}.safetensors"
    (d / "ensemble.json").write_text(json.dumps(cfg))
    old = Ensemble.load(d, "cpu")
    c = old.predict_tiles(tiles)
    assert all(np.array_equal(a[k], c[k]) for k in a)
    cfg["format_version"] = 99
    (d / "ensemble.json").write_text(json.dumps(cfg))
    with pytest.raises(StimageInputError, match="newer stimage_nb"):
        Ensemble.load(d)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_on_gpu_matches_cpu(ens):
    gpu = Ensemble.load(kit.tiny_run(), "cuda")
    a, b = ens.predict_tiles(_c4_tiles()), gpu.predict_tiles(_c4_tiles(), amp=False)
    assert np.allclose(a["mean"], b["mean"], rtol=1e-3)
