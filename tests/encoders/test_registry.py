"""The encoder registry: every entry's architecture against its published checkpoint, without the real weights.

Each entry is built on the meta device (no memory) and its tensors, in the published checkpoint's layout,
are compared with the key/shape signature written from the model cards (published_signatures.json);
a small randomly initialised stand-in of each family is saved in every supported layout (safetensors,
.bin, Hugging Face folder with config.json) and loaded back offline with identical outputs.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import save_layouts, standin

from stimage_nb.errors import StimageInputError, WeightsUnavailableError
from stimage_nb.models import create_backbone
from stimage_nb.models import encoders as E

NAMES = [e.name for e in E.list_encoders()]


def test_registry_holds_the_fields_encoders():
    want = {"uni", "uni2-h", "conch", "h-optimus-0", "h-optimus-1", "h0-mini", "virchow2", "phikon-v2",
            "prov-gigapath", "ctranspath"}
    assert want <= set(NAMES)
    for e in E.list_encoders():
        assert len(e.mean) == 3 and len(e.std) == 3 and all(0 < s < 1 for s in e.std)
        assert e.input_px in (224, 448) and 0.2 < e.um_per_px < 1.1 and e.tile_um == e.input_px * e.um_per_px
        assert e.output in E.OUTPUTS and e.layout in E.LAYOUTS and e.licence and e.source and e.weights_files
        assert json.loads(json.dumps(e.to_dict()))["name"] == e.name  # JSON-able, as ensemble.json records it
    # names, aliases and Hugging Face ids resolve; plain timm names do not
    assert E.get_encoder("UNI2_h").name == "uni2-h" and E.find_encoder("hf-hub:paige-ai/Virchow2").name == "virchow2"
    assert E.find_encoder("bioptimus/H-optimus-0").name == "h-optimus-0" and E.find_encoder("resnet18") is None
    with pytest.raises(StimageInputError, match="unknown encoder"):
        E.get_encoder("unii")


@pytest.mark.parametrize("name", NAMES)
def test_meta_architecture_matches_the_published_checkpoint(name, signatures):
    entry = E.get_encoder(name)
    module = E.meta_module(entry)
    assert next(module.parameters()).device.type == "meta"  # no memory
    expected = signatures[name]
    assert expected["layout"] == entry.layout
    pub = {k: list(v.shape) for k, v in E.to_published_layout(entry, module).items()}
    for key, shape in expected["keys"].items():
        assert key in pub, f"{name}: published key {key} missing"
        assert pub[key] == shape, f"{name}: {key} is {pub[key]}, the checkpoint has {shape}"
    for key in expected["absent"]:
        assert key not in pub, f"{name}: {key} is not in the published checkpoint"
    assert E.parameter_count(module) == expected["params"]
    assert module.num_features == entry.feature_dim
    # the published layout converts back to exactly the module's own tensors
    back = E.to_timm_layout(entry, E.to_published_layout(entry, module), module)
    own = module.model.state_dict()
    assert set(back) == set(own) and all(tuple(back[k].shape) == tuple(own[k].shape) for k in own)


def _randomise(module, seed=0):
    """Weights far from their initial values, so layer scales, norms and stems all matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan = p[0].numel() if p.ndim >= 2 else 1
            p.copy_(torch.randn(p.shape, generator=g) / fan ** 0.5 + (1.0 if name.endswith(("norm.weight", "gamma", "lambda1"))
                                                                   or ".norm" in name and name.endswith("weight") else 0.0))
        for name, b in module.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return module


@pytest.mark.parametrize("name", NAMES)
def test_standin_round_trips_in_every_layout(name, tmp_path):
    entry = E.get_encoder(name)
    src = _randomise(standin(entry))
    x = torch.rand(2, 3, entry.input_px, entry.input_px)
    with torch.no_grad():
        want = src(x)
    assert want.shape == (2, src.num_features)
    files = save_layouts(entry, src, tmp_path)
    over = E.standin_overrides(entry)
    for kind, path in files.items():
        torch.manual_seed(123)  # another random start that the weights must overwrite
        got = E.load_encoder(entry, path, overrides=None if kind == "folder" else over).eval()
        with torch.no_grad():
            assert torch.equal(got(x), want), f"{name} from {kind}"
        ws = got.weights_source
        wfile = path if path.is_file() else path / entry.weights_files[0]
        assert ws["files"] == {wfile.name: E.sha256_of(wfile)} and ws["sha256"] == E.sha256_of(wfile)
        assert list(got.pretrained_cfg["mean"]) == list(entry.mean) and got.pretrained_cfg["input_size"][-1] == entry.input_px
    # what the package writes for its own ensembles (timm layout) loads too
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(tmp_path / "own.safetensors"))
    got = E.load_encoder(entry, tmp_path / "own.safetensors", overrides=over).eval()
    with torch.no_grad():
        assert torch.equal(got(x), want)


def _hf_dinov2_reference(sd, x, heads, eps=1e-6):
    """transformers' Dinov2Model forward (CLS of last_hidden_state), written out in plain torch."""
    w, b = sd["embeddings.patch_embeddings.projection.weight"], sd["embeddings.patch_embeddings.projection.bias"]
    t = F.conv2d(x, w, b, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    h = torch.cat([sd["embeddings.cls_token"].expand(len(x), -1, -1), t], 1) + sd["embeddings.position_embeddings"]
    d = h.shape[-1]
    i = 0
    while f"encoder.layer.{i}.norm1.weight" in sd:
        g = {k[len(f"encoder.layer.{i}."):]: v for k, v in sd.items() if k.startswith(f"encoder.layer.{i}.")}
        y = F.layer_norm(h, (d,), g["norm1.weight"], g["norm1.bias"], eps)
        q, k, v = (F.linear(y, g[f"attention.attention.{n}.weight"], g[f"attention.attention.{n}.bias"])
                   .view(len(x), -1, heads, d // heads).transpose(1, 2) for n in ("query", "key", "value"))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, -1) @ v
        a = F.linear(a.transpose(1, 2).reshape(len(x), -1, d), g["attention.output.dense.weight"],
                     g["attention.output.dense.bias"])
        h = h + a * g["layer_scale1.lambda1"]
        y = F.layer_norm(h, (d,), g["norm2.weight"], g["norm2.bias"], eps)
        y = F.linear(F.gelu(F.linear(y, g["mlp.fc1.weight"], g["mlp.fc1.bias"])), g["mlp.fc2.weight"], g["mlp.fc2.bias"])
        h = h + y * g["layer_scale2.lambda1"]
        i += 1
    return F.layer_norm(h, (d,), sd["layernorm.weight"], sd["layernorm.bias"], eps)[:, 0]


def test_phikon_v2_hf_checkpoint_equals_the_transformers_computation(tmp_path):
    entry = E.get_encoder("phikon-v2")
    src = _randomise(standin(entry), seed=5)
    files = save_layouts(entry, src, tmp_path)
    from safetensors.torch import load_file

    sd = load_file(str(files["folder"] / "model.safetensors"))
    assert "embeddings.mask_token" in sd and not any(k.startswith("blocks.") for k in sd)
    x = torch.rand(3, 3, 224, 224)
    got = E.load_encoder("phikon-v2", files["folder"]).eval()
    with torch.no_grad():
        assert torch.allclose(got(x), _hf_dinov2_reference(sd, x, heads=E.standin_overrides(entry)["num_heads"]),
                              atol=1e-4, rtol=1e-4)


def test_conch_pooler_equals_a_plain_torch_computation(tmp_path):
    import timm

    entry = E.get_encoder("conch")
    src = _randomise(standin(entry), seed=7)
    files = save_layouts(entry, src, tmp_path)
    from safetensors.torch import load_file

    sd = load_file(str(files["safetensors"]))
    over = E.standin_overrides(entry)
    # CONCH's trunk: a timm VisionTransformer whose forward is forward_features (coca_model.py)
    trunk = timm.create_model("vit_base_patch16_224", num_classes=0, img_size=448, dynamic_img_size=True,
                              embed_dim=over["embed_dim"], depth=over["depth"], num_heads=over["num_heads"]).eval()
    trunk.load_state_dict({k[len("visual.trunk."):]: v for k, v in sd.items() if k.startswith("visual.trunk.")})
    p = {k[len("visual.attn_pool_contrast."):]: v for k, v in sd.items() if k.startswith("visual.attn_pool_contrast.")}
    x = torch.rand(2, 3, 448, 448)
    with torch.no_grad():
        tok = trunk.forward_features(x)
        kv = F.layer_norm(tok, (tok.shape[-1],), p["ln_k.weight"], p["ln_k.bias"])
        q = F.layer_norm(p["query"], (p["query"].shape[-1],), p["ln_q.weight"], p["ln_q.bias"])
        bq, bk, bv = p["attn.in_proj_bias"].chunk(3)
        heads, d = over["pool_heads"], q.shape[-1]
        Q = F.linear(q, p["attn.q_proj_weight"], bq).view(1, heads, d // heads).transpose(0, 1)
        K = F.linear(kv, p["attn.k_proj_weight"], bk).view(len(x), -1, heads, d // heads).transpose(1, 2)
        V = F.linear(kv, p["attn.v_proj_weight"], bv).view(len(x), -1, heads, d // heads).transpose(1, 2)
        a = torch.softmax(Q @ K.transpose(-1, -2) / (d // heads) ** 0.5, -1) @ V  # (n, heads, 1, d/heads)
        pooled = F.linear(a.transpose(1, 2).reshape(len(x), d), p["attn.out_proj.weight"], p["attn.out_proj.bias"])
        ref = F.layer_norm(pooled, (d,), sd["visual.ln_contrast.weight"], sd["visual.ln_contrast.bias"])
        got = E.load_encoder("conch", files["safetensors"], overrides=over).eval()(x)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_ctranspath_published_buffers_are_recomputed_and_downsample_moves(tmp_path):
    entry = E.get_encoder("ctranspath")
    src = _randomise(standin(entry), seed=3)
    files = save_layouts(entry, src, tmp_path)
    raw = torch.load(files["bin"], weights_only=True)["model"]
    assert "layers.0.downsample.reduction.weight" in raw and "layers.0.blocks.1.attn_mask" in raw
    got = E.load_encoder(entry, files["bin"], overrides=E.standin_overrides(entry))
    # timm downsamples at the start of the next stage: the published stage-0 merge is timm's stage 1
    assert torch.equal(got.model.state_dict()["layers.1.downsample.reduction.weight"],
                       raw["layers.0.downsample.reduction.weight"])
    with pytest.raises(StimageInputError, match="224 px"):
        got(torch.rand(1, 3, 112, 112))


@pytest.mark.parametrize("name", NAMES)
def test_full_size_signatures_are_identified(name):
    sig = {k: tuple(v.shape) for k, v in E.meta_module(E.get_encoder(name)).model.state_dict().items()}
    ranked = dict(E.identify(sig, top=len(NAMES)))
    # some share the architecture (H-optimus-0/-1; UNI and Phikon-v2 in timm's layout): a tie at the top is right
    assert ranked[name] == max(ranked.values()) == 1.0
    pub = {k: tuple(v.shape) for k, v in E.to_published_layout(E.get_encoder(name), E.meta_module(E.get_encoder(name))).items()}
    assert E.identify({"module." + k: s for k, s in pub.items()})[0][1] == 1.0  # wrapped and published layouts too


def test_weights_that_do_not_fit_name_the_encoder_they_belong_to(tmp_path):
    ct = E.get_encoder("ctranspath")
    files = save_layouts(ct, standin(ct), tmp_path / "ct")
    with pytest.raises(WeightsUnavailableError, match=r"do not fit UNI.*look like the registered encoder 'ctranspath'"):
        E.load_encoder("uni", files["safetensors"], overrides=E.standin_overrides(E.get_encoder("uni")))
    vir = E.get_encoder("virchow2")
    files = save_layouts(vir, standin(vir), tmp_path / "v")
    with pytest.raises(WeightsUnavailableError, match="do not fit UNI"):
        E.load_encoder("uni", files["folder"])


def test_bin_files_are_read_without_running_pickled_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    f = tmp_path / "evil.bin"
    torch.save({"pos_embed": torch.zeros(1), "x": Evil()}, f)
    with pytest.raises(WeightsUnavailableError, match="pickled Python objects"):
        E.load_encoder("uni", f)
    assert not marker.exists()


def test_hf_hub_name_with_local_weights_builds_offline(monkeypatch, tmp_path):
    """`--backbone hf-hub:bioptimus/H-optimus-0 --weights FOLDER` needs no hub (it used to fail offline)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_cache"))
    entry = E.get_encoder("h-optimus-0")
    src = _randomise(standin(entry), seed=2)
    files = save_layouts(entry, src, tmp_path)
    x = torch.rand(1, 3, 224, 224)
    for name in ("hf-hub:bioptimus/H-optimus-0", "h-optimus-0"):
        bb = create_backbone(name, files["folder"]).eval()
        with torch.no_grad():
            assert torch.equal(bb(x), src(x))
        assert bb.pretrained_cfg["mean"] == entry.mean
    # an hf-hub model outside the registry: its folder's config.json builds it offline too
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "test_vit", "model_args": {},
                                                    "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model("test_vit", num_classes=0).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "model.safetensors"))
    bb = create_backbone("hf-hub:someone/not-registered", folder).eval()
    xx = torch.rand(1, 3, 160, 160)
    assert torch.equal(bb(xx), ref(xx)) and tuple(bb.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
    with pytest.raises(WeightsUnavailableError, match="pass the downloaded Hugging Face folder|Pass the downloaded"):
        create_backbone("hf-hub:someone/not-registered", folder / "model.safetensors", hub_timeout=1.0)


@pytest.mark.parametrize("name", NAMES)
def test_gpu_code_path_on_the_cpu(name, monkeypatch):
    """The frozen feature pass a GPU takes (bf16 autocast, channels_last; stimage_nb.devices), on each family."""
    from stimage_nb.models.features import FeatureStack, TimmExtractor
    from stimage_nb.train import _raw_features

    entry = E.get_encoder(name)
    stack = FeatureStack(["timm"], timm=TimmExtractor(_randomise(standin(entry), seed=4), name)).eval()
    tiles = (torch.rand(3, entry.input_px, entry.input_px, 3) * 255).to(torch.uint8)
    ref = _raw_features(stack, tiles, views=1, batch_size=2, amp=False)[0]
    monkeypatch.setenv("STIMAGE_NB_CPU_FAST_PATHS", "1")
    fast = _raw_features(stack, tiles, views=1, batch_size=2, amp=True)[0]
    assert fast.dtype == torch.float32 and fast.shape == ref.shape
    rel = (fast - ref).norm() / ref.norm()
    assert rel < 0.05, f"{name}: bf16 features differ by {rel:.3f}"
