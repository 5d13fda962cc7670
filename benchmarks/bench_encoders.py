"""Feature-extraction throughput of each registered pathology encoder (tiles/s), beside a model-only ceiling.

For every encoder of :mod:`stimage_nb.models.encoders`, one run measures

- **package**: the frozen fast path of training (``stimage_nb.train._raw_features``): real her2st tiles
  (uint8, already read and cached, at the encoder's own tile size and µm/px) on the device, converted
  and normalised with the encoder's mean/std, forward, pooled as the encoder's card says;
- **model-only**: the same module's forward on a batch of already normalised float tiles on the device;

and prints their ratio, plus the full-size encoder's parameters, fp32 weight size and GFLOPs per tile
(counted with :class:`torch.utils.flop_counter.FlopCounterMode` on the meta device: no memory).

    python benchmarks/bench_encoders.py                     # CPU: stand-ins with 2 blocks at full width
    python benchmarks/bench_encoders.py --device cuda        # GPU: the full-size encoders (bf16 autocast)

No weights are needed: the encoders are randomly initialised (the speed does not depend on the values).
On the CPU the stand-ins keep every encoder's width, patch size, tokens and pooling but run only
``--depth`` transformer blocks (Swin: stages of that depth); the "est. full" column scales the measured
rate by ``depth / full depth``, which ignores the patch embedding and pooling (an upper bound).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import stimage_nb  # noqa: E402,F401  (sets OMP_WAIT_POLICY before torch is imported)
from stimage_nb.devices import autocast, resolve_device, synchronize  # noqa: E402


def _rate(fn, n_tiles: int, dev, repeats: int) -> float:
    fn()  # warm-up (allocations, cuDNN/SDPA choices)
    synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(dev)
    return n_tiles * repeats / (time.perf_counter() - t0)


def full_size_cost(entry) -> dict:
    """Parameters, fp32 weight size and GFLOPs per tile of the full-size encoder (meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    from stimage_nb.models.encoders import meta_module, parameter_count

    m = meta_module(entry).eval()
    x = torch.empty(1, 3, entry.input_px, entry.input_px, device="meta")
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(x)
    n = parameter_count(m)
    return {"params": n, "weights_gb_fp32": round(n * 4 / 1e9, 2), "gflops_per_tile": round(fc.get_total_flops() / 1e9, 1),
            "blocks": _depth(entry)}


def _depth(entry) -> int:
    d = entry.kwargs.get("depth")
    if d is not None:
        return int(d)
    from stimage_nb.models.encoders import meta_module

    m = meta_module(entry).model
    trunk = getattr(m, "trunk", m)
    if hasattr(trunk, "blocks"):
        return len(trunk.blocks)
    return sum(len(s.blocks) for s in trunk.layers)  # Swin


def measure(entry, overrides, tiles, dev, bs: int, n_tiles: int, repeats: int) -> tuple[float, float, int]:
    """(package tiles/s, model-only tiles/s, feature width) of one encoder on ``tiles`` (uint8, host)."""
    from stimage_nb.models.encoders import build_module
    from stimage_nb.models.features import FeatureStack, TimmExtractor
    from stimage_nb.train import _raw_features

    torch.manual_seed(0)
    enc = build_module(entry, overrides).eval()
    stack = FeatureStack(["timm"], timm=TimmExtractor(enc, entry.name)).to(dev).eval()
    x_dev = tiles.to(dev)
    xf = torch.rand(bs, 3, entry.input_px, entry.input_px, device=dev)

    def package():
        _raw_features(stack, x_dev, views=1, batch_size=bs, amp=True)

    @torch.no_grad()
    def model_only():
        for _ in range(max(1, n_tiles // bs)):
            with autocast(dev):
                enc(xf)

    pk = _rate(package, n_tiles, dev, repeats)
    mo = _rate(model_only, max(1, n_tiles // bs) * bs, dev, repeats)
    return pk, mo, int(enc.num_features)


def main(argv=None) -> dict:
    from stimage_nb._settings import her2st_manifest
    from stimage_nb.io.readers import read_manifest
    from stimage_nb.models.encoders import get_encoder, list_encoders, standin_overrides
    from stimage_nb.tiles import extract_tiles

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--encoders", default=None, help="comma-separated registry names (default: all)")
    p.add_argument("--depth", type=int, default=None, help="blocks per stand-in (default: 2 on CPU, 0 = full on CUDA)")
    p.add_argument("--tiles", type=int, default=None, help="tiles per pass (default: 16 on CPU, 512 on CUDA)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 16 on CPU, 256 on CUDA")
    p.add_argument("--repeats", type=int, default=None, help="timed passes (default: 2 on CPU, 5 on CUDA)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    dev = resolve_device(a.device)
    gpu = dev.type == "cuda"
    depth = a.depth if a.depth is not None else (0 if gpu else 2)
    n_tiles = a.tiles or (512 if gpu else 16)
    bs = a.batch_size or (256 if gpu else 16)
    repeats = a.repeats or (5 if gpu else 2)
    entries = [get_encoder(n) for n in a.encoders.split(",")] if a.encoders else list_encoders()
    (sec,) = read_manifest(her2st_manifest(), ["C2"])
    xy = sec.xy[np.linspace(0, len(sec.xy) - 1, min(n_tiles, len(sec.xy))).astype(int)]
    xy = np.resize(xy, (n_tiles, 2))
    res = {"device": torch.cuda.get_device_name(dev) if gpu else f"cpu ({torch.get_num_threads()} threads)",
           "depth": depth or "full", "tiles": n_tiles, "batch_size": bs, "repeats": repeats, "encoders": {}}
    for e in entries:
        tiles = torch.from_numpy(np.ascontiguousarray(extract_tiles(sec.image, xy, e.tile_um, e.input_px, cache=True)))
        cost = full_size_cost(e)
        over = None
        if depth:
            width = e.kwargs.get("embed_dim") or {"vit_large_patch16_224": 1024, "vit_huge_patch14_224": 1280,
                                                  "vit_base_patch14_reg4_dinov2": 768, "vit_base_patch16_224": 768,
                                                  "vit_giant_patch14_reg4_dinov2": 1536,
                                                  "swin_tiny_patch4_window7_224": 96}[e.architecture]
            over = standin_overrides(e, width=width, depth=depth)
            if e.builder != "ctranspath":
                over["num_heads"] = e.kwargs.get("num_heads") or {1024: 16, 1280: 16, 768: 12, 1536: 24}[width]
            else:
                over["num_heads"] = [3, 6, 12, 24]
        pk, mo, feat_dim = measure(e, over, tiles, dev, bs, n_tiles, repeats)
        blocks = depth or cost["blocks"]
        row = {**cost, "blocks_run": blocks if e.builder != "ctranspath" or not depth else 4 * depth,
               "package_tiles_per_s": round(pk, 2), "model_only_tiles_per_s": round(mo, 2), "ratio": round(pk / mo, 3),
               "feature_dim": feat_dim, "input_px": e.input_px, "tile_um": e.tile_um}
        if depth:
            row["est_full_depth_tiles_per_s"] = round(pk * row["blocks_run"] / cost["blocks"], 3)
        res["encoders"][e.name] = row
        print(f"{e.name:14s} done: {pk:.2f} tiles/s (ratio {pk / mo:.2f})", flush=True)
        if gpu:
            torch.cuda.empty_cache()

    print(f"\ndevice: {res['device']}; blocks run: {res['depth']}; {n_tiles} real her2st C2 tiles per pass, batch {bs}")
    hdr = (f"{'encoder':14s}{'params':>9s}{'GB fp32':>8s}{'GFLOP/tile':>11s}{'blocks':>8s}{'package':>10s}"
           f"{'model-only':>11s}{'ratio':>7s}{'est. full':>10s}")
    print(hdr + "   (tiles/s)")
    for n, r in res["encoders"].items():
        est = f"{r['est_full_depth_tiles_per_s']:>10.3f}" if "est_full_depth_tiles_per_s" in r else f"{'':>10s}"
        print(f"{n:14s}{r['params'] / 1e6:>8.0f}M{r['weights_gb_fp32']:>8.2f}{r['gflops_per_tile']:>11.1f}"
              f"{r['blocks_run']:>4d}/{r['blocks']:<3d}{r['package_tiles_per_s']:>10.2f}{r['model_only_tiles_per_s']:>11.2f}"
              f"{r['ratio']:>7.2f}{est}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
