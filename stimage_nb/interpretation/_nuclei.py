"""Nuclei without downloaded weights: colour deconvolution, threshold, distance-transform watershed.

Method (scikit-image; every length is in micrometres and converted with the image's µm/px):

1. **Haematoxylin** by colour deconvolution (Ruifrok & Johnston 2001: ``skimage.color.separate_stains``
   with the package's :data:`stimage_nb.stain.RUIFROK_HED` vectors), in optical-density units
   ``OD = -log10(I / 255)`` (QuPath's "Hematoxylin OD").
2. **Threshold**: Gaussian-smoothed (``smooth_um``) haematoxylin above Otsu's threshold of the
   *tissue* pixels (summed OD above ``tissue_od``: glass does not pull the threshold down), and at
   least ``min_threshold``; holes filled, specks below ``min_area_um2`` removed.
3. **Split touching nuclei**: markers are the local maxima, at least ``min_distance_um`` apart, of
   the distance to the background (capped at a nucleus radius) plus the haematoxylin smoothed at
   nucleus scale (``blob_um``); a watershed of that surface inside the foreground grows them.
4. **Morphology** per nucleus with ``skimage.measure.regionprops`` at a physical ``spacing``: area
   (µm²), perimeter (µm), major/minor axis (µm), eccentricity, solidity, circularity
   ``4πA/P²``, and the mean and maximum haematoxylin OD; objects larger than ``max_area_um2`` (clumps,
   folds) are dropped.

Whole slides (:func:`segment_slide`) are cut into a grid of cells, each read with a margin wider
than a nucleus; a nucleus belongs to the cell holding its centroid, so nuclei cut by a cell border
are segmented whole by the cell that owns them and never duplicated or split. The grid is fixed
by the slide, so segmenting some cells (``boxes=``) gives the same nuclei there as the whole slide.

Nuclei can also come from QuPath (:func:`nuclei_from_qupath`: cell or detection GeoJSON) or, where a
user has their weights, from StarDist or Cellpose (:func:`segment_nuclei` with ``method=``); the
same :class:`Nuclei` and morphology come out of each.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from ..errors import StimageInputError
from ..names import make_unique

if TYPE_CHECKING:  # pragma: no cover
    from ..io.image import SlideImage

log = logging.getLogger(__name__)

#: Morphology columns of :attr:`Nuclei.table` (besides the centroid ``x``, ``y`` in level-0 px).
MORPHOLOGY = ("area_um2", "perimeter_um", "major_axis_um", "minor_axis_um", "eccentricity", "solidity",
              "circularity", "hematoxylin_od_mean", "hematoxylin_od_max")
#: QuPath's names for the same measurements (cell detection's ``Nucleus: ...``), for exports.
QUPATH_NAMES = {"area_um2": "Nucleus: Area µm^2", "perimeter_um": "Nucleus: Perimeter µm",
                "major_axis_um": "Nucleus: Max diameter µm", "minor_axis_um": "Nucleus: Min diameter µm",
                "eccentricity": "Nucleus: Eccentricity", "solidity": "Nucleus: Solidity",
                "circularity": "Nucleus: Circularity", "hematoxylin_od_mean": "Nucleus: Hematoxylin OD mean",
                "hematoxylin_od_max": "Nucleus: Hematoxylin OD max"}
METHODS = ("watershed", "stardist", "cellpose")
_THRESHOLDS: dict = {}  # (slide, level, params, ...) -> its haematoxylin threshold, computed once per process
THRESHOLD_CELL_PX = 1024  # the grid the slide threshold samples (independent of the segmentation grid)


@dataclass(frozen=True)
class SegmentationParams:
    """Parameters of the weights-free segmentation (physical units; see the module docstring).

    Attributes
    ----------
    threshold
        Haematoxylin OD above which a pixel is nucleus; ``None``: Otsu on the tissue pixels.
    min_threshold
        Lower bound of the automatic threshold (a tile without nuclei must not call its stroma nuclei).
    tissue_od
        Summed RGB optical density below which a pixel is glass (left out of Otsu's threshold).
    smooth_um, blob_um
        Gaussian sigmas (µm) of the thresholded image and of the marker surface.
    min_distance_um
        Least distance between the centres of two touching nuclei.
    min_area_um2, max_area_um2
        Objects outside this range are not nuclei (specks; clumps and folds).
    max_um_per_px
        Segment on the coarsest pyramid level at most this coarse (level 0 when none is).
    """

    threshold: float | None = None
    min_threshold: float = 0.3
    tissue_od: float = 0.15
    smooth_um: float = 0.5
    blob_um: float = 1.5
    min_distance_um: float = 3.0
    min_area_um2: float = 8.0
    max_area_um2: float = 500.0
    max_um_per_px: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def max_diameter_um(self) -> float:
        return 2.0 * math.sqrt(self.max_area_um2 / math.pi)


def _params(params) -> SegmentationParams:
    if params is None:
        return SegmentationParams()
    if isinstance(params, SegmentationParams):
        return params
    if isinstance(params, dict):
        return SegmentationParams(**params)
    raise StimageInputError(f"segmentation params must be a SegmentationParams or a dict, not {type(params).__name__}")


# ====================================================================== the result
@dataclass(frozen=True)
class Nuclei:
    """Nuclei of (part of) a slide: outlines and morphology, in the slide's level-0 pixels.

    Attributes
    ----------
    table
        One row per nucleus, indexed by a stable id (``"nuc_<x>_<y>"`` from the centroid, or the
        QuPath object's name): ``x``, ``y`` (centroid, level-0 px) and the :data:`MORPHOLOGY` columns
        (µm, µm², OD; NaN where unknown, e.g. no image to read the haematoxylin from).
    polygons
        One (k, 2) float array of outline vertices (x, y; level-0 px, continuous coordinates in which
        pixel ``(c, r)`` covers ``[c, c+1) x [r, r+1)``) per row of ``table``, in the same order.
    um_per_px
        Level-0 pixel size (µm).
    source
        ``"watershed"``, ``"stardist"``, ``"cellpose"`` or ``"qupath"``.
    params
        How they were made (segmentation parameters, file, level).
    """

    table: pd.DataFrame
    polygons: tuple = field(repr=False)
    um_per_px: float
    source: str = "watershed"
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.polygons) != len(self.table):
            raise ValueError(f"{len(self.polygons)} polygons for {len(self.table)} nuclei")

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        return f"Nuclei({len(self)} nuclei from {self.source}, {self.um_per_px:g} µm/px)"

    @property
    def ids(self) -> list[str]:
        return [str(i) for i in self.table.index]

    @property
    def xy(self) -> np.ndarray:
        """(n, 2) centroids in level-0 px."""
        return self.table[["x", "y"]].to_numpy(dtype=np.float64)

    def to_frame(self) -> pd.DataFrame:
        """The table (a copy)."""
        return self.table.copy()

    def to_json(self) -> dict:
        """A summary: counts, source, parameters and the median morphology."""
        med = {c: (float(self.table[c].median()) if len(self) and self.table[c].notna().any() else None)
               for c in MORPHOLOGY}
        return {"n_nuclei": len(self), "source": self.source, "um_per_px": float(self.um_per_px),
                "params": self.params, "median": med}

    def subset(self, keep) -> "Nuclei":
        """The nuclei selected by a boolean mask, positions or ids."""
        keep = np.asarray(keep)
        if keep.dtype == bool:
            pos = np.flatnonzero(keep)
        elif keep.dtype.kind in "iu":
            pos = keep.astype(np.int64)
        else:
            pos = self.table.index.get_indexer(keep.astype(str))
            if (pos < 0).any():
                raise KeyError(f"unknown nucleus ids {list(keep[pos < 0][:3])}")
        return Nuclei(self.table.iloc[pos].copy(), tuple(self.polygons[i] for i in pos), self.um_per_px,
                      self.source, dict(self.params))

    def bounds(self) -> np.ndarray:
        """(n, 4) bounding boxes ``x0, y0, x1, y1`` of the outlines (level-0 px)."""
        if not len(self):
            return np.zeros((0, 4))
        return np.array([[p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()] for p in self.polygons])

    def in_box(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Which nuclei's outlines intersect the level-0 box ``[x0, x1) x [y0, y1)``."""
        b = self.bounds()
        return (b[:, 2] >= x0) & (b[:, 0] < x1) & (b[:, 3] >= y0) & (b[:, 1] < y1)

    def rasterise(self, x0: float, y0: float, width: int, height: int, downsample: float = 1.0,
                  rows: Sequence[int] | None = None) -> np.ndarray:
        """An int32 label image of a box of a pyramid level: value ``i + 1`` where nucleus ``i`` lies.

        ``(x0, y0)`` is the box's top-left corner in the level's pixels, ``downsample`` the level's
        factor to level 0. A pixel belongs to a nucleus when its centre lies inside the outline; where
        outlines overlap the later one wins. ``rows`` restricts to some nuclei (positions).
        """
        from skimage.draw import polygon as draw_polygon

        out = np.zeros((int(height), int(width)), np.int32)
        pos = np.flatnonzero(self.in_box(x0 * downsample, y0 * downsample, (x0 + width) * downsample,
                                         (y0 + height) * downsample)) if rows is None else np.asarray(rows)
        for i in pos:
            p = self.polygons[i] / downsample
            rr, cc = draw_polygon(p[:, 1] - y0 - 0.5, p[:, 0] - x0 - 0.5, shape=out.shape)
            out[rr, cc] = i + 1
        return out

    def count_in_discs(self, xy: np.ndarray, radius_px: float | np.ndarray) -> np.ndarray:
        """Number of nuclei whose centroid lies within ``radius_px`` (level-0 px) of each centre ``xy``."""
        from scipy.spatial import cKDTree

        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        r = np.broadcast_to(np.asarray(radius_px, dtype=np.float64), (len(xy),))
        if not len(self):
            return np.zeros(len(xy), np.int64)
        tree = cKDTree(self.xy)
        return np.array([len(tree.query_ball_point(c, rr)) for c, rr in zip(xy, r)], dtype=np.int64)

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(cls, um_per_px: float, source: str = "watershed", params: dict | None = None) -> "Nuclei":
        return cls(pd.DataFrame(columns=["x", "y", *MORPHOLOGY], dtype=np.float64), (), float(um_per_px), source,
                   dict(params or {}))

    @classmethod
    def concat(cls, parts: Sequence["Nuclei"]) -> "Nuclei":
        """Nuclei of several regions of one slide as one set (ids made unique)."""
        parts = [p for p in parts if p is not None]
        if not parts:
            raise ValueError("nothing to concatenate")
        table = pd.concat([p.table for p in parts]) if any(len(p) for p in parts) else parts[0].table
        polys = tuple(q for p in parts for q in p.polygons)
        table = table.set_axis(make_unique(list(map(str, table.index))))
        return cls(table, polys, parts[0].um_per_px, parts[0].source, dict(parts[0].params))


def _nucleus_id(x: float, y: float) -> str:
    """``"nuc_<x>_<y>"`` from a level-0 centroid, rounded so that the same nucleus measured from two
    origins (a tile and its neighbour) gets the same id despite floating-point noise."""
    return f"nuc_{int(math.floor(round(float(x), 4) + 0.5))}_{int(math.floor(round(float(y), 4) + 0.5))}"


# ====================================================================== colour deconvolution
def hematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density (log10, QuPath's units) of an (h, w, 3) uint8 RGB image.

    Colour deconvolution with :data:`stimage_nb.stain.RUIFROK_HED` through
    ``skimage.color.separate_stains`` (whose output is ``OD / 6`` in these units).
    """
    from skimage.color import separate_stains

    from ..stain import RUIFROK_HED

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise StimageInputError(f"expected an (h, w, 3) RGB image, got shape {rgb.shape}")
    return (separate_stains(rgb[..., :3], np.linalg.inv(RUIFROK_HED))[..., 0] * 6.0).astype(np.float32)


def _tissue_values(Hs: np.ndarray, rgb: np.ndarray, p: SegmentationParams) -> np.ndarray:
    """Smoothed haematoxylin of the tissue pixels (summed OD above ``tissue_od``)."""
    od = -np.log10(np.maximum(rgb[..., :3].astype(np.float32), 1.0) / 255.0).sum(2)
    return Hs[od > p.tissue_od]


def _otsu(vals: np.ndarray, p: SegmentationParams) -> float:
    from skimage.filters import threshold_otsu

    if vals.size < 64 or np.ptp(vals) <= 1e-6:
        return float(p.min_threshold)
    return max(float(threshold_otsu(vals)), float(p.min_threshold))


def _threshold(Hs: np.ndarray, rgb: np.ndarray, p: SegmentationParams) -> float:
    if p.threshold is not None:
        return float(p.threshold)
    return _otsu(_tissue_values(Hs, rgb, p), p)


def slide_threshold(image: "SlideImage", cells: Sequence[tuple[int, int, int, int]], level: int,
                    params: SegmentationParams | dict | None = None, *, max_cells: int = 8, max_side: int = 512,
                    max_values: int = 200_000) -> float:
    """One haematoxylin threshold for a slide: Otsu over the tissue pixels of up to ``max_cells``
    regions ``(x0, y0, x1, y1)`` of a level (their central ``max_side`` px), spread over the list, so
    every part of a slide is cut at the same level and tiles agree across their seams."""
    from skimage import filters

    p = _params(params)
    if p.threshold is not None:
        return float(p.threshold)
    um = float(image.um_per_px) * float(image.downsamples[level])
    pick = np.unique(np.linspace(0, len(cells) - 1, min(len(cells), max_cells)).astype(int)) if len(cells) else []
    vals = []
    for i in pick:
        x0, y0, x1, y1 = cells[i]
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        x0, x1 = max(x0, cx - max_side // 2), min(x1, cx + max_side // 2)
        y0, y1 = max(y0, cy - max_side // 2), min(y1, cy + max_side // 2)
        rgb = image.read_region(x0, y0, x1 - x0, y1 - y0, level=level)
        vals.append(_tissue_values(filters.gaussian(hematoxylin_od(rgb), p.smooth_um / um), rgb, p))
    v = np.concatenate(vals) if vals else np.zeros(0)
    if v.size > max_values:
        v = v[:: -(-v.size // max_values)]
    return _otsu(v, p)


def watershed_labels(rgb: np.ndarray, um_per_px: float, params: SegmentationParams | dict | None = None
                     ) -> tuple[np.ndarray, np.ndarray, float]:
    """Label nuclei in an RGB array: ``(labels int32, haematoxylin OD, threshold)`` (steps 1–3 above)."""
    from scipy import ndimage as ndi
    from skimage import feature, filters, measure, morphology, segmentation

    p = _params(params)
    um = float(um_per_px)
    H = hematoxylin_od(rgb)
    Hs = filters.gaussian(H, p.smooth_um / um)
    t = _threshold(Hs, rgb, p)
    fg = Hs > t
    min_px = max(1, int(round(p.min_area_um2 / um ** 2)))
    fg = morphology.remove_small_objects(fg, max_size=min_px - 1) if min_px > 1 else fg
    fg = ndi.binary_fill_holes(fg)
    if not fg.any():
        return np.zeros(fg.shape, np.int32), H, t
    dist = ndi.distance_transform_edt(fg) * um
    radius = math.sqrt(p.max_area_um2 / math.pi) / 2.0  # a typical nucleus radius (half the largest)
    Hb = filters.gaussian(H, p.blob_um / um)
    surf = np.minimum(dist, radius) / radius + Hb / max(2.0 * t, 1e-3)  # local: tiles of a slide agree
    surf = filters.gaussian(surf, 1.0 / um)
    comp = measure.label(fg)
    peaks = feature.peak_local_max(surf, min_distance=max(1, int(round(p.min_distance_um / um))), labels=comp,
                                   exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # components without a peak (flat plateaus) still get one marker
    missing = np.setdiff1d(np.unique(comp[fg]), np.unique(comp[tuple(peaks.T)]) if len(peaks) else [])
    if len(missing):
        coms = ndi.center_of_mass(fg, comp, missing)
        for j, (r, c) in enumerate(coms):
            rr, cc = int(round(r)), int(round(c))
            if comp[rr, cc] != missing[j]:  # a non-convex component: any of its pixels
                rr, cc = np.argwhere(comp == missing[j])[0]
            markers[rr, cc] = len(peaks) + 1 + j
    lab = segmentation.watershed(-surf, markers, mask=fg).astype(np.int32)
    lab = morphology.remove_small_objects(lab, max_size=min_px - 1) if min_px > 1 else lab
    lab, _, _ = segmentation.relabel_sequential(lab)
    return lab.astype(np.int32), H, t


def _outline(mask: np.ndarray) -> np.ndarray:
    """Outer boundary of a binary crop as (k, 2) x, y vertices in the crop's continuous coordinates."""
    from skimage.measure import find_contours

    cs = find_contours(np.pad(mask, 1).astype(np.float32), 0.5)
    if not cs:
        r, c = np.nonzero(mask)
        return np.array([[c.min(), r.min()], [c.max() + 1, r.min()], [c.max() + 1, r.max() + 1],
                         [c.min(), r.max() + 1]], dtype=np.float64)
    c = max(cs, key=len)
    # contour (row, col) in padded index coordinates -> continuous (x, y) of the crop
    xy = np.stack([c[:, 1] - 1 + 0.5, c[:, 0] - 1 + 0.5], axis=1)
    if len(xy) > 1 and np.allclose(xy[0], xy[-1]):
        xy = xy[:-1]
    return _drop_collinear(xy)


def _drop_collinear(xy: np.ndarray) -> np.ndarray:
    """Remove vertices that lie on a straight line between their neighbours (same outline, fewer points)."""
    if len(xy) < 4:
        return xy
    d_in = xy - np.roll(xy, 1, axis=0)
    d_out = np.roll(xy, -1, axis=0) - xy
    cross = d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0]
    keep = np.abs(cross) > 1e-9
    return xy[keep] if keep.sum() >= 3 else xy


def measure_labels(labels: np.ndarray, H: np.ndarray | None, um_per_px: float, *, origin=(0.0, 0.0),
                   downsample: float = 1.0) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """Morphology (:data:`MORPHOLOGY`) and outlines of every label of a label image.

    ``um_per_px`` is the label image's pixel size; ``origin`` its top-left corner in its level's px and
    ``downsample`` that level's factor, so centroids and outlines come out in level-0 px. Without
    ``H`` the haematoxylin columns are NaN.
    """
    from skimage.measure import regionprops

    um = float(um_per_px)
    rows, polys = [], []
    inten = H if H is not None else None
    for r in regionprops(labels, intensity_image=inten, spacing=(um, um)):
        minr, minc, _, _ = r.bbox
        cy, cx = np.asarray(r.centroid) / um  # regionprops gives the centroid in µm with a spacing
        area, perim = float(r.area), float(r.perimeter)
        d = {"x": (origin[0] + cx + 0.5) * downsample, "y": (origin[1] + cy + 0.5) * downsample,
             "area_um2": area, "perimeter_um": perim, "major_axis_um": float(r.axis_major_length),
             "minor_axis_um": float(r.axis_minor_length), "eccentricity": float(r.eccentricity),
             "solidity": float(r.solidity),
             "circularity": float(min(1.0, 4 * math.pi * area / perim ** 2)) if perim > 0 else np.nan,
             "hematoxylin_od_mean": float(r.intensity_mean) if inten is not None else np.nan,
             "hematoxylin_od_max": float(r.intensity_max) if inten is not None else np.nan}
        rows.append(d)
        xy = _outline(r.image)
        polys.append(((xy + [origin[0] + minc, origin[1] + minr]) * downsample).astype(np.float64))
    table = pd.DataFrame(rows, columns=["x", "y", *MORPHOLOGY], dtype=np.float64)
    table.index = pd.Index(make_unique([_nucleus_id(x, y) for x, y in
                                    zip(table["x"], table["y"])]), name="nucleus")
    return table, polys


# ====================================================================== arrays, tiles, slides
def segment_nuclei(image: np.ndarray, um_per_px: float, *, params: SegmentationParams | dict | None = None,
                   method: str = "watershed", model_path: str | os.PathLike | None = None,
                   origin=(0.0, 0.0)) -> Nuclei:
    """Nuclei of an RGB array (a tile or a region of a slide).

    Parameters
    ----------
    image
        (h, w, 3) uint8 RGB (H&E).
    um_per_px
        Its pixel size (µm); every parameter is physical, so any scan resolution works.
    params
        :class:`SegmentationParams` (watershed only).
    method
        ``"watershed"`` (the default, no weights), ``"stardist"`` or ``"cellpose"`` (optional
        extras that need the user's local weights in ``model_path``).
    origin
        The array's top-left corner in level-0 px (outlines and centroids are shifted by it).

    Returns
    -------
    Nuclei
        Outlines and morphology in level-0 px (the array's pixels shifted by ``origin``).

    Raises
    ------
    StimageInputError
        A bad array or µm/px; an optional method that is not installed or has no weights.
    """
    from ..io.ngff import check_um_per_px

    um = check_um_per_px(um_per_px, "segment_nuclei")
    rgb = np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.dtype != np.uint8:
        raise StimageInputError(f"segment_nuclei needs an (h, w, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    p = _params(params)
    if method == "watershed":
        lab, H, t = watershed_labels(rgb, um, p)
        extra = {"threshold_od": round(float(t), 4)}
    elif method in ("stardist", "cellpose"):
        from ._external import external_labels

        lab = external_labels(rgb, um, method, model_path)
        H, extra = hematoxylin_od(rgb), {"model_path": str(model_path)}
    else:
        raise StimageInputError(f"unknown nucleus segmentation method {method!r}; use one of {list(METHODS)}")
    table, polys = measure_labels(lab, H, um, origin=origin)
    keep = ((table["area_um2"] <= p.max_area_um2) & (table["area_um2"] >= p.min_area_um2)).to_numpy()
    return Nuclei(table[keep], tuple(q for q, k in zip(polys, keep) if k), um, method,
                  {"method": method, **p.to_dict(), **extra})


def _merge_rects(rects: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Replace intersecting rectangles ``(x0, y0, x1, y1)`` by their bounding box until none intersect."""
    out = list(rects)
    changed = True
    while changed:
        changed = False
        merged: list[tuple[int, int, int, int]] = []
        for r in out:
            for k, m in enumerate(merged):
                if r[0] < m[2] and m[0] < r[2] and r[1] < m[3] and m[1] < r[3]:
                    merged[k] = (min(r[0], m[0]), min(r[1], m[1]), max(r[2], m[2]), max(r[3], m[3]))
                    changed = True
                    break
            else:
                merged.append(r)
        out = merged
    return sorted(out, key=lambda r: (r[1], r[0]))


def _segmentation_level(image: "SlideImage", p: SegmentationParams) -> int:
    ok = [i for i, d in enumerate(image.downsamples) if image.um_per_px * d <= p.max_um_per_px * 1.001]
    return max(ok) if ok else 0


def segment_slide(image: "SlideImage", *, boxes: np.ndarray | None = None, params: SegmentationParams | dict | None = None,
                  method: str = "watershed", model_path: str | os.PathLike | None = None, cell_px: int = 1024,
                  tissue_only: bool = True, progress: bool = False, workers: int | None = None) -> Nuclei:
    """Nuclei of a whole slide, or of the parts of it that ``boxes`` cover, seams handled.

    Parameters
    ----------
    image
        A :class:`~stimage_nb.io.image.SlideImage` (any source the package reads).
    boxes
        (n, 4) level-0 boxes ``x0, y0, x1, y1`` (e.g. the tiles of the spots to explain): only they are
        segmented, each grown by half the largest nucleus (boxes that then overlap are merged), so
        every nucleus touching a box is found whole, once. ``None``: the whole slide, on a grid.
    params, method, model_path
        See :func:`segment_nuclei`.
    cell_px
        Grid cell side in pixels of the segmentation level (the level at most
        ``params.max_um_per_px`` µm/px).
    tissue_only
        Without ``boxes``: skip cells without tissue (:func:`stimage_nb.io.tissue.tissue_mask`).
    progress, workers
        A progress bar; threads segmenting cells in parallel (scikit-image releases the GIL in its
        filters; default 1).

    Returns
    -------
    Nuclei
        In level-0 px. Each cell (or grown box) is read with a margin of 1.5 times the largest nucleus
        diameter and keeps the nuclei whose centroid lies in it: a nucleus on a border is segmented whole, once.
        One haematoxylin threshold serves the whole slide (:func:`slide_threshold`), so the cells agree
        across their seams.
    """
    from concurrent.futures import ThreadPoolExecutor

    p = _params(params)
    level = _segmentation_level(image, p)
    ds = float(image.downsamples[level])
    um = float(image.um_per_px) * ds
    H, W = image.level_shapes[level]
    margin = int(math.ceil(1.5 * p.max_diameter_um / um)) + 2  # context around a core: > the largest nucleus
    masks: list = []

    def tissue_grid(side: int) -> list[tuple[int, int, int, int]]:
        cells = [(x, y, min(W, x + side), min(H, y + side)) for y in range(0, H, side) for x in range(0, W, side)]
        if not tissue_only:
            return cells
        from ..io.tissue import tissue_mask

        if not masks:
            masks.append(tissue_mask(image))
        mask, mds = masks[0]
        f = ds / mds  # thumbnail px per segmentation-level px

        def has_tissue(c):
            x0, y0 = int(c[0] * f), int(c[1] * f)
            x1, y1 = int(math.ceil(c[2] * f)), int(math.ceil(c[3] * f))
            return bool(mask[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)].any())

        return [c for c in cells if has_tissue(c)] or cells

    if p.threshold is None:  # one threshold from the whole slide's tissue, whatever part is segmented
        key = (str(image.source), int(level), p, bool(tissue_only))
        if key not in _THRESHOLDS:
            _THRESHOLDS[key] = slide_threshold(image, tissue_grid(THRESHOLD_CELL_PX), level, p)
        p = replace(p, threshold=_THRESHOLDS[key])
        log.info("nuclei: haematoxylin threshold %.3f OD for %s (Otsu over the slide's tissue)", p.threshold,
                 image.source)
    if boxes is not None:  # cores: the boxes grown by half a nucleus, overlapping ones merged
        pad = p.max_diameter_um / um / 2 + 1
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / ds + [-pad, -pad, pad, pad]
        cores = _merge_rects([(max(0, int(math.floor(x0))), max(0, int(math.floor(y0))), min(W, int(math.ceil(x1))),
                               min(H, int(math.ceil(y1)))) for x0, y0, x1, y1 in b])
        cells = [c for c in cores if c[2] > c[0] and c[3] > c[1]]
    else:  # cores: a grid fixed by the slide
        cells = tissue_grid(int(cell_px))

    def run(c):
        x0, y0, x1, y1 = c
        rx0, ry0 = max(0, x0 - margin), max(0, y0 - margin)
        rx1, ry1 = min(W, x1 + margin), min(H, y1 + margin)
        rgb = image.read_region(rx0, ry0, rx1 - rx0, ry1 - ry0, level=level)
        nuc = segment_nuclei(rgb, um, params=p, method=method, model_path=model_path, origin=(rx0, ry0))
        # centroids and outlines are in this level's px: keep the cell's own nuclei, then scale to level 0
        t = nuc.table
        lx, ly = t["x"].to_numpy(), t["y"].to_numpy()  # level px
        own = (lx >= x0) & (lx < x1) & (ly >= y0) & (ly < y1)
        nuc = nuc.subset(own)
        if ds != 1.0:
            tab = nuc.table.copy()
            tab[["x", "y"]] *= ds
            nuc = Nuclei(tab, tuple(q * ds for q in nuc.polygons), float(image.um_per_px), nuc.source, nuc.params)
        return nuc

    if not cells:
        return Nuclei.empty(image.um_per_px, method, {"method": method, **p.to_dict(), "level": level})
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cells), desc="nuclei", unit="cell", leave=False)
    parts = []
    with ThreadPoolExecutor(max_workers=max(1, int(workers or 1))) as ex:
        for part in ex.map(run, cells):
            parts.append(part)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    out = Nuclei.concat(parts)
    tab = out.table
    tab.index = pd.Index(make_unique([_nucleus_id(x, y) for x, y in zip(tab["x"], tab["y"])]),
                         name="nucleus")
    params_out = {"method": method, **p.to_dict(), "level": int(level), "cell_px": int(cell_px),
                  "source_image": str(image.source)}
    return Nuclei(tab, out.polygons, float(image.um_per_px), method, params_out)


# ====================================================================== QuPath
def nuclei_from_qupath(path: str | os.PathLike, *, um_per_px: float | None = None,
                       image: "SlideImage | str | os.PathLike | None" = None) -> Nuclei:
    """Nuclei from a QuPath GeoJSON of cells or detections (read with :func:`stimage_nb.qupath.read_qupath`).

    A cell's ``nucleusGeometry`` is its nucleus; a detection's geometry is taken as the nucleus.
    Morphology is measured on the rasterised outlines exactly as for segmented nuclei; the
    haematoxylin columns need the ``image`` (else NaN). Ids are the objects' names.

    Parameters
    ----------
    path
        The GeoJSON (``.geojson``, ``.json``, ``.geojson.gz``).
    um_per_px
        Full-resolution pixel size (default: the image's).
    image
        The slide the objects were drawn on (a path or :class:`~stimage_nb.io.image.SlideImage`).

    Raises
    ------
    StimageInputError
        A file QuPath would refuse, no µm/px, or a file without detections or cells.
    """
    from ..qupath import _polygons, read_qupath

    img = None
    if image is not None:
        from ..io.image import SlideImage, open_image

        img = image if isinstance(image, SlideImage) else open_image(image, um_per_px=um_per_px)
        um_per_px = um_per_px or img.um_per_px
    if um_per_px is None:
        raise StimageInputError(f"{path}: nuclei from QuPath need the pixel size: pass um_per_px= or image=.")
    objs = read_qupath(path)
    pts = objs.points
    if not len(pts):
        raise StimageInputError(f"{path}: no detections or cells to take nuclei from (only annotations?).")
    polys, ids = [], []
    for oid, geom_txt, nuc_txt in zip(pts.index, pts["geometry"], pts["nucleus_geometry"]):
        g = json.loads(nuc_txt) if nuc_txt else json.loads(geom_txt)
        rings = [p[0] for p in _polygons(g) if len(p)]
        if not rings:
            continue
        ring = max(rings, key=len)
        if len(ring) > 1 and np.allclose(ring[0], ring[-1]):
            ring = ring[:-1]
        polys.append(np.asarray(ring, dtype=np.float64))
        ids.append(str(oid))
    rows = []
    for poly in polys:
        rows.append(_measure_polygon(poly, float(um_per_px), img))
    table = pd.DataFrame(rows, columns=["x", "y", *MORPHOLOGY], dtype=np.float64, index=pd.Index(ids, name="nucleus"))
    return Nuclei(table, tuple(polys), float(um_per_px), "qupath", {"method": "qupath", "file": str(path)})


def _measure_polygon(poly: np.ndarray, um: float, image=None) -> dict:
    """Morphology of one outline (level-0 px), measured on its rasterised mask like segmented nuclei."""
    x0, y0 = int(math.floor(poly[:, 0].min())), int(math.floor(poly[:, 1].min()))
    x1, y1 = int(math.ceil(poly[:, 0].max())), int(math.ceil(poly[:, 1].max()))
    w, h = max(1, x1 - x0), max(1, y1 - y0)
    from skimage.draw import polygon as draw_polygon

    m = np.zeros((h, w), np.int32)
    rr, cc = draw_polygon(poly[:, 1] - y0 - 0.5, poly[:, 0] - x0 - 0.5, shape=m.shape)
    m[rr, cc] = 1
    if not m.any():  # thinner than a pixel: its centre pixel
        m[min(h - 1, h // 2), min(w - 1, w // 2)] = 1
    H = hematoxylin_od(image.read_region(x0, y0, w, h, level=0)) if image is not None else None
    table, _ = measure_labels(m, H, um, origin=(x0, y0))
    return table.iloc[0].to_dict()


def as_nuclei(nuclei, *, image=None, um_per_px: float | None = None) -> Nuclei:
    """A :class:`Nuclei`, or one read from a QuPath GeoJSON path."""
    if isinstance(nuclei, Nuclei):
        return nuclei
    if isinstance(nuclei, (str, os.PathLike)) and Path(nuclei).name.endswith((".geojson", ".json", ".geojson.gz")):
        return nuclei_from_qupath(nuclei, image=image, um_per_px=um_per_px)
    raise StimageInputError(f"nuclei must be a Nuclei object or a QuPath GeoJSON path, not {nuclei!r}")
