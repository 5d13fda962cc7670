"""Predicting sections with a trained ensemble; one AnnData per section.

``predict_section(ensemble, section)`` returns the prediction AnnData of the package's contract
(see :mod:`stimage_nb._keys`): obs names = spot ids, var = genes, ``X`` = predictive mean (expected
counts), ``layers["aleatoric_var"]`` and ``layers["epistemic_var"]`` (an ensemble of point predictors,
such as an imported Path2Space model, has no ``aleatoric_var``), ``obsm["celltype_mean"]`` and
``obsm["celltype_std"]`` (DataFrames), pixel coordinates and diameter in ``obs`` and
``obsm["spatial"]``, provenance in ``uns["stimage_nb"]``.

``predict_slides(model_dir, images, out)`` predicts whole slides that have no spatial transcriptomics
(routine H&E): points on a grid over the tissue (:func:`stimage_nb.io.readers.read_wsi`), by default
one tile apart, so every piece of tissue is seen once.

Tiles are read at the model's physical tile size (``tile_um``) whatever the scan's µm/px, so a
slide scanned at another resolution is resampled to what the model saw. Spots whose centre lies
outside the image are excluded and counted (``uns["stimage_nb"]["n_outside_image"]``). Large
sections are read in chunks on a background thread while the previous chunk is predicted, and
:func:`predict_section_to_h5ad` (what ``predict_manifest`` and ``predict_slides`` use) writes each chunk's
rows into the ``.h5ad`` as they come, so a whole slide at 40x is predicted in memory bounded by the chunk,
the batch and the model, not by the slide (the slide itself is read lazily, level by level:
:mod:`stimage_nb.io.image`).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from . import _keys as K
from .ensemble import Ensemble, versions
from .errors import StimageInputError
from .io.prediction import write_h5ad  # noqa: F401 - part of this module's API (notebook 02 imports it from here)
from .io.section import Section

log = logging.getLogger(__name__)

CHUNK = 2048


def _image_scale(section: Section) -> float:
    v = section.meta.get("image_scale")
    if v is None:
        v = (section.adata.uns.get(K.UNS) or {}).get("image_scale")
    return 1.0 if v is None else float(v)


def _chunks(section: Section, n: int, chunk: int) -> list[np.ndarray]:
    """Row indices in chunks: first a sample spread over the section (every ``n_chunks``-th point: the
    stain estimate's tiles), then the rest in reading order (by y, then x), so each chunk covers a
    compact part of the slide and neighbouring tiles are read together."""
    n_chunks = -(-n // chunk)
    first = np.arange(0, n, n_chunks)
    rest = np.setdiff1d(np.arange(n), first, assume_unique=True)
    xy = section.xy
    rest = rest[np.lexsort((xy[rest, 0], xy[rest, 1]))]
    return [first] + [rest[i:i + chunk] for i in range(0, len(rest), chunk)]


def _read_chunks(section: Section, ens: Ensemble, parts: list[np.ndarray], workers: int | None):
    """Yield (indices, tiles) chunks, reading the next one on a background thread."""
    from .tiles import extract_tiles

    xy = section.xy

    def read(idx):
        return extract_tiles(section.image, xy[idx], ens.tile_um, ens.out_px, cache=False, workers=workers)

    with ThreadPoolExecutor(max_workers=1) as ex:
        fut = ex.submit(read, parts[0]) if parts else None
        for j, idx in enumerate(parts):
            tiles = fut.result()
            fut = ex.submit(read, parts[j + 1]) if j + 1 < len(parts) else None
            yield idx, tiles


class _Arrays:
    """The in-memory sink of :func:`_predict_rows` (what :func:`predict_section` returns)."""

    def __init__(self, n: int, G: int, C: int, domain: bool):
        self.res = {"mean": np.empty((n, G), np.float32), "aleatoric_var": np.empty((n, G), np.float32),
                    "epistemic_var": np.empty((n, G), np.float32), "celltype_mean": np.empty((n, C), np.float32),
                    "celltype_std": np.empty((n, C), np.float32)}
        if domain:
            self.res["domain_distance"] = np.empty(n, np.float32)

    def write(self, idx, r) -> None:
        for k in self.res:
            self.res[k][idx] = r[k]


def _predict_rows(ensemble: Ensemble, sec: Section, sink, *, batch_size: int, progress: bool,
                  cache_tiles: bool | None, chunk: int, workers: int | None) -> None:
    """Predict every observation of ``sec`` (all inside the image) into ``sink.write(idx, results)``."""
    n = sec.adata.n_obs
    if cache_tiles is None:
        cache_tiles = n <= chunk
    if cache_tiles:
        from .tiles import extract_tiles

        tiles = extract_tiles(sec.image, sec.xy, ensemble.tile_um, ensemble.out_px, cache=True, progress=progress,
                              workers=workers)
        sink.write(np.arange(n), ensemble.predict_tiles(tiles, batch_size=batch_size, progress=progress))
        return
    # The first chunk is a spread sample of the section for the stain estimate; the others follow in reading order.
    parts = _chunks(sec, n, chunk)
    src = "auto"
    it = _read_chunks(sec, ensemble, parts, workers)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(parts), desc=f"predict {sec.name}", unit="chunk")
    for idx, tiles in it:
        if isinstance(src, str):
            src = ensemble.stain_source(tiles)
        sink.write(idx, ensemble.predict_tiles(tiles, batch_size=batch_size, stain_source=src))
        del tiles


def _obs(sec: Section):
    import pandas as pd

    obs = pd.DataFrame(index=pd.Index(sec.adata.obs_names.astype(str), name=None))
    xy = sec.xy
    obs[K.PIXEL_X] = xy[:, 0]
    obs[K.PIXEL_Y] = xy[:, 1]
    obs[K.DIAMETER_UM] = sec.adata.obs[K.DIAMETER_UM].to_numpy(dtype=np.float64)
    for col in ("array_x", "array_y", "array_row", "array_col", K.REGION):
        if col in sec.adata.obs:
            obs[col] = sec.adata.obs[col].to_numpy()
    return obs


def _domain(ensemble: Ensemble, sec: Section, d: np.ndarray) -> tuple[np.ndarray, dict]:
    """(percentile per observation, summary) of the domain distances, with the warning when flagged."""
    pct = ensemble.domain.percentile(d).astype(np.float32)
    summ = ensemble.domain.summary(d)
    if summ["flagged"]:
        log.warning("%s: its typical spot is further from the training data than %.0f%% of the model's held-out "
                    "reference tiles (%s; ~50%% expected): this slide looks unlike the training data (another "
                    "scanner, stain or tissue?). Predictions and their intervals may be off; check against "
                    "measured spots (docs/robustness.md).", sec.name, 100 * summ["median_percentile"],
                    summ["reference"])
    return pct, summ


def predict_section(ensemble: Ensemble, section: Section, *, batch_size: int = 256, progress: bool = True,
                    cache_tiles: bool | None = None, chunk: int = CHUNK, workers: int | None = None,
                    depth: float | str | None = None, tiles=None):
    """Predict every spot or cell of a section (in memory; :func:`predict_section_to_h5ad` streams to disk).

    Parameters
    ----------
    ensemble
        A trained :class:`~stimage_nb.ensemble.Ensemble` (on the device it should run on).
    section
        The section; counts are not needed.
    batch_size
        Tiles per forward pass.
    cache_tiles
        Read all tiles at once through the on-disk tile cache (default: when the section has at most
        ``chunk`` points); otherwise tiles are streamed in chunks without caching.
    chunk, workers
        Chunk size and tile-reading threads for streaming.
    depth
        The section's sequencing depth (mean counts per spot over the model's genes): a number,
        ``"observed"`` (from the section's own counts, when it has them) or ``None`` (the training depth).
        The predictions are rescaled so that their mean depth over the section equals it
        (:func:`stimage_nb.ensemble.rescale_to_depth`).
    tiles
        The section's tiles at the model's geometry (``(n, out_px, out_px, 3)`` uint8, in the order of the
        section's points inside the image), when already read; else they are read here.

    Returns
    -------
    AnnData following the prediction contract (module docstring).

    Raises
    ------
    StimageInputError
        All points outside the image, a bad ``depth``, ``tiles`` of the wrong length.
    """
    import anndata as ad
    import pandas as pd

    n_all = section.adata.n_obs
    sec = section.drop_outside_image()
    n_out = n_all - sec.adata.n_obs
    n = sec.adata.n_obs
    dval = _section_depth(sec, ensemble, depth)
    sink = _Arrays(n, len(ensemble.genes), len(ensemble.celltypes), ensemble.domain is not None)
    if tiles is not None:
        if len(tiles) != n:
            raise StimageInputError(f"{sec.name}: {len(tiles)} tiles given for {n} points inside the image.")
        sink.write(np.arange(n), ensemble.predict_tiles(tiles, batch_size=batch_size, progress=progress))
    else:
        _predict_rows(ensemble, sec, sink, batch_size=batch_size, progress=progress, cache_tiles=cache_tiles,
                      chunk=chunk, workers=workers)
    res = sink.res
    if dval is not None:  # one factor for the whole section
        from .ensemble import rescale_to_depth

        res = rescale_to_depth(res, dval)
    obs = _obs(sec)
    var = pd.DataFrame(index=pd.Index(ensemble.genes))
    a = ad.AnnData(X=res["mean"], obs=obs, var=var)
    if ensemble.has_distribution:  # a regression model (e.g. imported Path2Space) has no aleatoric part
        a.layers[K.ALEATORIC] = res["aleatoric_var"]
    a.layers[K.EPISTEMIC] = res["epistemic_var"]
    a.obsm[K.CELLTYPE_MEAN] = pd.DataFrame(res["celltype_mean"], index=obs.index, columns=ensemble.celltypes)
    a.obsm[K.CELLTYPE_STD] = pd.DataFrame(res["celltype_std"], index=obs.index, columns=ensemble.celltypes)
    a.obsm[K.SPATIAL] = sec.xy.astype(np.float64)
    a.uns[K.UNS] = _provenance(ensemble, sec, n_out)
    a.uns[K.UNS]["depth"] = _depth_record(ensemble, dval, float(res.get("depth_factor", 1.0)))
    if ensemble.domain is not None:
        d = res["domain_distance"]
        a.obs[K.DOMAIN_DISTANCE] = d
        a.obs[K.DOMAIN_PERCENTILE], a.uns[K.UNS]["domain"] = _domain(ensemble, sec, d)
    return a


def _depth_record(ens: Ensemble, dval: float | None, factor: float) -> dict:
    """``uns["stimage_nb"]["depth"]``: the depth asked for ("" = the training depth), the model's reference
    depth and the factor the predictions were scaled by."""
    return {"given": dval if dval is not None else "", "reference": ens.reference_depth or "", "factor": float(factor)}


def _section_depth(sec: Section, ens: Ensemble, depth) -> float | None:
    """The depth to predict at: a number, the section's observed mean counts per spot over the model's genes
    (``"observed"``), or ``None``."""
    if depth is None or depth == "reference":
        return None
    if depth == "observed":
        from .io.section import section_depth

        have = [g for g in ens.genes if g in set(sec.adata.var_names)]
        if not sec.has_counts or not have:
            raise StimageInputError(f"{sec.name}: depth='observed' needs the section's counts of the model's genes.")
        return section_depth(sec, have)
    try:
        return float(depth)
    except (TypeError, ValueError) as e:
        raise StimageInputError(f"depth must be a number, 'observed' or 'reference', not {depth!r}") from e


def predict_section_to_h5ad(ensemble: Ensemble, section: Section, path: str | os.PathLike, *, batch_size: int = 256,
                            progress: bool = True, cache_tiles: bool | None = None, chunk: int = CHUNK,
                            workers: int | None = None, depth: float | str | None = None,
                            uns: dict | None = None) -> Path:
    """Predict a section straight into ``path`` (an ``.h5ad``), writing each chunk's rows as they come.

    The same file as ``write_h5ad(predict_section(...), path)`` (same values, keys and provenance), but the
    (n, genes) matrices never sit in memory: peak memory depends on ``chunk``, ``batch_size`` and the
    model, not on the number of observations (:class:`~stimage_nb.io.prediction.PredictionWriter`; the
    file appears atomically when complete). Parameters as :func:`predict_section`; ``uns``: entries added to
    ``uns["stimage_nb"]`` (e.g. a cohort's patient id).
    """
    from .io.prediction import PredictionWriter

    n_all = section.adata.n_obs
    sec = section.drop_outside_image()
    n_out = n_all - sec.adata.n_obs
    dval = _section_depth(sec, ensemble, depth)
    with PredictionWriter(path, obs=_obs(sec), genes=ensemble.genes, celltypes=ensemble.celltypes,
                          spatial=sec.xy, domain=ensemble.domain is not None,
                          aleatoric=getattr(ensemble, "has_distribution", True)) as w:
        _predict_rows(ensemble, sec, w, batch_size=batch_size, progress=progress, cache_tiles=cache_tiles,
                      chunk=chunk, workers=workers)
        f = w.rescale_to_depth(dval) if dval is not None else 1.0  # one factor for the whole section
        prov = _provenance(ensemble, sec, n_out)
        prov["depth"] = _depth_record(ensemble, dval, f)
        prov.update(uns or {})
        extra = {}
        if ensemble.domain is not None:
            extra[K.DOMAIN_PERCENTILE], prov["domain"] = _domain(ensemble, sec, w.small["domain_distance"])
        return w.close(prov, extra)


def _provenance(ens: Ensemble, sec: Section, n_out: int) -> dict:
    m = ens.meta
    uns_in = sec.adata.uns.get(K.UNS) or {}
    img = sec.image
    return {
        "section": sec.name, "patient": str(sec.patient) if sec.patient is not None else "",
        "image": str(sec.image_path), "um_per_px": float(img.um_per_px), "image_scale": _image_scale(sec),
        "image_width": int(img.width), "image_height": int(img.height),
        "train_sections": list(m.get("train_sections", [])), "val_sections": list(m.get("val_sections", [])),
        "genes": list(ens.genes), "celltypes": list(ens.celltypes), "tile_um": float(ens.tile_um),
        "out_px": int(ens.out_px), "model_um_per_px": float(ens.tile_um / ens.out_px),
        "backbone": ",".join(dict.fromkeys(mm.backbone_name for mm in ens.members)),
        "n_members": int(ens.n_members), "run_id": str(ens.run_id), "weights_sha256": str(m.get("weights_sha256", "")),
        "predictive_distribution": "negative binomial per member" if ens.has_distribution else
        "none (point predictions; no aleatoric_var layer)",
        "source": str(m.get("source", "stimage_nb")),
        "model_dir": str(getattr(ens, "path", "")), "stain_normalization": "macenko" if ens.stain is not None else "none",
        "n_outside_image": int(n_out), "n_spots": int(sec.adata.n_obs),
        "counts": str(uns_in.get("counts") or ""),
        "platform": str(sec.platform), "obs_unit": str(uns_in.get(K.OBS_UNIT) or "spot"),
        "pseudospot_um": float((uns_in.get(K.PSEUDOSPOT) or {}).get("diameter_um", 0.0)),
        "train_platforms": sorted(set((m.get("train_platforms") or {}).values())),
        "package_version": str(versions().get("stimage_nb")), "versions": {k: str(v) for k, v in versions().items()},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def predict_manifest(model_dir: str | os.PathLike, manifest: str | os.PathLike, out: str | os.PathLike,
                     sections: Sequence[str] | None = None, device: str = "auto", *, batch_size: int = 256,
                     progress: bool = True) -> list[Path]:
    """Predict the sections of a manifest with the ensemble in ``model_dir``; write ``out/<section>.h5ad``.

    Rows without counts are fine. Returns the written paths.
    """
    from .io.readers import read_manifest

    ens = Ensemble.load(model_dir, device=device)
    secs = read_manifest(manifest, sections, genes=ens.genes, drop_missing_genes=True)
    out = Path(out)
    paths = []
    for s in secs:
        if (s.adata.uns.get(K.UNS) or {}).get(K.OBS_UNIT) == "bin":
            log.warning("%s: predicting %d %s bins one by one (a %g µm tile each); to predict at the model's spot size "
                        "give the manifest row pseudospot_um=%g", s.name, s.adata.n_obs, s.platform, ens.tile_um,
                        float(ens.meta.get("train_diameter_um") or ens.tile_um / 1.5))
        p = predict_section_to_h5ad(ens, s, out / f"{s.name}.h5ad", batch_size=batch_size, progress=progress)
        log.info("%s: %d spots predicted -> %s", s.name, s.adata.n_obs, p)
        paths.append(p)
    return paths


def predict_slides(model_dir: str | os.PathLike, images: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                   grid_um: float | None = None, um_per_px: float | None = None, device: str = "auto",
                   batch_size: int = 256, progress: bool = True) -> list[Path]:
    """Predict whole slides (routine H&E, no counts) on a grid over their tissue; write ``out/<name>.h5ad``.

    Parameters
    ----------
    images
        Slides (SVS/TIFF/OME-Zarr/JPEG...); each gets points ``grid_um`` apart over the tissue
        (:func:`stimage_nb.io.tissue.tissue_mask`), named ``"{x}_{y}"`` (level-0 pixels).
    grid_um
        Grid spacing and point diameter in µm; default: the model's tile side, so the tiles cover the
        tissue once without overlap.
    um_per_px
        The scan's resolution when the file does not record it (a JPEG); an SVS/OME-Zarr knows it.
    """
    from .io.readers import read_wsi

    ens = Ensemble.load(model_dir, device=device)
    step = float(grid_um or ens.tile_um)
    out = Path(out)
    paths = []
    for img in images:
        s = read_wsi(img, um_per_px=um_per_px, spacing_um=step, diameter_um=step)
        try:
            if s.adata.n_obs == 0:
                raise StimageInputError(f"{img}: no tissue found on the slide (stimage_nb.io.tissue.tissue_mask); "
                                        "is it a blank or fluorescence image?")
            p = predict_section_to_h5ad(ens, s, out / f"{s.name}.h5ad", batch_size=batch_size, progress=progress,
                                        cache_tiles=False)  # a slide's tiles are read once: no tile cache
        finally:
            s.image.close()
        log.info("%s: %d grid points over tissue (%g µm apart) predicted -> %s", s.name, s.adata.n_obs, step, p)
        paths.append(p)
    return paths
