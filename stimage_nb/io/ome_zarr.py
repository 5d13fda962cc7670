"""OME-Zarr (NGFF 0.4, Zarr v2) writers and readers: image pyramids, label images and heatmaps.

NGFF 0.4 on Zarr v2 is what QuPath 0.6–0.8 (Bio-Formats), OMERO (omero-zarr-pixel-buffer,
omero-web-zarr), napari (napari-ome-zarr) and vizarr read, so it is what this module writes.

A prediction store (:func:`write_prediction_ome_zarr`) holds, for one section::

    <section>.ome.zarr/            the H&E as an RGB pyramid (axes c, y, x; µm scales; "omero" rendering)
      labels/cell_types            semantic label image: value k = k-th cell type (0 = background)
      labels/spots | labels/cells  instance label image: value i = i-th observation (spot or cell)
      heatmaps/                    float32 image (c, y, x): per gene its predictive mean and both
                                   uncertainties (standard deviations), NaN outside observations

Label images carry ``image-label`` metadata with one ``colors`` entry (RGBA) and one ``properties``
entry per label value (class name, observation id, probabilities), as NGFF 0.4 specifies; napari
shows the properties on hover, vizarr and OMERO.iviewer use the colours. Every level of a label image
has the shape of the matching image level and is rasterised directly from the spot discs or cell
polygons (not downsampled), so small objects never vanish from overviews.

:func:`add_label_array` adds any integer label array (e.g. a nucleus segmentation) to an existing
image store the same way.

Heatmaps are rendered onto a chosen pyramid level (``heatmap_level``; by default the coarsest level
on which an observation still spans at least 16 pixels) and have their own pyramid below it. Their
**colour scale** is recorded in the ``omero`` block the way OMERO, napari and QuPath read it: each
channel is a linear ramp from black at ``window.start`` (0) to the channel's colour at
``window.end`` (the 99th percentile of that quantity over the section's observations), in the
units of the prediction (expected UMI counts per spot or cell). Means are magenta (``FF00FF``),
aleatoric SDs cyan (``00FFFF``), epistemic SDs yellow (``FFFF00``). The same numbers are repeated in
the group's ``stimage_nb`` attribute. Pixels outside every observation are NaN (no prediction), not 0.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .. import _keys as K
from .._colours import class_colours
from ..errors import StimageInputError
from .ngff import (  # noqa: F401
    CHUNK,
    NGFF_VERSION,
    atomic_store,
    check_um_per_px,
    compressor,
    create_array,
    downsample2,
    jsonable,
    multiscales_metadata,
    omero_rgb_metadata,
    write_ome_zarr,
)

if TYPE_CHECKING:  # pragma: no cover
    import anndata

    from .image import SlideImage

log = logging.getLogger(__name__)

HEATMAP_MIN_DIAMETER_PX = 16.0
QUANTITIES = ("mean", "aleatoric SD", "epistemic SD")
QUANTITY_COLOURS = {"mean": "FF00FF", "aleatoric SD": "00FFFF", "epistemic SD": "FFFF00"}


def copy_image_pyramid(image: "SlideImage", group, *, base_level: int = 0, name: str = "image",
                       chunk: int = CHUNK, progress: bool = False) -> list[tuple[int, int]]:
    """Copy levels ``base_level``… of a :class:`~stimage_nb.io.image.SlideImage` into ``group``.

    The copy's level 0 is the source's ``base_level`` (its µm/px is recorded accordingly); the source's
    own levels keep their downsample factors and 2x levels are added below them
    (:func:`stimage_nb.io.convert.write_pyramid`: streamed one chunk at a time, so memory stays
    bounded for whole-slide images).

    Returns
    -------
    list of (height, width)
        The shapes of the written levels.
    """
    from .convert import write_pyramid

    return write_pyramid(image, group, base_level=base_level, name=name, chunk=chunk, progress=progress)[0]


# ---------------------------------------------------------------------- rasterising observations
@dataclass
class Shapes:
    """Observation outlines in the level-0 pixels of the store being written.

    Parameters
    ----------
    xy
        (n, 2) centres, x then y.
    radius
        (n,) disc radii in pixels (used where no polygon is given).
    polygons
        Optional list of (k, 2) outer rings (x, y) per observation, ``None`` for a disc.
    """

    xy: np.ndarray
    radius: np.ndarray
    polygons: list | None = None

    def __post_init__(self):
        self.xy = np.asarray(self.xy, dtype=np.float64).reshape(-1, 2)
        self.radius = np.broadcast_to(np.asarray(self.radius, dtype=np.float64), (len(self.xy),)).copy()
        lo, hi = self.xy - self.radius[:, None], self.xy + self.radius[:, None]
        if self.polygons is not None:
            for i, p in enumerate(self.polygons):
                if p is not None and len(p):
                    p = np.asarray(p, dtype=np.float64)
                    lo[i], hi[i] = p.min(0), p.max(0)
        self._lo, self._hi = lo, hi

    def __len__(self) -> int:
        return len(self.xy)

    def render(self, downsample: float, width: int, y0: int, y1: int, values: np.ndarray | None = None) -> np.ndarray:
        """Rasterise rows ``[y0, y1)`` of the level whose pixels are ``downsample`` level-0 pixels.

        Pixel value ``values[i]`` (default ``i + 1``) where the pixel's centre lies inside observation
        ``i``, 0 elsewhere; later observations win where they overlap. Pixel ``(col, row)`` covers
        ``[col, col + 1) x [row, row + 1)`` in the level's continuous coordinates, as in QuPath.
        Objects smaller than a pixel still mark the pixel holding their centre. Returns an int32
        (y1 - y0, width) array.
        """
        out = np.zeros((int(y1 - y0), int(width)), dtype=np.int32)
        lo, hi = self._lo / downsample, self._hi / downsample
        idx = np.nonzero((hi[:, 1] >= y0 - 1) & (lo[:, 1] < y1 + 1) & (hi[:, 0] >= -1) & (lo[:, 0] < width + 1))[0]
        vals = np.arange(1, len(self) + 1) if values is None else np.asarray(values)
        for i in idx:
            v = int(vals[i])
            poly = None if self.polygons is None else self.polygons[i]
            c0 = max(0, int(np.floor(lo[i, 0])))
            c1 = min(int(width), int(np.ceil(hi[i, 0])) + 1)
            r0 = max(int(y0), int(np.floor(lo[i, 1])))
            r1 = min(int(y1), int(np.ceil(hi[i, 1])) + 1)
            if c1 <= c0 or r1 <= r0:
                continue
            gx = np.arange(c0, c1) + 0.5
            gy = np.arange(r0, r1)[:, None] + 0.5
            if poly is not None and len(poly) >= 3:
                from matplotlib.path import Path as MPath

                pts = np.asarray(poly, dtype=np.float64)[:, :2] / downsample
                gxx, gyy = np.broadcast_arrays(gx[None, :], gy)
                m = MPath(pts).contains_points(np.column_stack([gxx.ravel(), gyy.ravel()])).reshape(gxx.shape)
                centre = pts[:-1].mean(0) if len(pts) > 3 else pts.mean(0)
            else:
                cx, cy = self.xy[i] / downsample
                r = self.radius[i] / downsample
                m = (gx[None, :] - cx) ** 2 + (gy - cy) ** 2 <= r * r
                centre = np.array([cx, cy])
            if not m.any():  # smaller than a pixel: mark the pixel holding the centre
                cc, rr = int(np.floor(centre[0])), int(np.floor(centre[1]))
                if c0 <= cc < c1 and r0 <= rr < r1:
                    out[rr - y0, cc] = v
                continue
            sub = out[r0 - y0:r1 - y0, c0:c1]
            sub[m] = v
        return out


def _label_dtype(max_value: int) -> str:
    return "uint8" if max_value < 2 ** 8 else "uint16" if max_value < 2 ** 16 else "uint32"


def write_label_image(group, name: str, shapes: Shapes, level_shapes: Sequence[tuple[int, int]], um_per_px: float, *,
                      values: np.ndarray | None = None, colors: dict[int, Sequence[int]] | None = None,
                      properties: dict[int, dict] | None = None, chunk: int = CHUNK,
                      extra: dict | None = None, downsamples: Sequence[float] | None = None) -> None:
    """Write ``labels/<name>`` under an image group: one label level per image level.

    Parameters
    ----------
    group
        The (open, writable) Zarr v2 group of the image.
    name
        Label image name (registered in ``labels/.zattrs``).
    shapes
        The objects, in the image's level-0 pixels.
    level_shapes
        (height, width) of each image level; level ``i`` is ``2**i`` times coarser (or ``downsamples[i]``).
    um_per_px
        Level-0 pixel size (µm).
    values
        Label value per object (default ``1..n``); 0 is background.
    colors
        ``{label value: (r, g, b[, a])}`` with 0–255 integers.
    properties
        ``{label value: {key: JSON value}}``.
    extra
        More keys for the label group's attributes (e.g. provenance under ``stimage_nb``).
    downsamples
        Each level's downsample from level 0 (default ``2**i``): a slide's own pyramid (1, 4, 16, ...).
    """
    vals = np.arange(1, len(shapes) + 1) if values is None else np.asarray(values, dtype=np.int64)
    dtype = _label_dtype(int(vals.max()) if len(vals) else 1)
    labels_grp = group.require_group("labels")
    g = labels_grp.require_group(name)
    for li, (h, w) in enumerate(level_shapes):
        arr = create_array(g, str(li), (h, w), (min(chunk, h), min(chunk, w)), dtype)
        ds = float(downsamples[li]) if downsamples is not None else 2.0 ** li
        for y0 in range(0, h, chunk):
            y1 = min(h, y0 + chunk)
            arr[y0:y1, :] = shapes.render(ds, w, y0, y1, values=vals).astype(dtype)
    g.attrs["multiscales"] = [multiscales_metadata(len(level_shapes), um_per_px, name=name, axes="yx",
                                                   downscale_type="nearest",
                                                   method="each level rasterised from the object outlines",
                                                   downsamples=downsamples)]
    g.attrs["image-label"] = _image_label(colors, properties)
    if extra:
        for k, v in extra.items():
            g.attrs[k] = v
    names = list(labels_grp.attrs.get("labels", []))
    if name not in names:
        names.append(name)
    labels_grp.attrs["labels"] = names


def add_label_array(path: str | os.PathLike, name: str, labels: np.ndarray, *,
                    colors: dict[int, Sequence[int]] | None = None, properties: dict[int, dict] | None = None,
                    chunk: int = CHUNK) -> Path:
    """Add a label image given as an integer array to an existing OME-Zarr image (``labels/<name>``).

    ``labels`` has the shape of the image's level 0 (y, x); coarser levels are made by nearest
    (strided) sampling to match every image level, as NGFF 0.4 requires. ``colors`` and
    ``properties`` are per label value (see :func:`write_label_image`). Rewrites ``labels/<name>``
    if it exists.
    """
    import zarr

    from .image import SlideImage

    path = Path(path)
    img = SlideImage(path)
    labels = np.asarray(labels)
    if labels.shape != (img.height, img.width):
        raise StimageInputError(f"{path}: label array shape {labels.shape} differs from the image's level 0 "
                                f"{(img.height, img.width)} (y, x).")
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise StimageInputError(f"{path}: labels must be non-negative integers (got {labels.dtype}).")
    g = zarr.open_group(str(path), mode="a", zarr_format=2)
    lg = g.require_group("labels")
    if name in lg:
        del lg[name]
    sub = lg.require_group(name)
    dtype = _label_dtype(int(labels.max()) if labels.size else 1)
    for li, (h, w) in enumerate(img.level_shapes):
        s = max(1, int(round(img.downsamples[li])))
        lev = labels[s // 2::s, s // 2::s][:h, :w] if s > 1 else labels
        out = np.zeros((h, w), dtype=dtype)
        out[:lev.shape[0], :lev.shape[1]] = lev
        create_array(sub, str(li), (h, w), (min(chunk, h), min(chunk, w)), dtype)[:] = out
    sub.attrs["multiscales"] = [multiscales_metadata(img.n_levels, img.um_per_px, name=name, axes="yx",
                                                     downscale_type="nearest", method="strided nearest sampling",
                                                     downsamples=img.downsamples)]
    sub.attrs["image-label"] = _image_label(colors, properties)
    names = list(lg.attrs.get("labels", []))
    if name not in names:
        names.append(name)
    lg.attrs["labels"] = names
    return path


def _image_label(colors, properties) -> dict:
    image_label: dict = {"version": NGFF_VERSION, "source": {"image": "../../"}}
    cols = [{"label-value": 0, "rgba": [0, 0, 0, 0]}]
    for v, c in sorted((colors or {}).items()):
        c = [int(x) for x in c]
        cols.append({"label-value": int(v), "rgba": (c + [255])[:4]})
    image_label["colors"] = cols
    if properties:
        image_label["properties"] = [{"label-value": int(v), **{k: jsonable(x) for k, x in p.items()}}
                                     for v, p in sorted(properties.items())]
    return image_label


def write_heatmaps(group, shapes: Shapes, channels: dict[str, np.ndarray], level_shapes: Sequence[tuple[int, int]],
                   um_per_px: float, *, heatmap_level: int, colours: Sequence[str] | None = None,
                   windows: Sequence[tuple[float, float]] | None = None, meta: dict | None = None,
                   chunk: int = CHUNK, downsamples: Sequence[float] | None = None) -> None:
    """Render per-observation values onto image level ``heatmap_level`` (and coarser) as ``heatmaps/``.

    Parameters
    ----------
    group
        The image group; the heatmaps become its ``heatmaps`` sub-group, itself an NGFF image
        whose µm scales align it with the image in any viewer.
    shapes
        The observations (image level-0 pixels).
    channels
        ``{channel label: (n,) values}``, one channel each.
    level_shapes
        (height, width) of every image level.
    um_per_px
        Image level-0 pixel size (µm).
    heatmap_level
        The image level the first heatmap level matches.
    colours
        Hex colour per channel (linear ramp from black); see the module docstring.
    windows
        (start, end) per channel; default (0, 99th percentile).
    meta
        Extra information stored under the ``stimage_nb`` attribute.
    downsamples
        Each image level's downsample from level 0 (default ``2**i``).
    """
    dsl = [float(d) for d in downsamples] if downsamples is not None else [2.0 ** i for i in range(len(level_shapes))]
    if not 0 <= heatmap_level < len(level_shapes):
        raise StimageInputError(f"heatmap_level {heatmap_level} does not exist (levels 0–{len(level_shapes) - 1}).")
    labels = list(channels)
    V = np.stack([np.asarray(channels[c], dtype=np.float32) for c in labels]) if labels else np.zeros((0, len(shapes)), np.float32)
    lut = np.concatenate([np.full((len(labels), 1), np.nan, np.float32), V], axis=1)  # value 0 -> NaN
    hg = group.require_group("heatmaps")
    sub = list(level_shapes[heatmap_level:])
    for li, (h, w) in enumerate(sub):
        arr = create_array(hg, str(li), (len(labels), h, w), (1, min(chunk, h), min(chunk, w)), "float32",
                            fill_value=float("nan"))
        ds = dsl[heatmap_level + li]
        for y0 in range(0, h, chunk):
            y1 = min(h, y0 + chunk)
            idx = shapes.render(ds, w, y0, y1)
            for c in range(len(labels)):  # one channel at a time keeps a strip small
                arr[c, y0:y1, :] = lut[c][idx]
    if windows is None:
        windows = []
        for row in V:
            fin = row[np.isfinite(row)]
            end = float(np.percentile(fin, 99)) if fin.size else 1.0
            windows.append((0.0, end if end > 0 else (float(fin.max()) if fin.size and fin.max() > 0 else 1.0)))
    colours = list(colours or ["FFFFFF"] * len(labels))
    chans = []
    for i, lab in enumerate(labels):
        fin = V[i][np.isfinite(V[i])]
        lo, hi = (float(fin.min()), float(fin.max())) if fin.size else (0.0, 1.0)
        s, e = windows[i]
        chans.append({"label": lab, "color": colours[i], "active": i < 3, "family": "linear", "inverted": False,
                      "coefficient": 1, "window": {"min": min(lo, float(s)), "max": max(hi, float(e)),
                                                   "start": float(s), "end": float(e)}})
    hum = um_per_px * dsl[heatmap_level]
    hg.attrs["multiscales"] = [multiscales_metadata(len(sub), hum, name="heatmaps", axes="cyx",
                                                    downscale_type="nearest",
                                                    method="each level rasterised from the observations",
                                                    downsamples=[d / dsl[heatmap_level] for d in dsl[heatmap_level:]])]
    hg.attrs["omero"] = {"name": "heatmaps", "version": NGFF_VERSION, "rdefs": {"model": "color"}, "channels": chans}
    scale = [{"channel": c["label"], "ramp": f"linear, black at start to #{c['color']} at end",
              "start": c["window"]["start"], "end": c["window"]["end"]} for c in chans]
    hg.attrs["stimage_nb"] = {"colour_scale": scale, "background": "NaN (no observation)",
                              "image_level": int(heatmap_level), **(meta or {})}


# ---------------------------------------------------------------------- predictions -> store
def _uns(adata) -> dict:
    return dict(adata.uns.get(K.UNS, {}) or {})


def _classes(adata) -> tuple[list[str], np.ndarray | None, np.ndarray | None]:
    """(class names, class index per observation or None, probability of that class or None)."""
    import pandas as pd

    ct = adata.obsm.get(K.CELLTYPE_MEAN)
    if ct is not None and np.asarray(ct).shape[1] > 0:
        df = ct if isinstance(ct, pd.DataFrame) else pd.DataFrame(np.asarray(ct))
        P = df.to_numpy(dtype=np.float64)
        names = [str(c) for c in df.columns]
        filled = np.where(np.isfinite(P), P, -np.inf)
        idx = filled.argmax(1)
        ok = np.isfinite(P).any(1)
        return names, np.where(ok, idx, -1), np.where(ok, P[np.arange(len(P)), idx], np.nan)
    for key in (K.CELLTYPE_PRED, K.CLASSIFICATION, K.CELLTYPE_LABEL):
        if key in adata.obs:
            lab = adata.obs[key].astype(str).replace({"nan": "", "None": ""})
            names = sorted({v for v in lab if v})
            pos = {n: i for i, n in enumerate(names)}
            return names, np.array([pos.get(v, -1) for v in lab]), None
    return [], None, None


def _kind(adata) -> str:
    """"cells" or "spots": from ``obs["object_type"]``, nuclei, or ``uns`` ``observation``."""
    if K.OBJECT_TYPE in adata.obs:
        return "cells" if (adata.obs[K.OBJECT_TYPE].astype(str) == "cell").all() else "spots"
    if K.NUCLEUS_GEOMETRY in adata.obs or str(_uns(adata).get("observation", "")).lower().startswith("cell"):
        return "cells"
    return "spots"


def observation_shapes(adata, image: "SlideImage", base_level: int = 0) -> Shapes:
    """The observations of a section or prediction AnnData as :class:`Shapes` in level ``base_level`` pixels.

    Cells with a stored outline (``obs["geometry"]``, full-resolution pixels) are polygons, other
    observations discs of ``obs["diameter_um"]``.
    """
    uns = _uns(adata)
    ds = image.downsamples[base_level]
    scale = float(uns.get("image_scale") or 1.0)
    xy = np.asarray(adata.obsm[K.SPATIAL], dtype=np.float64)[:, :2] / ds
    diam = adata.obs[K.DIAMETER_UM].to_numpy(dtype=np.float64) if K.DIAMETER_UM in adata.obs else np.full(len(xy), 55.0)
    radius = diam / 2.0 / image.um_per_px / ds
    polys = None
    if K.GEOMETRY in adata.obs:
        polys = []
        for g in adata.obs[K.GEOMETRY].astype(str):
            ring = _outer_ring(g)
            polys.append(None if ring is None else ring * scale / ds)
    return Shapes(xy, radius, polys)


def _outer_ring(geom_json: str) -> np.ndarray | None:
    """Outer ring (k, 2) of the largest polygon of a GeoJSON geometry given as JSON text."""
    if not geom_json or geom_json in ("nan", "None"):
        return None
    try:
        g = json.loads(geom_json)
    except ValueError:
        return None
    t = g.get("type")
    if t == "Polygon" and g.get("coordinates"):
        return np.asarray(g["coordinates"][0], dtype=np.float64)[:, :2]
    if t == "MultiPolygon" and g.get("coordinates"):
        rings = [np.asarray(p[0], dtype=np.float64)[:, :2] for p in g["coordinates"] if p]
        if rings:
            return max(rings, key=lambda r: np.ptp(r[:, 0]) * np.ptp(r[:, 1]))
    return None


def default_heatmap_level(level_shapes: Sequence[tuple[int, int]], diameter_px: float,
                          downsamples: Sequence[float] | None = None) -> int:
    """The coarsest level on which an observation of ``diameter_px`` (level 0) spans ≥ 16 pixels."""
    best = 0
    for i in range(len(level_shapes)):
        if diameter_px / (downsamples[i] if downsamples is not None else 2 ** i) >= HEATMAP_MIN_DIAMETER_PX:
            best = i
    return best


def pick_heatmap_genes(adata, n: int = 6) -> list[str]:
    """The ``n`` genes whose predicted mean varies most across the section (variance of log1p)."""
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    if X.shape[1] == 0:
        return []
    v = np.nanvar(np.log1p(np.clip(X.astype(np.float64), 0, None)), axis=0)
    order = np.argsort(-np.nan_to_num(v, nan=-1.0), kind="stable")[:n]
    return [str(adata.var_names[i]) for i in order]


def _layer(adata, key, genes) -> np.ndarray | None:
    if key not in adata.layers:
        return None
    idx = [adata.var_names.get_loc(g) for g in genes]
    L = adata.layers[key]
    L = L[:, idx]
    return np.asarray(L.toarray() if hasattr(L, "toarray") else L, dtype=np.float32)


def write_prediction_ome_zarr(pred: "anndata.AnnData", path: str | os.PathLike, image: "SlideImage | str | os.PathLike | None" = None,
                              *, base_level: int = 0, heatmap_level: int | None = None,
                              genes: Sequence[str] | None = None, n_heatmap_genes: int = 6,
                              max_full_properties: int = 20000, chunk: int = CHUNK, progress: bool = True) -> Path:
    """Write one section's predictions as a viewer-ready OME-Zarr (see the module docstring).

    Parameters
    ----------
    pred
        A prediction AnnData (``PRED_DIR/<section>.h5ad``; see :mod:`stimage_nb._keys`).
    path
        The store to write (``<section>.ome.zarr``); replaced atomically if it exists.
    image
        The section's image (:class:`SlideImage` or a path); default ``uns["stimage_nb"]["image"]``.
    base_level
        Source pyramid level that becomes the store's level 0 (``0`` keeps full resolution; a
        higher level gives a light preview store).
    heatmap_level
        Store level the heatmaps are rendered onto (default: coarsest level on which an
        observation spans ≥ 16 pixels).
    genes
        Genes to render as heatmaps (default: the ``n_heatmap_genes`` most variable predictions).
    max_full_properties
        Above this many observations the instance labels' properties keep only ``id``, ``class`` and
        ``class probability`` and carry no per-object colour (``labels/cell_types`` has the class
        colours): the metadata of 100k cells with everything would be tens of MB.
    progress
        Show progress bars.

    Returns
    -------
    Path
        ``path``.
    """
    import zarr

    from .image import SlideImage, open_image

    path = Path(path)
    uns = _uns(pred)
    section = str(uns.get("section") or path.name.split(".")[0])
    if image is None:
        src = uns.get("image")
        if not src:
            raise StimageInputError(f"{section}: the prediction records no image; pass image= (CLI: --manifest).")
        image = src
    if not isinstance(image, SlideImage):
        image = open_image(image, um_per_px=uns.get("um_per_px"))
    if not 0 <= base_level < image.n_levels:
        raise StimageInputError(f"{image.source}: base_level {base_level} does not exist "
                                f"(levels 0–{image.n_levels - 1}).")
    xy = np.asarray(pred.obsm[K.SPATIAL], dtype=np.float64)
    inside = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < image.width) & (xy[:, 1] < image.height)
    n_out = int((~inside).sum())
    if len(xy) and n_out > 0.05 * len(xy):
        raise StimageInputError(
            f"{image.source}: {n_out} of the {len(xy)} predicted observations of section {section!r} lie outside the "
            f"{image.width}x{image.height} image. Is this the image the prediction ran on (same resolution)? "
            "Pass the section's image (CLI: --manifest).")
    if n_out:
        log.warning("%s: %d observations lie outside the image and are not drawn", section, n_out)
    genes = list(genes) if genes is not None else pick_heatmap_genes(pred, n_heatmap_genes)
    missing = [g for g in genes if g not in pred.var_names]
    if missing:
        raise StimageInputError(f"{section}: genes {missing[:10]} are not in the prediction "
                                f"(it has {pred.n_vars} genes, e.g. {list(pred.var_names[:5])}).")
    from .convert import pyramid_plan, write_pyramid

    shapes = observation_shapes(pred, image, base_level)
    ds = image.downsamples[base_level]
    level_shapes, level_ds = pyramid_plan(image, base_level)
    um0 = image.um_per_px * ds
    names, cls, pmax = _classes(pred)
    colours = class_colours(names, uns.get(K.CLASS_COLOURS))
    kind = _kind(pred)
    ids = [str(i) for i in pred.obs_names]

    with atomic_store(path) as tmp:
        g = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        write_pyramid(image, g, base_level=base_level, name=section, chunk=chunk, progress=progress)
        # instance labels: one value per observation, coloured by its predicted class
        props: dict[int, dict] = {}
        cols: dict[int, tuple] = {}
        ct = pred.obsm.get(K.CELLTYPE_MEAN)
        full = pred.n_obs <= max_full_properties
        if not full:
            log.info("%s: %d observations > max_full_properties=%d: label properties keep id and class only",
                     section, pred.n_obs, max_full_properties)
        P = np.asarray(ct, dtype=np.float64) if ct is not None and names and full else None
        means = None
        if genes:
            means = pred[:, genes].X
            means = np.asarray(means.toarray() if hasattr(means, "toarray") else means, dtype=np.float64)
        prop_means = means if full else None
        for i, oid in enumerate(ids):
            p: dict = {"id": oid}
            if cls is not None and cls[i] >= 0:
                p["class"] = names[cls[i]]
                if full:
                    cols[i + 1] = colours[names[cls[i]]]
            elif full:
                cols[i + 1] = (128, 128, 128)
            if pmax is not None:
                p["class probability"] = round(float(pmax[i]), 6) if np.isfinite(pmax[i]) else None
            if P is not None:
                for j, n in enumerate(names):
                    p[f"P({n})"] = round(float(P[i, j]), 6) if np.isfinite(P[i, j]) else None
            if prop_means is not None:
                for j, gname in enumerate(genes):
                    p[f"{gname} mean"] = float(np.float32(prop_means[i, j]))
            props[i + 1] = p
        write_label_image(g, kind, shapes, level_shapes, um0, colors=cols, properties=props, chunk=chunk,
                          downsamples=level_ds, extra={"stimage_nb": {"section": section, "kind": kind, "ids": "properties[].id"}})
        if names and cls is not None:
            counts = np.bincount(cls[cls >= 0], minlength=len(names))
            write_label_image(g, "cell_types", shapes, level_shapes, um0, values=np.where(cls >= 0, cls + 1, 0),
                              colors={k + 1: colours[n] for k, n in enumerate(names)},
                              properties={k + 1: {"class": n, "n_observations": int(counts[k])}
                                          for k, n in enumerate(names)}, chunk=chunk, downsamples=level_ds,
                              extra={"stimage_nb": {"section": section, "classes": names,
                                                    "rule": "argmax of obsm['celltype_mean']"}})
        if genes:
            hl = heatmap_level if heatmap_level is not None else default_heatmap_level(
                level_shapes, float(np.median(shapes.radius)) * 2 if len(shapes) else 1.0, level_ds)
            ale, epi = _layer(pred, K.ALEATORIC, genes), _layer(pred, K.EPISTEMIC, genes)
            channels: dict[str, np.ndarray] = {}
            colours_hex = []
            for j, gname in enumerate(genes):
                for q, arr in (("mean", means[:, j]), ("aleatoric SD", None if ale is None else np.sqrt(np.clip(ale[:, j], 0, None))),
                               ("epistemic SD", None if epi is None else np.sqrt(np.clip(epi[:, j], 0, None)))):
                    if arr is None:
                        continue
                    channels[f"{gname} {q}"] = arr
                    colours_hex.append(QUANTITY_COLOURS[q])
            write_heatmaps(g, shapes, channels, level_shapes, um0, heatmap_level=hl, colours=colours_hex, chunk=chunk,
                           downsamples=level_ds, meta={"section": section, "genes": genes, "quantities": list(QUANTITIES),
                                 "unit": f"expected UMI counts per {kind[:-1]}", "rendered_from": kind})
        g.attrs["stimage_nb"] = {
            "section": section, "source_image": str(image.source), "source_level": int(base_level),
            "labels": [kind] + (["cell_types"] if names and cls is not None else []),
            "heatmap_genes": genes, "provenance": {k: jsonable(v) for k, v in sorted(uns.items())
                                                   if isinstance(v, (str, int, float, bool, np.number))}}
    return path


# ---------------------------------------------------------------------- readers
@dataclass
class LabelImage:
    """A label image read back with ome-zarr-py's :class:`~ome_zarr.reader.Reader`.

    Attributes
    ----------
    name
        Its name under ``labels/``.
    levels
        Dask arrays, level 0 first.
    colors
        ``{label value: (r, g, b, a)}`` 0–255.
    properties
        ``{label value: {key: value}}`` (without ``label-value``).
    scales
        The ``scale`` of every level (µm).
    """

    name: str
    levels: list
    colors: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    properties: dict[int, dict] = field(default_factory=dict)
    scales: list = field(default_factory=list)
    attrs: dict = field(default_factory=dict)

    def table(self):
        """The properties as a DataFrame indexed by label value."""
        import pandas as pd

        return pd.DataFrame.from_dict(self.properties, orient="index").rename_axis("label-value")


@dataclass
class Heatmaps:
    """Heatmaps read back: ``levels`` (dask, (c, y, x)), channel names, windows and colours."""

    levels: list
    channels: list[str]
    windows: list[tuple[float, float]]
    colours: list[str]
    scales: list
    attrs: dict

    def channel(self, name: str, level: int = 0) -> np.ndarray:
        """One channel of one level as a numpy array."""
        if name not in self.channels:
            raise KeyError(f"no heatmap channel {name!r}; have {self.channels}")
        return np.asarray(self.levels[level][self.channels.index(name)])


def _nodes(path: Path):
    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    quiet = logging.getLogger("ome_zarr")  # its reader logs every attribute at INFO
    before = quiet.level
    quiet.setLevel(max(before, logging.WARNING))
    try:
        loc = parse_url(str(path), fmt=FormatV04())
        if loc is None:
            raise StimageInputError(f"{path}: not a readable OME-Zarr store.")
        return list(Reader(loc)())
    finally:
        quiet.setLevel(before)


def read_labels(path: str | os.PathLike) -> dict[str, LabelImage]:
    """All label images of an OME-Zarr image, read with ome-zarr-py's reader."""
    from ome_zarr.reader import Label

    path = Path(path)
    out = {}
    for node in _nodes(path):
        if node.load(Label) is None:
            continue
        md = node.metadata
        colors = {int(k): tuple(int(round(c * 255)) for c in v) for k, v in (md.get("color") or {}).items() if v is not None}
        props = {int(k): dict(v) for k, v in (md.get("properties") or {}).items()}
        scales = [next(t["scale"] for t in ct if t["type"] == "scale") for ct in md.get("coordinateTransformations", [])]
        out[md["name"]] = LabelImage(md["name"], list(node.data), colors, props, scales, dict(node.zarr.root_attrs))
    return out


def read_heatmaps(path: str | os.PathLike) -> Heatmaps | None:
    """The ``heatmaps`` group of a prediction store (``None`` when it has none)."""
    path = Path(path)
    hp = path / "heatmaps"
    if not hp.is_dir():
        return None
    nodes = _nodes(hp)
    if not nodes:
        return None
    node = nodes[0]
    attrs = dict(node.zarr.root_attrs)
    chans = attrs.get("omero", {}).get("channels", [])
    scales = [next(t["scale"] for t in ct if t["type"] == "scale") for ct in node.metadata.get("coordinateTransformations", [])]
    return Heatmaps(list(node.data), [c["label"] for c in chans],
                    [(c["window"]["start"], c["window"]["end"]) for c in chans], [c["color"] for c in chans],
                    scales, attrs)


def read_prediction_ome_zarr(path: str | os.PathLike) -> dict:
    """A prediction store back as ``{"image": SlideImage, "labels": {...}, "heatmaps": Heatmaps, "attrs": {...}}``."""
    import zarr

    from .image import SlideImage

    path = Path(path)
    g = zarr.open_group(str(path), mode="r")
    attrs = dict(g.attrs)
    img = SlideImage(path) if "0" in g else None
    return {"image": img, "labels": read_labels(path), "heatmaps": read_heatmaps(path), "attrs": attrs}

