"""Training a deep ensemble on sections with counts.

``train(manifest, genes=..., out=RUN_DIR, config=TrainConfig(...))`` reads the sections, extracts
tiles once (cached on disk by :mod:`stimage_nb.tiles`), normalises stains per section (Macenko, on
the device), keeps tiles as uint8 tensors on the device and augments each batch there, then trains
``config.members`` members (different seeds, optionally different backbones) with a
negative-binomial gene head and a soft-target cell-type head.

- **Early stopping** on validation *sections* (never spots of a training section).
- **A checkpoint per epoch** in ``RUN_DIR/members/m{i}/`` (model and optimizer as safetensors, state
  as JSON); a killed or cancelled run restarted with the same command continues from the last
  finished epoch, and gives the same weights as an uninterrupted run (every epoch re-seeds its RNGs
  from ``(seed, member, epoch)``).
- **Frozen fast path** (``frozen=True``, the default): a frozen feature extractor
  (:mod:`stimage_nb.models.features`; by default k-means convolutional + handcrafted features, the
  k-means filters fitted on the training sections' tiles) describes every tile once (cached in
  ``RUN_DIR/cache/`` until the ensemble is saved), and each member trains only its heads, optionally
  on a bootstrap sample of the spots (``bagging``). ``frozen=False``: full fine-tuning of a timm
  backbone.
- **The default NB mean** (``library_size="ridge"``, :mod:`stimage_nb.models.library_size`): after a member's
  heads are trained, its library-size regression is fitted and its composition shrunk, per gene, by factors
  cross-fitted once per run over the groups of the training spots (``RUN_DIR/crossfit/gene_shrinkage.json``).
- On CUDA: bf16 autocast and channels_last (the policy: :mod:`stimage_nb.devices`).

The data preparation (sections, tiles, counts, groups, frozen features) lives in :mod:`stimage_nb.train_data`;
the recipe in :mod:`stimage_nb.train_config`; the callbacks in :mod:`stimage_nb.train_callbacks`; the run
directory (run.json, checkpoints, member state) in :mod:`stimage_nb.train_checkpoint`; the checks and records
of the encoders' weights in :mod:`stimage_nb.train_encoders`.
- **Callbacks** (:class:`Callback`, Lightning-style empty hooks) drive progress bars, live loss
  curves and cancellation.

The finished run directory is an :class:`~stimage_nb.ensemble.Ensemble` (``ensemble.json`` +
``member_{i}.safetensors``, plus ``backbone_*.safetensors`` for a frozen backbone the members share) that
``predict`` loads.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .augment import AugmentConfig, augment, to_float
from .devices import OUT_OF_MEMORY, autocast, channels_last, for_batches, resolve_device
from .domain import DomainModel
from .ensemble import CONFIG_NAME, Ensemble, save_state_dict, write_json
from .errors import StimageInputError, TrainingDivergedError
from .io.section import Section, section_depth
from .models.heads import soft_cross_entropy
from .models.library_size import (
    SHRINKAGE_GRID,
    cross_fitted_shrinkage,
    fit_library_size,
    held_out_loglik,
    log_library_size,
    set_library_size,
    shrink_composition,
)
from .models.model import STModel, build_model
from .models.nb import nb_nll
from .train_callbacks import (  # noqa: F401 - part of this module's API
    Callback,
    LossHistory,
    ProgressCallback,
    StopOnEvent,
    TrainingCancelled,
    TrainState,
)
from .train_checkpoint import (
    CROSSFIT_DIR,
    GENE_SHRINKAGE_FILE,
    RUN_NAME,
    _check_or_write_run,
    _fingerprint,
    _forget_new_run,
    _gene_shrinkage_of,
    _load_member_state,
    _load_optimizer,
    _member_dir,
    _member_state,
    _optimizer_snapshot,
    _snapshot,
    _training_data,
    _write_checkpoint,
)
from .train_config import MODE_DEFAULTS, TrainConfig, _registered  # noqa: F401 - part of this module's API
from .train_data import (  # noqa: F401 - _raw_features is used by tests and benchmarks
    _build_data,
    _celltypes_of,
    _Data,
    _fit_normalizer,
    _frozen_stack,
    _load_sections,
    _per_member,
    _raw_features,
    _seed,
    _spatial_groups,
    _stack_id,
)
from .train_encoders import (  # noqa: F401 - _warn_random_weights is used by tests
    _check_encoder_weights,
    _encoder_provenance,
    _warn_random_weights,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- training one member
def _lr_factor(epoch: int, it: int, n_it: int, epochs: int) -> float:
    """Linear warm-up over the first epoch, then cosine decay to 5% over the rest."""
    if epoch == 0:
        return (it + 1) / max(n_it, 1)
    t = (epoch - 1 + it / max(n_it, 1)) / max(epochs - 1, 1)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _make_model(cfg: TrainConfig, backbone: str, n_genes: int, n_types: int, seed: int) -> STModel:
    from .models.backbone import create_backbone

    torch.manual_seed(seed)
    bb = create_backbone(backbone, cfg.weights_for(backbone), **cfg.backbone_kwargs)
    return STModel(bb, n_genes, n_types, backbone_name=backbone,
                   backbone_kwargs=getattr(bb, "build_kwargs", cfg.backbone_kwargs), dropout=cfg.dropout, rank=cfg.rank,
                   composition=cfg.composition)


def _offset(out, offset):
    """The heads' output with the spots' log depth offsets added to the NB log-means."""
    if offset is None:
        return out
    return dataclasses.replace(out, log_mu=out.log_mu + offset[:, None].to(out.log_mu.dtype))


def _loss(out, counts, targets, w_ct: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nll = nb_nll(counts, out.log_mu.float(), out.log_theta.float())
    ce = soft_cross_entropy(out.logits, targets) if (out.logits is not None and targets is not None) else nll * 0
    return nll + w_ct * ce, nll, ce


def _mean_pearson_log1p(mu: torch.Tensor, counts: torch.Tensor) -> float:
    """Mean over genes of Pearson(log1p mu, log1p counts); constant genes count as 0 (as in evaluate)."""
    p, o = torch.log1p(mu.double()), torch.log1p(counts.double())
    pc, oc = p - p.mean(0), o - o.mean(0)
    den = torch.sqrt((pc * pc).sum(0) * (oc * oc).sum(0))
    ok = den > 1e-12 * max(1.0, float(len(p)))
    r = torch.where(ok, (pc * oc).sum(0) / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(den))
    return float(r.mean())


@torch.no_grad()
def _evaluate(model: STModel, data: _Data, cfg: TrainConfig, device, feats: torch.Tensor | None = None
              ) -> tuple[float, float]:
    """Validation (loss, mean per-gene Pearson of log1p means vs log1p counts)."""
    model.eval()
    losses, mus = [], []
    lib = log_library_size(data.counts) if cfg.library_size == "ridge" else None

    def run(i, j):
        if feats is not None:  # with library_size="ridge" the composition is scored at the observed library sizes
            out = model.heads(feats[0, i:j], lib[i:j] if lib is not None else None)
        else:
            with autocast(device, cfg.amp):
                f = model.features(to_float(data.tiles[i:j], channels_last(device, cfg.channels_last)))
            out = model.heads(f.float())
        out = _offset(out, data.offset[i:j] if data.offset is not None else None)
        loss, _, _ = _loss(out, data.counts[i:j], data.targets[i:j] if data.targets is not None else None,
                           cfg.celltype_weight)
        losses.append(float(loss) * (j - i))
        mus.append(torch.exp(out.log_mu.float()))

    for_batches(run, len(data), cfg.eval_batch_size, device, "validation")
    r = _mean_pearson_log1p(torch.cat(mus), data.counts) if mus else float("nan")
    return sum(losses) / max(len(data), 1), r


def _bag(cfg: TrainConfig, i: int, n: int, group: np.ndarray | None = None) -> torch.Tensor:
    """Training rows of member ``i``: all of them, all but one group (``member_data="groups"``), or a
    bootstrap sample of those (``cfg.bagging``)."""
    base = torch.arange(n)
    if cfg.member_data == "groups" and group is not None:
        groups = np.unique(group)
        if len(groups) > 1:
            base = torch.from_numpy(np.flatnonzero(group != groups[i % len(groups)]))
    if not cfg.bagging:
        return base
    g = torch.Generator().manual_seed(_seed(cfg.seed, i, "bag"))
    return base[torch.randint(0, len(base), (len(base),), generator=g)]


def _val_summary(cfg: TrainConfig, st: dict) -> dict:
    """The kept epoch's validation numbers for ensemble.json."""
    if st.get("best_val") is None:  # no validation (null in the strict state JSON)
        return {"best_val_pearson" if cfg.early_stop == "pearson" else "best_val_loss": None}
    if cfg.early_stop == "pearson":
        return {"best_val_pearson": -st["best_val"]}
    if cfg.early_stop == "loss":
        return {"best_val_loss": st["best_val"]}
    last = st["history"][-1] if st.get("history") else {}
    return {"last_val_loss": last.get("val_loss"), "last_val_pearson": last.get("val_pearson")}


def _train_member(i: int, cfg: TrainConfig, train_d: _Data, val_d: _Data | None, out: Path, device,
                  callbacks: list[Callback], state: TrainState, feature_cache: dict, *,
                  rows: torch.Tensor | None = None, mdir: Path | None = None, tag: tuple | None = None) -> dict:
    """Train (or resume, or skip a finished) member ``i``; returns its JSON state.

    ``rows``, ``mdir`` and ``tag`` train a head that is not a member (the cross-fit of
    ``composition_shrinkage="cv"``): on these training rows, in this folder, seeded by ``tag``, and kept as
    trained (no library-size fit or shrinkage)."""
    key = i if tag is None else tag
    if mdir is None:
        mdir = _member_dir(out, i)
    else:
        mdir.mkdir(parents=True, exist_ok=True)
    sp = mdir / "state.json"
    mstate = json.loads(sp.read_text()) if sp.is_file() else None
    if mstate and mstate.get("done"):
        log.info("member %d already trained (best epoch %s)", i, mstate.get("best_epoch"))
        return mstate
    backbone = cfg.backbones[i % len(cfg.backbones)]
    n_genes = train_d.counts.shape[1]
    n_types = 0 if train_d.targets is None else train_d.targets.shape[1]
    if rows is None:
        rows = _bag(cfg, i, len(train_d), train_d.group)
    feats_tr = feats_va = None
    if cfg.frozen:
        # Members share one fitted extractor and its features (computed once) unless member_features="per_member".
        stack, feats_tr, feats_va = _frozen_stack(cfg, backbone, train_d, val_d, out, device, feature_cache,
                                                  member=i)
        model = STModel(stack, n_genes, n_types, backbone_name=stack.name, backbone_kwargs=cfg.backbone_kwargs,
                        dropout=cfg.dropout, rank=cfg.rank, composition=cfg.composition)
    else:
        model = _make_model(cfg, backbone, n_genes, n_types, _seed(cfg.seed, key, "init"))
    torch.manual_seed(_seed(cfg.seed, key, "heads"))
    model.nb.reset_parameters()  # re-drawn per member (the extractor may be shared)
    rows_d = rows.to(train_d.counts.device)
    c0 = train_d.counts[rows_d]
    if train_d.offset is not None:
        c0 = c0 * torch.exp(-train_d.offset[rows_d])[:, None]
    # library_size="ridge": the composition is trained at the spots' observed library sizes (models.library_size),
    # and initialised (rates, dispersions) from the counts scaled to the mean library size, as the offset sees them
    lib_tr = log_library_size(train_d.counts) if cfg.library_size == "ridge" else None
    if lib_tr is not None:
        lib = lib_tr[rows_d]
        c0 = c0 * torch.exp(torch.log(torch.exp(lib).mean()) - lib)[:, None]
    model.nb.init_from_counts(c0)
    if model.celltype is not None:
        model.celltype.reset_parameters()
        model.celltype.init_from_targets(train_d.targets)
    model.to(device)
    if channels_last(device, cfg.channels_last):
        model.to(memory_format=torch.channels_last)

    head_params = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    if cfg.frozen:
        opt = torch.optim.AdamW(head_params, lr=cfg.head_lr or cfg.lr, weight_decay=cfg.weight_decay)
    else:
        bb_params = [p for p in model.backbone.parameters()]
        opt = torch.optim.AdamW([{"params": bb_params, "lr": cfg.lr},
                                 {"params": head_params, "lr": cfg.head_lr or cfg.lr}],
                                weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]

    start = 0
    best_val, best_epoch, bad, history = float("inf"), -1, 0, []
    if mstate:  # resume
        from safetensors.torch import load_file

        _load_member_state(model, load_file(str(mdir / mstate["model_file"])), cfg.frozen)
        _load_optimizer(opt, mdir / mstate["optim_file"], mstate["optim"])
        start = mstate["epoch"] + 1
        best_val, best_epoch, bad, history = mstate["best_val"], mstate["best_epoch"], mstate["bad_epochs"], mstate["history"]
        best_val = float("inf") if best_val is None else best_val  # strict JSON writes +inf (nothing kept yet) as null
        history = [{k: float("nan") if v is None else v for k, v in h.items()} for h in history]
        log.info("member %d: resuming after epoch %d", i, mstate["epoch"])
        state.resumed_from = mstate["epoch"]
    state.member, state.epoch, state.history = i, start - 1, history
    state.best_val, state.best_epoch = best_val, best_epoch
    for cb in callbacks:
        cb.on_member_start(state)

    n = len(rows)
    bs = min(cfg.batch_size, n)
    n_it = max(1, n // bs)  # drop the last incomplete batch (BatchNorm and equal-weight steps)
    aug_cfg = AugmentConfig.from_dict(cfg.augment)
    cl = channels_last(device, cfg.channels_last)
    stop_early = False
    needs_batch_loss = any(type(cb).on_batch_end is not Callback.on_batch_end for cb in callbacks)
    # Checkpoints are snapshotted to host memory at once and written by a background thread, so the
    # device keeps training; leaving the `with` (normally or by an exception) waits for the writes.
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for epoch in range(start, cfg.epochs):
            if bad >= cfg.patience and val_d is not None:
                stop_early = True
                break
            torch.manual_seed(_seed(cfg.seed, key, epoch, "global"))
            g = torch.Generator().manual_seed(_seed(cfg.seed, key, epoch, "data"))
            perm = rows[torch.randperm(n, generator=g)]
            model.train()
            if cfg.frozen:
                model.backbone.eval()
            tot = torch.zeros((), device=device)
            t0 = time.perf_counter()
            for it in range(n_it):
                idx = perm[it * bs:(it + 1) * bs]
                for grp, base in zip(opt.param_groups, base_lrs):
                    grp["lr"] = base * _lr_factor(epoch, it, n_it, cfg.epochs)
                idx_d = idx.to(device, non_blocking=True)
                try:
                    if cfg.frozen:
                        views = _draw_views(cfg, feats_tr.shape[0], len(idx), g).to(device)
                        out_ = model.heads(feats_tr[views, idx_d], lib_tr[idx_d] if lib_tr is not None else None)
                    else:
                        x = augment(train_d.tiles.index_select(0, idx_d), aug_cfg, g, channels_last=cl)
                        with autocast(device, cfg.amp):
                            f = model.features(x)
                        out_ = model.heads(f.float())
                    out_ = _offset(out_, train_d.offset[idx_d] if train_d.offset is not None else None)
                    loss, nll, ce = _loss(out_, train_d.counts[idx_d],
                                          train_d.targets[idx_d] if train_d.targets is not None else None,
                                          cfg.celltype_weight)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                except OUT_OF_MEMORY as e:  # the batch size shapes the result, so no silent retry here
                    raise StimageInputError(
                        f"member {i} epoch {epoch}: out of memory on {device} with batches of {bs} tiles of "
                        f"{cfg.out_px} px ({backbone}). Train in a new --out directory with a smaller "
                        f"--batch-size (e.g. {max(2, bs // 2)}), smaller tiles (--out-px) or the frozen path "
                        "(--frozen); epochs already finished here are kept.") from e
                torch.nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], 5.0)
                opt.step()
                tot += loss.detach()
                state.batch, state.n_batches = it, n_it
                if needs_batch_loss:  # a host sync per step only when a callback wants the value
                    state.batch_loss = float(loss.detach())
                    for cb in callbacks:
                        cb.on_batch_end(state)
                if state.should_stop:
                    raise TrainingCancelled(f"training cancelled in member {i} epoch {epoch}; run the same "
                                            "command again to resume from the last finished epoch.")
            train_loss = float(tot) / n_it
            if not math.isfinite(train_loss):
                raise TrainingDivergedError(f"member {i} epoch {epoch}: the training loss became {train_loss}; "
                                            f"lower the learning rate (--lr, TrainConfig.lr; it was {cfg.lr:g}).")
            val_loss, val_r = _evaluate(model, val_d, cfg, device, feats_va) if val_d is not None else (float("nan"),) * 2
            crit = {"pearson": -val_r, "loss": val_loss}.get(cfg.early_stop, -float(epoch))  # lower is better
            improved = val_d is None or cfg.early_stop == "none" or crit < best_val - 1e-5
            if pending is not None:
                pending.result()  # surface a failed write of the previous epoch
            model_snap = _snapshot(_member_state(model, cfg.frozen))
            if improved:
                best_val, best_epoch, bad = (crit if val_d is not None and cfg.early_stop != "none" else float("inf")), \
                    epoch, 0
            else:
                bad += 1
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_pearson": val_r,
                            "seconds": round(time.perf_counter() - t0, 3)})
            mfile, ofile = f"last-e{epoch}.safetensors", f"optim-e{epoch}.safetensors"
            otensors, ometa = _optimizer_snapshot(opt)
            new_state = {"member": i, "backbone": backbone, "epoch": epoch, "best_val": best_val,
                         "best_epoch": best_epoch, "bad_epochs": bad, "history": list(history), "model_file": mfile,
                         "optim_file": ofile, "optim": ometa, "model_config": model.config(), "done": False}
            pending = writer.submit(_write_checkpoint, mdir, model_snap, otensors, new_state, improved)
            log.info("member %d epoch %d: train %.4f%s%s", i, epoch, train_loss,
                     f" val {val_loss:.4f}" if np.isfinite(val_loss) else "", " *" if improved else "")
            state.epoch, state.train_loss, state.val_loss, state.val_pearson = epoch, train_loss, val_loss, val_r
            state.best_val, state.best_epoch, state.history = best_val, best_epoch, history
            for cb in callbacks:
                cb.on_epoch_end(state)
            if state.should_stop:
                raise TrainingCancelled(f"training cancelled after member {i} epoch {epoch}; run the same command "
                                        "again to resume.")
        if pending is not None:
            pending.result()
    if stop_early or bad >= cfg.patience:
        log.info("member %d: early stop; best epoch %d (val %.4f)", i, best_epoch, best_val)
    final = json.loads(sp.read_text())
    final.update({"done": True, "stopped_early": bool(stop_early or (val_d is not None and bad >= cfg.patience))})
    if cfg.library_size == "ridge" and tag is None:
        final["library_size"] = _finish_composition(model, cfg, i, train_d, feats_tr, rows, mdir,
                                                    _gene_shrinkage_of(out))
    write_json(final, sp, strict=True)
    for cb in callbacks:
        cb.on_member_end(state)
    return final


def _finish_composition(model: STModel, cfg: TrainConfig, i: int, train_d: _Data, feats_tr: torch.Tensor,
                        rows: torch.Tensor, mdir: Path, gene_shrinkage: np.ndarray | None = None) -> dict:
    """library_size="ridge": the kept weights, with the depth head regressed from the features (member ``i``'s
    bootstrap sample) and the composition shrunk by ``cfg.composition_shrinkage`` (``"cv"``: the per-gene
    factors ``gene_shrinkage`` of :func:`_cross_fit_shrinkage`); written to ``final.safetensors`` (what the
    ensemble is assembled from). Deterministic, so a crash before the member's state says ``done`` only
    repeats it."""
    from safetensors.torch import load_file

    best = mdir / "best.safetensors"
    st = json.loads((mdir / "state.json").read_text())
    _load_member_state(model, load_file(str(best if best.is_file() else mdir / st["model_file"])), True)
    f0 = feats_tr[0]
    fit = fit_library_size(f0.float().cpu().numpy(), log_library_size(train_d.counts).cpu().numpy(), train_d.section,
                           train_d.group, rows=rows.cpu().numpy(), seed=_seed(cfg.seed, i, "library_size"))
    set_library_size(model.nb, fit)
    if cfg.composition_shrinkage == "cv":
        if gene_shrinkage is None:
            raise RuntimeError("composition_shrinkage='cv' but the cross-fitted factors are missing (crossfit/)")
        s = gene_shrinkage
    else:
        s = cfg.composition_shrinkage
    shrink_composition(model.nb, f0[rows.to(f0.device)], s)
    save_state_dict(_snapshot(_member_state(model, True)), mdir / "final.safetensors")
    s_mean = float(np.mean(s))
    log.info("member %d: log library size ridge alpha %g, grouped CV R^2 %.3f; composition shrunk by %s", i,
             fit.alpha, fit.cv_r2, f"per-gene factors (mean {s_mean:.3f})" if np.ndim(s) else f"{s:g}")
    return {**fit.summary(), "composition_shrinkage": cfg.composition_shrinkage,
            "composition_shrinkage_mean": round(s_mean, 4)}


def _draw_views(cfg: TrainConfig, n_views: int, n: int, g: torch.Generator) -> torch.Tensor:
    """The view each of ``n`` spots is seen in this step: the first ``cfg.frozen_views`` views are the tile as
    scanned (dihedral), the rest its simulated acquisitions; an acquisition with probability
    ``cfg.acquisition_share`` (uniform among them), else a scanned view (uniform among the dihedral views)."""
    n_acq = n_views - cfg.frozen_views
    if cfg.acquisition_share is None or n_acq == 0:
        return torch.randint(0, n_views, (n,), generator=g)
    acq = torch.rand(n, generator=g) < cfg.acquisition_share
    scanned = torch.randint(0, cfg.frozen_views, (n,), generator=g)
    return torch.where(acq, cfg.frozen_views + torch.randint(0, n_acq, (n,), generator=g), scanned)


def _cross_fit_shrinkage(cfg: TrainConfig, train_d: _Data, out: Path, device, feature_cache: dict,
                         genes: Sequence[str], section_names: Sequence[str] = ()) -> np.ndarray | None:
    """``composition_shrinkage="cv"``: per-gene shrinkage factors ``(genes,)``, cross-fitted once per run.

    For each group of the training spots (a section; the quarters of a single section), a head is trained
    on the other groups exactly as a member is (same recipe, view features and schedule; resumable in
    ``RUN_DIR/crossfit/g<k>``), and the held-out group's NB likelihood is measured with every gene's
    deviations scaled by 0, 0.1, ..., 1 (:func:`~stimage_nb.models.library_size.held_out_loglik`). Each gene
    keeps its best factor times ``cfg.composition_cv_scale``
    (:func:`~stimage_nb.models.library_size.cross_fitted_shrinkage`). The result is written to
    ``RUN_DIR/crossfit/gene_shrinkage.json`` (the heads are then removed) and read by every member, also
    on Dask workers."""
    from safetensors.torch import load_file

    if cfg.composition_shrinkage != "cv":
        return None
    done = _gene_shrinkage_of(out)
    if done is not None:
        return done
    cdir = out / CROSSFIT_DIR
    groups = np.unique(train_d.group)
    if len(groups) < 2:
        raise StimageInputError("composition_shrinkage='cv' needs at least two groups of training spots (sections, "
                                "or the quarters of one section); give --composition-shrinkage 0.25 instead")
    backbone = cfg.backbones[0]
    stack, feats_tr, _ = _frozen_stack(cfg, backbone, train_d, None, out, device, feature_cache, member=0)
    f0 = feats_tr[0]
    n_genes = train_d.counts.shape[1]
    n_types = 0 if train_d.targets is None else train_d.targets.shape[1]
    total = None
    t0 = time.perf_counter()
    for j, g in enumerate(groups):
        held = np.flatnonzero(train_d.group == g)
        rows = torch.from_numpy(np.flatnonzero(train_d.group != g))
        mdir = cdir / f"g{j}"
        state = TrainState(run_dir=out, n_members=len(groups), epochs=cfg.epochs)
        mst = _train_member(0, cfg, train_d, None, out, device, [], state, feature_cache, rows=rows, mdir=mdir,
                            tag=("crossfit", j))
        model = STModel(stack, n_genes, n_types, backbone_name=stack.name, backbone_kwargs=cfg.backbone_kwargs,
                        dropout=cfg.dropout, rank=cfg.rank, composition=cfg.composition).to(device)
        best = mdir / "best.safetensors"
        _load_member_state(model, load_file(str(best if best.is_file() else mdir / mst["model_file"])), True)
        rows_d, held_d = rows.to(f0.device), torch.from_numpy(held).to(f0.device)
        ll = held_out_loglik(model.nb, f0[rows_d], f0[held_d], train_d.counts[held_d])
        total = ll if total is None else total + ll
    applied, fitted = cross_fitted_shrinkage(total, cfg.composition_cv_scale)
    rec = {"method": "per-gene factor with the highest held-out NB likelihood over a grouped cross-fit, times "
                     "composition_cv_scale (stimage_nb.models.library_size.cross_fitted_shrinkage)",
           "scale": cfg.composition_cv_scale, "grid": list(SHRINKAGE_GRID),
           "groups": [_group_name(g, section_names) for g in groups],
           "genes": list(genes), "cross_fitted": fitted.tolist(), "applied": applied.tolist(),
           "held_out_loglik_summed_over_genes_by_factor": total.sum(1).round(3).tolist(),
           "seconds": round(time.perf_counter() - t0, 2)}
    write_json(rec, cdir / GENE_SHRINKAGE_FILE)
    for j in range(len(groups)):
        shutil.rmtree(cdir / f"g{j}", ignore_errors=True)
    log.info("composition shrinkage cross-fitted over %d groups in %.1fs: per-gene factors median %.2f (%.0f%% of "
             "genes at 0), applied x %g: median %.3f", len(groups), rec["seconds"], np.median(fitted),
             100 * np.mean(fitted == 0), cfg.composition_cv_scale, np.median(applied))
    return applied


_QUARTERS = ("top-left", "bottom-left", "top-right", "bottom-right")  # _spatial_groups: (x > median) * 2 + (y > median)


def _group_name(g, section_names: Sequence[str]) -> str:
    """A cross-fit group in words: the section, or the quarter of the single training section."""
    names = list(section_names)
    if len(names) > 1:
        return names[int(g)]
    return f"{names[0]} {_QUARTERS[int(g)]} quarter" if names else str(g)


# ---------------------------------------------------------------------- the public entry point
def train(manifest: str | os.PathLike | Iterable[Section], *, genes: Sequence[str] | str | None, out: str | os.PathLike,
          sections: Sequence[str] | None = None, val_sections: Sequence[str] | None = None,
          config: TrainConfig | None = None, drop_missing_genes: bool = False,
          callbacks: Sequence[Callback] | None = None, progress: bool = True, scheduler=None,
          cluster_options=None, _members: Sequence[int] | None = None) -> Ensemble:
    """Train a deep ensemble and save it in ``out`` (resuming a run found there).

    Parameters
    ----------
    manifest
        A manifest CSV (see :func:`stimage_nb.io.readers.read_manifest`) or a list of
        :class:`~stimage_nb.io.section.Section` (e.g. spot subsets).
    genes
        Genes to predict (in this order): a list, a gene panel or a gene-list file
        (:func:`stimage_nb.panels.resolve_genes`: ``"stimage769"``, ``"pam50"``, ``"breast_clinical"``,
        ``"hvg:2000"`` and ``"all"`` computed on the training sections, or a path); ``None``: all genes
        of the first training section. The panel is recorded in ``out/gene_panel.json``.
    out
        Run directory: checkpoints, then the ensemble (``ensemble.json`` + member safetensors).
    sections
        Training sections (default: every section with counts, minus the validation sections).
    val_sections
        Sections for early stopping (default ``config.val_sections``; when neither is given and
        there are at least three training sections, the last one is held out).
    config
        :class:`TrainConfig` (defaults: the package's offline default method).
    drop_missing_genes
        Drop listed genes absent from some section's counts instead of raising an error.
    callbacks
        :class:`Callback` objects (progress bars are added when ``progress``).
    scheduler
        Train the members in parallel on a Dask cluster (:func:`stimage_nb.cluster.connect`:
        ``"local"``, ``"slurm"``, ``"pbs"``, a scheduler address or a ``distributed.Client``), one task
        per member, each on a worker with a GPU when ``cluster_options.gpus_per_worker`` > 0. The
        members are independent and seeded by their index, so the result equals the serial run's
        (``tests/cohort/test_train_parallel.py``); the run directory must be on a filesystem the
        workers share. ``None``: members one after another in this process.
    cluster_options
        :class:`stimage_nb.cluster.ClusterOptions` for the workers ``scheduler`` starts.

    Returns
    -------
    The trained :class:`~stimage_nb.ensemble.Ensemble` (on the training device).
    """
    cfg = config or TrainConfig()
    _check_encoder_weights(cfg)  # before any tile is read: a wrong or missing file fails at once
    out = Path(out)
    if scheduler is not None:
        from .cluster import check_scheduler

        check_scheduler(scheduler)
    if val_sections is None and cfg.val_sections:
        val_sections = list(cfg.val_sections)
    if genes is not None and (isinstance(genes, (str, os.PathLike)) or hasattr(genes, "genes")):
        from .panels import needs_sections, resolve_genes

        pre = _load_sections(manifest, sections, val_sections, None, True)[0] if needs_sections(genes) else None
        panel = resolve_genes(genes, sections=pre)
        genes = list(panel.genes)
    else:
        panel = None
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if _members is None:
        _warn_random_weights(cfg)  # also refuses an unknown timm name before any section is read
    train_s, val_s = _load_sections(manifest, sections, val_sections, genes, drop_missing_genes)
    genes_used = train_s[0].genes
    celltypes = _celltypes_of(train_s + val_s)
    tile_um = float(cfg.tile_um) if cfg.tile_um else float(np.median([s.diameter_um for s in train_s])) * 1.5
    fp = _fingerprint(cfg, genes_used, celltypes, [s.name for s in train_s], [s.name for s in val_s], tile_um)
    had_out, had_run = out.exists(), (out / RUN_NAME).is_file()
    run = _check_or_write_run(out, fp)  # a run of other settings there is refused before anything is written
    if panel is not None and _members is None:  # only once the sections, genes and run are known good
        write_json(json.loads(panel.to_json()), out / "gene_panel.json")
    try:
        return _train_run(manifest, genes, out, sections, val_sections, cfg, drop_missing_genes, callbacks, progress,
                          scheduler, cluster_options, _members, train_s, val_s, genes_used, celltypes, tile_um, run,
                          device)
    except StimageInputError:
        if not had_run:
            _forget_new_run(out, remove_dir=not had_out)
        raise


def _train_run(manifest, genes, out: Path, sections, val_sections, cfg: TrainConfig, drop_missing_genes, callbacks,
               progress, scheduler, cluster_options, _members, train_s, val_s, genes_used, celltypes, tile_um,
               run, device) -> Ensemble | None:
    """The body of :func:`train` once the sections are read and the run directory is checked."""
    if (out / CONFIG_NAME).is_file():
        log.info("%s already holds the trained ensemble; loading it", out)
        return Ensemble.load(out, device)
    if not val_s:
        log.warning("no validation sections: training runs all %d epochs without early stopping", cfg.epochs)
    cbs = list(callbacks or [])
    if progress and not any(isinstance(c, ProgressCallback) for c in cbs):
        cbs.insert(0, ProgressCallback())
    state = TrainState(run_dir=out, n_members=cfg.members, epochs=cfg.epochs)
    for cb in cbs:
        cb.on_train_start(state)
    t0 = time.perf_counter()
    normalizer = None
    if cfg.stain == "macenko":
        normalizer = _fit_normalizer(train_s, tile_um, cfg.out_px, progress, cfg.background)
    depths = {s.name: section_depth(s) for s in train_s + val_s}
    ref_depth = float(np.median([depths[s.name] for s in train_s]))
    kw = {"background": cfg.background, "ref_depth": ref_depth if cfg.depth == "section" else None}
    train_d = _build_data(train_s, genes_used, celltypes, tile_um, cfg.out_px, normalizer, device, progress, **kw,
                          shifts=cfg.acquisition_shifts())
    val_d = (_build_data(val_s, genes_used, celltypes, tile_um, cfg.out_px, normalizer, device, progress, **kw)
             if val_s else None)
    log.info("data: %d training tiles (%s), %d validation tiles (%s), %d genes, %d cell types, %.1fs",
             len(train_d), [s.name for s in train_s], len(val_d) if val_d else 0, [s.name for s in val_s],
             len(genes_used), len(celltypes), time.perf_counter() - t0)
    feature_cache: dict = {}
    if cfg.frozen:
        if "timm" not in cfg.extractor and cfg.backbone != "resnet18":
            log.warning("backbone %r is not used by the frozen extractor %r: pass frozen=False (CLI: --backbone "
                        "alone) to fine-tune it, or extractor='timm' to use its frozen features", cfg.backbone,
                        cfg.extractor)
        for i in range(cfg.members) if _per_member(cfg) else range(len(cfg.backbones)):
            _frozen_stack(cfg, cfg.backbones[i % len(cfg.backbones)], train_d, val_d, out, device, feature_cache,
                          progress=progress, member=i)
        _cross_fit_shrinkage(cfg, train_d, out, device, feature_cache, genes_used,  # before any member needs it
                             [s.name for s in train_s])
    if _members is not None:  # a worker of train(scheduler=...): only these members, no ensemble
        for i in _members:
            _train_member(i, cfg, train_d, val_d, out, device, cbs, state, feature_cache)
        return None
    if scheduler is not None:
        _train_members_parallel(scheduler, cluster_options, manifest, genes, out, sections, val_sections, cfg,
                                drop_missing_genes, progress)
    mstates = []
    for i in range(cfg.members):  # members trained on the cluster are found done here
        mstates.append(_train_member(i, cfg, train_d, val_d, out, device, cbs, state, feature_cache))
    # where the training sections came from (absolute manifest path, sha256 of every file read), so that
    # `evaluate` can train the baseline on them even against another lab's manifest (stimage_nb.io.provenance)
    run = {**run, "training_data": _training_data(manifest, train_s + val_s)}
    ens = _assemble(out, cfg, mstates, genes_used, celltypes, tile_um, normalizer, run, train_s, val_s, feature_cache,
                    train_d, val_d, device, depths=depths, ref_depth=ref_depth)
    for cb in cbs:
        cb.on_train_end(state)
    log.info("trained %r in %s", ens, out)
    return ens.to(device)


def _member_task(job: dict) -> int:
    """One member on a Dask worker (:func:`train` with ``scheduler``): the same data preparation as
    the driver (tile and frozen-feature caches make it cheap), then member ``job["member"]`` only."""
    train(job["manifest"], genes=job["genes"], out=job["out"], sections=job["sections"],
          val_sections=job["val_sections"], config=job["config"], drop_missing_genes=job["drop_missing_genes"],
          progress=False, _members=[job["member"]])
    return job["member"]


def _train_members_parallel(scheduler, options, manifest, genes, out: Path, sections, val_sections, cfg: TrainConfig,
                            drop_missing_genes: bool, progress: bool) -> None:
    """Train the unfinished members as one Dask task each; raise if any fails (finished ones are kept)."""
    from .cluster import connect, run_tasks, task_resources

    todo = [i for i in range(cfg.members) if not json.loads((_member_dir(out, i) / "state.json").read_text()
                                                            if (_member_dir(out, i) / "state.json").is_file()
                                                            else "{}").get("done")]
    if not todo:
        return
    src = str(manifest) if isinstance(manifest, (str, os.PathLike)) else list(manifest)
    jobs = [{"manifest": src, "genes": list(genes) if genes is not None else None, "out": str(out),
             "sections": list(sections) if sections is not None else None,
             "val_sections": list(val_sections) if val_sections is not None else None, "config": cfg,
             "drop_missing_genes": drop_missing_genes, "member": i} for i in todo]
    gpu = bool(options is not None and options.gpus_per_worker)
    errors = []
    with connect(scheduler, options) as client:
        log.info("training members %s on %s", todo, client)
        for k, _, err in run_tasks(client, _member_task, jobs, resources=task_resources(gpu), progress=progress,
                                   desc="members", unit="member"):
            if err is not None:
                errors.append(f"member {todo[k]}: {type(err).__name__}: {err}")
    if errors:
        raise RuntimeError("training members on the cluster failed (finished members are kept; run the same "
                           "command again to resume): " + "; ".join(errors))


def _fit_domain(cfg: TrainConfig, ens: Ensemble, stacks: dict, mstates: list[dict], train_d: _Data,
                val_d: _Data | None, val_s, device) -> DomainModel | None:
    """The domain-shift model of member 0's features (:mod:`stimage_nb.domain`): fitted on the training
    tiles, its reference distribution from the validation sections (never fitted on) when there are any."""
    try:
        if cfg.frozen:  # the features are computed already
            _, ft, fv = stacks[_stack_id(cfg, mstates[0]["backbone"], 0)]
            tr = ft[0].float().cpu().numpy()
            va = fv[0].float().cpu().numpy() if fv is not None else None
        else:  # member 0's features of the tiles, which are stain-normalised already
            ens.to(device)
            try:
                kw = {"batch_size": cfg.eval_batch_size, "stain_source": None, "amp": cfg.amp}
                tr = ens.features(train_d.tiles, **kw)
                va = ens.features(val_d.tiles, **kw) if val_d is not None else None
            finally:
                ens.to("cpu")
        ref = "validation sections " + ",".join(s.name for s in val_s) if val_s else ""
        return DomainModel.fit(tr, va, reference=ref)
    except (ValueError, np.linalg.LinAlgError) as e:
        log.warning("no domain-shift model for this ensemble (%s); predictions carry no domain_distance", e)
        return None


def _assemble(out: Path, cfg: TrainConfig, mstates: list[dict], genes, celltypes, tile_um, normalizer, run,
              train_s, val_s, stacks: dict, train_d: _Data, val_d: _Data | None, device, *, depths: dict | None = None,
              ref_depth: float | None = None) -> Ensemble:
    from safetensors.torch import load_file

    members, info = [], []
    for i, st in enumerate(mstates):
        mdir = _member_dir(out, i)
        best, final = mdir / "best.safetensors", mdir / "final.safetensors"
        sd = load_file(str(final if final.is_file() else best if best.is_file() else mdir / st["model_file"]))
        if cfg.frozen:  # heads on the shared fitted extractor
            stack = stacks[_stack_id(cfg, st["backbone"], i)][0].cpu()
            m = STModel(stack, len(genes), len(celltypes), backbone_name=stack.name,
                        backbone_kwargs=cfg.backbone_kwargs, dropout=cfg.dropout, rank=cfg.rank, composition=cfg.composition)
            _load_member_state(m, sd, True)
        else:
            m = build_model(st["model_config"], "none")
            m.load_state_dict(sd)
        members.append(m)
        info.append({"member": i, "seed": _seed(cfg.seed, i, "init"), "weights": cfg.weights_for(st["backbone"]),
                     "best_epoch": st["best_epoch"], "early_stop": cfg.early_stop,
                     **_val_summary(cfg, st),
                     "epochs_run": len(st["history"]), "stopped_early": st.get("stopped_early", False),
                     **({"library_size": st["library_size"]} if "library_size" in st else {})})
    meta = {"run_id": run["run_id"], "training_data": run.get("training_data"), "train_sections": [s.name for s in train_s],
            "val_sections": [s.name for s in val_s],
            "train_patients": sorted({str(s.patient) for s in train_s if s.patient}),
            "train_um_per_px": {s.name: s.um_per_px for s in train_s},
            "train_platforms": {s.name: s.platform for s in train_s + val_s},
            "train_diameter_um": float(np.median([s.diameter_um for s in train_s])),
            "n_train_spots": int(sum(s.adata.n_obs for s in train_s)), "train_config": cfg.to_dict(),
            "section_depths": dict(depths or {}),
            "members": info, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    encs = _encoder_provenance(cfg, tile_um, stacks)
    if encs:
        meta["encoders"] = encs
    ens = Ensemble(members, genes=genes, celltypes=celltypes, tile_um=tile_um, out_px=cfg.out_px, stain=normalizer,
                   meta=meta, background=cfg.background, reference_depth=ref_depth)
    ens.domain = _fit_domain(cfg, ens, stacks, mstates, train_d, val_d, val_s, device)
    ens.save(out)
    # keep the per-member histories, drop the bulky checkpoints
    for i in range(len(mstates)):
        for f in _member_dir(out, i).glob("*.safetensors"):
            f.unlink(missing_ok=True)
    shutil.rmtree(out / "cache", ignore_errors=True)
    return ens
