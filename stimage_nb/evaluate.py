"""Evaluate predictions against observed counts: correlations, calibration, cell types, a baseline.

:func:`evaluate` reads every ``PRED_DIR/<section>.h5ad`` written by :func:`stimage_nb.predict.predict_manifest`,
matches it to the section's observed counts in a manifest, and writes ``metrics.json`` (summaries),
``metrics_per_gene.csv`` (one row per section x model x target x gene) and figures.

The metrics (the two targets, calibration by the randomised PIT, uncertainty ranking, cell types) and
their protocol live in :mod:`stimage_nb.metrics`; they are re-exported here. The protocol is recorded in
``metrics.json["protocol"]``.

Baseline (``baseline=True``): a ridge regression on handcrafted colour/texture features of the same
tiles (:mod:`stimage_nb.baseline`), trained in the same run on the prediction's training sections
(``uns["stimage_nb"]["train_sections"]``) from the same manifest, with the same tile size in µm and
pixels, and scored with the same metrics on the same held-out spots. It regresses ``log1p`` counts, so
its own ``log1p`` output is scored for ``log1p_counts`` (the numbers equal
:func:`stimage_nb.baseline.evaluate_baseline`'s) and ``expm1`` of it (floored at 0) is its expected count
for ``log1p_cp10k``. It has no predictive distribution, so it gets correlations (and cell-type metrics)
but no calibration.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from . import _keys as K
from .atomic import finite_or_none, save_figure, write_csv, write_json
from .errors import StimageInputError
from .metrics import (  # noqa: F401 - re-exported: the metrics' names were first defined here
    _EPS,
    COVERAGE_LEVELS,
    R_THRESHOLD,
    RETAINED_FRACTIONS,
    TARGETS,
    _colwise_pearson,
    calibration,
    celltype_metrics,
    correlations,
    nb_cdf,
    nb_logpmf,
    nb_ppf,
    pit_coverage,
    pit_histogram,
    score_genes,
    summarize,
    transform,
    uncertainty_ranking,
)
from .names import name_of_file

log = logging.getLogger(__name__)


__all__ = [
    "evaluate", "transform", "correlations", "summarize", "nb_logpmf", "nb_cdf", "pit_coverage", "pit_histogram",
    "calibration", "uncertainty_ranking", "celltype_metrics", "score_genes", "TARGETS",
]


# ----------------------------------------------------------------------------- I/O helpers
def _json_default(o):
    if isinstance(o, (np.floating,)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


_clean = finite_or_none  # the name the harness imports


def write_json_atomic(obj, path: str | os.PathLike) -> Path:
    """Write strict JSON (non-finite floats as null) via a temporary file and ``os.replace``."""
    return write_json(path, obj, strict=True, indent=1, default=_json_default)


def _dense(X) -> np.ndarray:
    import scipy.sparse as sp

    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)


def _pred_files(pred_dir: Path, sections: Iterable[str] | None) -> list[Path]:
    if not pred_dir.is_dir():
        raise StimageInputError(f"{pred_dir}: prediction directory not found. Run `stimage-nb predict ... "
                                f"--out {pred_dir}` first.")
    files = sorted(p for p in pred_dir.glob("*.h5ad") if not p.name.startswith("."))
    if sections is not None:
        want = list(sections)
        files = [p for p in files if name_of_file(p, ".h5ad") in want]
        missing = sorted(set(want) - {name_of_file(p, ".h5ad") for p in files})
        if missing:
            raise StimageInputError(f"{pred_dir}: no predictions for sections {missing}.")
    if not files:
        raise StimageInputError(f"{pred_dir}: no <section>.h5ad prediction files. Run `stimage-nb predict` "
                                "with --out pointing here first.")
    return files


def _check_pred(adata, path: Path) -> dict:
    prov = dict(adata.uns.get(K.UNS, {}))
    for layer in (K.EPISTEMIC,):  # aleatoric_var is absent for point predictors (e.g. imported Path2Space)
        if layer not in adata.layers:
            raise StimageInputError(f"{path}: prediction lacks layers[{layer!r}]; was it written by "
                                    "`stimage-nb predict`?")
    return prov


# ----------------------------------------------------------------------------- baseline
class _BaselineCache:
    """Fit the ridge baseline once per (training sections, genes, tile geometry) within a run."""

    def __init__(self, manifest: Path, progress: bool, train_manifest: str | os.PathLike | None = None):
        self.manifest = manifest
        self.train_manifest = train_manifest
        self.progress = progress
        self._fitted: dict = {}
        self._located: dict = {}

    def locate(self, prov: dict, train_sections: Sequence[str]):
        """Where the model's training sections are (:func:`stimage_nb.io.provenance.locate_training_data`)."""
        from .io.provenance import TrainingData, locate_training_data, record_from_json

        raw = prov.get("training_data")
        key = (str(raw), tuple(train_sections))
        if key not in self._located and prov.get("baseline_sections"):  # named by the user: not the model's own
            self._located[key] = TrainingData(Path(self.train_manifest or self.manifest), "--baseline-sections", False,
                                              "sections named by the user, read by name")
        if key not in self._located:
            self._located[key] = locate_training_data(record_from_json(raw), train_sections,
                                                      evaluation_manifest=self.manifest,
                                                      train_manifest=self.train_manifest)
            td = self._located[key]
            log.info("baseline training sections %s from the %s %s%s", list(train_sections), td.source, td.manifest,
                     "" if td.verified else f" ({td.note})" if td.note else " (files not checked)")
        return self._located[key]

    def predict(self, train_sections: Sequence[str], genes: Sequence[str], tile_um: float, out_px: int, section,
                prov: dict | None = None):
        """The fitted baseline and its :class:`~stimage_nb.baseline.BaselinePrediction` for ``section``."""
        from .baseline import RidgeBaseline
        from .io.readers import read_manifest

        td = self.locate(prov or {}, train_sections)
        key = (str(td.manifest), tuple(train_sections), tuple(genes), float(tile_um), int(out_px))
        if key not in self._fitted:
            log.info("fitting the ridge baseline on %s (%d genes, %g µm tiles at %d px)",
                     list(train_sections), len(genes), tile_um, out_px)
            train = read_manifest(td.manifest, list(train_sections), genes=list(genes))
            self._fitted[key] = RidgeBaseline(tile_um=tile_um, out_px=out_px).fit(train, progress=self.progress)
        rb = self._fitted[key]
        return rb, rb.predict_sections([section], progress=self.progress)[section.name]


# ----------------------------------------------------------------------------- main entry point
def evaluate(pred_dir: str | os.PathLike, manifest: str | os.PathLike, out: str | os.PathLike | None = None,
             baseline: bool = True, *, sections: Sequence[str] | None = None, figures: bool = True,
             progress: bool = True, baseline_sections: Sequence[str] | None = None,
             train_manifest: str | os.PathLike | None = None) -> dict:
    """Score the predictions in ``pred_dir`` against the observed data of ``manifest``.

    Parameters
    ----------
    pred_dir
        Folder of ``<section>.h5ad`` predictions (``stimage-nb predict --out``).
    manifest
        The manifest CSV holding the same sections with their counts (rows without counts are skipped
        with a note).
    out
        Where ``metrics.json``, ``metrics_per_gene.csv`` and ``figures/`` go (default: ``pred_dir``).
    baseline
        Also train and score the ridge baseline (see the module docstring) in the same run.
    sections
        Evaluate only these sections (default: every prediction file).
    figures
        Write the correlation-distribution and calibration figures.
    progress
        Show progress bars.
    baseline_sections
        Train the baseline on these manifest sections instead of the prediction's training sections (a
        model trained elsewhere, e.g. an imported Path2Space model, records none).
    train_manifest
        Where the model's training sections are, for the baseline (default: found from the record
        the model keeps of its training files, :mod:`stimage_nb.io.provenance`: the recorded manifest,
        else this ``manifest`` when it holds the same files). Needed only when neither holds them.

    Returns
    -------
    The content of ``metrics.json`` (a JSON-compatible dict). When the baseline cannot be trained
    (its training sections cannot be found), each section's ``baseline`` says why in ``skipped``.
    """
    from .io.prediction import read_prediction
    from .io.readers import read_manifest

    pred_dir = Path(pred_dir)
    manifest = Path(manifest)
    files = _pred_files(pred_dir, sections)
    out = Path(out) if out is not None else pred_dir
    out.mkdir(parents=True, exist_ok=True)
    bl = _BaselineCache(manifest, progress, train_manifest) if baseline else None
    patients = _manifest_patients(manifest)

    result: dict = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "package_version": _package_version(),
        "pred_dir": str(pred_dir.resolve()),
        "manifest": str(manifest.resolve()),
        "protocol": PROTOCOL,
        "sections": {},
        "skipped": {},
    }
    per_gene: list[pd.DataFrame] = []
    it = files
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(files, desc="evaluate", leave=False)
    for path in it:
        pred = read_prediction(path)  # one clear error for a file that is not a prediction
        prov = _check_pred(pred, path)
        name = str(prov.get("section") or name_of_file(path, ".h5ad"))
        genes = [str(g) for g in pred.var_names]
        try:
            (sec,) = read_manifest(manifest, [name], genes=genes, drop_missing_genes=True)
        except StimageInputError as e:
            if "unknown sections" in str(e):
                result["skipped"][name] = f"section {name!r} is not in the manifest {manifest}"
                log.warning("%s: skipped (not in the manifest)", name)
                continue
            raise
        if not sec.has_counts:
            result["skipped"][name] = f"the manifest row of {name!r} has no counts; nothing to compare with"
            log.warning("%s: skipped (no counts in %s)", name, manifest)
            continue
        if baseline_sections:
            prov["baseline_sections"] = list(baseline_sections)
        entry, df = _evaluate_section(pred, sec, prov, bl, path, patients)
        result["sections"][name] = entry
        per_gene.append(df.assign(section=name))

    result["summary"] = _overall(result["sections"])
    if per_gene:
        pg = pd.concat(per_gene, ignore_index=True)[["section", "model", "target", "gene", "pearson", "spearman"]]
        result["per_gene_csv"] = str(write_csv(pg, out / "metrics_per_gene.csv"))
    else:
        pg = None
    if figures and result["sections"]:
        result["figures"] = _figures(result, pg, out)
    write_json_atomic(result, out / "metrics.json")
    log.info("wrote %s", out / "metrics.json")
    return _clean(result)


PROTOCOL = {
    "log1p_counts": "Pearson/Spearman per gene across spots of log1p(predicted mean) vs log1p(observed counts) "
                    "(STimage protocol; dominated by spot depth)",
    "log1p_cp10k": "the same after scaling each spot to 1e4 counts over the evaluated gene panel, for both observed "
                   "counts and predicted means (depth-normalised, gene-specific)",
    "summary": f"mean/median over genes with a defined correlation; n_r_gt_{R_THRESHOLD:g} = genes with r > {R_THRESHOLD}",
    "calibration": "negative binomial moment-matched to mean = X and variance = aleatoric_var + epistemic_var "
                   "(Poisson where variance <= mean); coverage_50/90 = randomised-PIT coverage of the central "
                   "50%/90% intervals (in expectation); interval_coverage_* = naive quantile-interval coverage "
                   "(conservative for discrete counts); nll = mean negative log-likelihood (nats) per spot and gene; "
                   "aleatoric_only = the same with variance = aleatoric_var",
    "uncertainty_ranking": "genes: Spearman across genes of relative predictive SD sqrt(mean var)/mean with "
                           "Pearson r (log1p counts); mean r of the half of genes with the smallest relative SD "
                           "vs the half with the highest predicted mean (baseline proxy). spots: per gene, mean "
                           "|log1p error| of the 80% of spots with the smallest log-scale SD sqrt(var)/(1+mean) "
                           "over that of all spots (1 = random; oracle ranks by the error; baseline keeps the spots with "
                           "the highest predicted panel depth), averaged over genes",
    "celltypes": "per-type Pearson across spots of predicted mean probability vs proportion; mae over spots and types; "
                 "mean Jensen-Shannon divergence (base 2) per spot; dominant_agreement = argmax match rate",
    "baseline": "ridge regression on handcrafted colour/texture features of the same tiles (stimage_nb.baseline), "
                "trained in the same run on the prediction's train_sections with the same tile_um/out_px",
}


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("stimage_nb")
    except Exception:  # noqa: BLE001
        return "unknown"


def _as_list(v) -> list[str]:
    """A provenance list (h5ad stores lists as arrays, a single name as a string)."""
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    return [str(x) for x in np.asarray(v).ravel().tolist()]


def _is_training_section(sec, prov: dict, train_sections: Sequence[str]) -> bool:
    """Was ``sec`` trained on? By its image's sha256 when the model records its files (a section of another lab
    may share a training section's name), else by name."""
    from .io.provenance import record_from_json, sha256_file

    rec = record_from_json(prov.get("training_data"))
    if rec is None or sec.image_path is None or not Path(sec.image_path).is_file():
        return sec.name in train_sections
    sha = sha256_file(sec.image_path)
    return any(f.get("role") == "image" and f.get("sha256") == sha
               for r in rec.get("sections", []) if r.get("section") in set(train_sections) for f in r.get("files", []))


def _recorded_patients(prov: dict) -> set[str]:
    """Patients of the training sections as the model recorded them (another lab's manifest lacks them)."""
    from .io.provenance import record_from_json

    rec = record_from_json(prov.get("training_data")) or {}
    train = set(_as_list(prov.get("train_sections")))
    return {str(r["patient"]) for r in rec.get("sections", []) if r.get("patient") and r.get("section") in train}


def _manifest_patients(manifest: Path) -> dict:
    try:
        m = pd.read_csv(manifest, dtype=str)
    except Exception:  # noqa: BLE001 - read_manifest reports a bad manifest properly
        return {}
    if "patient" not in m.columns:
        return {}
    return dict(zip(m["section"], m["patient"]))


def _evaluate_section(pred, sec, prov: dict, bl: _BaselineCache | None, path: Path,
                      patients: dict) -> tuple[dict, pd.DataFrame]:
    name = sec.name
    have = set(sec.adata.var_names)
    genes = [g for g in pred.var_names if g in have]
    dropped = [g for g in pred.var_names if g not in have]
    if dropped:
        log.warning("%s: %d predicted genes are not in the counts and are not scored (e.g. %s)",
                    name, len(dropped), dropped[:5])
    in_pred = sec.adata.obs_names.isin(pred.obs_names)
    ids = sec.adata.obs_names[in_pred]  # the section's order, so tile caches are shared with prediction
    if len(ids) < 3:
        raise StimageInputError(
            f"{path}: only {len(ids)} of its {pred.n_obs} spot ids match the counts of section {name!r} "
            f"(e.g. prediction {list(pred.obs_names[:3])} vs counts {list(sec.adata.obs_names[:3])}). "
            "Was it predicted from another manifest?")
    p = pred[ids, genes]
    s = sec.adata[ids, genes]
    Y = _dense(s.X)
    mu = _dense(p.X)
    epi = _dense(p.layers[K.EPISTEMIC])
    has_dist = K.ALEATORIC in p.layers
    alea = _dense(p.layers[K.ALEATORIC]) if has_dist else np.zeros_like(epi)
    train_sections = _as_list(prov.get("train_sections"))
    recorded = _recorded_patients(prov)  # by the model's record when it has one: another lab reuses names
    train_patients = sorted(recorded if recorded else {patients[t] for t in train_sections if patients.get(t)})
    entry: dict = {
        "n_spots": int(len(ids)),
        "n_spots_pred": int(pred.n_obs),
        "n_spots_counts": int(sec.adata.n_obs),
        "n_genes": len(genes),
        "genes_missing_from_counts": dropped,
        "train_sections": train_sections,
        "patient": sec.patient,
        "held_out_patient": bool(sec.patient and train_patients and sec.patient not in train_patients),
        "provenance": {k: prov.get(k) for k in ("run_id", "backbone", "n_members", "tile_um", "out_px",
                                               "weights_sha256") if k in prov},
    }
    if prov.get("domain"):  # how unlike the training data the section looks (stimage_nb.domain)
        entry["domain"] = {k: (v.item() if hasattr(v, "item") else v) for k, v in dict(prov["domain"]).items()}
    if _is_training_section(sec, prov, train_sections):
        entry["warning"] = f"{name} is one of the training sections: these are not held-out metrics"
        log.warning("%s: section was used for training; its metrics are not held-out", name)
    obs_depth, pred_depth = float(np.median(Y.sum(1))), float(np.median(mu.sum(1)))
    entry["depth"] = {  # a depth shift (another protocol or patient) shows up here and in the calibration
        "observed_median_panel_counts": obs_depth, "predicted_median_panel_counts": pred_depth,
        "predicted_over_observed": pred_depth / obs_depth if obs_depth > 0 else None,
    }
    df, summ = score_genes(mu, Y, genes)
    df["model"] = "model"
    if has_dist:
        cal = calibration(Y, mu, alea, epi)
        cal["aleatoric_only"] = calibration(Y, mu, alea, None)
    else:  # point predictions (not counts): no predictive distribution to calibrate
        cal = {"skipped": f"the prediction has no layers['{K.ALEATORIC}']: the model gives point predictions, not "
                          "a count distribution (e.g. an imported Path2Space model); the uncertainty ranking below "
                          "uses the epistemic variance only"}
    entry["model"] = {"genes": summ, "calibration": cal, "uncertainty_ranking": uncertainty_ranking(Y, mu, alea, epi)}
    ct_obs = sec.adata.obsm.get(K.CELLTYPE_PROPORTIONS)
    ct_obs = None if ct_obs is None else pd.DataFrame(ct_obs, index=sec.adata.obs_names).loc[ids]
    ct_pred = pred.obsm.get(K.CELLTYPE_MEAN)
    if ct_obs is not None and ct_pred is not None:
        ct_pred = pd.DataFrame(ct_pred, index=pred.obs_names).loc[ids]
        entry["model"]["celltypes"] = celltype_metrics(ct_pred, ct_obs)
    frames = [df]
    if bl is not None:
        res, bdf = _score_baseline(bl, sec, prov, ids, genes, Y, ct_obs, path)
        entry["baseline"] = res
        if bdf is not None:
            frames.append(bdf)
        if "genes" in res:
            comp = {}
            for t in TARGETS:
                m = entry["model"]["genes"][t]["pearson"]["mean"]
                b_ = res["genes"][t]["pearson"]["mean"]
                comp[t] = {"model_mean_pearson": m, "baseline_mean_pearson": b_,
                           "model_beats_baseline": None if m is None or b_ is None else bool(m > b_)}
            entry["comparison"] = comp
    return entry, pd.concat(frames, ignore_index=True)


def _score_baseline(bl: _BaselineCache, sec, prov: dict, ids, genes, Y, ct_obs,
                    path: Path) -> tuple[dict, pd.DataFrame | None]:
    train_sections = _as_list(prov.get("baseline_sections")) or _as_list(prov.get("train_sections"))
    if not train_sections:
        return {"skipped": f"{path}: uns['{K.UNS}'] has no train_sections; cannot train the baseline (give "
                           "baseline_sections, CLI --baseline-sections)"}, None
    tile_um, out_px = prov.get("tile_um"), prov.get("out_px")
    if tile_um is None or out_px is None:
        return {"skipped": f"{path}: uns['{K.UNS}'] lacks tile_um/out_px; cannot tile like the model"}, None
    held = sec if len(ids) == sec.adata.n_obs else sec.subset(sec.adata.obs_names.isin(ids))
    held, _ = _restrict_genes(held, genes)
    try:
        rb, bp = bl.predict(train_sections, genes, float(tile_um), int(out_px), held, prov)
    except StimageInputError as e:
        if bl.train_manifest is not None:  # the user named the training manifest: a wrong one is an error
            raise
        log.warning("%s: baseline skipped: %s", sec.name, e)
        return {"skipped": f"the baseline could not be trained: {e}"}, None
    order = pd.Index(bp.genes).get_indexer(genes)
    L = np.asarray(bp.log1p, dtype=np.float64)[:, order]
    counts = np.clip(np.expm1(L), 0, None)
    df, summ = score_genes(counts, Y, genes, pred_on_scale={"log1p_counts": L})
    df["model"] = "baseline"
    res = {"genes": summ, "train_sections": train_sections, "tile_um": float(tile_um), "out_px": int(out_px),
           "alpha": float(getattr(rb, "alpha_", float("nan"))),
           "training_data": bl.locate(prov, train_sections).to_dict()}
    if bp.celltypes is not None and ct_obs is not None:
        res["celltypes"] = celltype_metrics(bp.celltypes.loc[list(ids)], ct_obs)
    return res, df


def _restrict_genes(section, genes):
    from .io.section import select_genes

    return select_genes(section, list(genes))


def _overall(sections: dict) -> dict:
    """Averages over evaluated sections of the per-section means."""
    out: dict = {"n_sections": len(sections)}
    for who in ("model", "baseline"):
        d = {}
        for t in TARGETS:
            vals = [e[who]["genes"][t]["pearson"]["mean"] for e in sections.values()
                    if who in e and "genes" in e[who] and e[who]["genes"][t]["pearson"]["mean"] is not None]
            d[t] = {"mean_pearson_over_sections": float(np.mean(vals)) if vals else None}
        out[who] = d
    by_target = {}
    for t in TARGETS:
        comps = [e["comparison"][t]["model_beats_baseline"] for e in sections.values() if "comparison" in e]
        if comps:
            by_target[t] = bool(all(c for c in comps if c is not None))
    if by_target:
        # the headline is on log1p counts (what the model is trained to predict); every target is in the dict beside it
        out["model_beats_baseline_every_section"] = by_target.get("log1p_counts")
        out["model_beats_baseline_every_section_by_target"] = by_target
    return out


def _figures(result: dict, per_gene: pd.DataFrame | None, out: Path) -> dict:
    from . import plotting as P

    fdir = out / "figures"
    fdir.mkdir(parents=True, exist_ok=True)
    figs = {}
    if per_gene is not None:
        for t in TARGETS:
            fig = P.correlation_distribution(per_gene, target=t)
            figs[f"correlation_{t}"] = str(save_figure(fig, fdir / f"correlation_{t}.png"))
    fig = P.calibration_plot(result)
    figs["calibration"] = str(save_figure(fig, fdir / "calibration.png"))
    if any("uncertainty_ranking" in e.get("model", {}) for e in result.get("sections", {}).values()):
        fig = P.sparsification_plot(result)
        figs["uncertainty_ranking"] = str(save_figure(fig, fdir / "uncertainty_ranking.png"))
    return figs
