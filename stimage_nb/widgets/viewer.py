"""Overlay viewer: the slide with pan and zoom over its pyramid, predictions drawn on top.

Two layers:

- :class:`SlideCanvas` is an `anywidget <https://anywidget.dev>`_ whose JavaScript and CSS ship inside
  the package (``stimage_nb/widgets/static/``; nothing is fetched from a CDN at run time). It draws
  an overview of the slide at once, then requests the tiles of the pyramid level that matches the
  zoom from the kernel (JPEG or PNG, served by :meth:`SlideCanvas.tile`), and paints one disc per
  spot or cell coloured by a per-point value.
- :class:`OverlayViewer` is the panel around it (ipywidgets): gene / cell-type search, a toggle
  between the predictive mean, aleatoric and epistemic uncertainty (and the observed counts when
  given, and the domain-shift score when the prediction has one), opacity, the values of a clicked spot, and buttons to export QuPath GeoJSON and to push
  to OMERO. Given attributions (:mod:`stimage_nb.interpretation`), a clicked spot's nuclei are drawn
  coloured by their attribution to the shown gene.

Everything the panel does is visible as trait values (``status``, ``feature``, ``mode``,
``spot_info``, ``last_export``, ``last_push``), so tests drive it without a browser.

Uncertainty display: the viewer shows standard deviations (same unit as the mean). For genes,
aleatoric = sqrt(``layers["aleatoric_var"]``), epistemic = sqrt(``layers["epistemic_var"]``). For a
cell type with ensemble-mean probability *m* and across-member standard deviation *s*, the law of
total variance splits the indicator's variance *m(1-m)* into epistemic *s²* and aleatoric
*m(1-m) - s²*; the viewer shows their square roots.

Domain shift (``obs["domain_percentile"]``, :mod:`stimage_nb.domain`): per spot, the fraction of the
model's held-out reference tiles that lie closer to the training data. It does not depend on the
gene; the ``domain shift`` mode draws it on a fixed 0–1 scale, so sections can be compared by eye
(above 0.95 the tissue looks less familiar than 95% of the tiles the model was checked on).
"""

from __future__ import annotations

import io
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from .. import _keys as K
from ..errors import StimageInputError
from ..io.prediction import read_prediction

log = logging.getLogger(__name__)

try:  # the widget classes need the jupyter extra; the helpers below work without it
    import anywidget
    import ipywidgets as widgets
    import traitlets as t
except ImportError as _e:  # pragma: no cover - exercised only without the jupyter extra
    raise ImportError("stimage_nb.widgets needs the jupyter extra: pip install 'stimage_nb[jupyter]'") from _e

STATIC = Path(__file__).parent / "static"
MODES = ("mean", "aleatoric", "epistemic")
OBSERVED = "observed"
DOMAIN = "domain shift"
GENE, CELLTYPE = "gene", "cell type"
TILE_SIZE = 512
OVERVIEW_PX = 1024


# ---------------------------------------------------------------------------------------- helpers
def colormap_lut(name: str = "viridis") -> bytes:
    """A 256-entry RGBA lookup table (uint8, 1024 bytes) for a matplotlib colormap."""
    from matplotlib import colormaps

    cmap = colormaps[name]
    return (np.asarray(cmap(np.linspace(0, 1, 256))) * 255).round().astype(np.uint8).tobytes()


def encode_image(rgb: np.ndarray, fmt: str = "jpeg", quality: int = 85) -> bytes:
    """Encode an (h, w, 3) uint8 array as JPEG or PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    im = Image.fromarray(np.ascontiguousarray(rgb))
    if fmt == "png":
        im.save(buf, format="PNG", compress_level=3)
    else:
        im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64).ravel()


def _provenance(pred) -> dict:
    return dict(pred.uns.get(K.UNS, {}) or {})


def resolve_image(pred, image=None):
    """The :class:`~stimage_nb.io.image.SlideImage` a prediction refers to (``uns`` image + µm/px)."""
    from ..io.image import SlideImage, open_image

    if isinstance(image, SlideImage):
        return image
    prov = _provenance(pred)
    um = prov.get("um_per_px")
    um = float(um) if um is not None and str(um) not in ("", "nan", "None") else None
    if image is None:
        image = prov.get("image")
        if not image:
            raise StimageInputError("the prediction's uns['stimage_nb'] names no image; pass image=<path or "
                                    "SlideImage> to the viewer.")
    if hasattr(image, "image") and hasattr(image, "adata"):  # a Section
        return image.image
    return open_image(image, um_per_px=um)


class FeatureValues:
    """Per-point values of one gene or cell type under one mode, taken from a prediction.

    Parameters
    ----------
    pred
        The prediction AnnData (see :mod:`stimage_nb._keys`).
    observed
        Optional observed AnnData (a section's counts, same obs ids or a superset/subset) or a
        :class:`~stimage_nb.io.section.Section`; enables the ``observed`` mode.
    """

    def __init__(self, pred, observed=None):
        self.pred = pred
        self.genes = [str(g) for g in pred.var_names]
        cm = pred.obsm.get(K.CELLTYPE_MEAN)
        self.celltypes = [str(c) for c in cm.columns] if isinstance(cm, pd.DataFrame) else []
        if observed is not None and hasattr(observed, "adata"):
            observed = observed.adata
        self.observed = observed
        self._obs_index = None
        if observed is not None:
            self._obs_index = pd.Index(observed.obs_names).get_indexer(pred.obs_names)

    @property
    def modes(self) -> tuple[str, ...]:
        return (MODES + ((OBSERVED,) if self.observed is not None else ())
                + ((DOMAIN,) if K.DOMAIN_PERCENTILE in self.pred.obs else ()))

    def kind_of(self, feature: str) -> str:
        if feature in self.genes:
            return GENE
        if feature in self.celltypes:
            return CELLTYPE
        raise KeyError(feature)

    def _observed_gene(self, gene: str) -> np.ndarray:
        o = self.observed
        out = np.full(self.pred.n_obs, np.nan)
        if gene not in o.var_names:
            return out
        col = _dense(o[:, gene].X)
        ok = self._obs_index >= 0
        out[ok] = col[self._obs_index[ok]]
        return out

    def _observed_celltype(self, ct: str) -> np.ndarray:
        out = np.full(self.pred.n_obs, np.nan)
        props = self.observed.obsm.get(K.CELLTYPE_PROPORTIONS)
        if not isinstance(props, pd.DataFrame) or ct not in props.columns:
            return out
        col = props[ct].to_numpy(dtype=np.float64)
        ok = self._obs_index >= 0
        out[ok] = col[self._obs_index[ok]]
        return out

    def values(self, feature: str, mode: str) -> np.ndarray:
        """float64 array (n_obs,); NaN where a value is unknown."""
        if mode not in self.modes:
            raise ValueError(f"mode {mode!r} not in {self.modes}")
        kind = self.kind_of(feature)
        p = self.pred
        if mode == DOMAIN:  # a property of the tile, the same for every gene
            return p.obs[K.DOMAIN_PERCENTILE].to_numpy(dtype=np.float64)
        if kind == GENE:
            if mode == OBSERVED:
                return self._observed_gene(feature)
            j = p.var_names.get_loc(feature)
            if mode == "mean":
                return _dense(p.X[:, j])
            layer = K.ALEATORIC if mode == "aleatoric" else K.EPISTEMIC
            if layer not in p.layers:
                return np.full(p.n_obs, np.nan)
            return np.sqrt(np.clip(_dense(p.layers[layer][:, j]), 0, None))
        if mode == OBSERVED:
            return self._observed_celltype(feature)
        m = p.obsm[K.CELLTYPE_MEAN][feature].to_numpy(dtype=np.float64)
        if mode == "mean":
            return m
        sd_df = p.obsm.get(K.CELLTYPE_STD)
        s = sd_df[feature].to_numpy(dtype=np.float64) if isinstance(sd_df, pd.DataFrame) else np.full_like(m, np.nan)
        if mode == "epistemic":
            return s
        return np.sqrt(np.clip(m * (1 - m) - s ** 2, 0, None))

    def unit(self, feature: str, mode: str) -> str:
        kind = self.kind_of(feature)
        if mode == DOMAIN:
            return "domain-shift percentile (1 = less familiar than every held-out training tile)"
        if kind == GENE:
            what = {"mean": "predicted mean", "aleatoric": "aleatoric SD", "epistemic": "epistemic SD",
                    OBSERVED: "observed"}[mode]
            return f"{feature} · {what} (counts)"
        what = {"mean": "predicted proportion", "aleatoric": "aleatoric SD", "epistemic": "epistemic SD",
                OBSERVED: "observed proportion"}[mode]
        return f"{feature} · {what}"


def value_range(v: np.ndarray, lo_q: float = 1.0, hi_q: float = 99.0) -> tuple[float, float]:
    """Robust colour range of finite values (percentiles; 0 as floor for non-negative data)."""
    f = v[np.isfinite(v)]
    if f.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(f, [lo_q, hi_q])
    if f.min() >= 0:
        lo = 0.0
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------- canvas
class SlideCanvas(anywidget.AnyWidget):
    """The slide + overlay canvas (anywidget; JS in ``static/viewer.js``).

    Parameters
    ----------
    image
        A :class:`~stimage_nb.io.image.SlideImage` (its pyramid levels are served as tiles).
    tile_format
        ``"jpeg"`` (small, default) or ``"png"`` (lossless).
    """

    _esm = STATIC / "viewer.js"
    _css = STATIC / "viewer.css"

    image_info = t.Dict().tag(sync=True)
    overview = t.Bytes(b"").tag(sync=True)
    overview_downsample = t.Float(1.0).tag(sync=True)
    points = t.Bytes(b"").tag(sync=True)
    radius_px = t.Float(10.0).tag(sync=True)
    values = t.Bytes(b"").tag(sync=True)
    vmin = t.Float(0.0).tag(sync=True)
    vmax = t.Float(1.0).tag(sync=True)
    lut = t.Bytes(b"").tag(sync=True)
    legend = t.Unicode("").tag(sync=True)
    opacity = t.Float(0.7, min=0.0, max=1.0).tag(sync=True)
    show_overlay = t.Bool(True).tag(sync=True)
    selected = t.Int(-1).tag(sync=True)
    view = t.Dict().tag(sync=True)
    height = t.Int(520).tag(sync=True)
    #: polygons drawn over the spots (a clicked spot's nuclei coloured by attribution): float32 x, y vertices
    #: (level-0 px), int32 start of each polygon in them (n + 1 entries), float32 value per polygon
    shapes = t.Bytes(b"").tag(sync=True)
    shape_offsets = t.Bytes(b"").tag(sync=True)
    shape_values = t.Bytes(b"").tag(sync=True)
    shape_lut = t.Bytes(b"").tag(sync=True)
    shape_limit = t.Float(1.0).tag(sync=True)

    #: number of tiles served so far (not synced; for tests and diagnostics)
    tiles_served = t.Int(0)

    def __init__(self, image=None, *, tile_format: str = "jpeg", tile_size: int = TILE_SIZE,
                 overview_px: int = OVERVIEW_PX, cache_tiles: int = 256, **kwargs):
        super().__init__(**kwargs)
        if tile_format not in ("jpeg", "png"):
            raise ValueError("tile_format must be 'jpeg' or 'png'")
        self.tile_format = tile_format
        self.tile_size = int(tile_size)
        self.overview_px = int(overview_px)
        self._cache: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()
        self._cache_max = int(cache_tiles)
        self._image = None
        self.on_msg(self._on_custom)
        if image is not None:
            self.set_image(image)

    # -- image ---------------------------------------------------------------------------
    @property
    def image(self):
        return self._image

    def set_image(self, image) -> None:
        """Show another :class:`~stimage_nb.io.image.SlideImage` (overview sent at once, tiles on demand)."""
        self._image = image
        self._cache.clear()
        rgb, ds = image.thumbnail(self.overview_px)
        levels = [{"width": int(w), "height": int(h), "downsample": float(d)}
                  for (h, w), d in zip(image.level_shapes, image.downsamples)]
        with self.hold_sync():
            self.overview = encode_image(rgb, self.tile_format)
            self.overview_downsample = float(ds)
            self.image_info = {"width": int(image.width), "height": int(image.height),
                               "um_per_px": float(image.um_per_px), "tile_size": self.tile_size,
                               "levels": levels, "format": self.tile_format, "source": str(image.source)}

    def tile(self, level: int, col: int, row: int) -> bytes:
        """The encoded tile (col, row) of a pyramid level (edge tiles are cropped, not padded)."""
        key = (int(level), int(col), int(row))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        img = self._image
        if img is None or not (0 <= key[0] < img.n_levels):
            raise ValueError(f"no pyramid level {level}")
        H, W = img.level_shapes[key[0]]
        T = self.tile_size
        x, y = key[1] * T, key[2] * T
        if not (0 <= x < W and 0 <= y < H):
            raise ValueError(f"tile {key} outside level {level} ({W}x{H})")
        w, h = min(T, W - x), min(T, H - y)
        data = encode_image(img.read_region(x, y, w, h, level=key[0]), self.tile_format)
        self._cache[key] = data
        if len(self._cache) > self._cache_max:
            self._cache.popitem(last=False)
        return data

    def _on_custom(self, _widget, content, _buffers) -> None:
        if not isinstance(content, dict) or content.get("type") != "tiles":
            return
        mime = "image/png" if self.tile_format == "png" else "image/jpeg"
        for req in content.get("tiles", [])[:64]:
            try:
                data = self.tile(req["level"], req["col"], req["row"])
            except (KeyError, ValueError, TypeError) as e:
                log.debug("tile request %s refused: %s", req, e)
                data = b""
            self.send({"type": "tile", "level": req.get("level"), "col": req.get("col"), "row": req.get("row"),
                       "mime": mime}, buffers=[data])
            self.tiles_served += 1

    # -- overlay -------------------------------------------------------------------------
    def set_points(self, xy: np.ndarray, radius_px: float) -> None:
        """Point centres (n, 2) in level-0 px and their disc radius in level-0 px."""
        xy = np.asarray(xy, dtype=np.float32).reshape(-1, 2)
        with self.hold_sync():
            self.points = xy.tobytes()
            self.radius_px = float(radius_px)
            self.selected = -1

    def set_values(self, values: np.ndarray, vmin: float, vmax: float, lut: bytes, legend: str) -> None:
        """Per-point values (NaN = not drawn), colour range, 256-entry RGBA LUT and legend text."""
        v = np.asarray(values, dtype=np.float32).ravel()
        with self.hold_sync():
            self.values = v.tobytes()
            self.vmin, self.vmax = float(vmin), float(vmax)
            self.lut = lut
            self.legend = legend

    def fit(self) -> None:
        """Reset the view to the whole slide (the browser computes the fitting zoom)."""
        self.view = {}

    def set_shapes(self, polygons, values, limit: float, lut: bytes) -> None:
        """Polygons (each (k, 2), level-0 px) filled by value on a LUT over ``[-limit, limit]``; none clears."""
        polys = [np.asarray(p, dtype=np.float32).reshape(-1, 2) for p in (polygons or [])]
        offs = np.cumsum([0] + [len(p) for p in polys]).astype(np.int32)
        with self.hold_sync():
            self.shapes = np.concatenate(polys).tobytes() if polys else b""
            self.shape_offsets = offs.tobytes() if polys else b""
            self.shape_values = np.asarray(values, dtype=np.float32).ravel().tobytes() if polys else b""
            self.shape_limit = float(limit) if limit and np.isfinite(limit) else 1.0
            self.shape_lut = lut if polys else b""


# ---------------------------------------------------------------------------------------- panel
class OverlayViewer(widgets.VBox):
    """Slide viewer with predictions on top (see module docstring).

    Parameters
    ----------
    pred
        Prediction AnnData or ``.h5ad`` path (``PRED_DIR/<section>.h5ad``).
    image
        The section's image (SlideImage, path or Section); default: ``uns["stimage_nb"]["image"]``.
    observed
        Section or AnnData with observed counts / proportions; adds an ``observed`` mode.
    feature
        Gene or cell type shown first (default: the first gene).
    export_dir
        Folder for the QuPath GeoJSON export (default: beside the ``.h5ad``, else the working dir).
    omero
        A connected OMERO gateway (or ``stimage_nb.omero`` session); ``None`` = push as dry run.
    omero_image_id
        The OMERO image the section came from (needed for a real push).
    exporter, pusher
        Override the export / push functions (``exporter(pred, path) -> Path``,
        ``pusher(pred, conn, image_id, dry_run) -> dict``); by default those of
        :mod:`stimage_nb.qupath` and :mod:`stimage_nb.omero`.
    attributions
        :class:`~stimage_nb.interpretation.Attributions` of this section (or the folder ``stimage-nb
        interpret`` wrote): clicking an explained spot draws its nuclei coloured by their attribution
        to the shown gene (red raises, blue lowers its prediction; the first explained gene when the
        shown one was not explained) and lists the attribution in ``spot_info["attribution"]``.
    """

    status = t.Unicode("")
    feature = t.Unicode("")
    kind = t.Unicode(GENE)
    mode = t.Unicode("mean")
    opacity = t.Float(0.7)
    spot_info = t.Dict()
    last_export = t.Unicode("")
    last_push = t.Dict()

    def __init__(self, pred, image=None, *, observed=None, feature: str | None = None, mode: str = "mean",
                 opacity: float = 0.7, export_dir=None, omero=None, omero_image_id: int | None = None,
                 exporter: Callable | None = None, pusher: Callable | None = None, height: int = 520,
                 tile_format: str = "jpeg", attributions=None):
        self._pred_path = Path(pred) if isinstance(pred, (str, os.PathLike)) else None
        self.pred = read_prediction(pred)
        self.features = FeatureValues(self.pred, observed)
        if not self.features.genes and not self.features.celltypes:
            raise StimageInputError("the prediction has neither genes nor cell types to show.")
        self.slide = resolve_image(self.pred, image)
        self.export_dir = Path(export_dir) if export_dir else (self._pred_path.parent if self._pred_path else Path.cwd())
        self.omero = omero
        self.omero_image_id = omero_image_id
        self._exporter = exporter
        self._pusher = pusher
        if attributions is not None and not hasattr(attributions, "spots"):
            from ..interpretation import read_attributions

            attributions = read_attributions(attributions)
        self.attributions = attributions

        self.canvas = SlideCanvas(self.slide, tile_format=tile_format, height=height)
        xy = np.asarray(self.pred.obsm[K.SPATIAL], dtype=np.float64)
        diam_um = (np.median(self.pred.obs[K.DIAMETER_UM]) if K.DIAMETER_UM in self.pred.obs
                   else _provenance(self.pred).get("diameter_um", 100.0))
        self.canvas.set_points(xy, radius_px=float(diam_um) / self.slide.um_per_px / 2)

        kinds = [k for k, have in ((GENE, self.features.genes), (CELLTYPE, self.features.celltypes)) if have]
        lab = widgets.Layout(width="70px")
        self.kind_toggle = widgets.ToggleButtons(options=kinds, value=kinds[0], style={"button_width": "86px"})
        self.search = widgets.Combobox(placeholder="search a gene…", ensure_option=True,
                                       options=tuple(self.features.genes if kinds[0] == GENE else self.features.celltypes),
                                       layout=widgets.Layout(width="240px"))
        self.mode_toggle = widgets.ToggleButtons(options=list(self.features.modes), value=mode,
                                                 style={"button_width": "86px"})
        self.opacity_slider = widgets.FloatSlider(value=opacity, min=0.0, max=1.0, step=0.05, readout_format=".2f",
                                                  layout=widgets.Layout(width="240px"))
        self.export_button = widgets.Button(description="Export QuPath GeoJSON", icon="download",
                                            layout=widgets.Layout(width="200px"))
        self.push_button = widgets.Button(description=self._push_label(), icon="upload",
                                          layout=widgets.Layout(width="220px"))
        self.info = widgets.HTML(value="<i>click a spot to see its values</i>",
                                 layout=widgets.Layout(min_width="240px", margin="0 0 0 24px"))
        self.status_label = widgets.HTML()
        for w, cls in ((self.kind_toggle, "stimage-kind"), (self.search, "stimage-search"),
                       (self.mode_toggle, "stimage-mode"), (self.opacity_slider, "stimage-opacity"),
                       (self.export_button, "stimage-export"), (self.push_button, "stimage-push"),
                       (self.info, "stimage-spot-info"), (self.status_label, "stimage-status")):
            w.add_class(cls)

        def row(label, w):
            return widgets.HBox([widgets.Label(label, layout=lab), w])

        controls = widgets.VBox([row("layer", self.kind_toggle), row("feature", self.search),
                                 row("show", self.mode_toggle), row("opacity", self.opacity_slider),
                                 widgets.HBox([self.export_button, self.push_button])])
        super().__init__([widgets.HBox([controls, self.info]), self.canvas, self.status_label])
        self.add_class("stimage-overlay-viewer")

        self.kind_toggle.observe(self._on_kind, "value")
        self.search.observe(self._on_search, "value")
        self.mode_toggle.observe(lambda c: setattr(self, "mode", c["new"]), "value")
        self.opacity_slider.observe(lambda c: setattr(self, "opacity", c["new"]), "value")
        self.canvas.observe(self._on_selected, "selected")
        self.export_button.on_click(lambda _b: self.export_qupath())
        self.push_button.on_click(lambda _b: self.push_to_omero())

        self.opacity = opacity
        self.mode = mode
        first = feature or (self.features.genes[0] if self.features.genes else self.features.celltypes[0])
        self.show(first, mode)

    # -- traits -> widgets ----------------------------------------------------------------
    @t.validate("mode")
    def _valid_mode(self, proposal):
        if proposal["value"] not in self.features.modes:
            raise t.TraitError(f"mode must be one of {self.features.modes}, not {proposal['value']!r}")
        return proposal["value"]

    @t.validate("feature")
    def _valid_feature(self, proposal):
        try:
            self.features.kind_of(proposal["value"])
        except KeyError:
            raise t.TraitError(f"{proposal['value']!r} is neither a predicted gene nor a cell type") from None
        return proposal["value"]

    @t.observe("feature", "mode")
    def _redraw(self, _change=None) -> None:
        if not self.feature:
            return
        self.kind = self.features.kind_of(self.feature)
        if self.kind_toggle.value != self.kind:
            self.kind_toggle.value = self.kind
        if self.search.value != self.feature:
            self.search.value = self.feature
        if self.mode_toggle.value != self.mode:
            self.mode_toggle.value = self.mode
        v = self.features.values(self.feature, self.mode)
        lo, hi = (0.0, 1.0) if self.mode == DOMAIN else value_range(v)
        cmap = "viridis" if self.mode in ("mean", OBSERVED) else "magma"
        self.canvas.set_values(v, lo, hi, colormap_lut(cmap), self.features.unit(self.feature, self.mode))
        n = int(np.isfinite(v).sum())
        self.status = f"showing {self.features.unit(self.feature, self.mode)} on {n} spots (range {lo:.3g}–{hi:.3g})"
        self._update_info()

    @t.observe("opacity")
    def _on_opacity(self, change) -> None:
        self.canvas.opacity = float(np.clip(change["new"], 0, 1))
        if self.opacity_slider.value != change["new"]:
            self.opacity_slider.value = change["new"]

    @t.observe("status")
    def _on_status(self, change) -> None:
        import html

        self.status_label.value = f"<span class='stimage-status'>{html.escape(change['new'])}</span>"

    def _on_kind(self, change) -> None:
        names = self.features.genes if change["new"] == GENE else self.features.celltypes
        self.search.options = tuple(names)
        self.search.placeholder = "search a gene…" if change["new"] == GENE else "search a cell type…"
        if self.feature not in names and names:
            self.feature = names[0]

    def _on_search(self, change) -> None:
        name = change["new"]
        if name and name != self.feature:
            try:
                self.features.kind_of(name)
            except KeyError:
                return
            self.feature = name

    # -- API ------------------------------------------------------------------------------
    def show(self, feature: str, mode: str | None = None) -> None:
        """Show ``feature`` (a gene or a cell type) under ``mode``."""
        with self.hold_trait_notifications():
            if mode is not None:
                self.mode = mode
            self.feature = feature

    def select(self, spot: int | str) -> dict:
        """Select a spot by index or obs name (as a click does); returns its values."""
        i = spot if isinstance(spot, (int, np.integer)) else int(self.pred.obs_names.get_loc(str(spot)))
        self.canvas.selected = int(i)
        return self.spot_info

    def _on_selected(self, _change) -> None:
        self._update_info()

    def _update_info(self) -> None:
        import html

        i = self.canvas.selected
        if i < 0 or i >= self.pred.n_obs:
            self.spot_info = {}
            self.info.value = "<i>click a spot to see its values</i>"
            if self.attributions is not None:
                self.canvas.set_shapes([], [], 1.0, b"")
            return
        sid = str(self.pred.obs_names[i])
        xy = np.asarray(self.pred.obsm[K.SPATIAL])[i]
        info: dict[str, Any] = {"spot": sid, "index": int(i), "x": float(xy[0]), "y": float(xy[1]),
                                "feature": self.feature}
        for m in self.features.modes:
            if m != DOMAIN:  # added below as domain_percentile
                info[m] = float(self.features.values(self.feature, m)[i])
        cm = self.pred.obsm.get(K.CELLTYPE_MEAN)
        if isinstance(cm, pd.DataFrame) and cm.shape[1]:
            row = cm.iloc[i].sort_values(ascending=False)
            info["top_celltypes"] = {str(k): float(v) for k, v in row.head(3).items()}
        if K.DOMAIN_PERCENTILE in self.pred.obs:  # how unlike the training data this spot looks (stimage_nb.domain)
            info["domain_percentile"] = float(self.pred.obs[K.DOMAIN_PERCENTILE].iloc[i])
        self.spot_info = info
        label = {"mean": "predicted mean", "aleatoric": "aleatoric SD", "epistemic": "epistemic SD",
                 OBSERVED: "observed"}
        rows = "".join(f"<tr><td>{label[m]}</td><td style='text-align:right; padding-left:12px'>{info[m]:.3g}</td></tr>"
                       for m in self.features.modes if m != DOMAIN)  # the domain score has its own line
        cts = "".join(f"<li>{html.escape(k)}: {v:.2f}</li>" for k, v in info.get("top_celltypes", {}).items())
        dom = ""
        if "domain_percentile" in info:
            p = info["domain_percentile"]
            dom = (f"domain shift: further from the training data than {100 * p:.0f}% of held-out tiles"
                   + (" <b>(unfamiliar)</b>" if p > 0.95 else "") + "<br>")
        att = self._attribution_info(sid)
        if att:
            self.spot_info = {**info, "attribution": att}
        self.info.value = (f"<b>spot {html.escape(sid)}</b> ({info['x']:.0f}, {info['y']:.0f}) px<br>"
                           f"<b>{html.escape(self.feature)}</b><table>{rows}</table>"
                           + (f"top cell types<ul style='margin:0'>{cts}</ul>" if cts else "") + dom
                           + (_attribution_html(att) if att else ""))

    def _attribution_info(self, sid: str) -> dict:
        """The clicked spot's attribution (and its nuclei drawn on the canvas), or {} when not explained."""
        attr = self.attributions
        if attr is None:
            return {}
        if sid not in attr.spots.index:
            self.canvas.set_shapes([], [], 1.0, b"")
            return {}
        gene = self.feature if self.feature in attr.genes else attr.genes[0]
        players, vals = attr.matrix(sid)
        g = list(attr.genes).index(gene)
        v = vals[:-1, g]
        pos = attr.nuclei.table.index.get_indexer(players[:-1])
        lim = float(np.abs(v).max()) if len(v) else 1.0
        self.canvas.set_shapes([attr.nuclei.polygons[k] for k in pos], v, lim or 1.0, colormap_lut("RdBu_r"))
        row = attr.spots.loc[sid]
        order = np.argsort(v)
        return {"gene": gene, "output": attr.output, "method": attr.method, "n_nuclei": int(len(v)),
                "prediction": float(row[f"prediction:{gene}"]), "base": float(row[f"base:{gene}"]),
                "nuclei_sum": float(v.sum()), "background": float(vals[-1, g]),
                "top_positive": [(players[k], float(v[k])) for k in order[::-1][:3] if v[k] > 0],
                "top_negative": [(players[k], float(v[k])) for k in order[:3] if v[k] < 0]}

    def _section_name(self) -> str:
        return str(_provenance(self.pred).get("section") or (self._pred_path.stem if self._pred_path else "section"))

    def _push_label(self) -> str:
        return "Push to OMERO" if self.omero is not None else "Push to OMERO (dry run)"

    def export_qupath(self, path=None) -> Path | None:
        """Write the prediction as QuPath GeoJSON; the path lands in ``last_export``."""
        path = Path(path) if path else self.export_dir / f"{self._section_name()}.geojson"
        self.status = f"exporting QuPath GeoJSON to {path} …"
        try:
            exporter = self._exporter or _default_exporter()
            out = exporter(self.pred, path)
        except Exception as e:  # noqa: BLE001 - shown to the user, not raised into the event loop
            log.exception("QuPath export failed")
            self.status = f"export failed: {type(e).__name__}: {e}"
            return None
        self.last_export = str(out)
        self.status = f"exported QuPath GeoJSON: {out}"
        return Path(out)

    def push_to_omero(self, dry_run: bool | None = None) -> dict:
        """Push ROIs and a table to OMERO (a dry run without a connection); result in ``last_push``."""
        dry = self.omero is None if dry_run is None else bool(dry_run)
        self.status = "pushing to OMERO …" if not dry else "OMERO push (dry run) …"
        try:
            pusher = self._pusher or _default_pusher()
            res = pusher(self.pred, self.omero, self.omero_image_id, dry)
        except Exception as e:  # noqa: BLE001
            log.exception("OMERO push failed")
            self.status = f"OMERO push failed: {type(e).__name__}: {e}"
            self.last_push = {"ok": False, "error": str(e), "dry_run": dry}
            return self.last_push
        res = dict(res or {})
        res.setdefault("dry_run", dry)
        res.setdefault("ok", True)
        self.last_push = res
        self.status = ("OMERO push (dry run): " if dry else "pushed to OMERO: ") + _summarise(res)
        return res


def _attribution_html(att: dict) -> str:
    import html

    unit = "log expected counts" if att["output"] == "log_mean" else "expected counts"
    return (f"<hr style='margin:4px 0'><b>why {html.escape(att['gene'])}?</b> ({html.escape(att['method'])}, "
            f"{unit})<br>prediction {att['prediction']:.3g} = base {att['base']:.3g} + {att['n_nuclei']} nuclei "
            f"{att['nuclei_sum']:+.3g} + background {att['background']:+.3g}<br>"
            "<span style='color:#b2182b'>red</span> nuclei raise it, <span style='color:#2166ac'>blue</span> "
            "lower it")


def _summarise(res: dict) -> str:
    keys = [k for k in ("mode", "n_rois", "rois_written", "tables", "files", "image_id") if res.get(k) is not None]
    return ", ".join(f"{k}={len(res[k]) if isinstance(res[k], (list, tuple)) else res[k]}" for k in keys) or "done"


def _default_exporter():
    from .. import qupath

    return _adapt_exporter(qupath)


def _default_pusher():
    from .. import omero as om

    return _adapt_pusher(om)


def _adapt_exporter(qupath):
    def export(pred, path):
        return qupath.export_qupath(pred, path)

    return export


def _adapt_pusher(om):
    from ..omero.push import offline_push_plan, push_summary

    def push(pred, conn, image_id, dry_run):
        if conn is None:
            return offline_push_plan(pred, image_id=image_id)
        if image_id is None:
            raise StimageInputError("no OMERO image to push onto: pass omero_image_id= (the image the prediction "
                                    "was made on) to the viewer.")
        return push_summary(om.push_predictions(conn, int(image_id), pred, dry_run=dry_run, progress=False))

    return push
