"""Building and reading ``omero.model`` objects: ROIs, shapes, colours, map annotations, links.

Everything here is pure object construction and decoding: no server call. Coordinates in OMERO are
pixels of the image's full resolution (x right, y down), the same frame as level 0 of a pulled
image when it was pulled at full resolution (``image_scale == 1``).
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Iterable, Sequence

import numpy as np

from .connection import require_omero

log = logging.getLogger(__name__)

# Namespaces: every object a push writes carries one of these (and the run id, see run_tag).
NS_ROOT = "stimage_nb.github.io/omero"
NS_RUN = f"{NS_ROOT}/run"              # MapAnnotation on the image: the run's record and state
NS_TABLE = f"{NS_ROOT}/table"          # FileAnnotation of an OMERO.table of predictions
NS_FILE = f"{NS_ROOT}/file"            # FileAnnotation of an attached file (h5ad, GeoJSON, labels)
NS_ROI = f"{NS_ROOT}/roi"              # written into each pushed ROI's description (ROIs have no ns)
OUR_NAMESPACES = (NS_RUN, NS_TABLE, NS_FILE)
TAG_PREFIX = "stimage_nb:"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")
_POINTS_RE = re.compile(r"(-?[\d.]+(?:[eE][-+]?\d+)?)\s*,\s*(-?[\d.]+(?:[eE][-+]?\d+)?)")


# ----------------------------------------------------------------------------- run tags
def check_run_id(run_id) -> str:
    """A run id usable in OMERO descriptions and queries (letters, digits, ``._:+-``; ≤ 128)."""
    from ..errors import StimageInputError

    s = str(run_id or "")
    if not _RUN_ID_RE.match(s):
        raise StimageInputError(f"run id {run_id!r} is not usable: use 1-128 letters, digits or ._:+- "
                                "(it comes from the prediction's uns['stimage_nb']['run_id'] or --run-id).")
    return s


def run_tag(run_id: str, image_id: int, fingerprint: str, **extra) -> str:
    """The machine-readable description written on every object a push creates.

    ``stimage_nb:run=<run id>;image=<image id>;fp=<fingerprint>[;state=...][;obj=...]``: the run id
    (one model run predicts many sections), the image (so pushes of one run onto several images stay
    apart), the fingerprint of what was pushed (content and options) and per-object extras.
    """
    parts = [f"{TAG_PREFIX}run={run_id}", f"image={int(image_id)}", f"fp={fingerprint}"]
    for k, v in extra.items():
        if v is not None:
            v = str(v)
            if ";" in v or "=" in v:
                raise ValueError(f"tag value {v!r} may not contain ';' or '='")
            parts.append(f"{k}={v}")
    return ";".join(parts)


def run_tag_prefix(run_id: str, image_id: int) -> str:
    """The start every tag of (run, image) shares (for HQL ``like`` queries; match exactly after)."""
    return f"{TAG_PREFIX}run={run_id};image={int(image_id)};"


def parse_tag(text) -> dict | None:
    """Inverse of :func:`run_tag` (None when ``text`` is not one of our tags)."""
    if text is None:
        return None
    s = unwrap(text)
    if not isinstance(s, str) or not s.startswith(TAG_PREFIX):
        return None
    out = {}
    for part in s[len(TAG_PREFIX):].split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out if "run" in out else None


# ----------------------------------------------------------------------------- rtypes
def unwrap(v):
    """omero.rtypes.unwrap, tolerant of plain values."""
    if v is None:
        return None
    try:
        from omero.rtypes import unwrap as _unwrap

        return _unwrap(v)
    except ImportError:  # pragma: no cover
        return getattr(v, "val", v)


# ----------------------------------------------------------------------------- colours
def rgba_to_int(r: int, g: int, b: int, a: int = 255) -> int:
    """OMERO's packed signed 32-bit RGBA colour (via omero-py's ``ColorHolder``)."""
    require_omero()
    from omero.gateway import ColorHolder

    return int(ColorHolder.fromRGBA(int(r), int(g), int(b), int(a)).getInt())


def int_to_rgba(v) -> tuple[int, int, int, int] | None:
    """Decode an OMERO colour int (signed RGBA) into ``(r, g, b, a)``."""
    v = unwrap(v)
    if v is None:
        return None
    u = int(v) & 0xFFFFFFFF
    return (u >> 24) & 0xFF, (u >> 16) & 0xFF, (u >> 8) & 0xFF, u & 0xFF


def value_colours(values: np.ndarray, cmap: str = "viridis", *, log1p: bool = True,
                  lo_hi: tuple[float, float] | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """(n, 3) uint8 colours for values, scaled between the 1st and 99th percentiles.

    Returns the colours and the (lo, hi) range used (in the transformed units).
    """
    import matplotlib

    v = np.asarray(values, dtype=np.float64)
    t = np.log1p(np.clip(v, 0, None)) if log1p else v
    finite = t[np.isfinite(t)]
    if lo_hi is None:
        lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    else:
        lo, hi = lo_hi
    span = hi - lo if hi > lo else 1.0
    z = np.clip((np.nan_to_num(t, nan=lo) - lo) / span, 0, 1)
    rgba = matplotlib.colormaps[cmap](z)
    return (rgba[:, :3] * 255).round().astype(np.uint8), (float(lo), float(hi))


# ----------------------------------------------------------------------------- shapes
def _length_px(v: float):
    import omero.model
    from omero.model.enums import UnitsLength

    return omero.model.LengthI(float(v), UnitsLength.PIXEL)


def _style(shape, text: str | None, fill: Sequence[int] | None, stroke: Sequence[int] | None,
           stroke_width: float | None):
    from omero.rtypes import rint, rstring

    if text:
        shape.setTextValue(rstring(str(text)))
    if fill is not None:
        shape.setFillColor(rint(rgba_to_int(*fill)))
    if stroke is not None:
        shape.setStrokeColor(rint(rgba_to_int(*stroke)))
    if stroke_width is not None:
        shape.setStrokeWidth(_length_px(stroke_width))
    return shape


def ellipse(x: float, y: float, rx: float, ry: float | None = None, *, text: str | None = None,
            fill: Sequence[int] | None = None, stroke: Sequence[int] | None = None,
            stroke_width: float | None = 1.0):
    """An ``omero.model.EllipseI`` centred at (x, y) in full-resolution pixels."""
    require_omero()
    import omero.model
    from omero.rtypes import rdouble

    e = omero.model.EllipseI()
    e.setX(rdouble(float(x)))
    e.setY(rdouble(float(y)))
    e.setRadiusX(rdouble(float(rx)))
    e.setRadiusY(rdouble(float(rx if ry is None else ry)))
    return _style(e, text, fill, stroke, stroke_width)


def point(x: float, y: float, *, text: str | None = None, fill=None, stroke=None):
    """An ``omero.model.PointI``."""
    require_omero()
    import omero.model
    from omero.rtypes import rdouble

    p = omero.model.PointI()
    p.setX(rdouble(float(x)))
    p.setY(rdouble(float(y)))
    return _style(p, text, fill, stroke, None)


def points_string(xy: np.ndarray) -> str:
    """OMERO's polygon ``points`` text: ``"x1,y1 x2,y2 ..."``."""
    return " ".join(f"{float(x):.2f},{float(y):.2f}" for x, y in np.asarray(xy, dtype=np.float64))


def parse_points(text) -> np.ndarray:
    """(n, 2) float array from an OMERO ``points`` string (signed and exponent forms accepted)."""
    s = unwrap(text) or ""
    pts = _POINTS_RE.findall(s)
    return np.array([[float(a), float(b)] for a, b in pts], dtype=np.float64).reshape(-1, 2)


def polygon(xy: np.ndarray, *, text: str | None = None, fill=None, stroke=None, stroke_width: float | None = 1.0):
    """An ``omero.model.PolygonI`` through the (n, 2) vertices ``xy``."""
    require_omero()
    import omero.model
    from omero.rtypes import rstring

    p = omero.model.PolygonI()
    p.setPoints(rstring(points_string(xy)))
    return _style(p, text, fill, stroke, stroke_width)


def mask(binary: np.ndarray, x0: int, y0: int, *, text: str | None = None, fill=None):
    """An ``omero.model.MaskI`` of a boolean crop whose top-left is (x0, y0); bits packed as OMERO does."""
    require_omero()
    import omero.model
    from omero.rtypes import rdouble

    b = np.asarray(binary, dtype=bool)
    m = omero.model.MaskI()
    m.setBytes(np.packbits(b.astype(np.uint8)).tobytes())
    m.setWidth(rdouble(float(b.shape[1])))
    m.setHeight(rdouble(float(b.shape[0])))
    m.setX(rdouble(float(x0)))
    m.setY(rdouble(float(y0)))
    return _style(m, text, fill, None, None)


def masks_from_labels(labels: np.ndarray, *, fills: dict[int, Sequence[int]] | None = None,
                      texts: dict[int, str] | None = None, offset: tuple[int, int] = (0, 0)) -> dict[int, object]:
    """One cropped ``MaskI`` per label > 0 of a label image.

    Same masks as ``omero_rois.masks_from_label_image`` (which scans the whole image once per label,
    O(labels × pixels)), but each label is cropped to its bounding box found in one pass
    (``scipy.ndimage.find_objects``), so thousands of labels take a fraction of a second.
    """
    from scipy import ndimage

    lab = np.asarray(labels)
    if lab.ndim != 2 or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer array, got {lab.dtype} {lab.shape}")
    out = {}
    ox, oy = offset
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        crop = lab[sl] == i
        out[i] = mask(crop, sl[1].start + ox, sl[0].start + oy, text=(texts or {}).get(i),
                      fill=(fills or {}).get(i))
    return out


def roi(image_id: int, shapes: Iterable, *, name: str | None = None, description: str | None = None):
    """An ``omero.model.RoiI`` on image ``image_id`` (an unloaded ImageI reference) holding ``shapes``."""
    require_omero()
    import omero.model
    from omero.rtypes import rstring

    r = omero.model.RoiI()
    r.setImage(omero.model.ImageI(int(image_id), False))
    if name is not None:
        r.setName(rstring(str(name)))
    if description is not None:
        r.setDescription(rstring(str(description)))
    for s in shapes:
        r.addShape(s)
    return r


# ----------------------------------------------------------------------------- annotations
def map_annotation(pairs: dict | Sequence[tuple[str, str]], *, ns: str, description: str | None = None):
    """An ``omero.model.MapAnnotationI`` (ordered key-value pairs, shown in OMERO.web's side panel)."""
    require_omero()
    import omero.model
    from omero.rtypes import rstring

    items = pairs.items() if isinstance(pairs, dict) else pairs
    a = omero.model.MapAnnotationI()
    a.setNs(rstring(ns))
    if description is not None:
        a.setDescription(rstring(description))
    a.setMapValue([omero.model.NamedValue(str(k), _kv_text(v)) for k, v in items])
    return a


def _kv_text(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, default=str)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return str(v)


def map_pairs(ann) -> list[tuple[str, str]]:
    """The (key, value) pairs of a loaded MapAnnotation (model object or gateway wrapper)."""
    obj = getattr(ann, "_obj", ann)
    mv = obj.getMapValue() if hasattr(obj, "getMapValue") else None
    return [(nv.name, nv.value) for nv in (mv or [])]


def image_link(image_id: int, annotation):
    """An ``ImageAnnotationLinkI`` from image ``image_id`` to ``annotation`` (saved or not)."""
    require_omero()
    import omero.model

    link = omero.model.ImageAnnotationLinkI()
    link.setParent(omero.model.ImageI(int(image_id), False))
    link.setChild(annotation)
    return link


def file_annotation_ref(original_file_id: int, *, ns: str, description: str | None = None):
    """A FileAnnotationI pointing at an existing OriginalFile (e.g. the file of a new OMERO.table)."""
    require_omero()
    import omero.model
    from omero.rtypes import rstring

    fa = omero.model.FileAnnotationI()
    fa.setFile(omero.model.OriginalFileI(int(original_file_id), False))
    fa.setNs(rstring(ns))
    if description is not None:
        fa.setDescription(rstring(description))
    return fa


# ----------------------------------------------------------------------------- decoding shapes
SHAPE_KINDS = ("point", "ellipse", "polygon", "mask", "rectangle", "polyline", "line", "label")


def shape_kind(shape) -> str:
    """``"ellipse"``, ``"point"``, ... from an omero.model shape (its Ice type id)."""
    return shape.ice_id().split("::")[-1].lower()


def polygon_area_centroid(xy: np.ndarray) -> tuple[float, float, float]:
    """Area and centroid (shoelace) of a closed polygon; falls back to the vertex mean if degenerate."""
    x, y = xy[:, 0], xy[:, 1]
    xs, ys = np.roll(x, -1), np.roll(y, -1)
    cross = x * ys - xs * y
    a = cross.sum() / 2.0
    if abs(a) < 1e-9:
        return 0.0, float(x.mean()), float(y.mean())
    cx = ((x + xs) * cross).sum() / (6 * a)
    cy = ((y + ys) * cross).sum() / (6 * a)
    return float(abs(a)), float(cx), float(cy)


def decode_mask(shape) -> tuple[np.ndarray, int, int]:
    """(boolean crop, x0, y0) of a MaskI (bits as packed by ``np.packbits``, row-major)."""
    w, h = int(round(unwrap(shape.getWidth()))), int(round(unwrap(shape.getHeight())))
    raw = np.frombuffer(bytes(shape.getBytes() or b""), dtype=np.uint8)
    bits = np.unpackbits(raw)[: w * h]
    if bits.size < w * h:
        bits = np.pad(bits, (0, w * h - bits.size))
    return bits.reshape(h, w).astype(bool), int(round(unwrap(shape.getX()))), int(round(unwrap(shape.getY())))


def decode_shape(shape) -> dict:
    """A plain dict describing one shape: kind, centre (x, y), area (px²), geometry, text, colours."""
    kind = shape_kind(shape)
    d = {"shape_id": unwrap(shape.getId()), "kind": kind, "text": unwrap(shape.getTextValue()),
         "fill": int_to_rgba(shape.getFillColor()), "stroke": int_to_rgba(shape.getStrokeColor()),
         "z": unwrap(shape.getTheZ()), "t": unwrap(shape.getTheT()), "c": unwrap(shape.getTheC())}
    if kind in ("point", "label"):
        d.update(x=float(unwrap(shape.getX())), y=float(unwrap(shape.getY())), area=0.0, geometry=None)
    elif kind == "ellipse":
        rx, ry = float(unwrap(shape.getRadiusX())), float(unwrap(shape.getRadiusY()))
        d.update(x=float(unwrap(shape.getX())), y=float(unwrap(shape.getY())), area=math.pi * rx * ry,
                 rx=rx, ry=ry, geometry=None)
    elif kind == "rectangle":
        x0, y0 = float(unwrap(shape.getX())), float(unwrap(shape.getY()))
        w, h = float(unwrap(shape.getWidth())), float(unwrap(shape.getHeight()))
        d.update(x=x0 + w / 2, y=y0 + h / 2, area=w * h,
                 geometry=[[x0, y0], [x0 + w, y0], [x0 + w, y0 + h], [x0, y0 + h]])
    elif kind in ("polygon", "polyline"):
        xy = parse_points(shape.getPoints())
        if len(xy) == 0:
            d.update(x=float("nan"), y=float("nan"), area=0.0, geometry=[])
        else:
            area, cx, cy = polygon_area_centroid(xy) if kind == "polygon" else (0.0, float(xy[:, 0].mean()), float(xy[:, 1].mean()))
            d.update(x=cx, y=cy, area=area, geometry=xy.tolist())
    elif kind == "mask":
        b, x0, y0 = decode_mask(shape)
        yy, xx = np.nonzero(b)
        n = int(b.sum())
        d.update(x=float(x0 + xx.mean() + 0.5) if n else float("nan"),
                 y=float(y0 + yy.mean() + 0.5) if n else float("nan"), area=float(n),
                 geometry={"x": x0, "y": y0, "width": b.shape[1], "height": b.shape[0]})
    elif kind == "line":
        x1, y1 = float(unwrap(shape.getX1())), float(unwrap(shape.getY1()))
        x2, y2 = float(unwrap(shape.getX2())), float(unwrap(shape.getY2()))
        d.update(x=(x1 + x2) / 2, y=(y1 + y2) / 2, area=0.0, geometry=[[x1, y1], [x2, y2]])
    else:  # pragma: no cover - future shape types
        d.update(x=float("nan"), y=float("nan"), area=0.0, geometry=None)
    return d
