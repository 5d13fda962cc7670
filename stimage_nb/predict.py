"""Predicting sections with a trained ensemble; one AnnData per section.

``predict_section(ensemble, section)`` returns the prediction AnnData of the package's contract
(see :mod:`stimage_nb._keys`): obs names = spot ids, var = genes, ``X`` = predictive mean (expected
counts), ``layers["aleatoric_var"]`` and ``layers["epistemic_var"]``, ``obsm["celltype_mean"]`` and
``obsm["celltype_std"]`` (DataFrames), pixel coordinates and diameter in ``obs`` and
``obsm["spatial"]``, provenance in ``uns["stimage_nb"]``.

``predict_slides(model_dir, images, out)`` predicts whole slides that have no spatial transcriptomics
(routine H&E): points on a grid over the tissue (:func:`stimage_nb.io.readers.read_wsi`), by default
one tile apart, so every piece of tissue is seen once.

Tiles are read at the model's physical tile size (``tile_um``) whatever the scan's µm/px, so a
slide scanned at another resolution is resampled to what the model saw. Spots whose centre lies
outside the image are excluded and counted (``uns["stimage_nb"]["n_outside_image"]``). Large
sections are read in chunks on a background thread while the previous chunk is predicted.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from . import _keys as K
from .ensemble import Ensemble, versions
from .errors import StimageInputError
from .io.prediction import write_h5ad
from .io.section import Section
from .names import file_stem

log = logging.getLogger(__name__)

CHUNK = 2048


def _image_scale(section: Section) -> float:
    v = section.meta.get("image_scale")
    if v is None:
        v = (section.adata.uns.get(K.UNS) or {}).get("image_scale")
    return 1.0 if v is None else float(v)


def _read_chunks(section: Section, ens: Ensemble, order: np.ndarray, chunk: int, workers: int | None):
    """Yield (indices, tiles) chunks, reading the next one on a background thread."""
    from .tiles import extract_tiles

    xy = section.xy
    parts = [order[i:i + chunk] for i in range(0, len(order), chunk)]

    def read(idx):
        return extract_tiles(section.image, xy[idx], ens.tile_um, ens.out_px, cache=False, workers=workers)

    with ThreadPoolExecutor(max_workers=1) as ex:
        fut = ex.submit(read, parts[0]) if parts else None
        for j, idx in enumerate(parts):
            tiles = fut.result()
            fut = ex.submit(read, parts[j + 1]) if j + 1 < len(parts) else None
            yield idx, tiles


def predict_section(ensemble: Ensemble, section: Section, *, batch_size: int = 256, progress: bool = True,
                    cache_tiles: bool | None = None, chunk: int = CHUNK, workers: int | None = None):
    """Predict every spot or cell of a section.

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

    Returns
    -------
    AnnData following the prediction contract (module docstring).
    """
    import anndata as ad
    import pandas as pd

    n_all = section.adata.n_obs
    sec = section.drop_outside_image()
    n_out = n_all - sec.adata.n_obs
    n = sec.adata.n_obs
    G, C = len(ensemble.genes), len(ensemble.celltypes)
    res = {"mean": np.empty((n, G), np.float32), "aleatoric_var": np.empty((n, G), np.float32),
           "epistemic_var": np.empty((n, G), np.float32), "celltype_mean": np.empty((n, C), np.float32),
           "celltype_std": np.empty((n, C), np.float32)}
    if ensemble.domain is not None:
        res["domain_distance"] = np.empty(n, np.float32)
    if cache_tiles is None:
        cache_tiles = n <= chunk
    if cache_tiles:
        from .tiles import extract_tiles

        tiles = extract_tiles(sec.image, sec.xy, ensemble.tile_um, ensemble.out_px, cache=True, progress=progress,
                              workers=workers)
        res = ensemble.predict_tiles(tiles, batch_size=batch_size, progress=progress)
    else:
        # Chunks are strided over the section so the first one is a spread sample for the stain estimate.
        n_chunks = -(-n // chunk)
        order = np.concatenate([np.arange(j, n, n_chunks) for j in range(n_chunks)])
        src = "auto"
        it = _read_chunks(sec, ensemble, order, chunk, workers)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=n_chunks, desc=f"predict {sec.name}", unit="chunk")
        for idx, tiles in it:
            if isinstance(src, str):
                src = ensemble.stain_source(tiles)
            r = ensemble.predict_tiles(tiles, batch_size=batch_size, stain_source=src)
            for k in res:
                res[k][idx] = r[k]

    obs = pd.DataFrame(index=pd.Index(sec.adata.obs_names.astype(str), name=None))
    xy = sec.xy
    obs[K.PIXEL_X] = xy[:, 0]
    obs[K.PIXEL_Y] = xy[:, 1]
    obs[K.DIAMETER_UM] = sec.adata.obs[K.DIAMETER_UM].to_numpy(dtype=np.float64)
    for col in ("array_x", "array_y", "array_row", "array_col"):
        if col in sec.adata.obs:
            obs[col] = sec.adata.obs[col].to_numpy()
    var = pd.DataFrame(index=pd.Index(ensemble.genes))
    a = ad.AnnData(X=res["mean"], obs=obs, var=var)
    a.layers[K.ALEATORIC] = res["aleatoric_var"]
    a.layers[K.EPISTEMIC] = res["epistemic_var"]
    a.obsm[K.CELLTYPE_MEAN] = pd.DataFrame(res["celltype_mean"], index=obs.index, columns=ensemble.celltypes)
    a.obsm[K.CELLTYPE_STD] = pd.DataFrame(res["celltype_std"], index=obs.index, columns=ensemble.celltypes)
    a.obsm[K.SPATIAL] = xy.astype(np.float64)
    a.uns[K.UNS] = _provenance(ensemble, sec, n_out)
    if ensemble.domain is not None:
        d = res["domain_distance"]
        a.obs[K.DOMAIN_DISTANCE] = d
        a.obs[K.DOMAIN_PERCENTILE] = ensemble.domain.percentile(d).astype(np.float32)
        summ = ensemble.domain.summary(d)
        a.uns[K.UNS]["domain"] = summ
        if summ["flagged"]:
            log.warning("%s: its typical spot is further from the training data than %.0f%% of the model's held-out "
                        "reference tiles (%s; ~50%% expected): this slide looks unlike the training data (another "
                        "scanner, stain or tissue?). Predictions and their intervals may be off; check against "
                        "measured spots (docs/robustness.md).", sec.name, 100 * summ["median_percentile"],
                        summ["reference"])
    return a


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
        "model_dir": str(getattr(ens, "path", "")), "stain_normalization": "macenko" if ens.stain is not None else "none",
        "n_outside_image": int(n_out), "n_spots": int(sec.adata.n_obs),
        "counts": str(uns_in.get("counts") or ""),
        # the model's training files (stimage_nb.io.provenance), as JSON: evaluate finds its training sections with it
        "training_data": json.dumps(m.get("training_data") or {}),
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
        a = predict_section(ens, s, batch_size=batch_size, progress=progress)
        p = write_h5ad(a, out / f"{file_stem(s.name)}.h5ad")
        log.info("%s: %d spots predicted -> %s", s.name, a.n_obs, p)
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
        if s.adata.n_obs == 0:
            raise StimageInputError(f"{img}: no tissue found on the slide (stimage_nb.io.tissue.tissue_mask); "
                                    "is it a blank or fluorescence image?")
        a = predict_section(ens, s, batch_size=batch_size, progress=progress)
        p = write_h5ad(a, out / f"{file_stem(s.name)}.h5ad")
        log.info("%s: %d grid points over tissue (%g µm apart) predicted -> %s", s.name, a.n_obs, step, p)
        paths.append(p)
    return paths
