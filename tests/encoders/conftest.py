"""Helpers for the encoder tests: small randomly initialised stand-ins saved in every supported layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def standin(entry, seed: int = 0):
    from stimage_nb.models.encoders import build_module, standin_overrides

    torch.manual_seed(seed)
    return build_module(entry, standin_overrides(entry)).eval()


def hf_config(entry, overrides: dict) -> dict:
    """The config.json a Hugging Face download of this (resized) encoder would carry."""
    if entry.layout == "hf_dinov2":
        return {"architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": overrides["embed_dim"],
                "num_hidden_layers": overrides["depth"], "num_attention_heads": overrides["num_heads"],
                "patch_size": 16, "image_size": 224, "mlp_ratio": 4, "layer_norm_eps": 1e-6, "layerscale_value": 1e-5,
                "use_swiglu_ffn": False, "qkv_bias": True}
    return {"architecture": entry.architecture, "model_args": overrides,
            "pretrained_cfg": {"mean": list(entry.mean), "std": list(entry.std), "input_size": [3, entry.input_px, entry.input_px]}}


def save_layouts(entry, module, root: Path) -> dict:
    """The stand-in as a published-layout .safetensors, a published-layout .bin and a Hugging Face folder."""
    from safetensors.torch import save_file

    from stimage_nb.models.encoders import standin_overrides, to_published_layout

    root.mkdir(parents=True, exist_ok=True)
    pub = {k: v.detach().contiguous().clone() for k, v in to_published_layout(entry, module).items()}
    st = root / f"{entry.name}.safetensors"
    save_file(pub, str(st))
    binf = root / (entry.weights_files[0] if entry.weights_files[0].endswith((".bin", ".pth")) else f"{entry.name}.bin")
    binf = root / f"{entry.name}{binf.suffix}"
    torch.save({"model": pub} if entry.layout == "swin_v0.5" else pub, binf)
    folder = root / f"{entry.name}_hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config(entry, standin_overrides(entry))))
    name = entry.weights_files[0]
    if name.endswith(".safetensors"):
        save_file(pub, str(folder / name))
    else:
        torch.save({"model": pub} if entry.layout == "swin_v0.5" else pub, folder / name)
    return {"safetensors": st, "bin": binf, "folder": folder}


@pytest.fixture(scope="session")
def signatures():
    return json.loads((Path(__file__).parent / "published_signatures.json").read_text())
