"""Slide-level features of a cohort's predictions, in one table (one row per slide).

Columns of ``features.csv`` (written by :func:`write_features`; ``patient_id`` keys it for
``stimage-nb outcomes``, which averages a patient's slides):

============================  =======================================================================================
``slide_id``, ``patient_id``  the cohort table's names
``status``, ``error``         ``done`` or ``failed`` with the slide's one-line error (its features are then empty)
``n_spots``                   grid points over the tissue; ``n_spots_region`` those in ``--region`` (when given)
``domain_percentile``         median domain-shift percentile of the slide's points (~0.5: like the training data)
``pb_<GENE>``                 pseudo-bulk: mean predicted expression (counts per spot) over the tissue, or over the
                              ``--region`` annotation (:func:`~stimage_nb.cohort.pseudobulk`); its uncertainty is in
                              ``pseudobulk.csv`` (``sd``, ``var_aleatoric``, ``var_epistemic`` per slide and gene)
``celltype_<TYPE>``           predicted cell-type composition: mean predicted probability over the tissue
``spatialtype_<ST>``          fraction of the slide's points of each spatial type (:mod:`._types`)
``nhood_<A>_<B>``             neighbourhood-enrichment z-score of types A and B (squidpy)
``pam50_call``, ``pam50_<S>`` PAM50-like subtype and the correlation with each centroid (when centroids are given)
============================  =======================================================================================
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from .. import _keys as K
from ..atomic import write_atomic
from ..errors import StimageInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureOptions:
    """Settings of the slide-level features.

    Attributes
    ----------
    region
        Average the pseudo-bulk over the points in this annotation (shell pattern on ``obs["region"]``,
        e.g. ``"Tumo*r"``); ``None``: the whole tissue.
    genes
        Genes for the pseudo-bulk and the spatial types: a panel spec (``"breast_clinical"``, a file...;
        :func:`stimage_nb.panels.resolve_genes`), or ``None`` for all the model predicts. Panel genes the
        model does not predict are dropped with a warning.
    epistemic
        How the pseudo-bulk's epistemic variance is bounded (``"correlated"``, ``"independent"``).
    smooth_um
        Smooth every slide's predictions over this radius (µm) before the spatial types
        (:func:`stimage_nb.smoothing.smooth_prediction`); ``None``: no smoothing. The pseudo-bulk uses the raw predictions.
    spatial_types
        Compute the spatial types and their per-slide features.
    resolution, n_pcs, n_neighbors, max_spots, n_perms, seed
        Leiden resolution, PCA components, neighbours, spots sampled from the whole cohort to fit the types,
        neighbourhood-enrichment permutations, random seed.
    pam50_centroids
        A centroid table (:func:`~stimage_nb.cohort.read_centroids`) for PAM50-like calls; ``None``: none.
    """

    region: str | None = None
    genes: object = None
    epistemic: str = "correlated"
    smooth_um: float | None = None
    spatial_types: bool = True
    resolution: float = 0.5
    n_pcs: int = 20
    n_neighbors: int = 15
    max_spots: int = 10000
    n_perms: int = 200
    seed: int = 0
    pam50_centroids: str | None = None

    def __post_init__(self):
        """Fail before a cohort is predicted, not after."""
        from ..panels import needs_sections
        from ._pseudobulk import EPISTEMIC_MODES

        if self.epistemic not in EPISTEMIC_MODES:
            raise StimageInputError(f"epistemic must be one of {EPISTEMIC_MODES}, not {self.epistemic!r}")
        if needs_sections(self.genes):
            raise StimageInputError(f"genes={self.genes!r} is computed from training counts; the features take a "
                                    "fixed panel (stimage769, pam50, breast_clinical), a gene-list file or a list.")
        if self.genes is not None and isinstance(self.genes, str):
            from ..panels import resolve_genes

            resolve_genes(self.genes)  # an unknown name or a missing file fails here
        if self.smooth_um is not None and not self.smooth_um > 0:
            raise StimageInputError(f"smooth_um must be a positive radius in µm, not {self.smooth_um}")
        if self.n_perms < 1 or self.max_spots < 1 or self.n_pcs < 2 or self.n_neighbors < 2 or not self.resolution > 0:
            raise StimageInputError("invalid spatial-type settings: n_perms, max_spots >= 1, n_pcs, n_neighbors >= 2, "
                                    "resolution > 0.")
        if self.pam50_centroids is not None:
            from ._subtype import read_centroids

            read_centroids(self.pam50_centroids)  # a missing or malformed table fails here

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["genes"] = d["genes"] if d["genes"] is None or isinstance(d["genes"], str) else "list"
        d["pam50_centroids"] = str(d["pam50_centroids"]) if d["pam50_centroids"] else None
        return d


@dataclass(frozen=True)
class CohortFeatures:
    """The slide-level features of a cohort.

    Attributes
    ----------
    table
        One row per slide (module docstring), indexed by ``slide_id``.
    pseudobulk
        Long table: slide_id, region, gene, n_spots, mean, sd, var_aleatoric, var_epistemic.
    spatial_types
        The fitted :class:`~stimage_nb.cohort.SpatialTypes` (``None`` when not computed).
    subtypes
        :class:`~stimage_nb.cohort.SubtypeCalls` (``None`` without centroids).
    params
        The options and notes (e.g. why a part was skipped).
    """

    table: pd.DataFrame
    pseudobulk: pd.DataFrame
    spatial_types: object = None
    subtypes: object = None
    params: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return self.table

    def to_json(self) -> str:
        return json.dumps({"n_slides": len(self.table), "columns": list(self.table.columns), "params": self.params,
                           "spatial_types": json.loads(self.spatial_types.to_json()) if self.spatial_types else None,
                           "subtypes": json.loads(self.subtypes.to_json()) if self.subtypes else None},
                          indent=1, default=str)


def _read(pred):
    from ..io.prediction import read_prediction

    return read_prediction(pred)


def _feature_genes(pred, spec) -> list[str]:
    have = list(pred.var_names)
    if spec is None:
        return have
    from ..panels import resolve_genes

    panel = resolve_genes(spec)
    keep = [g for g in panel.genes if g in set(have)]
    if not keep:
        raise StimageInputError(f"none of the {len(panel)} genes of {panel.name} is predicted by this model.")
    return keep


def _smoothed(a, options: FeatureOptions):
    if options.smooth_um is None:
        return a
    from ..smoothing import smooth_prediction

    return smooth_prediction(a, radius_um=options.smooth_um, epistemic=options.epistemic)


def slide_summary(job: tuple) -> dict:
    """Per-slide part 1 (a task): pseudo-bulk over tissue and region, cell-type composition, domain
    shift, and a spot sample for fitting the spatial types."""
    from ._pseudobulk import pseudobulk
    from ._types import sample_spots

    slide, path, options, n_sample = job
    a = _read(path)
    genes = _feature_genes(a, options.genes)
    pbs = [pseudobulk(a, genes=genes, epistemic=options.epistemic, slide=slide)]
    if options.region is not None:
        pbs.append(pseudobulk(a, genes=genes, region=options.region, epistemic=options.epistemic, slide=slide))
    row = {"n_spots": int(a.n_obs)}
    if options.region is not None:
        row["n_spots_region"] = pbs[-1].n_spots
    if K.DOMAIN_PERCENTILE in a.obs:
        row["domain_percentile"] = float(np.median(a.obs[K.DOMAIN_PERCENTILE].to_numpy()))
    ct = a.obsm.get(K.CELLTYPE_MEAN)
    if ct is not None and a.n_obs:
        ct = ct if isinstance(ct, pd.DataFrame) else pd.DataFrame(ct)
        for c, v in ct.mean(0).items():
            row[f"celltype_{c}"] = float(v)
    sample = None
    if options.spatial_types and n_sample:
        sample = sample_spots(_smoothed(a, options), n_sample, seed=options.seed, genes=genes)
    return {"slide": slide, "genes": genes, "row": row, "pseudobulk": pd.concat([p.to_frame() for p in pbs]),
            "use": pbs[-1], "sample": sample}


def slide_types(job: tuple) -> dict:
    """Per-slide part 2 (a task): every point's spatial type, the composition and neighbourhood enrichment."""
    from ._types import type_features

    slide, path, types, options = job
    a = _smoothed(_read(path), options)
    labels = types.assign(a)
    return {"slide": slide, "row": type_features(a, labels, n_perms=options.n_perms, seed=options.seed)}


def _map(client, fn, items, progress: bool, desc: str):
    """[(item index, result, error)] of fn over items: on the Dask client, else here one by one."""
    if client is None:
        out = []
        for i, it in enumerate(items):
            try:
                out.append((i, fn(it), None))
            except Exception as e:  # noqa: BLE001
                out.append((i, None, e))
        return out
    from ..cluster import run_tasks

    return list(run_tasks(client, fn, items, progress=progress, desc=desc, unit="slide"))


def cohort_features(predictions: Mapping[str, object], *, patients: Mapping[str, str] | None = None,
                    options: FeatureOptions | None = None, client=None, progress: bool = False,
                    status: pd.DataFrame | None = None) -> CohortFeatures:
    """Slide-level features of predictions (module docstring): pseudo-bulk, cell-type composition,
    spatial types with neighbourhood enrichment, PAM50-like calls.

    Parameters
    ----------
    predictions
        ``{slide_id: prediction AnnData or .h5ad path}`` (the slides that were predicted).
    patients
        ``{slide_id: patient_id}``; default: each prediction's ``uns["stimage_nb"]["patient"]``.
    options
        :class:`FeatureOptions`.
    client
        A ``distributed.Client`` to run the per-slide parts on (one task per slide), or ``None``.
    status
        The cohort's status table: slides that failed get a row with their error and empty features.

    Returns
    -------
    :class:`CohortFeatures`.
    """
    o = options or FeatureOptions()
    slides = list(predictions)
    notes: dict = {}
    n_sample = max(50, o.max_spots // max(len(slides), 1)) if o.spatial_types else 0
    res = _map(client, slide_summary, [(s, predictions[s], o, n_sample) for s in slides], progress, "features")
    rows: dict[str, dict] = {}
    pb_frames, pb_use, samples, errors = [], {}, {}, {}
    genes = None
    for i, r, err in res:
        s = slides[i]
        if err is not None:
            errors[s] = f"features: {type(err).__name__}: {err}"
            continue
        rows[s] = dict(r["row"])
        pb_frames.append(r["pseudobulk"])
        pb_use[s] = r["use"]
        genes = genes or r["genes"]
        if r["sample"] is not None and len(r["sample"]):
            samples[s] = r["sample"]
    types = None
    if o.spatial_types and samples:
        from ._types import fit_spatial_types

        try:
            types = fit_spatial_types(samples, genes, n_pcs=o.n_pcs, n_neighbors=o.n_neighbors,
                                      resolution=o.resolution, seed=o.seed)
        except StimageInputError as e:
            notes["spatial_types"] = str(e)
            log.warning("no spatial types: %s", e)
    if types is not None:
        jobs = [(s, predictions[s], types, o) for s in slides if s in rows]
        for i, r, err in _map(client, slide_types, jobs, progress, "spatial types"):
            if err is not None:
                errors[jobs[i][0]] = f"spatial types: {type(err).__name__}: {err}"
            else:
                rows[r["slide"]].update(r["row"])
    # the table: one row per slide of the cohort (failed ones with their error)
    pb_wide = pd.DataFrame({s: p.mean for s, p in pb_use.items()}, index=list(genes or [])).T.add_prefix("pb_")
    meta = pd.DataFrame(index=pd.Index(slides, name="slide_id"))
    if status is not None:
        st = status.set_index("slide_id")
        meta = pd.DataFrame(index=pd.Index(st.index, name="slide_id"))
        meta["patient_id"] = st["patient_id"].astype(str)
        meta["status"] = st["status"]
        meta["error"] = st["error"].fillna("")
    else:
        meta["patient_id"] = [str((patients or {}).get(s) or _patient_of(predictions[s])) for s in slides]
        meta["status"] = "done"
        meta["error"] = ""
    for s, e in errors.items():
        meta.loc[s, "status"], meta.loc[s, "error"] = "failed", e
    table = meta.join(pd.DataFrame.from_dict(rows, orient="index")).join(pb_wide)
    subtypes = None
    if o.pam50_centroids:
        from ._subtype import read_centroids, subtype_calls

        try:
            expr = pb_wide.rename(columns=lambda c: c[3:])
            expr = expr[[np.isfinite(expr.loc[s]).all() for s in expr.index]]
            subtypes = subtype_calls(expr, read_centroids(o.pam50_centroids))
            table = table.join(subtypes.to_frame())
        except StimageInputError as e:
            notes["pam50"] = str(e)
            log.warning("no PAM50 calls: %s", e)
    if o.region is not None and "n_spots_region" in table:
        empty = table.index[(table["status"] == "done") & (table["n_spots_region"].fillna(0) == 0)].tolist()
        if empty:
            notes["region"] = (f"{len(empty)} slides have no point in region {o.region!r} (no annotations, or none "
                               f"matching): their pb_ columns are empty: {empty[:10]}")
            log.warning("%s", notes["region"])
    pb_long = pd.concat(pb_frames, ignore_index=True) if pb_frames else pd.DataFrame()
    table.index.name = "slide_id"
    return CohortFeatures(table, pb_long, types, subtypes, {"options": o.to_dict(), "notes": notes,
                                                            "n_genes": len(genes or [])})


def _patient_of(pred) -> str:
    try:
        return str((_read(pred).uns.get(K.UNS) or {}).get("patient", ""))
    except StimageInputError:
        return ""


def write_features(feats: CohortFeatures, out: str | os.PathLike) -> dict[str, Path]:
    """Write ``features.csv``, ``pseudobulk.csv`` (long), ``features.json`` and, when fitted,
    ``spatial_types.npz`` / ``spatial_types.csv`` (type profiles) into ``out`` (atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"features": write_atomic(out / "features.csv", lambda p: feats.table.reset_index().to_csv(p, index=False)),
             "pseudobulk": write_atomic(out / "pseudobulk.csv", lambda p: feats.pseudobulk.to_csv(p, index=False)),
             "json": write_atomic(out / "features.json", lambda p: Path(p).write_text(feats.to_json()))}
    if feats.spatial_types is not None:
        t = feats.spatial_types
        paths["spatial_types"] = out / "spatial_types.npz"
        t.save(paths["spatial_types"])
        paths["type_profiles"] = write_atomic(out / "spatial_types.csv", lambda p: t.to_frame().to_csv(p))
    return paths
