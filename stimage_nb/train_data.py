"""The training data of :func:`stimage_nb.train.train`: sections -> tiles on the device -> frozen features.

- :func:`_load_sections` picks the training and validation sections of a manifest (or a list of
  :class:`~stimage_nb.io.section.Section`), with the genes common to all, and checks them;
- :func:`_build_data` turns sections into one :class:`_Data`: uint8 tiles (physical size, cached on disk by
  :mod:`stimage_nb.tiles`, stain-normalised per section by :func:`_fit_normalizer`'s Macenko reference)
  kept on the device, counts, cell-type targets, and the groups of the spots (sections, or the quarters of a
  single section) that cross-validation and ``member_data="groups"`` leave out;
- :func:`_frozen_stack` fits the frozen feature extractor on the training tiles once per run and describes
  every tile (``frozen_views`` dihedral views, then the tiles of the ``acquisition_views`` simulated
  acquisitions that :func:`_build_data` made), cached in ``RUN_DIR/cache`` so a resumed run reuses them.

Private to the training loop (:mod:`stimage_nb.train` re-exports what tests and benchmarks use).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import _keys as K
from .augment import _layout, dihedral_views, to_float
from .devices import autocast, for_batches
from .ensemble import save_state_dict
from .errors import StimageInputError
from .io.section import Section, section_depth, select_genes
from .models.heads import labels_to_targets
from .stain import MacenkoNormalizer
from .train_config import TrainConfig

log = logging.getLogger("stimage_nb.train")


@dataclass
class _Data:
    tiles: torch.Tensor          # uint8 (n, h, w, 3) on the device, stain-normalised
    counts: torch.Tensor         # float32 (n, genes) on the device
    targets: torch.Tensor | None  # float32 (n, types) with NaN rows, on the device
    section: np.ndarray          # section index per row
    offset: torch.Tensor | None = None  # float32 (n,) log(section depth / reference depth), on the device
    group: np.ndarray | None = None     # the group a member may leave out (member_data="groups")
    um_per_px: float | None = None      # the tiles' pixel size (tile µm / out px)
    acquisitions: list | None = None    # uint8 (n, h, w, 3) CPU tiles per simulated acquisition (acquisition_views)

    def __len__(self):
        return self.tiles.shape[0]


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _celltype_targets(section: Section, celltypes: list[str]) -> torch.Tensor:
    n = section.adata.n_obs
    props = section.adata.obsm.get(K.CELLTYPE_PROPORTIONS)
    if props is not None and len(celltypes):
        df = props.reindex(columns=celltypes)
        arr = df.to_numpy(dtype=np.float32)
        has_row = ~np.isnan(props.to_numpy(dtype=np.float32)).any(1)
        arr = np.where(np.isnan(arr) & has_row[:, None], 0.0, arr)  # a type absent from this table: 0
        return torch.from_numpy(arr)
    if K.CELLTYPE_LABEL in section.adata.obs and len(celltypes):
        return labels_to_targets(list(section.adata.obs[K.CELLTYPE_LABEL].astype(object)), celltypes)
    return torch.full((n, len(celltypes)), float("nan"))


def _celltypes_of(sections: Sequence[Section]) -> list[str]:
    out: list[str] = []
    for s in sections:
        names = s.celltypes
        if not names and K.CELLTYPE_LABEL in s.adata.obs:
            names = sorted(str(v) for v in s.adata.obs[K.CELLTYPE_LABEL].dropna().unique())
        out += [c for c in names if c not in out]
    return out


def _counts(section: Section) -> np.ndarray:
    import scipy.sparse as sp

    X = section.adata.X
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float32)


def _section_tiles(section: Section, tile_um: float, out_px: int, progress: bool) -> np.ndarray:
    from .tiles import extract_tiles

    return extract_tiles(section.image, section.xy, tile_um, out_px, cache=True, progress=progress)


def _spatial_groups(xy: np.ndarray) -> np.ndarray:
    """Quarters of a section (split at the median x and y): the groups of one training section."""
    return (xy[:, 0] > np.median(xy[:, 0])).astype(int) * 2 + (xy[:, 1] > np.median(xy[:, 1])).astype(int)


def _build_data(sections, genes, celltypes, tile_um, out_px, normalizer, device, progress, *, background="keep",
                ref_depth: float | None = None, shifts=()) -> _Data:
    """``shifts``: simulated acquisitions (:func:`stimage_nb.shifts.shift_tiles`) applied to each section's tiles
    as read, then through the same background handling and per-section stain normalisation as the tiles, as
    a slide from that scanner would go (kept on the CPU in ``_Data.acquisitions``)."""
    from .shifts import shift_tiles
    from .stain import whiten_background

    tiles, counts, targets, idx, offs = [], [], [], [], []
    acq = [[] for _ in shifts]
    um = float(tile_um) / int(out_px)
    for i, s in enumerate(sections):
        raw = _section_tiles(s, tile_um, out_px, progress)
        t = torch.from_numpy(np.ascontiguousarray(whiten_background(raw, background)))
        offs.append(np.full(len(t), 0.0 if ref_depth is None else np.log(section_depth(s) / ref_depth), np.float32))
        if normalizer is not None:
            t = normalizer.transform(t, device=device)
        tiles.append(t.to(device))
        for k, sh in enumerate(shifts):
            a = torch.from_numpy(np.ascontiguousarray(whiten_background(shift_tiles(raw, sh, um), background)))
            acq[k].append((normalizer.transform(a, device=device) if normalizer is not None else a).cpu())
        counts.append(torch.from_numpy(_counts(s)))
        targets.append(_celltype_targets(s, celltypes))
        idx.append(np.full(len(t), i))
    section = np.concatenate(idx)
    group = section if len(sections) > 1 else _spatial_groups(sections[0].xy)
    return _Data(torch.cat(tiles), torch.cat(counts).to(device),
                 torch.cat(targets).to(device) if celltypes else None, section,
                 torch.from_numpy(np.concatenate(offs)).to(device), group, um, [torch.cat(a) for a in acq])


def _load_sections(manifest, sections, val_sections, genes, drop_missing_genes) -> tuple[list[Section], list[Section]]:
    """Training and validation sections, with counts restricted to ``genes`` (common to all)."""
    if isinstance(manifest, (str, os.PathLike)):
        from .io.readers import read_manifest

        wanted = None
        if sections is not None:
            wanted = list(dict.fromkeys(list(sections) + list(val_sections or [])))
        all_secs = read_manifest(manifest, wanted, genes=genes, drop_missing_genes=drop_missing_genes)
        src = str(manifest)
    else:
        all_secs = list(manifest)
        src = "the given sections"
        for s in all_secs:
            if not isinstance(s, Section):
                raise StimageInputError(f"train() takes a manifest path or a list of Sections, got {type(s).__name__}")
    with_counts = [s for s in all_secs if s.has_counts]
    if not with_counts:
        if genes is not None and any((s.adata.uns.get(K.UNS) or {}).get("counts") for s in all_secs):
            raise StimageInputError(f"{src}: none of the {len(genes)} requested genes is in the sections' counts "
                                    f"(e.g. {list(genes)[:5]}); check the gene list (symbols as in the counts tables).")
        raise StimageInputError(f"{src}: no section has counts; training needs spatial counts.")
    by_name = {s.name: s for s in with_counts}
    no_counts = [s.name for s in all_secs if not s.has_counts and (sections is None or s.name in (sections or []))]
    if no_counts and sections is not None:
        raise StimageInputError(f"{src}: sections {no_counts} have no counts and cannot be trained on.")
    val_names = list(val_sections or [])
    unknown = [v for v in val_names if v not in by_name]
    if unknown:
        raise StimageInputError(f"{src}: validation sections {unknown} are not sections with counts ({list(by_name)}).")
    train_names = [s.name for s in with_counts if (sections is None or s.name in sections) and s.name not in val_names]
    if val_sections is None and len(train_names) >= 3:
        val_names = [train_names.pop()]  # hold out one whole section for early stopping
        log.info("no validation sections given; holding out %s for early stopping", val_names)
    if not train_names:
        raise StimageInputError(f"{src}: no training sections left after removing the validation sections {val_names}.")
    train_s = [by_name[n] for n in train_names]
    val_s = [by_name[n] for n in val_names]
    # genes common to every section, in the requested order
    gene_list = list(genes) if genes is not None else train_s[0].genes
    common = [g for g in gene_list if all(g in set(s.genes) for s in train_s + val_s)]
    if len(common) < len(gene_list):
        missing = [g for g in gene_list if g not in common]
        if not drop_missing_genes:
            raise StimageInputError(f"{src}: {len(missing)} genes are missing from some sections' counts: "
                                    f"{missing[:10]}. Fix the gene list or pass drop_missing_genes=True "
                                    "(CLI: --drop-missing-genes).")
        log.warning("dropping %d genes missing from some sections: %s", len(missing), missing[:10])
    if not common:
        raise StimageInputError(f"{src}: none of the requested genes is in the counts.")
    out = []
    for group in (train_s, val_s):
        secs = []
        for s in group:
            s2, _ = select_genes(s, common, source=src)
            secs.append(s2.drop_outside_image())
        out.append(secs)
    return out[0], out[1]


@torch.no_grad()
def _raw_features(stack, tiles: torch.Tensor, *, views: int, batch_size: int, amp: bool,
                  progress: bool = False, acquisitions=()) -> torch.Tensor:
    """Unstandardised stack features ``(views + len(acquisitions), n, dim)`` of uint8 tiles: view 0 is the tile
    itself, then its other dihedral views, then the same spots' tiles under each simulated acquisition
    (``acquisitions``: uint8 tensors shaped like ``tiles``, on any device)."""
    stack.eval()
    dev = tiles.device
    out = torch.empty((views + len(acquisitions), tiles.shape[0], stack.num_features), dtype=torch.float32,
                      device=dev)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tiles.shape[0], desc="features", leave=False, unit="tile")

    def run(i, j):
        xs = dihedral_views(to_float(tiles[i:j]))[:views]
        xs += [to_float(a[i:j].to(dev)) for a in acquisitions]
        for v, xv in enumerate(xs):
            with autocast(dev, amp):
                out[v, i:j] = stack.raw(_layout(xv, None)).float()

    for_batches(run, tiles.shape[0], batch_size, dev, "feature extraction", bar)
    if bar is not None:
        bar.close()
    return out


def _per_member(cfg: TrainConfig) -> bool:
    return cfg.member_features == "per_member" and "kmeans" in cfg.extractor.split("+")


def _stack_id(cfg: TrainConfig, backbone: str, member: int = 0) -> str:
    """Members whose frozen extractors are identical share one id (the backbone matters only for 'timm';
    with ``member_features="per_member"`` every member has its own k-means dictionary)."""
    base = backbone if "timm" in cfg.extractor.split("+") else "-"
    return f"{base}#m{member}" if _per_member(cfg) else base


def _stack_seed(cfg: TrainConfig, member: int) -> int:
    """The k-means seed (patch sample and clustering) of ``member``'s stack: ``seed`` when shared, else ``seed + i``."""
    return cfg.seed + member if _per_member(cfg) else cfg.seed


def _frozen_stack(cfg: TrainConfig, backbone: str, train_d: _Data, val_d: _Data | None, out: Path, device,
                  cache: dict, progress: bool = False, member: int = 0):
    """The fitted :class:`~stimage_nb.models.features.FeatureStack` of ``backbone`` and its standardised
    features ``(views, n_train, F)``, ``(1, n_val, F)``; fitted once per run (kept in ``RUN_DIR/cache``
    until the ensemble is saved, so a resumed run reuses them)."""
    from safetensors.torch import load_file

    from .models.features import build_stack

    ident = _stack_id(cfg, backbone, member)
    if ident in cache:
        return cache[ident]
    cdir = out / "cache"
    cdir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(ident.encode()).hexdigest()[:12]
    acqs = train_d.acquisitions or []
    if len(acqs) != len(cfg.acquisition_shifts()):
        raise RuntimeError("the training data were built without the config's acquisition views")
    n_views = cfg.frozen_views + len(acqs)
    acq = hashlib.sha256(cfg.acquisition_views.encode()).hexdigest()[:8] if acqs else "0"
    sp, fp = cdir / f"extractor-{key}.safetensors", cdir / f"features-{key}-v{cfg.frozen_views}-a{acq}.safetensors"
    torch.manual_seed(_seed(cfg.seed, "backbone", backbone))  # a random timm branch is the same in every run
    stack = build_stack(cfg.extractor, backbone=backbone, weights=cfg.weights_for(backbone),
                        backbone_kwargs=cfg.backbone_kwargs,
                        kmeans_k=cfg.kmeans_k)
    for p in stack.parameters():
        p.requires_grad_(False)
    if sp.is_file() and fp.is_file():
        stack.load_state_dict(load_file(str(sp)))
        stack.to(device)
        d = load_file(str(fp), device=str(device))
        if d["train"].shape[:2] == (n_views, len(train_d)) and (val_d is None or d["val"].shape[1] == len(val_d)):
            log.info("using the cached frozen extractor and features in %s", cdir)
            cache[ident] = (stack, d["train"], d.get("val") if val_d is not None else None)
            return cache[ident]
    t0 = time.perf_counter()
    stack.fit(train_d.tiles, n_patches=cfg.kmeans_patches, seed=_stack_seed(cfg, member))
    stack.to(device)
    raw_tr = _raw_features(stack, train_d.tiles, views=cfg.frozen_views, batch_size=cfg.eval_batch_size,
                           amp=cfg.amp, progress=progress, acquisitions=acqs)
    stack.set_standardisation(raw_tr[0])
    ft = stack.standardise(raw_tr)
    fv = stack.standardise(_raw_features(stack, val_d.tiles, views=1, batch_size=cfg.eval_batch_size, amp=cfg.amp,
                                         progress=progress)) if val_d is not None else None
    log.info("frozen features %s (%d) of %d training x %d views (%d simulated acquisitions) and %d validation tiles "
             "in %.1fs", stack.name, stack.num_features, len(train_d), n_views, len(acqs),
             len(val_d) if val_d is not None else 0,
             time.perf_counter() - t0)
    save_state_dict(stack.state_dict(), sp)
    save_state_dict({"train": ft, **({"val": fv} if fv is not None else {})}, fp)
    cache[ident] = (stack, ft, fv)
    return cache[ident]


def _fit_normalizer(train_s: list[Section], tile_um: float, out_px: int, progress: bool,
                    background: str = "keep") -> MacenkoNormalizer:
    """Fit the Macenko reference on a spread sample of the training tiles (up to 256 per section)."""
    from .stain import whiten_background

    ref = []
    for s in train_s:
        t = whiten_background(_section_tiles(s, tile_um, out_px, progress), background)
        step = max(1, len(t) // 256)
        ref.append(t[::step])
    return MacenkoNormalizer().fit(np.concatenate(ref))
