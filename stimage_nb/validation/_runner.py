"""The runner: train each fold's ensemble, predict its held-out sections three ways, score everything.

:func:`validate` is the one entry point (the CLI's ``stimage-nb validate`` calls it, then
:func:`stimage_nb.validation.write_report`). Per fold (:class:`~stimage_nb.validation.Split`):

1. the ensemble is trained on the fold's training sections with the given :class:`~stimage_nb.train.TrainConfig`
   (``OUT/models/<key>/``, shared by every fold with the same training sections: leave-one-section-out's
   fold B4 is leave-one-patient-out's train-C fold), or loaded when it exists;
2. every test section (re-made under each acquisition of the fold, cropped around its spots, in
   ``OUT/shifted/``) is tiled once, and the same tiles are predicted by the **ensemble**, by its **first
   member alone**, and by the **ridge baseline** (:class:`stimage_nb.baseline.RidgeBaseline` fitted in the
   same run on the handcrafted features of the training sections' tiles, after the same background
   handling as the model's input);
3. everything is scored (the module docstring of :mod:`stimage_nb.validation`), and the fold's records are
   written atomically to ``OUT/folds/<fold>.json`` (+ ``.genes.parquet``). A fold whose file exists with the
   same fingerprint (split, recipe, genes, scoring options) is read back, not redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .. import _keys as K
from ..atomic import write_atomic
from ..errors import StimageInputError
from ..metrics import (
    TARGETS,
    calibration,
    celltype_metrics,
    pit_histogram,
    score_genes,
    transform,
    uncertainty_ranking,
)
from ._metrics import bootstrap_mean_r_difference, lees_l, map_ssim, paired_test, spatial_weights
from ._result import ValidationResult
from ._splits import PROTOCOLS, SectionInfo, Split, make_splits, platform_of, skipped_protocols

log = logging.getLogger(__name__)

MODELS = ("ensemble", "single_member", "baseline")
#: Pairs compared gene by gene (Wilcoxon) in every held-out section; the first is also bootstrapped over spots.
COMPARISONS = (("ensemble", "baseline"), ("single_member", "baseline"), ("ensemble", "single_member"))
FORMAT = 1  # of the fold files; a change re-runs folds
RETAIN = 0.8


def validate(manifest: str | os.PathLike, *, out: str | os.PathLike, protocol: str | Sequence[str] = "all",
             genes: Sequence[str] | None = None, config=None, sections: Sequence[str] | None = None,
             val: str = "none", depth: str = "observed", shifts=None, patients: Sequence[str] | None = None,
             train_platform: str | None = None, test_platform: str | None = None, n_boot: int = 200,
             crop_margin_um: float | None = 200.0, keep_shifted: bool = False, shift_dir: str | os.PathLike | None = None,
             seed: int = 0, progress: bool = True) -> ValidationResult:
    """Run validation protocols on a manifest: train, predict held-out sections, score, beside the baseline.

    Parameters
    ----------
    manifest
        A manifest CSV (:func:`stimage_nb.io.readers.read_manifest`; optional columns ``patient`` and
        ``platform`` define the groups).
    out
        Folder for the trained models, the per-fold results (resumption) and shifted images.
    protocol
        ``"loso"``, ``"lopo"``, ``"cross_platform"``, ``"acquisition"``, a list of them, or ``"all"`` (every
        protocol the manifest supports; the others are reported as skipped).
    genes
        Genes to train and score (default: every gene the sections share); genes missing from a section
        are dropped with a warning.
    config
        The :class:`~stimage_nb.train.TrainConfig` of every fold (default: ``TrainConfig()``).
    sections
        Only these manifest rows (default: all).
    val
        ``"none"`` (all training sections are fitted on) or ``"last"`` (the last one is held out of fitting
        for validation) — see :func:`~stimage_nb.validation.make_splits`.
    depth
        ``"observed"``: each held-out section's sequencing depth (mean counts per spot over the genes, one
        number per section, a property of the sequencing run) is given to the ensemble, which predicts
        at that depth (:meth:`stimage_nb.ensemble.Ensemble.predict_tiles`); ``"reference"``: predictions at
        the training depth.
    shifts
        The acquisitions of the acquisition protocol (default :data:`stimage_nb.shifts.ACQUISITION_SHIFTS`).
    patients, train_platform, test_platform
        Restrict leave-one-patient-out to these held-out patients / cross-platform to this pair.
    n_boot
        Bootstrap resamples of spots for the CI of the ensemble-minus-baseline difference in mean r.
    crop_margin_um
        Shifted images are made of the box around the spots plus this margin (µm; at least half a tile);
        ``None``: the whole slide.
    keep_shifted
        Keep the shifted images after their fold is scored (default: removed).
    shift_dir
        Where shifted images go (default ``OUT/shifted``); runs of several recipes can share one with
        ``keep_shifted=True``, so each image is made once.
    seed
        Seed of the bootstrap.
    progress
        A progress bar over folds.

    Returns
    -------
    :class:`~stimage_nb.validation.ValidationResult` (tidy records: ``to_frame()``).

    Raises
    ------
    StimageInputError
        A protocol the manifest cannot support (e.g. leave-one-patient-out with one patient), unknown
        sections, no genes in common.
    """
    from ..train import TrainConfig

    t_start = time.perf_counter()
    out = Path(out)
    cfg = config or TrainConfig()
    names = [protocol] if isinstance(protocol, str) else list(protocol)
    bad = [n for n in names if str(n).strip().lower().replace("-", "_") not in (*PROTOCOLS, "all")]
    if bad:  # before anything is read
        raise StimageInputError(f"unknown validation protocol {bad[0]!r}; choose from {list(PROTOCOLS)} or 'all'.")
    if depth not in ("observed", "reference"):
        raise StimageInputError(f"depth must be 'observed' or 'reference', not {depth!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise StimageInputError(f"--n-boot (n_boot) must be a whole number >= 0 (0: no bootstrap CI), not {n_boot!r}")
    secs, genes_used, dropped = _read_sections(manifest, sections, genes)
    infos = [SectionInfo.of(s) for s in secs]
    kw = {"patients": patients, "train_platform": train_platform, "test_platform": test_platform}
    if shifts is not None:
        kw["shifts"] = list(shifts)
    splits = make_splits(infos, protocol, val=val, **kw)
    skipped = skipped_protocols(infos, protocol)
    by_name = {s.name: s for s in secs}
    opts = {"depth": depth, "n_boot": int(n_boot), "seed": int(seed), "crop_margin_um": crop_margin_um,
            "retain": RETAIN, "format": FORMAT}
    gene_sha = hashlib.sha256("\n".join(genes_used).encode()).hexdigest()[:16]
    cfg_d = _config_key(cfg)
    folds_dir = out / "folds"
    folds_dir.mkdir(parents=True, exist_ok=True)
    records, per_gene, curves, timings = [], [], [], {}
    it = splits
    bar = None
    if progress:
        from tqdm.auto import tqdm

        it = bar = tqdm(splits, desc="validate", unit="fold")
    ctx = _Context(by_name, genes_used, cfg, out, opts)
    ctx.keep_shifted = bool(keep_shifted)
    ctx.shift_dir = Path(shift_dir) if shift_dir is not None else out / "shifted"
    quiet = _Quiet("stimage_nb.predict", "stimage_nb.baseline")  # per-section warnings are in the records
    for split in it:
        if bar is not None:
            bar.set_postfix_str(split.id)
        fp = {"split": split.to_dict(), "config": cfg_d, "genes": gene_sha, "options": opts}
        f_json = folds_dir / f"{_safe(split.id)}.json"
        f_genes = folds_dir / f"{_safe(split.id)}.genes.parquet"
        done = _read_fold(f_json, f_genes, fp)
        if done is None:
            t0 = time.perf_counter()
            with quiet:
                done = _run_fold(split, ctx)
            done["fingerprint"] = fp
            done["seconds"]["total"] = round(time.perf_counter() - t0, 1)
            _write_fold(done, f_json, f_genes)
        records += done["records"]
        per_gene.append(done["per_gene"])
        curves += done["curves"]
        timings[split.id] = done["seconds"]
    rec = pd.DataFrame.from_records(records)
    pg = pd.concat(per_gene, ignore_index=True) if per_gene else pd.DataFrame()
    options = {**opts, "protocol": protocol if isinstance(protocol, str) else list(protocol), "val": val,
               "manifest": str(Path(manifest).resolve()), "sections": [s.name for s in secs],
               "n_genes": len(genes_used), "genes_dropped": dropped, "config": cfg.to_dict(),
               "models": list(MODELS)}
    timings["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    return ValidationResult(records=rec, per_gene=pg, curves=tuple(curves), splits=tuple(splits),
                            skipped=dict(skipped), options=options, timings=timings, out=str(out))


def load_result(out: str | os.PathLike) -> ValidationResult:
    """The :class:`ValidationResult` of the finished folds in a ``validate`` folder, read back without running
    anything (e.g. to report a run made by another process or an older version)."""
    from ..shifts import Shift

    out = Path(out)
    files = sorted((out / "folds").glob("*.json"))
    if not files:
        raise StimageInputError(f"{out}: no finished folds (folds/*.json); run stimage-nb validate first.")
    records, per_gene, curves, splits, timings, opts = [], [], [], [], {}, {}
    for f in files:
        d = json.loads(f.read_text())
        g = f.with_name(f.stem + ".genes.parquet")
        records += d["records"]
        curves += d["curves"]
        if g.is_file():
            per_gene.append(pd.read_parquet(g))
        sp_ = d["split"]
        split = Split(sp_["protocol"], sp_["fold"], tuple(sp_["train"]), tuple(sp_["test"]), sp_["held_out"],
                      tuple(sp_["val"]), tuple(Shift(**x) for x in sp_["shifts"]))
        splits.append(split)
        timings[split.id] = d.get("seconds", {})
        fp = d.get("fingerprint", {})
        opts = {**fp.get("options", {}), "config": fp.get("config", {})}
    rec = pd.DataFrame.from_records(records)
    opts.update({"protocol": sorted({s.protocol for s in splits}), "n_genes": int(pd.concat(per_gene)["gene"].nunique())
                 if per_gene else None, "sections": sorted(set(rec["source_section"])) if len(rec) else [],
                 "manifest": "", "read_back_from": str(out)})
    timings["wall_seconds"] = round(sum(v.get("total", 0) for v in timings.values() if isinstance(v, dict)), 1)
    return ValidationResult(records=rec, per_gene=pd.concat(per_gene, ignore_index=True) if per_gene else pd.DataFrame(),
                            curves=tuple(curves), splits=tuple(splits), skipped={}, options=opts, timings=timings,
                            out=str(out))


# ----------------------------------------------------------------------------- inputs
def _read_sections(manifest, sections, genes) -> tuple[list, list[str], list[str]]:
    """The manifest's sections, restricted to the genes every section with counts has."""
    from ..io.readers import read_manifest
    from ..io.section import select_genes

    secs = read_manifest(manifest, sections, genes=genes, drop_missing_genes=True)
    with_counts = [s for s in secs if s.has_counts]
    if not with_counts:
        if genes is not None:
            g = list(genes)
            raise StimageInputError(f"{manifest}: no section has counts of the {len(g)} listed genes (e.g. {g[:3]}): "
                                    "either none of them is measured (check the names against the counts tables) "
                                    "or the manifest has no counts; validation compares predictions with counts.")
        raise StimageInputError(f"{manifest}: no section has counts; validation compares predictions with counts.")
    order = list(genes) if genes is not None else with_counts[0].genes
    common = [g for g in order if all(g in set(s.genes) for s in with_counts)]
    dropped = [g for g in order if g not in set(common)]
    if not common:
        raise StimageInputError(f"{manifest}: the sections share none of the genes; give a gene list they all have.")
    if dropped:
        log.warning("%d genes are not measured in every section and are left out (e.g. %s)", len(dropped), dropped[:5])
    out = []
    for s in secs:
        out.append(select_genes(s, common)[0] if s.has_counts else s)
    return out, common, dropped


class _Quiet:
    """Raise some loggers to ERROR inside a ``with`` block."""

    def __init__(self, *names):
        self.loggers = [logging.getLogger(n) for n in names]
        self.levels: list = []

    def __enter__(self):
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for lg, lv in zip(self.loggers, self.levels):
            lg.setLevel(lv)


#: Recipe fields added after runs were made, with their value before: left out of the keys at that value,
#: so models and folds of earlier runs stay valid.
_ADDED_FIELDS = {"composition": False}


def _config_key(cfg) -> dict:
    from ..train_config import RESUMABLE_FIELDS as _RESUMABLE_FIELDS

    return {k: v for k, v in cfg.to_dict().items()
            if k not in _RESUMABLE_FIELDS and not (k in _ADDED_FIELDS and v == _ADDED_FIELDS[k])}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


# ----------------------------------------------------------------------------- fold files
def _read_fold(f_json: Path, f_genes: Path, fp: dict) -> dict | None:
    if not (f_json.is_file() and f_genes.is_file()):
        return None
    try:
        d = json.loads(f_json.read_text())
        if d.get("fingerprint") != json.loads(json.dumps(fp)):
            log.info("%s: settings changed; the fold is run again", f_json.name)
            return None
        d["per_gene"] = pd.read_parquet(f_genes)
        return d
    except Exception as e:  # noqa: BLE001 - an unreadable file is a fold to redo
        log.warning("%s: unreadable (%s); the fold is run again", f_json, e)
        return None


def _write_fold(done: dict, f_json: Path, f_genes: Path) -> None:
    from ..evaluate import write_json_atomic

    write_atomic(f_genes, lambda tmp: done["per_gene"].to_parquet(tmp, index=False))
    write_json_atomic({k: v for k, v in done.items() if k != "per_gene"}, f_json)  # last: marks the fold done


# ----------------------------------------------------------------------------- one fold
class _Context:
    def __init__(self, sections: dict, genes: list[str], cfg, out: Path, opts: dict):
        self.sections, self.genes, self.cfg, self.out, self.opts = sections, genes, cfg, out, opts
        self.features: dict = {}  # handcrafted features of prepared tiles, per (tile cache key, background)
        self.keep_shifted = False
        self.shift_dir = out / "shifted"


def _model_dir(split: Split, ctx: _Context) -> Path:
    key = {"train": list(split.train), "val": list(split.val), "config": _config_key(ctx.cfg), "genes": ctx.genes}
    return ctx.out / "models" / hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _train(split: Split, ctx: _Context):
    from ..ensemble import CONFIG_NAME, Ensemble
    from ..train import train

    d = _model_dir(split, ctx)
    if (d / CONFIG_NAME).is_file():
        return Ensemble.load(d, ctx.cfg.device)
    secs = [ctx.sections[n] for n in split.train + split.val]
    return train(secs, genes=ctx.genes, out=d, sections=list(split.train), val_sections=list(split.val),
                 config=ctx.cfg, progress=False)


def single_member(ens):
    """The ensemble's first member as an ensemble of one (same tiles, stain, background and depth handling)."""
    from ..ensemble import Ensemble

    meta = {k: v for k, v in ens.meta.items() if k != "members"}
    meta["run_id"] = f"{ens.run_id}-member0"
    one = Ensemble([ens.members[0]], genes=ens.genes, celltypes=ens.celltypes, tile_um=ens.tile_um,
                   out_px=ens.out_px, stain=ens.stain, meta=meta, domain=ens.domain, background=ens.background,
                   reference_depth=ens.reference_depth)
    return one.to(ens.device)


def _prepared_features(ctx: _Context, ens, sec, tiles: np.ndarray | None = None) -> np.ndarray:
    """Handcrafted features of a section's tiles as the model's input pipeline starts from them (cached)."""
    from ..baseline import handcrafted_features
    from ..tiles import extract_tiles

    key = (str(sec.image_path), sec.name, ens.tile_um, ens.out_px, ens.background)
    if key not in ctx.features:
        if tiles is None:
            tiles = extract_tiles(sec.image, sec.xy, ens.tile_um, ens.out_px, cache=True)
        ctx.features[key] = handcrafted_features(ens.prepare_tiles(tiles))
    return ctx.features[key]


def _fit_baseline(split: Split, ctx: _Context, ens):
    from ..baseline import RidgeBaseline
    from ..train_data import _counts

    train = [ctx.sections[n].drop_outside_image() for n in split.train]
    F = np.concatenate([_prepared_features(ctx, ens, s) for s in train])
    Y = np.concatenate([_counts(s) for s in train])
    groups = np.concatenate([[s.name] * s.adata.n_obs for s in train])
    cts = [s.adata.obsm.get(K.CELLTYPE_PROPORTIONS) for s in train]
    ct = pd.concat(cts) if all(isinstance(c, pd.DataFrame) for c in cts) else None
    return RidgeBaseline(tile_um=ens.tile_um, out_px=ens.out_px).fit(None, Y, groups, features=F, celltypes=ct,
                                                                      genes=ctx.genes)


def _run_fold(split: Split, ctx: _Context) -> dict:
    from ..baseline import handcrafted_features
    from ..io.section import section_depth
    from ..shifts import Shift, shift_section
    from ..tiles import extract_tiles

    t0 = time.perf_counter()
    ens = _train(split, ctx)
    t_train = time.perf_counter() - t0
    rb = _fit_baseline(split, ctx, ens)
    train_patients = {ctx.sections[n].patient for n in split.train}
    records, per_gene, curves = [], [], []
    shift_dir = ctx.shift_dir / _safe(split.fold if split.protocol == "acquisition" else split.id)
    t0 = time.perf_counter()
    for name in split.test:
        base = ctx.sections[name].drop_outside_image()
        d_obs = section_depth(base)
        for shift in split.shifts or (Shift("reference"),):
            if shift.is_identity:
                sec = base
            else:
                sec = shift_section(base, shift, shift_dir, crop_margin_um=ctx.opts["crop_margin_um"])
                sec = sec.drop_outside_image()
            tiles = extract_tiles(sec.image, sec.xy, ens.tile_um, ens.out_px, cache=shift.is_identity)
            dval = d_obs if ctx.opts["depth"] == "observed" else None
            preds = _predict_both(ens, sec, tiles, dval)
            X = (_prepared_features(ctx, ens, sec, tiles) if shift.is_identity
                 else handcrafted_features(ens.prepare_tiles(tiles)))
            bl = {"log1p": rb.predict(features=X), "celltypes": rb.predict_celltypes(features=X)}
            info = {"protocol": split.protocol, "fold": split.fold, "train": ",".join(split.train),
                    "held_out": split.held_out, "section": sec.name if not shift.is_identity else name,
                    "source_section": name, "acquisition": shift.name, "patient": str(base.patient or ""),
                    "platform": platform_of(base), "held_out_patient": bool(base.patient not in train_patients)}
            r, g, c = _score(sec, preds, bl, rb, ctx.genes, info, ctx.opts)
            records += r
            per_gene.append(g)
            curves += c
            if not shift.is_identity and not ctx.keep_shifted:
                shutil.rmtree(sec.image_path, ignore_errors=True)
    if shift_dir.is_dir() and not any(shift_dir.iterdir()):
        shift_dir.rmdir()
    return {"format": FORMAT, "split": split.to_dict(), "model_dir": str(_model_dir(split, ctx)),
            "records": records, "per_gene": pd.concat(per_gene, ignore_index=True), "curves": curves,
            "seconds": {"train": round(t_train, 1), "predict_and_score": round(time.perf_counter() - t0, 1)}}


def _predict_both(ens, sec, tiles: np.ndarray, depth: float | None) -> dict:
    """The ensemble's and its first member's predictions of one section's tiles (one feature pass), as
    prediction AnnDatas (``X``, both variance layers, cell-type means; the member's epistemic variance is 0)."""
    import anndata as ad

    r = ens.predict_tiles(tiles, depth=depth, member=0)
    obs = pd.DataFrame(index=pd.Index(sec.adata.obs_names.astype(str)))
    var = pd.DataFrame(index=pd.Index(ens.genes))
    out = {}
    for m, mean, alea, epi, ct in (
            ("ensemble", r["mean"], r["aleatoric_var"], r["epistemic_var"], r["celltype_mean"]),
            ("single_member", r["member_mean"], r["member_aleatoric_var"], np.zeros_like(r["member_mean"]),
             r.get("member_celltype_mean"))):
        a = ad.AnnData(X=mean, obs=obs.copy(), var=var.copy())
        a.layers[K.ALEATORIC], a.layers[K.EPISTEMIC] = alea, epi
        if ct is not None and ens.celltypes:
            a.obsm[K.CELLTYPE_MEAN] = pd.DataFrame(ct, index=obs.index, columns=ens.celltypes)
        a.uns[K.UNS] = {}
        if m == "ensemble" and ens.domain is not None and "domain_distance" in r:
            a.uns[K.UNS]["domain"] = ens.domain.summary(r["domain_distance"])
        out[m] = a
    return out


# ----------------------------------------------------------------------------- scoring
def _dense(X) -> np.ndarray:
    import scipy.sparse as sp

    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)


def _score(sec, preds: dict, bl: dict, rb, genes: list[str], info: dict, opts: dict):
    """Tidy records, per-gene rows and curves of one (held-out section, acquisition)."""
    ids = list(preds["ensemble"].obs_names)
    obs = sec.adata[ids, genes]
    Y = _dense(obs.X)
    xy = sec.xy[sec.adata.obs_names.get_indexer(ids)]
    W = spatial_weights(xy)
    spots_obs = sec.adata.obs.loc[ids]
    ct_obs = sec.adata.obsm.get(K.CELLTYPE_PROPORTIONS)
    ct_obs = ct_obs.loc[ids] if isinstance(ct_obs, pd.DataFrame) else None
    rows, genes_rows, curves = [], [], []

    def rec(model, metric, target, value):
        v = None if value is None or (isinstance(value, float) and not np.isfinite(value)) else float(value)
        rows.append({**info, "model": model, "metric": metric, "target": target, "value": v})

    # predictions on each target's scale
    scaled: dict[str, dict[str, np.ndarray]] = {}
    for m in ("ensemble", "single_member"):
        mu = _dense(preds[m][ids, genes].X)
        scaled[m] = {t: transform(mu, t) for t in TARGETS}
    L = np.asarray(bl["log1p"], np.float64)[:, pd.Index(rb.genes).get_indexer(genes)]
    scaled["baseline"] = {"log1p_counts": L, "log1p_cp10k": transform(np.clip(np.expm1(L), 0, None), "log1p_cp10k")}
    obs_scaled = {t: transform(Y, t) for t in TARGETS}
    pearson: dict = {}
    for m in MODELS:
        mu = _dense(preds[m][ids, genes].X) if m != "baseline" else np.clip(np.expm1(L), 0, None)
        df, summ = score_genes(mu, Y, genes, pred_on_scale=scaled[m] if m == "baseline" else None)
        for t in TARGETS:
            ll = lees_l(scaled[m][t], obs_scaled[t], W)
            ss = map_ssim(scaled[m][t], obs_scaled[t], xy, spots=spots_obs)
            sub = df[df["target"] == t]
            genes_rows.append(pd.DataFrame({
                "protocol": info["protocol"], "fold": info["fold"], "section": info["section"],
                "acquisition": info["acquisition"], "model": m, "target": t, "gene": genes,
                "pearson": sub["pearson"].to_numpy(), "spearman": sub["spearman"].to_numpy(), "lees_l": ll,
                "ssim": ss}))
            pearson[(m, t)] = sub["pearson"].to_numpy()
            p, s_ = summ[t]["pearson"], summ[t]["spearman"]
            rec(m, "pearson_mean", t, p["mean"])
            rec(m, "pearson_median", t, p["median"])
            rec(m, "n_r_gt_0.3", t, p["n_r_gt_0.3"])
            rec(m, "spearman_mean", t, s_["mean"])
            rec(m, "lees_l_mean", t, float(np.mean(ll)))
            rec(m, "ssim_mean", t, float(np.nanmean(ss)) if np.isfinite(ss).any() else None)
        rec(m, "observed_depth", "counts", float(np.mean(Y.sum(1))))
        rec(m, "predicted_depth", "counts", float(np.mean(mu.sum(1))))
        if m != "baseline":
            a = preds[m][ids, genes]
            alea, epi = _dense(a.layers[K.ALEATORIC]), _dense(a.layers[K.EPISTEMIC])
            cal = calibration(Y, mu, alea, epi)
            for k in ("coverage_50", "coverage_90", "interval_coverage_90", "nll"):
                rec(m, k, "counts", cal[k])
            curves.append({**info, "model": m, "kind": "reliability", "x": cal["curve"]["nominal"],
                           "y": cal["curve"]["empirical"]})
            curves.append({**info, "model": m, "kind": "pit_histogram", "x": list(np.linspace(0, 1, 11)),
                           "y": [float(v) for v in pit_histogram(Y, mu, alea + epi)]})
            if m == "ensemble":
                alo = calibration(Y, mu, alea, None, levels=(0.5, 0.9))
                rec(m, "coverage_50_aleatoric_only", "counts", alo["coverage_50"])
                rec(m, "coverage_90_aleatoric_only", "counts", alo["coverage_90"])
                ur = uncertainty_ranking(Y, mu, alea, epi, retain=RETAIN)
                sp_ = ur["spots"]
                for k in ("by_sd", "by_epistemic_sd", "by_predicted_depth", "oracle"):
                    rec(m, f"err{int(RETAIN * 100)}_{k}", "log1p_counts", sp_[f"error_retained_{RETAIN:g}_{k}"])
                rec(m, "spearman_relative_sd_vs_r", "log1p_counts", ur["genes"]["spearman_relative_sd_vs_r"])
                rec(m, "relative_epistemic_sd", "counts", float(np.sqrt(epi.mean()) / max(mu.mean(), 1e-12)))
                curves.append({**info, "model": m, "kind": "sparsification", "x": sp_["curve"]["retained"],
                               **{f"y_{k}": sp_["curve"][k] for k in ("sd", "epistemic_sd", "predicted_depth",
                                                                       "oracle")}})
                dom = (preds[m].uns.get(K.UNS) or {}).get("domain") or {}
                if dom.get("median_percentile") is not None:
                    rec(m, "domain_median_percentile", "", float(dom["median_percentile"]))
        if ct_obs is not None:
            if m == "baseline":
                ctp = None if bl["celltypes"] is None else pd.DataFrame(bl["celltypes"], index=ids, columns=rb.celltypes)
            else:
                ctp = preds[m].obsm.get(K.CELLTYPE_MEAN)
                ctp = None if ctp is None else pd.DataFrame(ctp, index=preds[m].obs_names).loc[ids]
            cm = celltype_metrics(ctp, ct_obs) if ctp is not None else None
            if cm:
                rec(m, "celltype_pearson_mean", "celltypes", cm["pearson_summary"]["mean"])
                rec(m, "celltype_mae", "celltypes", cm["mae"])
                rec(m, "celltype_js_divergence", "celltypes", cm["js_divergence"])
                rec(m, "celltype_dominant_agreement", "celltypes", cm["dominant_agreement"])
    for a, b in COMPARISONS:
        for t in TARGETS:
            pt = paired_test(pearson[(a, t)], pearson[(b, t)])
            m = f"{a}-{b}"
            rec(m, "delta_pearson_mean", t, pt["mean_difference"])
            rec(m, "wilcoxon_p_two_sided", t, pt["p_two_sided"])
            rec(m, "wilcoxon_p_greater", t, pt["p_greater"])
            if (a, b) == COMPARISONS[0] and opts["n_boot"] > 0:
                bs = bootstrap_mean_r_difference(scaled[a][t], scaled[b][t], obs_scaled[t], n_resamples=opts["n_boot"],
                                                 seed=opts["seed"])
                rec(m, "bootstrap_ci_low", t, bs["ci_low"])
                rec(m, "bootstrap_ci_high", t, bs["ci_high"])
    return rows, pd.concat(genes_rows, ignore_index=True), curves
