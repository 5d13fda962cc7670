"""End-to-end training and prediction throughput next to the model-only step, in one run.

End-to-end numbers start from the OME-Zarr pyramids of real her2st sections: tiles are read and
resampled (the on-disk tile cache is pointed at an empty temporary folder so every tile is really
read), stain-normalised, moved to the device and augmented there, then

- training: ``stimage_nb.train.train`` (one member, no validation, checkpoints every epoch);
- prediction: ``stimage_nb.predict.predict_section`` with an N-member ensemble (streamed chunks,
  background reading, AnnData assembly).

The model-only numbers run the same model(s) on tensors already on the device (no reading, no
augmentation, no checkpoints). The ratio end-to-end / model-only says how busy the pipeline keeps
the device.

    python benchmarks/bench_throughput.py                    # CPU: a small run (C2, 96 spots)
    python benchmarks/bench_throughput.py --device cuda      # GPU: all six sections, 5 members

Counts files are read before timing starts (they are not part of the image pipeline).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import stimage_nb  # noqa: E402,F401  (sets OMP_WAIT_POLICY before torch is imported)
from stimage_nb.devices import autocast, channels_last, resolve_device, synchronize  # noqa: E402


def _calls_per_s(fn, n_calls: int, dev, warmup: int = 1) -> float:
    """Calls of ``fn`` per second after ``warmup`` calls, the device synchronised around the timing."""
    for _ in range(warmup):
        fn()
    synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(n_calls):
        fn()
    synchronize(dev)
    return n_calls / (time.perf_counter() - t0)


def model_only_train(cfg, n_genes, n_types, n_steps, dev) -> float:
    """Training steps/s x batch on in-memory device tensors (same model, loss and optimizer)."""
    from stimage_nb.models.backbone import create_backbone
    from stimage_nb.models.heads import soft_cross_entropy
    from stimage_nb.models.model import STModel
    from stimage_nb.models.nb import nb_nll

    m = STModel(create_backbone(cfg.backbone.split(",")[0], "none"), n_genes, n_types,
                backbone_name=cfg.backbone).to(dev).train()
    cl = channels_last(dev, cfg.channels_last)
    if cl:
        m.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    bs = cfg.batch_size
    x = torch.rand(bs, 3, cfg.out_px, cfg.out_px, device=dev)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.poisson(torch.full((bs, n_genes), 3.0, device=dev))
    t = torch.softmax(torch.randn(bs, max(n_types, 1), device=dev), 1)

    def step():
        with autocast(dev, cfg.amp):
            f = m.features(x)
        o = m.heads(f.float())
        loss = nb_nll(y, o.log_mu, o.log_theta)
        if o.logits is not None:
            loss = loss + soft_cross_entropy(o.logits, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return bs * _calls_per_s(step, n_steps, dev, warmup=3)


def model_only_predict(ens, n_tiles, batch_size, dev) -> float:
    """Tiles/s of the ensemble's members' forward passes on in-memory device tensors."""
    x = torch.rand(batch_size, 3, ens.out_px, ens.out_px, device=dev)
    if channels_last(dev):
        x = x.contiguous(memory_format=torch.channels_last)
    n_batches = max(1, n_tiles // batch_size)

    @torch.no_grad()
    def run():
        for m in ens.members:
            with autocast(dev):
                o = m(x)
            torch.exp(o.log_mu.double())

    return batch_size * _calls_per_s(run, n_batches, dev, warmup=1)


def main(argv=None) -> dict:
    from stimage_nb import tiles as tiles_mod
    from stimage_nb._settings import her2st_manifest
    from stimage_nb.ensemble import Ensemble
    from stimage_nb.io.readers import read_gene_list, read_manifest
    from stimage_nb.models.backbone import create_backbone
    from stimage_nb.models.model import STModel
    from stimage_nb.predict import predict_section
    from stimage_nb.stain import MacenkoNormalizer
    from stimage_nb.train import TrainConfig, train

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--backbone", default=None, help="default: TrainConfig's")
    p.add_argument("--out-px", type=int, default=None)
    p.add_argument("--tile-um", type=float, default=None)
    p.add_argument("--sections", default=None, help="default: C2 on CPU, all six on CUDA")
    p.add_argument("--max-spots", type=int, default=None, help="spots per section (default: 96 on CPU, all on CUDA)")
    p.add_argument("--genes", type=int, default=769, help="first N genes of the STimage list")
    p.add_argument("--epochs", type=int, default=None, help="default: 2 on CPU, 5 on CUDA")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 256 on CUDA")
    p.add_argument("--members", type=int, default=5, help="ensemble size for prediction")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    dev = resolve_device(a.device)
    gpu = dev.type == "cuda"
    base = TrainConfig()
    cfg = TrainConfig(backbone=a.backbone or base.backbone, out_px=a.out_px or base.out_px,
                      tile_um=a.tile_um or base.tile_um, epochs=a.epochs or (5 if gpu else 2),
                      batch_size=a.batch_size or (256 if gpu else 32), members=1, device=str(dev), patience=100)
    names = a.sections.split(",") if a.sections else (["B4", "C2", "C3", "C4", "C5", "C6"] if gpu else ["C2"])
    max_spots = a.max_spots or (None if gpu else 96)
    genes = read_gene_list(her2st_manifest().parent / "genes_stimage_her2st.txt")[:a.genes]

    t0 = time.perf_counter()
    secs = read_manifest(her2st_manifest(), names, genes=genes, drop_missing_genes=True)
    if max_spots:
        secs = [s.subset(np.linspace(0, s.adata.n_obs - 1, min(max_spots, s.adata.n_obs)).astype(int)) for s in secs]
    t_sections = time.perf_counter() - t0
    n_tiles = sum(s.adata.n_obs for s in secs)
    res = {"device": torch.cuda.get_device_name(dev) if gpu else f"cpu ({torch.get_num_threads()} threads)",
           "backbone": cfg.backbone, "out_px": cfg.out_px, "tile_um": cfg.tile_um, "sections": names,
           "n_tiles": n_tiles, "genes": len(genes), "epochs": cfg.epochs, "batch_size": cfg.batch_size,
           "members_predict": a.members, "read_sections_s": round(t_sections, 2)}

    with tempfile.TemporaryDirectory(prefix="stimage_nb_bench_") as tmp:
        real_cache_dir = tiles_mod.cache_dir
        tiles_mod.cache_dir = lambda: Path(tmp)  # an empty tile cache: every tile is read from the OME-Zarr
        try:
            # ---------------- training
            t0 = time.perf_counter()
            ens1 = train(secs, genes=[g for g in genes if g in secs[0].genes], out=Path(tmp) / "run",
                         val_sections=[], config=cfg, progress=False)
            synchronize(dev)
            t_train = time.perf_counter() - t0
            hist = json.loads((Path(tmp) / "run" / "members" / "m0" / "state.json").read_text())["history"]
            steps_per_epoch = n_tiles // min(cfg.batch_size, n_tiles)
            seen = steps_per_epoch * min(cfg.batch_size, n_tiles) * cfg.epochs
            e2e_train = seen / t_train
            mo_train = model_only_train(cfg, len(ens1.genes), len(ens1.celltypes), max(steps_per_epoch * 2, 10), dev)
            res.update({"train_e2e_s": round(t_train, 2), "train_e2e_tiles_per_s": round(e2e_train, 1),
                        "train_epoch_s": [h["seconds"] for h in hist],
                        "train_epoch_tiles_per_s": round(steps_per_epoch * min(cfg.batch_size, n_tiles)
                                                         / float(np.median([h["seconds"] for h in hist])), 1),
                        "train_model_only_tiles_per_s": round(mo_train, 1),
                        "train_ratio": round(e2e_train / mo_train, 3)})

            # ---------------- prediction with an N-member ensemble (fresh tile cache again)
            tiles_mod.cache_dir = lambda: Path(tmp) / "pred_cache"
            members = []
            for i in range(a.members):
                torch.manual_seed(i)
                members.append(STModel(create_backbone(cfg.backbone.split(",")[0], "none"), len(ens1.genes),
                                       len(ens1.celltypes), backbone_name=cfg.backbone))
            ens = Ensemble(members, genes=ens1.genes, celltypes=ens1.celltypes, tile_um=ens1.tile_um,
                           out_px=ens1.out_px, stain=ens1.stain or MacenkoNormalizer()).to(dev)
            bs = 256 if gpu else 64
            t0 = time.perf_counter()
            for s in secs:
                predict_section(ens, s, batch_size=bs, progress=False, cache_tiles=False)
            synchronize(dev)
            t_pred = time.perf_counter() - t0
            e2e_pred = n_tiles / t_pred
            mo_pred = model_only_predict(ens, max(n_tiles, bs * 4), bs, dev)
            res.update({"predict_e2e_s": round(t_pred, 2), "predict_e2e_tiles_per_s": round(e2e_pred, 1),
                        "predict_model_only_tiles_per_s": round(mo_pred, 1),
                        "predict_ratio": round(e2e_pred / mo_pred, 3)})

            # ---------------- tile reading alone (for the breakdown)
            t0 = time.perf_counter()
            for s in secs:
                tiles_mod.extract_tiles(s.image, s.xy, ens.tile_um, ens.out_px, cache=False)
            res["tile_read_tiles_per_s"] = round(n_tiles / (time.perf_counter() - t0), 1)
        finally:
            tiles_mod.cache_dir = real_cache_dir

    print(f"device: {res['device']}; backbone {res['backbone']} at {res['out_px']} px ({res['tile_um']:g} µm tiles); "
          f"{n_tiles} tiles of {names}; {len(genes)} genes")
    print(f"{'':28s}{'end-to-end':>14s}{'model-only':>14s}{'ratio':>8s}")
    print(f"{'training (tiles/s)':28s}{res['train_e2e_tiles_per_s']:>14.1f}{res['train_model_only_tiles_per_s']:>14.1f}"
          f"{res['train_ratio']:>8.2f}   ({cfg.epochs} epochs, batch {cfg.batch_size}, incl. tile reading, "
          "stain norm, checkpoints)")
    print(f"{'  of which epochs only':28s}{res['train_epoch_tiles_per_s']:>14.1f}"
          f"{res['train_model_only_tiles_per_s']:>14.1f}"
          f"{res['train_epoch_tiles_per_s'] / res['train_model_only_tiles_per_s']:>8.2f}   (median epoch, incl. "
          "on-device augmentation and validation)")
    print(f"{'prediction x' + str(a.members) + ' (tiles/s)':28s}{res['predict_e2e_tiles_per_s']:>14.1f}"
          f"{res['predict_model_only_tiles_per_s']:>14.1f}{res['predict_ratio']:>8.2f}   (incl. tile reading, "
          "stain estimate, AnnData)")
    print(f"tile reading alone: {res['tile_read_tiles_per_s']:.1f} tiles/s; reading the sections' counts: "
          f"{res['read_sections_s']:.1f} s (not timed above)")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
