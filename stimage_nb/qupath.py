"""QuPath GeoJSON: export predictions as measurement-map-ready objects, import QuPath's objects back.

**Export** (:func:`export_qupath`) writes one GeoJSON FeatureCollection per section in the form that
QuPath 0.3 through 0.8 all import (see ``shared/data/fixtures/qupath/README.md`` and the golden file
``H_dual_compat.geojson``):

- each spot is a *detection* whose geometry is a 16-vertex polygon flagged ``isEllipse`` (QuPath
  makes an ellipse ROI of it); each cell is a *cell* with its polygon and ``nucleusGeometry`` where
  the outlines are known (``obs["geometry"]``/``obs["nucleus_geometry"]``), an ellipse otherwise;
- both ``objectType`` and ``object_type`` are set; measurements are a list of ``{name, value}``;
- the stable observation id (spot id, barcode, cell id) is the object's ``name`` (QuPath replaces a
  non-UUID ``id``); ``id`` is a UUID derived from section and observation id, so re-imports keep it;
- the predicted cell type (argmax of ``obsm["celltype_mean"]``) is the classification, always with a
  ``color`` (QuPath 0.4+ refuses the whole file when one class lacks it); a ``:`` in a cell type
  (QuPath's separator of derived classes) is percent-encoded (:mod:`stimage_nb.names`), and decoded
  again on import;
- per gene three measurements, ``"<gene>: mean"``, ``"<gene>: aleatoric SD"`` and
  ``"<gene>: epistemic SD"`` (square roots of ``layers["aleatoric_var"]``/``["epistemic_var"]``, in
  the same count units as the mean), plus ``"P(<cell type>)"`` and ``"P(<cell type>) SD"``, so
  *Measure → Show measurement maps* colours the slide by any gene, its uncertainty or a cell type;
- coordinates are full-resolution pixels of the scan: when prediction ran on a lower-resolution
  image (``uns["stimage_nb"]["image_scale"]`` < 1) they are divided by that scale;
- values are float32 written in their shortest exact decimal form (QuPath stores float32), NaN as
  the string ``"NaN"``; a ``.geojson.gz`` path is gzip-compressed (QuPath ≥ 0.4 imports it by drag
  and drop); ``genes=`` picks genes and ``max_mb=`` keeps the file under a size by dropping the
  genes that come last.

**Import** (:func:`read_qupath`, :func:`import_qupath`) reads every form QuPath itself accepts
(``objectType``/``object_type``/``type``, dict or list measurements, ``color`` or ``colorRGB``,
``name``/``names`` or a plain-string class, FeatureCollection, bare list or single feature,
``.geojson.gz``) and refuses what QuPath refuses (a class without a colour, a non-numeric
measurement, a feature without geometry, ...) with a :class:`~stimage_nb.errors.StimageInputError`
that names the file, the feature and the fix. Annotations become :class:`Region` objects that label
spots or cells (``obs["region"]``, :func:`assign_regions`) and restrict training and prediction to
what a pathologist outlined (:func:`restrict_to_regions`); detections and cells become observation
points with their classes, outlines and measurements — and, for files this module wrote, the
prediction layers again (same ids, classes and float32 values).
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import logging
import math
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import pandas as pd

from . import _keys as K
from ._colours import class_colours, qupath_int_to_rgb
from .atomic import atomic_path
from .errors import StimageInputError
from .names import looks_encoded, original_name, safe_name

if TYPE_CHECKING:  # pragma: no cover
    import anndata

    from .io.section import Section

log = logging.getLogger(__name__)

ELLIPSE_VERTICES = 16
MEAN, ALE, EPI = "mean", "aleatoric SD", "epistemic SD"
#: Measurement names of the domain-shift score (:mod:`stimage_nb.domain`) and the obs columns they come from.
DOMAIN_MEASUREMENTS = (("Domain shift percentile", K.DOMAIN_PERCENTILE), ("Domain shift distance", K.DOMAIN_DISTANCE))
_NS = uuid.UUID("6b1c4c0e-3d55-4a43-9a3c-5f0a3b2f1d7e")  # namespace of stimage_nb object UUIDs
DEFAULT_EXCLUDE = ("Ignore*", "ignore", "exclude", "excluded", "background", "artefact", "artifact")


# ====================================================================== export
def _uns(adata) -> dict:
    return dict(adata.uns.get(K.UNS, {}) or {})


def _f32_strings(a: np.ndarray) -> np.ndarray:
    """Shortest exact decimal text of float32 values; non-finite values as the JSON string "NaN"."""
    a = np.asarray(a, dtype=np.float32)
    out = np.array(list(map(str, a.ravel())), dtype=object).reshape(a.shape)
    bad = ~np.isfinite(a)
    if bad.any():
        out[bad] = '"NaN"'
    return out


def _ellipse_ring(cx: float, cy: float, r: float, n: int = ELLIPSE_VERTICES) -> list[list[float]]:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    pts = [[round(float(cx + r * math.cos(a)), 2), round(float(cy + r * math.sin(a)), 2)] for a in t]
    return pts + [pts[0]]


def _dense(m) -> np.ndarray:
    return np.asarray(m.toarray() if hasattr(m, "toarray") else m)


def _coord_scale(uns: dict, image_scale: float | None) -> float:
    s = float(image_scale if image_scale is not None else (uns.get("image_scale") or 1.0))
    if not (s > 0 and math.isfinite(s)):
        raise StimageInputError(f"image_scale must be a positive number (image px = full-res px * scale), got {s}.")
    return s


def _object_types(pred, object_type: str) -> np.ndarray:
    n = pred.n_obs
    if object_type not in ("auto", "detection", "cell"):
        raise StimageInputError(f"object_type must be 'auto', 'detection' or 'cell', not {object_type!r}.")
    if object_type != "auto":
        return np.full(n, object_type, dtype=object)
    if K.OBJECT_TYPE in pred.obs:
        t = pred.obs[K.OBJECT_TYPE].astype(str).str.lower().to_numpy(dtype=object)
        return np.where(t == "cell", "cell", "detection").astype(object)
    uns = _uns(pred)
    if K.NUCLEUS_GEOMETRY in pred.obs or str(uns.get("observation", "")).lower().startswith("cell"):
        return np.full(n, "cell", dtype=object)
    return np.full(n, "detection", dtype=object)


def _classification(pred) -> tuple[list[str], np.ndarray]:
    """Class name per observation ("" = unclassified): argmax of celltype_mean, else obs columns."""
    ct = pred.obsm.get(K.CELLTYPE_MEAN)
    if ct is not None and np.asarray(ct).shape[1] > 0:
        df = ct if isinstance(ct, pd.DataFrame) else pd.DataFrame(np.asarray(ct))
        P = df.to_numpy(dtype=np.float64)
        names = [str(c) for c in df.columns]
        ok = np.isfinite(P).any(1)
        idx = np.where(np.isfinite(P), P, -np.inf).argmax(1)
        return names, np.array([names[i] if o else "" for i, o in zip(idx, ok)], dtype=object)
    for key in (K.CELLTYPE_PRED, K.CLASSIFICATION, K.CELLTYPE_LABEL):
        if key in pred.obs:
            lab = pred.obs[key].astype(str).replace({"nan": "", "None": ""}).to_numpy(dtype=object)
            return sorted({v for v in lab if v}), lab
    return [], np.full(pred.n_obs, "", dtype=object)


def _parse_geom_text(v) -> dict | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    s = str(v)
    if not s or s in ("nan", "None"):
        return None
    try:
        g = json.loads(s)
    except ValueError:
        return None
    return g if isinstance(g, dict) and "type" in g else None


@dataclass
class _Col:
    """One exported measurement: its name, its gene ("" if none) and where its values come from."""

    name: str
    gene: str
    source: str  # "X", "ale", "epi", "obsm:<key>"
    key: object  # column index (X/layers) or column label (obsm DataFrame)


def _columns(pred, genes: Sequence[str], celltypes: bool) -> list[_Col]:
    """Measurements in export order: per gene mean and both SDs, then cell types, then imported ones."""
    cols: list[_Col] = []
    has_ale, has_epi = K.ALEATORIC in pred.layers, K.EPISTEMIC in pred.layers
    for g in genes:
        j = pred.var_names.get_loc(g)
        cols.append(_Col(f"{g}: {MEAN}", g, "X", j))
        if has_ale:
            cols.append(_Col(f"{g}: {ALE}", g, "ale", j))
        if has_epi:
            cols.append(_Col(f"{g}: {EPI}", g, "epi", j))
    if celltypes:
        for key, suffix in ((K.CELLTYPE_MEAN, ""), (K.CELLTYPE_STD, " SD")):
            ct = pred.obsm.get(key)
            if ct is None or not isinstance(ct, pd.DataFrame):
                continue
            cols += [_Col(f"P({c}){suffix}", "", f"obsm:{key}", c) for c in ct.columns]
    cols += [_Col(name, "", "obs", col) for name, col in DOMAIN_MEASUREMENTS if col in pred.obs]
    if K.MEASUREMENTS in pred.obsm and isinstance(pred.obsm[K.MEASUREMENTS], pd.DataFrame):
        cols += [_Col(str(c), "", f"obsm:{K.MEASUREMENTS}", c) for c in pred.obsm[K.MEASUREMENTS].columns]
    return cols


def _block(pred, cols: list[_Col], rows: np.ndarray) -> np.ndarray:
    """float32 values of ``cols`` for observations ``rows`` (SDs are square roots of the variances)."""
    out = np.empty((len(rows), len(cols)), dtype=np.float32)
    by_src: dict[str, list[int]] = {}
    for k, c in enumerate(cols):
        by_src.setdefault(c.source, []).append(k)
    for src, ks in by_src.items():
        if src in ("X", "ale", "epi"):
            m = pred.X if src == "X" else pred.layers[K.ALEATORIC if src == "ale" else K.EPISTEMIC]
            v = _dense(m[rows][:, [cols[k].key for k in ks]]).astype(np.float32)
            if src != "X":
                v = np.sqrt(np.clip(v, 0, None))
        elif src == "obs":
            v = pred.obs.iloc[rows][[cols[k].key for k in ks]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float32)
        else:
            df = pred.obsm[src[len("obsm:"):]]
            v = df.iloc[rows][[cols[k].key for k in ks]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float32)
        out[:, ks] = v
    return out


def _iter_features(pred, cols: list[_Col], *, object_type: str = "auto", image_scale: float | None = None,
                   rows: np.ndarray | None = None, chunk: int = 2048):
    """The features of :func:`export_qupath` as compact JSON texts, generated in row chunks."""
    uns = _uns(pred)
    section = str(uns.get("section", ""))
    scale = _coord_scale(uns, image_scale)
    xy_full = np.asarray(pred.obsm[K.SPATIAL], dtype=np.float64)[:, :2] / scale
    has_geom = (pred.obs[K.GEOMETRY].astype(str).str.len() > 2).to_numpy() if K.GEOMETRY in pred.obs \
        else np.zeros(pred.n_obs, bool)
    r_full = np.full(pred.n_obs, np.nan)
    if not has_geom.all():
        um = uns.get("um_per_px")
        if um is None or not (float(um) > 0):
            raise StimageInputError(f"section {section!r}: the prediction records no um_per_px in uns['{K.UNS}']; "
                                    "spot and cell outlines need it.")
        um_full = float(um) * scale  # µm per full-resolution pixel
        diam = pred.obs[K.DIAMETER_UM].to_numpy(dtype=np.float64) if K.DIAMETER_UM in pred.obs \
            else np.full(pred.n_obs, np.nan)
        if not np.isfinite(diam[~has_geom]).all():
            raise StimageInputError(f"section {section!r}: obs['{K.DIAMETER_UM}'] is missing or NaN for some "
                                    "observations without an outline.")
        r_full = diam / 2.0 / um_full
    names, cls = _classification(pred)
    colours = class_colours(names or sorted({c for c in cls if c}), uns.get(K.CLASS_COLOURS))
    # QuPath splits a class name on ':' into derived classes and strips blanks (stimage_nb.names)
    qclass = {c: safe_name(c, "qupath_class") for c in {*(names or []), *(c for c in cls if c)}}
    types = _object_types(pred, object_type)
    name_frag = [json.dumps(c.name) for c in cols]
    ids = [str(o) for o in pred.obs_names]
    geoms = pred.obs[K.GEOMETRY].to_numpy(dtype=object) if K.GEOMETRY in pred.obs else None
    nucs = pred.obs[K.NUCLEUS_GEOMETRY].to_numpy(dtype=object) if K.NUCLEUS_GEOMETRY in pred.obs else None
    rows = np.arange(pred.n_obs) if rows is None else np.asarray(rows)
    for c0 in range(0, len(rows), chunk):
        rr = rows[c0:c0 + chunk]
        vals = _f32_strings(_block(pred, cols, rr)) if cols else np.zeros((len(rr), 0), object)
        for i, v in zip(rr, vals):
            oid = ids[i]
            geom = _parse_geom_text(geoms[i]) if geoms is not None else None
            nuc = _parse_geom_text(nucs[i]) if nucs is not None else None
            if geom is None:
                geom = {"type": "Polygon", "coordinates": [_ellipse_ring(xy_full[i, 0], xy_full[i, 1], r_full[i])],
                        "isEllipse": True}
            props: dict = {"objectType": types[i], "object_type": types[i], "name": oid}
            if cls[i]:
                props["classification"] = {"name": qclass[cls[i]], "color": list(colours[cls[i]])}
            head = {"type": "Feature", "id": str(uuid.uuid5(_NS, f"{section}/{oid}")), "geometry": geom}
            if nuc is not None and types[i] == "cell":
                head["nucleusGeometry"] = nuc
            meas = ",".join(f'{{"name":{n},"value":{x}}}' for n, x in zip(name_frag, v))
            p = json.dumps(props, separators=(",", ":"))[:-1] + f',"measurements":[{meas}]}}'
            yield json.dumps(head, separators=(",", ":"))[:-1] + f',"properties":{p}}}'


def _write_stream(feats, path: Path) -> int:
    """Write a FeatureCollection from an iterator of feature texts (gzip for ``*.gz``), atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        fh = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6) if path.name.endswith(".gz") else raw
        fh.write(b'{"type":"FeatureCollection","features":[')
        for k, f in enumerate(feats):
            fh.write((",\n" if k else "\n").encode() + f.encode("utf-8"))
        fh.write(b"\n]}\n")
        if fh is not raw:
            fh.close()
    return path.stat().st_size


def _genes_that_fit(pred, genes: list[str], celltypes: bool, limit: float, gz: bool, **kw) -> int:
    """How many of ``genes`` (from the front) fit in ``limit`` bytes, estimated on a sample of objects."""
    n = pred.n_obs
    sample = np.unique(np.linspace(0, n - 1, min(n, 400)).astype(int))
    full = "\n".join(_iter_features(pred, _columns(pred, genes, celltypes), rows=sample, **kw)).encode()
    base = "\n".join(_iter_features(pred, _columns(pred, [], celltypes), rows=sample, **kw)).encode()
    ratio = len(gzip.compress(full, 6)) / max(len(full), 1) if gz else 1.0
    f = n / len(sample) * ratio
    per_gene = (len(full) - len(base)) / max(len(genes), 1)
    budget = 0.97 * limit / f - len(base)
    return int(max(0, min(len(genes), budget // max(per_gene, 1))))


def export_qupath(pred: "anndata.AnnData", path: str | os.PathLike, *, genes: Sequence[str] | None = None,
                  max_mb: float | None = None, object_type: str = "auto", image_scale: float | None = None,
                  celltypes: bool = True) -> Path:
    """Write a prediction AnnData as QuPath GeoJSON (see the module docstring for the form).

    Features are generated and written in chunks of observations, so memory stays bounded for
    hundreds of thousands of cells.

    Parameters
    ----------
    pred
        Prediction AnnData (``PRED_DIR/<section>.h5ad``) or an imported QuPath section.
    path
        ``.geojson`` or ``.geojson.gz`` (gzip); written atomically.
    genes
        Genes to export, in this order (default: all predicted genes).
    max_mb
        Keep the file under this many megabytes (10^6 bytes) by dropping genes from the end of
        ``genes`` (a warning says how many were kept); raises when even no gene fits.
    object_type
        ``"auto"`` (``obs["object_type"]`` when present, cells when nuclei are known or
        ``uns`` says ``observation="cell"``, else detections), ``"detection"`` or ``"cell"``.
    image_scale
        Override ``uns["stimage_nb"]["image_scale"]`` (image px = full-resolution px * scale).
    celltypes
        Also export cell-type probabilities and their SDs.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    if not (path.name.endswith(".geojson") or path.name.endswith(".geojson.gz") or path.name.endswith(".json")):
        raise StimageInputError(f"{path}: a QuPath export must end in .geojson or .geojson.gz.")
    genes = list(pred.var_names) if genes is None else [str(g) for g in genes]
    missing = [g for g in genes if g not in pred.var_names]
    if missing:
        raise StimageInputError(f"{path}: genes {missing[:10]} are not in the prediction "
                                f"({pred.n_vars} genes, e.g. {list(pred.var_names[:5])}). Fix --genes.")
    kw = dict(object_type=object_type, image_scale=image_scale)
    limit = None if max_mb is None else float(max_mb) * 1e6
    k = len(genes)
    if limit is not None and pred.n_obs:
        k = _genes_that_fit(pred, genes, celltypes, limit, path.name.endswith(".gz"), **kw)
    for _ in range(5):
        size = _write_stream(_iter_features(pred, _columns(pred, genes[:k], celltypes), **kw), path)
        if limit is None or size <= limit:
            break
        if k == 0:
            path.unlink(missing_ok=True)
            raise StimageInputError(
                f"{path}: {pred.n_obs} objects take {size / 1e6:.1f} MB even without genes, over max_mb={max_mb}. "
                "Raise --max-mb, write .geojson.gz (--gzip), or export fewer objects.")
        k = int(k * min(0.97 * limit / size, 0.95))
    else:
        path.unlink(missing_ok=True)
        raise StimageInputError(f"{path}: could not fit the export under max_mb={max_mb}; raise it or use --gzip.")
    if k < len(genes):
        log.warning("%s: kept %d of %d genes (%s ...) to stay under %s MB; pass genes= to choose which",
                    path, k, len(genes), genes[:3], max_mb)
    log.info("wrote %s (%d objects, %d genes, %.2f MB)", path, pred.n_obs, k, size / 1e6)
    return path


# ====================================================================== import
@dataclass
class Region:
    """A QuPath annotation: a named, classified area (tumour, stroma, exclude, ...).

    Coordinates are full-resolution pixels of the image the annotation was drawn on.
    """

    name: str
    classification: str
    colour: tuple[int, int, int] | None
    geometry: dict
    object_type: str = "annotation"
    id: str = ""

    @property
    def label(self) -> str:
        """The region's label: its class, else its name."""
        return self.classification or self.name

    def rings(self) -> list[list[np.ndarray]]:
        """Polygons as lists of rings (outer first), (k, 2) arrays."""
        return _polygons(self.geometry)

    @property
    def area(self) -> float:
        return float(sum(_ring_area(p[0]) - sum(_ring_area(h) for h in p[1:]) for p in self.rings()))

    def contains(self, xy: np.ndarray) -> np.ndarray:
        """Which (n, 2) points (full-resolution px) lie inside (even-odd over all rings)."""
        from matplotlib.path import Path as MPath

        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        inside = np.zeros(len(xy), dtype=bool)
        for poly in self.rings():
            n_in = np.zeros(len(xy), dtype=int)
            for ring in poly:
                if len(ring) >= 3:
                    n_in += MPath(ring).contains_points(xy)
            inside |= (n_in % 2) == 1
        return inside

    def to_dict(self) -> dict:
        return {"name": self.name, "classification": self.classification,
                "colour": None if self.colour is None else list(self.colour), "object_type": self.object_type,
                "id": self.id, "geometry": json.dumps(self.geometry, separators=(",", ":"))}

    @classmethod
    def from_dict(cls, d: dict) -> "Region":
        g = d["geometry"]
        return cls(d.get("name", ""), d.get("classification", ""), None if d.get("colour") is None else tuple(d["colour"]),
                   json.loads(g) if isinstance(g, str) else g, d.get("object_type", "annotation"), d.get("id", ""))


def _polygons(geom: dict) -> list[list[np.ndarray]]:
    t = geom.get("type")
    c = geom.get("coordinates")
    if t == "Polygon":
        return [[np.asarray(r, dtype=np.float64)[:, :2] for r in c if len(r)]]
    if t == "MultiPolygon":
        return [[np.asarray(r, dtype=np.float64)[:, :2] for r in p if len(r)] for p in c if p]
    if t == "GeometryCollection":
        return [p for g in geom.get("geometries", []) for p in _polygons(g)]
    return []


def _ring_area(r: np.ndarray) -> float:
    x, y = r[:, 0], r[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _all_points(geom: dict) -> np.ndarray:
    """Every vertex of a geometry as an (n, 2) float array (raises on non-numeric coordinates)."""
    t = geom.get("type")
    if t == "GeometryCollection":
        pts = [_all_points(g) for g in geom.get("geometries", [])]
        pts = [p for p in pts if len(p)]
        return np.concatenate(pts) if pts else np.zeros((0, 2))
    c = geom.get("coordinates", [])
    depth = {"Point": 0, "MultiPoint": 1, "LineString": 1, "MultiLineString": 2, "Polygon": 2, "MultiPolygon": 3}.get(t, 0)
    flat = [c]
    for _ in range(depth):
        flat = [q for p in flat for q in p]
    if not flat or (depth == 0 and not c):
        return np.zeros((0, 2))
    return np.asarray([[float(p[0]), float(p[1])] for p in flat], dtype=np.float64).reshape(-1, 2)


def _centroid_area(geom: dict) -> tuple[np.ndarray, float]:
    """Area-weighted centroid and area (px²) of a geometry; vertex mean for points/lines."""
    polys = _polygons(geom)
    tot, cx, cy = 0.0, 0.0, 0.0
    for p in polys:
        for k, ring in enumerate(p):
            x, y = ring[:, 0], ring[:, 1]
            x1, y1 = np.roll(x, -1), np.roll(y, -1)
            cross = x * y1 - x1 * y
            a = 0.5 * cross.sum()
            if a == 0:
                continue
            sign = 1.0 if k == 0 else -1.0  # holes subtract
            a_abs = abs(a) * sign
            cx += sign * abs(a) * ((x + x1) * cross).sum() / (6 * a)
            cy += sign * abs(a) * ((y + y1) * cross).sum() / (6 * a)
            tot += a_abs
    if tot > 0:
        return np.array([cx / tot, cy / tot]), tot
    pts = _all_points(geom)
    if len(pts) == 0:
        return np.array([np.nan, np.nan]), 0.0
    return pts.mean(0), 0.0


_GEOM_TYPES = {"Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon", "GeometryCollection"}
_TYPE_ALIASES = {"annotation": "annotation", "detection": "detection", "cell": "cell", "tile": "detection",
                 "tma_core": "annotation", "tmacore": "annotation", "root": "root"}


def _load_json(path: Path):
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise StimageInputError(f"{path}: cannot read the file ({e}).") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise StimageInputError(f"{path}: corrupt gzip data ({e}). Re-export from QuPath.") from e
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as e:
        raise StimageInputError(f"{path}: not valid GeoJSON/JSON ({e}). Export it from QuPath with "
                                "File → Export objects as GeoJSON.") from e


def _features(obj, path: Path) -> list:
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        t = obj.get("type")
        if t == "FeatureCollection":
            f = obj.get("features")
            if not isinstance(f, list):
                raise StimageInputError(f"{path}: the FeatureCollection has no 'features' list.")
            return f
        if t == "Feature":
            return [obj]
    raise StimageInputError(f"{path}: expected a GeoJSON FeatureCollection, a Feature or a list of Features, "
                            f"got {type(obj).__name__}{' of type ' + repr(obj.get('type')) if isinstance(obj, dict) else ''}.")


def _class_name_back(cname: str) -> str:
    """A class name this module exported with :func:`stimage_nb.names.safe_name` back to the original
    (``T cells%3A CD8`` -> ``T cells: CD8``); QuPath's own derived classes (``Tumor: Positive``) stay as they are."""
    if cname and looks_encoded(cname) and safe_name(original_name(cname), "qupath_class") == cname:
        return original_name(cname)
    return cname


def _parse_colour(cl: dict, path: Path, i: int, cname: str) -> tuple[int, int, int]:
    if "color" in cl and cl["color"] is not None:
        c = cl["color"]
        if isinstance(c, (list, tuple)) and len(c) >= 3 and all(isinstance(v, (int, float)) for v in c[:3]):
            return tuple(int(v) for v in c[:3])  # type: ignore[return-value]
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            return qupath_int_to_rgb(int(c))
        raise StimageInputError(f"{path}: feature {i}: classification {cname!r} has an unreadable color {c!r}; "
                                "use \"color\": [r, g, b] with 0–255 integers.")
    if "colorRGB" in cl and isinstance(cl["colorRGB"], (int, float)) and not isinstance(cl["colorRGB"], bool):
        return qupath_int_to_rgb(int(cl["colorRGB"]))
    raise StimageInputError(
        f"{path}: feature {i}: classification {cname!r} has no colour. QuPath 0.4–0.8 refuses the whole file "
        "(JsonParseException), so it is refused here too. Add \"color\": [r, g, b] to every classification "
        "(or re-export the objects from QuPath, which always writes it).")


def _parse_measurements(m, path: Path, i: int) -> dict[str, float]:
    out: dict[str, float] = {}
    if m is None:
        return out
    if isinstance(m, dict):
        items = m.items()
    elif isinstance(m, list):
        try:
            items = [(e["name"], e.get("value")) for e in m]
        except (TypeError, KeyError, AttributeError):
            bad = next(e for e in m if not isinstance(e, dict) or "name" not in e)
            raise StimageInputError(f"{path}: feature {i}: a measurement list entry is not "
                                    f"{{\"name\", \"value\"}}: {bad!r}.") from None
    else:
        raise StimageInputError(f"{path}: feature {i}: 'measurements' must be an object or a list, not {type(m).__name__}.")
    for k, v in items:
        t = type(v)
        if t is float or t is int:
            out[k if type(k) is str else str(k)] = float(v)
        elif v is None or t is bool:
            continue  # QuPath silently drops null and boolean measurements
        else:
            try:
                if t is not str:
                    raise ValueError
                out[str(k)] = float(v)  # "NaN", "Infinity", "1.5" parse as QuPath parses them
            except ValueError:
                raise StimageInputError(f"{path}: feature {i}: measurement {k!r} has the non-numeric value {v!r}; "
                                        "QuPath cannot import it. Measurements must be numbers (or \"NaN\").") from None
    return out


@dataclass
class QuPathObjects:
    """Everything read from one QuPath GeoJSON file.

    Attributes
    ----------
    path
        The file.
    regions
        Annotations (and TMA cores) as :class:`Region`.
    points
        One row per detection or cell: ``id``, ``object_type``, ``classification``, ``x``, ``y``
        (centroid, full-resolution px), ``area_px``, ``geometry``/``nucleus_geometry`` (JSON text).
    measurements
        DataFrame of their measurements (float32), same index as ``points``.
    class_colours
        ``{class: (r, g, b)}`` over all objects.
    """

    path: Path
    regions: list[Region]
    points: pd.DataFrame
    measurements: pd.DataFrame
    class_colours: dict[str, tuple[int, int, int]] = field(default_factory=dict)


def read_qupath(path: str | os.PathLike) -> QuPathObjects:
    """Parse a QuPath GeoJSON (``.geojson``, ``.json`` or ``.geojson.gz``) as QuPath 0.5–0.8 would.

    Raises
    ------
    StimageInputError
        For every form QuPath refuses (the message names the file, the feature and the fix).
    """
    path = Path(path)
    if not path.is_file():
        raise StimageInputError(f"{path}: GeoJSON file not found.")
    feats = _features(_load_json(path), path)
    regions: list[Region] = []
    rows: list[dict] = []
    meas: list[dict] = []
    colours: dict[str, tuple[int, int, int]] = {}
    for i, f in enumerate(feats):
        if not isinstance(f, dict) or f.get("type") != "Feature":
            raise StimageInputError(f"{path}: item {i} is not a GeoJSON Feature ({str(f)[:80]!r}).")
        geom = f.get("geometry")
        if not isinstance(geom, dict) or geom.get("type") not in _GEOM_TYPES:
            raise StimageInputError(f"{path}: feature {i} has no usable geometry "
                                    f"({None if not isinstance(geom, dict) else geom.get('type')!r}); QuPath needs a "
                                    f"GeoJSON geometry of type {sorted(_GEOM_TYPES)}.")
        if geom["type"] != "GeometryCollection" and not isinstance(geom.get("coordinates"), list):
            raise StimageInputError(f"{path}: feature {i}: geometry has no coordinates list.")
        props = f.get("properties") or {}
        if not isinstance(props, dict):
            raise StimageInputError(f"{path}: feature {i}: 'properties' must be an object.")
        raw_type = props.get("objectType", props.get("object_type", props.get("type", "annotation")))
        otype = _TYPE_ALIASES.get(str(raw_type).lower().replace(" ", "_"))
        if otype is None:
            raise StimageInputError(f"{path}: feature {i}: unknown object type {raw_type!r}; use annotation, "
                                    "detection, cell, tile or tma_core.")
        if otype == "root":
            continue
        cname, colour = "", None
        cl = props.get("classification")
        if isinstance(cl, str):
            cname = cl
        elif isinstance(cl, dict):
            if "names" in cl and isinstance(cl["names"], list):
                cname = ": ".join(str(n) for n in cl["names"])
            elif "name" in cl:
                cname = str(cl["name"])
            else:
                raise StimageInputError(f"{path}: feature {i}: classification has neither 'name' nor 'names'.")
            colour = _parse_colour(cl, path, i, cname)
        elif cl is not None:
            raise StimageInputError(f"{path}: feature {i}: classification must be an object or a string, not {cl!r}.")
        cname = _class_name_back(cname)
        if cname and colour is not None:
            colours.setdefault(cname, colour)
        m = _parse_measurements(props.get("measurements"), path, i)
        name = props.get("name")
        fid = f.get("id") if isinstance(f.get("id"), (str, int)) else ""
        try:
            _all_points(geom)
        except (TypeError, ValueError, IndexError) as e:
            raise StimageInputError(f"{path}: feature {i}: geometry coordinates are not numbers ({e}).") from e
        if otype == "annotation":
            regions.append(Region(str(name) if name is not None else "", cname, colour, geom, str(raw_type), str(fid)))
            continue
        c, area = _centroid_area(geom)
        nuc = f.get("nucleusGeometry") or props.get("nucleusGeometry")
        rows.append({"name": None if name is None else str(name), "uuid": str(fid) if fid != "" else None,
                     K.OBJECT_TYPE: otype, K.CLASSIFICATION: cname, "x": float(c[0]), "y": float(c[1]),
                     "area_px": float(area), "is_ellipse": bool(geom.get("isEllipse", False)),
                     K.GEOMETRY: json.dumps(geom, separators=(",", ":")),
                     K.NUCLEUS_GEOMETRY: json.dumps(nuc, separators=(",", ":")) if isinstance(nuc, dict) else ""})
        meas.append(m)
    points = pd.DataFrame(rows, columns=["name", "uuid", K.OBJECT_TYPE, K.CLASSIFICATION, "x", "y", "area_px",
                                         "is_ellipse", K.GEOMETRY, K.NUCLEUS_GEOMETRY])
    ids = _unique_ids(points, path)
    points.index = pd.Index(ids, name="id")
    mdf = pd.DataFrame(meas, index=points.index).astype(np.float32) if meas else pd.DataFrame(index=points.index)
    return QuPathObjects(path, regions, points, mdf, colours)


def _unique_ids(points: pd.DataFrame, path: Path) -> list[str]:
    ids = []
    for k, (n, u, t) in enumerate(zip(points["name"], points["uuid"], points[K.OBJECT_TYPE])):
        ids.append(n if n not in (None, "") else (u if u not in (None, "") else f"{t}_{k}"))
    s = pd.Series(ids)
    if s.duplicated().any():
        dup = s[s.duplicated()].unique()[:3].tolist()
        log.warning("%s: %d object names are repeated (e.g. %s); suffixes -1, -2, ... make them unique",
                    path, int(s.duplicated().sum()), dup)
        from .names import make_unique

        ids = make_unique(ids)
    return [str(i) for i in ids]


_GENE_RE = re.compile(r"^(?P<g>.+): (?P<q>mean|aleatoric SD|epistemic SD)$")
_P_RE = re.compile(r"^P\((?P<c>.*)\)(?P<sd> SD)?$")


def _split_measurements(m: pd.DataFrame):
    """(means, aleatoric SDs, epistemic SDs, celltype mean, celltype SD, other) from measurement names."""
    genes: list[str] = []
    q: dict[tuple[str, str], str] = {}
    cts: list[str] = []
    pcols: dict[tuple[str, bool], str] = {}
    other = []
    for c in m.columns:
        mg = _GENE_RE.match(c)
        mp = _P_RE.match(c)
        if mg:
            g = mg["g"]
            if g not in genes:
                genes.append(g)
            q[(g, mg["q"])] = c
        elif mp:
            ct = mp["c"]
            if ct not in cts:
                cts.append(ct)
            pcols[(ct, bool(mp["sd"]))] = c
        else:
            other.append(c)
    genes = [g for g in genes if (g, MEAN) in q]
    for (g, _), c in list(q.items()):  # SD columns without a mean stay plain measurements
        if g not in genes:
            other.append(c)
    return genes, q, cts, pcols, other


def qupath_adata(objs: QuPathObjects, *, um_per_px: float | None = None, image_scale: float = 1.0,
                 section: str | None = None):
    """Detections and cells of :func:`read_qupath` as a section/prediction AnnData.

    Centres are ``image_scale`` × full-resolution px (the frame of the image the points belong to).
    Measurements this module exported (``"<gene>: mean"``, SDs, ``"P(<type>)"``) become ``X``,
    ``layers["aleatoric_var"]``/``["epistemic_var"]`` (SD²), ``obsm["celltype_mean"/"celltype_std"]`` and
    ``obs["domain_percentile"/"domain_distance"]``; all others go to ``obsm["qupath_measurements"]``.
    """
    import anndata as ad
    import scipy.sparse as sp

    p = objs.points
    name = section or objs.path.name.split(".")[0]
    m = objs.measurements
    genes, q, cts, pcols, other = _split_measurements(m)
    xy = p[["x", "y"]].to_numpy(dtype=np.float64) * image_scale
    diam_px = 2.0 * np.sqrt(p["area_px"].to_numpy(dtype=np.float64) / np.pi)
    diam = diam_px * float(um_per_px) / image_scale if um_per_px else np.full(len(p), np.nan)
    obs = pd.DataFrame({K.PIXEL_X: xy[:, 0], K.PIXEL_Y: xy[:, 1], K.DIAMETER_UM: diam,
                        K.OBJECT_TYPE: p[K.OBJECT_TYPE].to_numpy(), K.CLASSIFICATION: p[K.CLASSIFICATION].to_numpy()},
                       index=p.index.astype(str))
    if (p[K.GEOMETRY] != "").any():
        obs[K.GEOMETRY] = p[K.GEOMETRY].to_numpy()
    if (p[K.NUCLEUS_GEOMETRY] != "").any():
        obs[K.NUCLEUS_GEOMETRY] = p[K.NUCLEUS_GEOMETRY].to_numpy()
    if genes:
        X = np.stack([m[q[(g, MEAN)]].to_numpy(np.float32) for g in genes], axis=1)
    else:
        X = sp.csr_matrix((len(p), 0), dtype=np.float32)
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=str)))
    for qq, key in ((ALE, K.ALEATORIC), (EPI, K.EPISTEMIC)):
        if genes and all((g, qq) in q for g in genes):
            sd = np.stack([m[q[(g, qq)]].to_numpy(np.float32) for g in genes], axis=1)
            a.layers[key] = (sd.astype(np.float64) ** 2).astype(np.float32)
    if cts and all((c, False) in pcols for c in cts):
        a.obsm[K.CELLTYPE_MEAN] = pd.DataFrame({c: m[pcols[(c, False)]].to_numpy(np.float32) for c in cts}, index=a.obs_names)
        if all((c, True) in pcols for c in cts):
            a.obsm[K.CELLTYPE_STD] = pd.DataFrame({c: m[pcols[(c, True)]].to_numpy(np.float32) for c in cts}, index=a.obs_names)
    else:
        other = other + [pcols[k] for k in pcols]
    for mname, col in DOMAIN_MEASUREMENTS:  # the domain-shift score goes back where predict put it
        if mname in other:
            a.obs[col] = m[mname].to_numpy(np.float32)
            other = [c for c in other if c != mname]
    if other:
        a.obsm[K.MEASUREMENTS] = m[other].set_axis(a.obs_names).astype(np.float32)
    a.obsm[K.SPATIAL] = xy
    kinds = set(p[K.OBJECT_TYPE])
    a.uns[K.UNS] = {"section": name, "source": str(objs.path), "image_scale": float(image_scale),
                    "observation": "cell" if kinds == {"cell"} else "detection" if kinds == {"detection"} else "mixed",
                    K.CLASS_COLOURS: {k: list(v) for k, v in objs.class_colours.items()},
                    K.REGIONS: regions_json(objs.regions)}
    if um_per_px:
        a.uns[K.UNS]["um_per_px"] = float(um_per_px) / image_scale
    return a


def import_qupath(path: str | os.PathLike, *, image: str | os.PathLike | None = None, um_per_px: float | None = None,
                  name: str | None = None, image_scale: float = 1.0) -> "Section":
    """A QuPath GeoJSON as a :class:`~stimage_nb.io.section.Section`.

    Detections and cells become the observation points (id = QuPath ``name``, else its UUID); their
    classes are ``obs["classification"]`` and outlines ``obs["geometry"]``/``obs["nucleus_geometry"]``;
    annotations are kept in ``uns["stimage_nb"]["regions"]`` and label the points in ``obs["region"]``.

    Parameters
    ----------
    path
        The GeoJSON (``.geojson``/``.json``/``.geojson.gz``).
    image
        The image the objects were drawn on (optional; needed later for tiles).
    um_per_px
        Full-resolution pixel size, for diameters in µm (default: read from ``image`` when given).
    name
        Section name (default: the file name without extensions).
    image_scale
        Points are stored in image px = full-resolution px * ``image_scale``.
    """
    from .io.section import Section

    objs = read_qupath(path)
    if um_per_px is None and image is not None:
        from .io.image import open_image

        um_per_px = open_image(image).um_per_px / image_scale
    a = qupath_adata(objs, um_per_px=um_per_px, image_scale=image_scale, section=name)
    if objs.regions and a.n_obs:
        assign_regions(a, objs.regions)
    sec = Section(a.uns[K.UNS]["section"], a, Path(image) if image is not None else None,
                  None if um_per_px is None else float(um_per_px) / image_scale)
    return sec


def read_regions(path: str | os.PathLike) -> list[Region]:
    """Only the annotations of a QuPath GeoJSON, as :class:`Region` objects."""
    return read_qupath(path).regions


def regions_json(regions: Iterable[Region]) -> str:
    """Regions as JSON text (how they are kept in ``uns["stimage_nb"]["regions"]``, h5ad-safe)."""
    return json.dumps([r.to_dict() for r in regions], separators=(",", ":"))


def as_regions(regions) -> list[Region]:
    """Regions from a list of :class:`Region`/dicts, their JSON text, or a GeoJSON path."""
    if regions is None:
        return []
    if isinstance(regions, str) and regions.lstrip().startswith("["):
        return [Region.from_dict(d) for d in json.loads(regions)]
    if isinstance(regions, (str, os.PathLike)):
        return read_regions(regions)
    out = []
    for r in regions:
        out.append(r if isinstance(r, Region) else Region.from_dict(r))
    return out


def assign_regions(adata, regions: "Iterable[Region] | str | os.PathLike | None" = None, *, key: str = K.REGION,
                   image_scale: float | None = None) -> pd.Series:
    """Label each observation with the annotation that holds it (``obs[key]``; "" outside all).

    Where annotations nest or overlap, the smallest one wins (an "Exclude" drawn inside "Tumor"
    labels its points "Exclude"). ``regions`` defaults to ``uns["stimage_nb"]["regions"]``;
    points are converted to full-resolution pixels with ``image_scale`` (default from ``uns``).
    """
    uns = _uns(adata)
    regs = as_regions(regions if regions is not None else uns.get(K.REGIONS))
    scale = float(image_scale if image_scale is not None else (uns.get("image_scale") or 1.0))
    xy = np.asarray(adata.obsm[K.SPATIAL], dtype=np.float64)[:, :2] / scale
    lab = np.full(len(xy), "", dtype=object)
    best = np.full(len(xy), np.inf)
    for r in regs:
        if not r.rings():
            continue
        inside = r.contains(xy)
        a = r.area
        win = inside & (a < best)
        lab[win] = r.label
        best[win] = a
    adata.obs[key] = pd.Categorical(lab)
    adata.uns.setdefault(K.UNS, {})
    if regions is not None:
        adata.uns[K.UNS][K.REGIONS] = regions_json(regs)
    return adata.obs[key]


def _matches(label: str, patterns: Sequence[str]) -> bool:
    lo = label.lower()
    return any(fnmatch.fnmatchcase(lo, p.lower()) for p in patterns)


def restrict_to_regions(section_or_adata, regions: "Iterable[Region] | str | os.PathLike | None" = None, *,
                        include: Sequence[str] | None = None, exclude: Sequence[str] = DEFAULT_EXCLUDE,
                        image_scale: float | None = None):
    """Keep only observations inside the tissue a pathologist outlined (for training or prediction).

    Parameters
    ----------
    section_or_adata
        A :class:`~stimage_nb.io.section.Section` or an AnnData with ``obsm["spatial"]``.
    regions
        Annotations (list of :class:`Region`, a GeoJSON path, or ``None`` for the ones stored in
        ``uns["stimage_nb"]["regions"]``).
    include
        Region labels (class or name; shell patterns, case-insensitive) to keep; default: every
        annotation not matched by ``exclude``.
    exclude
        Labels whose points are dropped (default: QuPath's ``Ignore*`` and names like "exclude",
        "background", "artefact").
    image_scale
        Observation px = full-resolution px * ``image_scale`` (default from ``uns``).

    Returns
    -------
    The same kind of object, subset (``obs["region"]`` set); unchanged when there are no regions.
    """
    from .io.section import Section

    adata = section_or_adata.adata if isinstance(section_or_adata, Section) else section_or_adata
    regs = as_regions(regions if regions is not None else _uns(adata).get(K.REGIONS))
    if not regs:
        log.info("no annotations: nothing to restrict")
        return section_or_adata
    lab = assign_regions(adata, regs, image_scale=image_scale).astype(str).to_numpy()
    if include is not None:
        keep = np.array([bool(v) and _matches(v, include) and not _matches(v, exclude) for v in lab])
    else:
        keep = np.array([bool(v) and not _matches(v, exclude) for v in lab])
    n_drop = int((~keep).sum())
    log.info("regions: kept %d of %d observations (%d outside the chosen annotations or excluded)",
             int(keep.sum()), len(keep), n_drop)
    if not keep.any():
        raise StimageInputError(
            f"none of the {len(keep)} observations lies inside the chosen annotations "
            f"({sorted({r.label for r in regs})}; include={include}, exclude={list(exclude)}). Are the annotations "
            "for this image, in full-resolution pixels?")
    if isinstance(section_or_adata, Section):
        return section_or_adata.subset(keep)
    return adata[keep].copy()
