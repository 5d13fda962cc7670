"""Attributions into the viewers: QuPath cell objects and an OME-Zarr label image with heatmaps.

- :func:`export_qupath_nuclei`: one QuPath **cell** per nucleus (its outline as the cell and as the
  ``nucleusGeometry``: no cell boundary is invented), classified ``"SHAP+ <gene>"`` / ``"SHAP- <gene>"``
  by the sign of its attribution to the first gene, with measurements ``"SHAP <gene>"`` per gene and
  the nucleus morphology under QuPath's own names (``"Nucleus: Area µm^2"``, ...), so *Measure →
  Show measurement maps* colours the nuclei by any gene's attribution. Written through
  :func:`stimage_nb.qupath.export_qupath` (the form QuPath 0.3–0.8 imports) and read back by
  :func:`stimage_nb.qupath.read_qupath`.
- :func:`write_attribution_ome_zarr`: the slide's pyramid (NGFF 0.4) with ``labels/nuclei`` (one
  value per nucleus, coloured by its attribution to the first gene on a red-blue scale, properties:
  id, spot, ``SHAP <gene>``) and ``heatmaps/``: per gene a ``"SHAP+ <gene>"`` (red) and a
  ``"SHAP- <gene>"`` (blue, the magnitude of negative values) channel over the nuclei, both with the
  window 0 to the 99th percentile of the gene's |attribution|, NaN elsewhere (written with
  :mod:`stimage_nb.io.ome_zarr`'s writers; read back with ome-zarr-py).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .. import _keys as K
from ..errors import StimageInputError
from ._nuclei import MORPHOLOGY, QUPATH_NAMES
from ._result import UNITS, Attributions, value_column

log = logging.getLogger(__name__)

POSITIVE, NEGATIVE = (214, 39, 40), (31, 119, 180)  # red raises the gene's prediction, blue lowers it


def class_names(gene: str) -> tuple[str, str]:
    """QuPath class names of nuclei raising / lowering a gene's prediction."""
    return f"SHAP+ {gene}", f"SHAP- {gene}"


def diverging_colours(values: np.ndarray, vmax: float | None = None, cmap: str = "RdBu_r") -> np.ndarray:
    """(n, 3) uint8 colours of signed values on a symmetric red-blue scale (0 = white)."""
    import matplotlib

    v = np.nan_to_num(np.asarray(values, dtype=np.float64))
    lim = float(vmax if vmax is not None else (np.percentile(np.abs(v), 99) if v.size else 1.0)) or 1.0
    z = np.clip(0.5 + 0.5 * v / lim, 0, 1)
    return (matplotlib.colormaps[cmap](z)[:, :3] * 255).round().astype(np.uint8)


def _closed(poly: np.ndarray) -> list:
    ring = np.round(np.asarray(poly, dtype=np.float64), 2).tolist()
    return ring + [ring[0]]


def nuclei_adata(attr: Attributions, *, classify_by: str | None = None):
    """The attributed nuclei as a cell AnnData that :func:`stimage_nb.qupath.export_qupath` writes.

    ``obs``: centroid, diameter (µm, of a disc of the same area), outline (``geometry`` and
    ``nucleus_geometry``), ``object_type="cell"``, ``classification`` and the nearest spot;
    ``obsm["qupath_measurements"]``: ``SHAP <gene>`` and the QuPath-named morphology.
    """
    import anndata as ad

    gene = classify_by or attr.genes[0]
    if gene not in attr.genes:
        raise StimageInputError(f"classify_by={gene!r} is not an explained gene ({list(attr.genes)}).")
    per = attr.per_nucleus()
    nuc = attr.nuclei.subset(np.asarray(per.index, dtype=str))
    t = nuc.table
    geoms = [json.dumps({"type": "Polygon", "coordinates": [_closed(p)]}, separators=(",", ":")) for p in nuc.polygons]
    pos, neg = class_names(gene)
    v0 = per[value_column(gene)].to_numpy(dtype=np.float64)
    obs = pd.DataFrame({K.PIXEL_X: t["x"].to_numpy(), K.PIXEL_Y: t["y"].to_numpy(),
                        K.DIAMETER_UM: 2 * np.sqrt(t["area_um2"].to_numpy(dtype=np.float64) / np.pi),
                        K.GEOMETRY: geoms, K.NUCLEUS_GEOMETRY: geoms, K.OBJECT_TYPE: "cell",
                        K.CLASSIFICATION: np.where(v0 > 0, pos, neg), "spot": per["spot"].astype(str).to_numpy()},
                       index=pd.Index(nuc.ids))
    meas = pd.DataFrame({value_column(g): per[value_column(g)].to_numpy(np.float32) for g in attr.genes}, index=obs.index)
    for c in MORPHOLOGY:
        meas[QUPATH_NAMES[c]] = t[c].to_numpy(np.float32)
    a = ad.AnnData(X=np.zeros((len(obs), 0), np.float32), obs=obs)
    a.obsm[K.SPATIAL] = t[["x", "y"]].to_numpy(dtype=np.float64)
    a.obsm[K.MEASUREMENTS] = meas
    a.uns[K.UNS] = {"section": attr.section, "um_per_px": float(attr.nuclei.um_per_px), "image_scale": 1.0,
                    "observation": "cell", "image": str(attr.meta.get("image", "")),
                    K.CLASS_COLOURS: {pos: list(POSITIVE), neg: list(NEGATIVE)},
                    "attributions": {"genes": list(attr.genes), "method": attr.method, "output": attr.output,
                                     "units": UNITS[attr.output], "classified_by": gene}}
    return a


def export_qupath_nuclei(attr: Attributions, path: str | os.PathLike, *, classify_by: str | None = None) -> Path:
    """Write the attributed nuclei as QuPath cells (module docstring); ``.geojson`` or ``.geojson.gz``."""
    from ..qupath import export_qupath

    a = nuclei_adata(attr, classify_by=classify_by)
    return export_qupath(a, path, genes=[], object_type="cell", celltypes=False)


def write_attribution_ome_zarr(attr: Attributions, path: str | os.PathLike, image=None, *, base_level: int = 0,
                               heatmap_level: int | None = None, chunk: int = 512, progress: bool = False) -> Path:
    """Write the slide with a nucleus label image and attribution heatmaps as OME-Zarr (NGFF 0.4).

    Parameters
    ----------
    attr
        The attributions of one section.
    path
        The store (``<section>.attributions.ome.zarr``), replaced atomically.
    image
        The section's :class:`~stimage_nb.io.image.SlideImage` or path (default: the one recorded).
    base_level
        Source pyramid level that becomes the store's level 0 (0: full resolution).
    heatmap_level
        Store level the heatmaps are rendered on (default: the coarsest on which the median nucleus
        still spans 4 pixels).

    Returns
    -------
    Path
        ``path``; read it back with :func:`stimage_nb.io.ome_zarr.read_labels` / ``read_heatmaps``
        (ome-zarr-py).
    """
    import zarr

    from ..io.convert import pyramid_plan, write_pyramid
    from ..io.image import SlideImage, open_image
    from ..io.ome_zarr import Shapes, atomic_store, write_heatmaps, write_label_image

    path = Path(path)
    if image is None:
        image = attr.meta.get("image")
        if not image:
            raise StimageInputError(f"{attr.section}: the attributions record no image; pass image=.")
    if not isinstance(image, SlideImage):
        image = open_image(image, um_per_px=attr.nuclei.um_per_px)
    if abs(image.um_per_px - attr.nuclei.um_per_px) > 0.05 * attr.nuclei.um_per_px:
        raise StimageInputError(f"{image.source}: {image.um_per_px:g} µm/px, but the nuclei were outlined at "
                                f"{attr.nuclei.um_per_px:g} µm/px: is this the section's image?")
    if not 0 <= base_level < image.n_levels:
        raise StimageInputError(f"{image.source}: base_level {base_level} does not exist (levels 0–{image.n_levels - 1}).")
    per = attr.per_nucleus()
    nuc = attr.nuclei.subset(np.asarray(per.index, dtype=str))
    ds = float(image.downsamples[base_level])
    # the copy's levels: the slide's own (their downsamples, e.g. 1, 4, 16 for an SVS) and 2x levels below
    level_shapes, level_ds = pyramid_plan(image, base_level)
    um0 = float(image.um_per_px) * ds
    radius = np.sqrt(nuc.table["area_um2"].to_numpy(dtype=np.float64) / np.pi) / um0
    shapes = Shapes(nuc.xy / ds, radius, [p / ds for p in nuc.polygons])
    g0 = attr.genes[0]
    v0 = per[value_column(g0)].to_numpy(dtype=np.float64)
    cols = diverging_colours(v0)
    props = {}
    for i, (nid, row) in enumerate(per.iterrows()):
        props[i + 1] = {"id": nid, "spot": str(row["spot"]),
                        **{value_column(g): float(np.float32(row[value_column(g)])) for g in attr.genes}}
    if heatmap_level is None:
        d_med = 2 * float(np.median(radius)) if len(radius) else 1.0
        heatmap_level = max([i for i in range(len(level_shapes)) if d_med / level_ds[i] >= 4.0] or [0])
    channels, colours, windows = {}, [], []
    for g in attr.genes:
        v = per[value_column(g)].to_numpy(dtype=np.float64)
        lim = float(np.percentile(np.abs(v), 99)) if len(v) else 1.0
        lim = lim if lim > 0 else 1.0
        channels[f"SHAP+ {g}"] = np.clip(v, 0, None)
        channels[f"SHAP- {g}"] = np.clip(-v, 0, None)
        colours += ["FF0000", "0000FF"]
        windows += [(0.0, lim), (0.0, lim)]
    with atomic_store(path) as tmp:
        grp = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        write_pyramid(image, grp, base_level=base_level, name=attr.section, chunk=chunk, progress=progress)
        write_label_image(grp, "nuclei", shapes, level_shapes, um0, colors={i + 1: tuple(c) for i, c in enumerate(cols)},
                          properties=props, chunk=chunk, downsamples=level_ds,
                          extra={"stimage_nb": {"section": attr.section, "kind": "nuclei", "coloured_by": value_column(g0),
                                                "colour_scale": "RdBu_r, symmetric at the 99th percentile of |value|",
                                                "ids": "properties[].id"}})
        write_heatmaps(grp, shapes, channels, level_shapes, um0, heatmap_level=heatmap_level, colours=colours,
                       windows=windows, chunk=chunk, downsamples=level_ds,
                       meta={"section": attr.section, "genes": list(attr.genes), "method": attr.method,
                             "output": attr.output, "unit": UNITS[attr.output], "rendered_from": "nuclei",
                             "channels": "per gene: SHAP+ (positive values), SHAP- (magnitude of negative values)"})
        grp.attrs["stimage_nb"] = {"section": attr.section, "kind": "attributions", "labels": ["nuclei"],
                                   "genes": list(attr.genes), "method": attr.method, "output": attr.output,
                                   "source_image": str(image.source), "source_level": int(base_level),
                                   "run_id": str(attr.meta.get("run_id", ""))}
    return path


def export_attributions(attr: Attributions, out: str | os.PathLike, *, formats: Sequence[str] = ("qupath", "ome-zarr"),
                        image=None, base_level: int = 0, progress: bool = False) -> dict[str, Path]:
    """Write the viewers' files of one section's attributions into ``out``; returns ``{format: path}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res = {}
    for f in formats:
        if f == "qupath":
            res[f] = export_qupath_nuclei(attr, out / f"{attr.section}.nuclei.geojson")
        elif f == "ome-zarr":
            res[f] = write_attribution_ome_zarr(attr, out / f"{attr.section}.attributions.ome.zarr", image,
                                                base_level=base_level, progress=progress)
        else:
            raise StimageInputError(f"unknown export format {f!r}; use 'qupath' or 'ome-zarr'.")
    return res
