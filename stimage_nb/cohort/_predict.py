"""Cohort prediction on Dask: one task per slide, resumable, a failed slide recorded while the rest go on.

``predict_cohort(model, cohort, out)`` writes

- ``out/slides/<slide_id>.h5ad``: the slide's prediction on a grid over its tissue (the prediction
  contract of :mod:`stimage_nb.io.prediction`; ``obs["region"]`` when the row names QuPath annotations),
  written atomically;
- ``out/status/<slide_id>.json``: the slide's record (``done`` or ``failed`` with its one-line error,
  spots, seconds, worker, and a fingerprint of model, options and source file), written atomically after
  the h5ad, so a slide is either done or not, whatever kills a run;
- ``out/status.csv``: every slide's record; then the slide-level features (:mod:`._features`).

Running it again skips every slide whose record is ``done`` with the same fingerprint and whose h5ad is
there; a slide that failed is retried only when its file changed or with ``retry_failed``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd

from .. import _keys as K
from ..atomic import write_csv
from ..errors import StimageInputError
from ._table import CohortSlide, read_cohort, resolve_slide

log = logging.getLogger(__name__)

SLIDES = "slides"
STATUS = "status"
DOWNLOADS = "downloads"
STATUS_COLUMNS = ["slide_id", "patient_id", "source", "status", "error", "n_spots", "seconds", "h5ad", "worker",
                  "fingerprint", "finished"]

_ENSEMBLES: dict = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class SlideJob:
    """Everything one slide's task needs (picklable: it travels to a worker)."""

    slide: CohortSlide
    model_dir: str
    out: str
    grid_um: float | None = None
    device: str = "auto"
    batch_size: int = 256
    resolvers: Mapping[str, Callable | str] = field(default_factory=dict)
    keep_downloads: bool = False
    fingerprint: str = ""


def _model_config(model_dir: Path) -> dict:
    from ..ensemble import CONFIG_NAME

    p = Path(model_dir) / CONFIG_NAME
    if not p.is_file():
        raise StimageInputError(f"{model_dir}: no {CONFIG_NAME}; not a trained model directory (the --out of "
                                "`stimage-nb train`).")
    try:
        return json.loads(p.read_text())
    except Exception as e:  # noqa: BLE001
        raise StimageInputError(f"{p}: unreadable model config ({e}).") from e


def _stat(path: str | None) -> str:
    if not path:
        return ""
    try:
        st = os.stat(path)
        return f"{st.st_size}:{int(st.st_mtime)}"
    except OSError:
        return "missing"


def fingerprint(model_cfg: dict, slide: CohortSlide, grid_um: float | None) -> str:
    """What a slide's prediction depends on: the model's weights, the grid, the source file and its
    annotations (size and mtime of local files). A change redoes the slide."""
    parts = {"weights": model_cfg.get("weights_sha256"), "run": model_cfg.get("run_id"), "grid_um": grid_um,
             "source": slide.source, "um_per_px": slide.um_per_px, "annotations": slide.annotations,
             "annotations_stat": _stat(slide.annotations),
             "source_stat": _stat(slide.source) if slide.scheme == "file" else ""}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _ensemble(model_dir: str, device: str):
    """The ensemble, loaded once per worker process (and model file)."""
    from ..ensemble import Ensemble

    p = Path(model_dir).resolve()
    key = (str(p), device, _stat(str(p / "ensemble.json")))
    with _LOCK:
        if key not in _ENSEMBLES:
            _ENSEMBLES.clear()
            _ENSEMBLES[key] = Ensemble.load(p, device=device)
        return _ENSEMBLES[key]


def _slide_section(ensemble, image, *, slide_id: str, grid_um: float | None, um_per_px: float | None,
                   annotations) -> tuple:
    """The slide as a Section of grid points over its tissue (labelled by the QuPath annotations), and the step."""
    from ..io.readers import read_wsi
    from ..omero.pull import pulled_source  # needs no omero-py

    step = float(grid_um or ensemble.tile_um)
    s = read_wsi(image, um_per_px=um_per_px, spacing_um=step, diameter_um=step, name=slide_id)
    pulled = pulled_source(image) or {}
    if pulled.get("image_scale"):  # an OMERO image pulled at a lower resolution level
        s.meta["image_scale"] = float(pulled["image_scale"])
    if s.adata.n_obs == 0:
        s.image.close()
        raise StimageInputError(f"{image}: no tissue found on the slide (stimage_nb.io.tissue.tissue_mask); "
                                "is it a blank or fluorescence image?")
    if annotations:
        from ..qupath import assign_regions

        assign_regions(s.adata, annotations, image_scale=float(s.meta.get("image_scale") or 1.0))
    return s, step


def predict_slide(ensemble, image: str | os.PathLike, *, slide_id: str, grid_um: float | None = None,
                  um_per_px: float | None = None, annotations: str | os.PathLike | None = None,
                  batch_size: int = 256, path: str | os.PathLike | None = None, uns: dict | None = None):
    """One slide: points on a grid over its tissue (``grid_um`` apart; default the model's tile side),
    predicted by the ensemble; QuPath ``annotations`` label the points (``obs["region"]``). An OMERO image
    pulled at a lower resolution level keeps its ``image_scale`` (``uns["stimage_nb"]``), so exports and
    annotations use full-resolution pixels.

    With ``path`` the prediction is streamed into that ``.h5ad`` (memory bounded by the chunk, the batch and
    the model, whatever the slide's size: :func:`stimage_nb.predict.predict_section_to_h5ad`) and the path is
    returned; without it, the prediction AnnData is returned. ``uns``: entries added to ``uns["stimage_nb"]``.

    Raises
    ------
    StimageInputError
        An unreadable slide (:class:`~stimage_nb.errors.SlideReadError`), or no tissue on it.
    """
    from ..predict import predict_section, predict_section_to_h5ad

    s, step = _slide_section(ensemble, image, slide_id=slide_id, grid_um=grid_um, um_per_px=um_per_px,
                             annotations=annotations)
    extra = {"grid_um": step, **(uns or {})}
    if K.REGIONS in (s.adata.uns.get(K.UNS) or {}):  # the annotations travel with the prediction (exports, viewer)
        extra[K.REGIONS] = s.adata.uns[K.UNS][K.REGIONS]
    try:
        if path is not None:
            return predict_section_to_h5ad(ensemble, s, path, batch_size=batch_size, progress=False,
                                           cache_tiles=False, uns=extra)
        a = predict_section(ensemble, s, batch_size=batch_size, progress=False, cache_tiles=False)
    finally:
        s.image.close()
    a.uns[K.UNS].update(extra)
    return a


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}"[:1000]


def run_slide(job: SlideJob) -> dict:
    """The task of one slide (runs on a worker): resolve, predict, write the h5ad, then the record.

    Never raises for a bad slide: the error goes into the returned (and written) record.
    """
    import h5py

    from ..ensemble import write_json

    t0 = time.perf_counter()
    s = job.slide
    out = Path(job.out)
    rec = {"slide_id": s.slide_id, "patient_id": s.patient_id, "source": s.source, "status": "failed", "error": "",
           "n_spots": 0, "seconds": 0.0, "h5ad": "", "worker": f"{socket.gethostname()}:{os.getpid()}",
           "fingerprint": job.fingerprint, "finished": ""}
    try:
        ens = _ensemble(job.model_dir, job.device)
        path, fetched = resolve_slide(s, dest=out / DOWNLOADS, resolvers=job.resolvers,
                                      um_per_px_wanted=ens.tile_um / ens.out_px)
        h5 = predict_slide(ens, path, slide_id=s.slide_id, grid_um=job.grid_um, um_per_px=s.um_per_px,
                           annotations=s.annotations, batch_size=job.batch_size,
                           path=out / SLIDES / f"{s.slide_id}.h5ad",
                           uns={"patient": s.patient_id, "cohort_source": s.source})
        with h5py.File(h5, "r") as f:  # the row count, without loading anything
            n_spots = int(f["X"].shape[0])
        rec.update(status="done", n_spots=n_spots, h5ad=str(Path(h5).relative_to(out)))
        if fetched and not job.keep_downloads:
            Path(path).unlink(missing_ok=True)
    except Exception as e:  # noqa: BLE001 - recorded for this slide; the cohort goes on
        rec["error"] = _one_line(e)
        log.warning("%s: failed: %s", s.slide_id, rec["error"])
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    rec["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_json(rec, out / STATUS / f"{s.slide_id}.json")
    return rec


def read_status(out: str | os.PathLike, slide_id: str) -> dict | None:
    """The record of a slide from an earlier run, or ``None``."""
    p = Path(out) / STATUS / f"{slide_id}.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _is_done(out: Path, rec: dict | None, fp: str) -> bool:
    return bool(rec and rec.get("status") == "done" and rec.get("fingerprint") == fp
                and (out / str(rec.get("h5ad", ""))).is_file() and rec.get("h5ad"))


@dataclass(frozen=True)
class CohortResult:
    """What :func:`predict_cohort` did.

    Attributes
    ----------
    out
        The output directory.
    status
        One row per slide (:data:`STATUS_COLUMNS`).
    ran, skipped
        Slide ids predicted in this run, and those kept from an earlier run (done, or failed and unchanged).
    features
        The slide-level features (:class:`~stimage_nb.cohort.CohortFeatures`) or ``None`` when not computed.
    seconds
        Wall time of the prediction phase.
    """

    out: Path
    status: pd.DataFrame
    ran: tuple[str, ...]
    skipped: tuple[str, ...]
    features: object = None
    seconds: float = 0.0

    @property
    def failed(self) -> pd.DataFrame:
        return self.status[self.status["status"] != "done"]

    def to_frame(self) -> pd.DataFrame:
        return self.status

    def to_json(self) -> str:
        return json.dumps({"out": str(self.out), "n_slides": len(self.status), "n_done": int((self.status["status"] == "done").sum()),
                           "n_failed": int(len(self.failed)), "ran": list(self.ran), "skipped": list(self.skipped),
                           "seconds": self.seconds,
                           "failed": self.failed[["slide_id", "error"]].to_dict(orient="records")}, indent=1)


def predict_cohort(model: str | os.PathLike, cohort: "str | os.PathLike | Sequence[CohortSlide]", out: str | os.PathLike, *,
                   scheduler="local", cluster_options=None, grid_um: float | None = None, device: str = "auto",
                   batch_size: int = 256, resolvers: Mapping[str, Callable | str] | None = None,
                   retry_failed: bool = False, keep_downloads: bool = False, features=None,
                   progress: bool = True) -> CohortResult:
    """Predict every slide of a cohort on a Dask cluster, then compute the slide-level features.

    Parameters
    ----------
    model
        A trained run directory (``stimage-nb train --out``).
    cohort
        A cohort table (:func:`~stimage_nb.cohort.read_cohort`) or its rows.
    out
        Output directory (module docstring); an earlier run there is resumed.
    scheduler, cluster_options
        Where the tasks run (:func:`stimage_nb.cluster.connect`): ``"local"`` (a LocalCluster),
        ``"slurm"``, ``"pbs"``, a scheduler address or a ``distributed.Client``; GPU workers when
        ``cluster_options.gpus_per_worker`` > 0 (each slide then asks for ``resources={"GPU": 1}``).
    grid_um
        Grid spacing and point diameter in µm (default: the model's tile side).
    device
        Where each worker runs the model (``"auto"``: its GPU when it has one).
    batch_size
        Tiles per forward pass.
    resolvers
        ``{scheme: function or "module:function"}`` for non-local sources (:func:`~stimage_nb.cohort.resolve_slide`).
    retry_failed
        Retry slides that failed before even when their file did not change.
    keep_downloads
        Keep slides a resolver downloaded (default: delete each once predicted).
    features
        :class:`~stimage_nb.cohort.FeatureOptions` (default settings when ``None``), or ``False`` to skip them.
    progress
        tqdm progress bars.

    Returns
    -------
    :class:`CohortResult`; the files listed in the module docstring.
    """
    from ..cluster import ClusterOptions, check_scheduler, connect, run_tasks, task_resources
    from ..ensemble import write_json

    check_scheduler(scheduler)
    slides = read_cohort(cohort) if isinstance(cohort, (str, os.PathLike)) else list(cohort)
    if not slides:
        raise StimageInputError("the cohort has no slides.")
    model = Path(model).resolve()
    mcfg = _model_config(model)
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise StimageInputError(f"{out}: --out must be a directory (it is a file).")
    (out / STATUS).mkdir(parents=True, exist_ok=True)
    (out / SLIDES).mkdir(parents=True, exist_ok=True)
    jobs, records, skipped = [], {}, []
    for s in slides:
        fp = fingerprint(mcfg, s, grid_um)
        old = read_status(out, s.slide_id)
        if _is_done(out, old, fp) or (old and old.get("status") == "failed" and old.get("fingerprint") == fp
                                      and not retry_failed):
            records[s.slide_id] = old
            skipped.append(s.slide_id)
            continue
        jobs.append(SlideJob(s, str(model), str(out), grid_um, device, batch_size, dict(resolvers or {}),
                             keep_downloads, fp))
    if skipped:
        log.info("%d of %d slides already done (or failed with an unchanged file) in %s: skipped", len(skipped),
                 len(slides), out)
    opts = cluster_options or ClusterOptions()
    t0 = time.perf_counter()
    feats = None
    with connect(scheduler, opts) as client:
        for i, rec, err in run_tasks(client, run_slide, jobs, resources=task_resources(bool(opts.gpus_per_worker)),
                                     progress=progress, desc="slides", unit="slide"):
            if err is not None:  # the worker died (e.g. out of memory): record it here
                s = jobs[i].slide
                rec = {"slide_id": s.slide_id, "patient_id": s.patient_id, "source": s.source, "status": "failed",
                       "error": _one_line(err), "n_spots": 0, "seconds": 0.0, "h5ad": "", "worker": "",
                       "fingerprint": jobs[i].fingerprint,
                       "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
                write_json(rec, out / STATUS / f"{s.slide_id}.json")
            records[rec["slide_id"]] = rec
        seconds = time.perf_counter() - t0
        status = pd.DataFrame([records[s.slide_id] for s in slides]).reindex(columns=STATUS_COLUMNS)
        write_csv(status, out / "status.csv")
        n_failed = int((status["status"] != "done").sum())
        log.info("cohort: %d slides done, %d failed, %d predicted in this run (%.1f s)", len(status) - n_failed,
                 n_failed, len(jobs), seconds)
        if features is not False:
            from ._features import FeatureOptions, cohort_features, write_features

            fo = features if features is not None else FeatureOptions()
            done = status[status["status"] == "done"]
            preds = {r.slide_id: out / r.h5ad for r in done.itertuples()}
            feats = cohort_features(preds, patients=dict(zip(status["slide_id"], status["patient_id"])),
                                    options=fo, client=client, progress=progress, status=status)
            write_features(feats, out)
    return CohortResult(out, status, tuple(j.slide.slide_id for j in jobs), tuple(skipped), feats, round(seconds, 3))
