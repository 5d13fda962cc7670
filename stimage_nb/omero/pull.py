"""Pull from OMERO: images as local OME-Zarr 0.4 pyramids, ROIs and attachments as a Section.

- :func:`pull_image` reads the pixels tile by tile through the ``RawPixelsStore`` (the same calls as
  omero-py's ``PixelsWrapper.getTiles``, decoded with ``numpy.frombuffer`` instead of ``struct``),
  one band of tiles per store session, writes them into an NGFF 0.4 (Zarr v2) store with the same
  layout and metadata as :func:`stimage_nb.io.ngff.write_ome_zarr`, records each finished band so an
  interrupted pull resumes where it stopped, and builds the lower levels locally. With
  ``target_um_per_px`` it reads the coarsest server resolution level that is still fine enough
  (``image_scale`` < 1) instead of the full-resolution plane. The finished store is cached under
  ``$STIMAGE_NB_CACHE/omero/<host>/`` and a second pull of the same pixels costs no transfer.
- :func:`pull_rois` and :func:`pull_annotations` read shapes, names, texts, map annotations, comments
  and attached files; :func:`pull_section` turns them (point/ellipse ROIs = spots or cells,
  polygons = regions or cell outlines, an attached OMERO.table / h5ad / TSV of counts, or an attached
  Visium ``outs`` archive) into a :class:`~stimage_nb.io.section.Section` ready for training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tarfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .. import _keys as K
from .._settings import cache_dir
from ..atomic import write_json
from ..errors import StimageInputError
from ..io.image import SlideImage, check_um_per_px
from ..io.ngff import CHUNK, create_array, downsample2, multiscales_metadata, omero_rgb_metadata
from . import model as M
from .connection import OmeroError, OmeroNotFoundError, as_session, is_connection_loss, require_omero, translate_error

log = logging.getLogger(__name__)

MAX_REQUEST_PX = 2048          # per getTile request side (servers refuse > omero.pixeldata.max_plane_*, 3192)
PULL_FORMAT = 1                # bump when the local layout changes
SOURCE_ATTR = "stimage_nb"     # group attribute holding {"omero": {host, image_id, level, image_scale, ...}}
MAX_RETRIES = 3

# HQL used by this module (the test double in tests/omero answers exactly these).
Q_IMAGE_ANN_LINKS = ("select l from ImageAnnotationLink as l join fetch l.child as a "
                     "left outer join fetch a.file where l.parent.id = :iid")
Q_ROI_ANN_LINKS = ("select l from RoiAnnotationLink as l join fetch l.child as a "
                   "left outer join fetch a.file where l.parent.image.id = :iid")


# ----------------------------------------------------------------------------- image info
@dataclass
class ImageInfo:
    """What the server says about an image's pixels."""

    image_id: int
    name: str
    pixels_id: int
    size_x: int
    size_y: int
    size_c: int
    size_z: int
    size_t: int
    pixels_type: str
    um_per_px: float | None
    group_id: int | None = None
    levels: list[tuple[int, int]] = field(default_factory=list)  # (sizeX, sizeY), 0 = full resolution
    tile: tuple[int, int] = (512, 512)

    def level_um_per_px(self, i: int) -> float | None:
        return None if self.um_per_px is None else self.um_per_px * self.size_x / self.levels[i][0]


def _params(**values):
    from omero.sys import ParametersI

    p = ParametersI()
    for k, v in values.items():
        if isinstance(v, (list, tuple)):
            p.addLongs(k, [int(x) for x in v])
        elif isinstance(v, int):
            p.addLong(k, int(v))
        else:
            p.addString(k, str(v))
    return p


def get_image(conn, image_id: int):
    """The ImageWrapper for ``image_id``, or :class:`OmeroNotFoundError` naming the id and the user."""
    sess = as_session(conn)
    gw = sess.gateway
    old = gw.SERVICE_OPTS.getOmeroGroup()
    try:
        gw.SERVICE_OPTS.setOmeroGroup("-1")  # look in every group the user can read
        img = gw.getObject("Image", int(image_id))
    except Exception as e:  # noqa: BLE001
        raise translate_error(e, sess.target, f"reading image {image_id}") from None
    finally:
        gw.SERVICE_OPTS.setOmeroGroup(old)
    if img is None:
        raise OmeroNotFoundError(
            f"OMERO image {image_id} on {sess.target} does not exist or is not readable by this user "
            "(check the id in OMERO.web, and that you are a member of its group).")
    return img


def _group_id(img) -> int | None:
    """The image's group id, read from the loaded object (no server call)."""
    try:
        return int(img._obj.getDetails().getGroup().getId().getValue())
    except Exception:  # noqa: BLE001
        return None


def image_ctx(conn, image_id: int):
    """(ImageWrapper, call context set to the image's group) for reads that must see that group."""
    sess = as_session(conn)
    img = get_image(sess, image_id)
    ctx = sess.gateway.SERVICE_OPTS.copy()
    gid = _group_id(img)
    if gid is not None:
        ctx.setOmeroGroup(gid)
    return img, ctx


def image_info(conn, image_id: int, *, with_levels: bool = True) -> ImageInfo:
    """Size, pixel type, pixel size (µm/px) and resolution levels of an OMERO image."""
    sess = as_session(conn)
    img = get_image(sess, image_id)
    px = img.getPrimaryPixels()
    size = img.getPixelSizeX(units="MICROMETER")
    um = float(size.getValue()) if size is not None else None
    gid = _group_id(img)
    info = ImageInfo(int(image_id), img.getName() or f"image-{image_id}", int(px.getId()), int(img.getSizeX()),
                     int(img.getSizeY()), int(img.getSizeC()), int(img.getSizeZ()), int(img.getSizeT()),
                     str(img.getPixelsType()), um, gid)
    info.levels = [(info.size_x, info.size_y)]
    if with_levels:
        store = _open_store(sess, info)
        try:
            descs = store.getResolutionDescriptions()
            info.levels = [(int(d.sizeX), int(d.sizeY)) for d in descs] or info.levels
            tw, th = store.getTileSize()
            info.tile = (int(tw), int(th))
        finally:
            _close(store)
    return info


def _open_store(sess, info: ImageInfo, server_level: int | None = None):
    """A RawPixelsStore on the image's pixels, at ``server_level`` (0 = full resolution)."""
    gw = sess.gateway
    store = gw.createRawPixelsStore()
    ctx = gw.SERVICE_OPTS.copy()
    if info.group_id is not None:
        ctx.setOmeroGroup(info.group_id)
    store.setPixelsId(info.pixels_id, True, ctx)
    if server_level is not None and server_level > 0:
        # getResolutionDescriptions() lists full resolution first, but setResolutionLevel counts from
        # the smallest level: description i is level (n - 1 - i) (as OMERO's own image-region service does).
        n = store.getResolutionLevels()
        store.setResolutionLevel(n - 1 - server_level)
    return store


def _close(store) -> None:
    try:
        store.close()
    except Exception:  # noqa: BLE001
        pass


def _numpy_type(pixels_type: str):
    from omero.gateway import OMERO_NUMPY_TYPES

    if pixels_type not in OMERO_NUMPY_TYPES:
        raise StimageInputError(f"OMERO pixel type {pixels_type!r} is not supported for H&E "
                                "(expected uint8 or uint16 RGB).")
    return np.dtype(OMERO_NUMPY_TYPES[pixels_type])


def read_block(store, channels: Sequence[int], x: int, y: int, w: int, h: int, pixels_type: str,
               z: int = 0, t: int = 0) -> np.ndarray:
    """(h, w, len(channels)) array of one region, one ``getTile`` per channel (big-endian bytes)."""
    dt = _numpy_type(pixels_type).newbyteorder(">")
    out = np.empty((h, w, len(channels)), dtype=dt.newbyteorder("="))
    for k, c in enumerate(channels):
        raw = store.getTile(z, c, t, x, y, w, h)
        if isinstance(raw, str):  # omero-py tolerates str planes; so do we
            raw = raw.encode("utf-8")
        a = np.frombuffer(raw, dtype=dt)
        if a.size != w * h:
            raise OmeroError(f"getTile({x},{y},{w},{h}) returned {a.size} values, expected {w * h}")
        out[:, :, k] = a.reshape(h, w)
    return out


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.integer):
        hi = float(np.iinfo(a.dtype).max)
        return np.clip(a.astype(np.float32) / hi * 255.0, 0, 255).round().astype(np.uint8)
    return np.clip(a.astype(np.float32) * 255.0, 0, 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------- pull_image
def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(s))[:80] or "omero"


def choose_level(info: ImageInfo, target_um_per_px: float | None) -> int:
    """The coarsest server level whose pixels are at most ``target_um_per_px`` (0 without a target)."""
    if target_um_per_px is None or info.um_per_px is None:
        return 0
    best = 0
    for i in range(len(info.levels)):
        um = info.level_um_per_px(i)
        if um is not None and um <= float(target_um_per_px) * 1.0001:
            best = i
    return best


def _channels(info: ImageInfo) -> list[int]:
    if info.size_c >= 3:
        if info.size_c > 4:
            raise StimageInputError(
                f"OMERO image {info.image_id} ({info.name}) has {info.size_c} channels; an H&E pull needs an "
                "RGB brightfield image (3 channels, or 4 with alpha).")
        return [0, 1, 2]
    if info.size_c == 1:
        return [0, 0, 0]
    raise StimageInputError(f"OMERO image {info.image_id} has {info.size_c} channels; expected RGB (3).")


def _create_level(g, level: int, h: int, w: int, chunk: int = CHUNK):
    """A (3, h, w) uint8 level laid out exactly as :func:`stimage_nb.io.ngff.write_ome_zarr` lays it out."""
    if str(level) in g:
        del g[str(level)]
    return create_array(g, str(level), (3, h, w), (3, min(chunk, h), min(chunk, w)), "uint8")


def _build_lower_levels(g, min_size: int = 512, chunk: int = CHUNK) -> int:
    """Add factor-2 levels below level 0 by 2x2 area mean, streamed block by block; returns the level count."""
    level = 0
    prev = g["0"]
    while True:
        _, h, w = prev.shape
        if max(h, w) <= min_size:
            return level + 1
        nh, nw = h // 2, w // 2
        cur = _create_level(g, level + 1, max(nh, 1), max(nw, 1), chunk)
        step_y, step_x = chunk, 4 * chunk
        for oy in range(0, nh, step_y):
            for ox in range(0, nw, step_x):
                oh, ow = min(step_y, nh - oy), min(step_x, nw - ox)
                src = np.asarray(prev[:, 2 * oy:2 * (oy + oh), 2 * ox:2 * (ox + ow)])
                small = downsample2(np.transpose(src, (1, 2, 0)))
                cur[:, oy:oy + oh, ox:ox + ow] = np.transpose(small[:oh, :ow], (2, 0, 1))
        level += 1
        prev = cur


def pulled_source(path: str | os.PathLike) -> dict | None:
    """What a pulled store records about its origin (``.zattrs`` → ``stimage_nb.omero``), or None."""
    try:
        attrs = json.loads((Path(path) / ".zattrs").read_text())
        return attrs.get(SOURCE_ATTR, {}).get("omero")
    except (OSError, ValueError, AttributeError):
        return None


def pulled_image_path(host: str, image_id: int, server_level: int = 0, dest: str | os.PathLike | None = None) -> Path:
    """Where :func:`pull_image` keeps an image (``dest`` wins when given)."""
    if dest is not None:
        return Path(dest)
    return cache_dir() / "omero" / _safe(host) / f"image-{int(image_id)}-L{int(server_level)}.ome.zarr"


def pull_image(conn, image_id: int, *, dest: str | os.PathLike | None = None, target_um_per_px: float | None = None,
               um_per_px: float | None = None, refresh: bool = False, progress: bool = True,
               info: ImageInfo | None = None) -> SlideImage:
    """Pull an OMERO image into a local OME-Zarr 0.4 pyramid and open it.

    Parameters
    ----------
    conn
        :class:`~stimage_nb.omero.connection.OmeroSession` (reconnects and resumes after a dropped
        connection) or a connected BlitzGateway.
    image_id
        OMERO Image id.
    dest
        Where to write the store (default: the cache, keyed by host, image id and level).
    target_um_per_px
        Read the coarsest server resolution level whose pixels are at most this size (e.g. 0.5 for
        tiles at ~0.5 µm/px) instead of the full-resolution plane; the pulled image then records
        ``image_scale`` = level px / full-resolution px.
    um_per_px
        Full-resolution pixel size when the server does not record one (required then).
    refresh
        Pull again even when a complete copy of the same pixels exists.
    progress
        Show a tqdm progress bar over bands of tiles.

    Returns
    -------
    SlideImage
        The pulled image; the store's ``.zattrs`` holds the NGFF ``multiscales`` and ``omero`` blocks and
        ``stimage_nb.omero``: host, image id, server level and ``image_scale`` (see :func:`pulled_source`).
    """
    from tqdm.auto import tqdm

    require_omero()
    import zarr

    sess = as_session(conn)
    info = info or image_info(sess, image_id)
    if info.um_per_px is None and um_per_px is None:
        raise StimageInputError(
            f"OMERO image {image_id} ({info.name}) on {sess.target} has no physical pixel size. Pass "
            "um_per_px= (CLI: --um-per-px) with the scan's µm/px (e.g. 0.25 at 40x, 0.5 at 20x), or set it in "
            "OMERO (omero metadata pixelsize).")
    um_full = check_um_per_px(um_per_px if um_per_px is not None else info.um_per_px,
                              f"OMERO image {image_id} ({info.name})")
    if info.size_z > 1 or info.size_t > 1:
        log.warning("OMERO image %s has Z=%d, T=%d; pulling the plane z=0, t=0", image_id, info.size_z, info.size_t)
    chans = _channels(info)
    _numpy_type(info.pixels_type)
    lvl = choose_level(info, target_um_per_px)
    W, H = info.levels[lvl]
    scale = W / info.size_x
    um_local = um_full / scale
    final = pulled_image_path(sess.target.host, image_id, lvl, dest)
    stamp = {"format": PULL_FORMAT, "host": sess.target.host, "image_id": int(image_id),
             "pixels_id": info.pixels_id, "size_x": info.size_x, "size_y": info.size_y,
             "pixels_type": info.pixels_type, "server_level": lvl, "level_size": [W, H],
             "um_per_px_full": um_full, "um_per_px": um_local, "image_scale": scale, "name": info.name}
    if not refresh:
        old = pulled_source(final)
        if old is not None and {k: old.get(k) for k in stamp} == stamp:
            log.info("OMERO image %s already pulled at %s", image_id, final)
            return SlideImage(final, source=f"omero://{sess.target.host}/image/{image_id}")
    partial = final.with_name(final.name + ".partial")
    prog_path = partial / "pull-progress.json"
    done: set[int] = set()
    if partial.exists():
        try:
            prog = json.loads(prog_path.read_text())
            if prog.get("stamp") == stamp:
                done = set(int(b) for b in prog.get("bands_done", []))
            else:
                shutil.rmtree(partial)
        except (OSError, ValueError):
            shutil.rmtree(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    if not partial.exists() or "0" not in zarr.open_group(str(partial), mode="a", zarr_format=2):
        g = zarr.open_group(str(partial), mode="w", zarr_format=2)
        _create_level(g, 0, H, W)
        done = set()
        write_json(prog_path, {"stamp": stamp, "bands_done": []})
    g = zarr.open_group(str(partial), mode="a", zarr_format=2)
    arr = g["0"]
    if tuple(arr.shape) != (3, H, W):
        raise OmeroError(f"{partial}: unexpected level-0 shape {arr.shape}; delete it and pull again.")
    tw, th = info.tile
    band_h = int(min(MAX_REQUEST_PX, max(CHUNK, math.ceil(max(th, 1) / CHUNK) * CHUNK)))
    req_w = int(min(MAX_REQUEST_PX, max(CHUNK, math.ceil(max(min(tw, MAX_REQUEST_PX), 1) / CHUNK) * CHUNK)))
    bands = list(range(0, H, band_h))
    todo = [i for i in range(len(bands)) if i not in done]
    t0 = time.perf_counter()
    nbytes = 0
    bar = tqdm(total=len(bands), initial=len(bands) - len(todo), desc=f"pull image {image_id}", unit="band",
               disable=not progress)
    failures = 0
    k = 0
    store = None
    try:
        while k < len(todo):
            bi = todo[k]
            y = bands[bi]
            h = min(band_h, H - y)
            try:
                if store is None:
                    store = _open_store(sess, info, lvl)
                for x in range(0, W, req_w):
                    w = min(req_w, W - x)
                    block = read_block(store, chans, x, y, w, h, info.pixels_type)
                    nbytes += block.nbytes
                    arr[:, y:y + h, x:x + w] = np.transpose(_to_uint8(block), (2, 0, 1))
            except Exception as e:  # noqa: BLE001
                _close(store)
                store = None
                if not is_connection_loss(e) or failures >= MAX_RETRIES or sess.factory is None:
                    if _is_ice(e):
                        raise translate_error(e, sess.target, f"pulling image {image_id} (band {bi + 1}/"
                                              f"{len(bands)}; run the pull again to resume)") from e
                    raise
                failures += 1
                log.warning("connection lost while pulling image %s (band %d); reconnecting (%d/%d)",
                            image_id, bi + 1, failures, MAX_RETRIES)
                sess.reconnect()
                continue
            failures = 0
            done.add(bi)
            write_json(prog_path, {"stamp": stamp, "bands_done": sorted(done)})
            bar.update(1)
            k += 1
    finally:
        _close(store)
        bar.close()
    n_levels = _build_lower_levels(g)
    g.attrs["multiscales"] = [multiscales_metadata(n_levels, um_local, name=info.name)]
    g.attrs["omero"] = omero_rgb_metadata(info.name)
    dt = time.perf_counter() - t0
    g.attrs[SOURCE_ATTR] = {"omero": dict(stamp, pulled_s=round(dt, 3), bytes_read=nbytes)}
    prog_path.unlink(missing_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    log.info("pulled OMERO image %s (%dx%d px at %.4g µm/px, %d levels) into %s in %.1f s", image_id, W, H,
             um_local, n_levels, final, dt)
    return SlideImage(final, source=f"omero://{sess.target.host}/image/{image_id}")


def _is_ice(e: BaseException) -> bool:
    mod = type(e).__module__ or ""
    return mod.startswith(("Ice", "omero", "Glacier2", "IcePy"))


# ----------------------------------------------------------------------------- ROIs and annotations
def pull_rois(conn, image_id: int, *, page: int = 500, progress: bool = False) -> pd.DataFrame:
    """Every shape of every ROI on an image, one row per shape (full-resolution px).

    Columns: ``roi_id, roi_name, roi_description, shape_id, kind, x, y, area, text, fill, stroke,
    geometry, rx, ry`` (see :func:`stimage_nb.omero.model.decode_shape`). ROIs are read through
    ``IRoi.findByImage`` in pages of ``page``.
    """
    require_omero()
    from omero.api import RoiOptions
    from omero.rtypes import rint
    from tqdm.auto import tqdm

    sess = as_session(conn)
    _, ctx = image_ctx(sess, image_id)
    rows = []
    offset = 0
    bar = tqdm(desc=f"ROIs of image {image_id}", unit="roi", disable=not progress)
    while True:
        opts = RoiOptions()
        opts.limit, opts.offset = rint(int(page)), rint(int(offset))
        try:
            res = sess.gateway.getRoiService().findByImage(int(image_id), opts, ctx)
        except Exception as e:  # noqa: BLE001
            raise translate_error(e, sess.target, f"reading the ROIs of image {image_id}") from None
        rois = list(res.rois or [])
        for r in rois:
            base = {"roi_id": M.unwrap(r.getId()), "roi_name": M.unwrap(r.getName()),
                    "roi_description": M.unwrap(r.getDescription())}
            for s in r.copyShapes():
                if s is None:
                    continue
                rows.append({**base, **M.decode_shape(s)})
        bar.update(len(rois))
        if len(rois) < page:
            break
        offset += page
    bar.close()
    cols = ["roi_id", "roi_name", "roi_description", "shape_id", "kind", "x", "y", "area", "text", "fill", "stroke",
            "geometry", "rx", "ry", "z", "t", "c"]
    df = pd.DataFrame(rows)
    for c in cols:
        if c not in df.columns:
            df[c] = pd.Series(dtype=object)
    return df[cols]


@dataclass
class Attachment:
    """A file attached to an image (FileAnnotation → OriginalFile)."""

    annotation_id: int
    file_id: int
    name: str
    ns: str | None
    mimetype: str | None
    size: int | None
    description: str | None

    @property
    def is_table(self) -> bool:
        return (self.mimetype or "") == "OMERO.tables"


@dataclass
class Annotations:
    """Map annotations, comments, tags and attached files of an image (and its ROIs)."""

    maps: list[dict] = field(default_factory=list)        # {id, ns, pairs, on}
    comments: list[dict] = field(default_factory=list)    # {id, ns, text, on}
    tags: list[dict] = field(default_factory=list)        # {id, ns, text, on}
    files: list[Attachment] = field(default_factory=list)
    group_id: int | None = None

    def ctx(self, gateway):
        """A call context in the image's group (for downloads and table reads)."""
        c = gateway.SERVICE_OPTS.copy()
        if self.group_id is not None:
            c.setOmeroGroup(self.group_id)
        return c

    def to_json(self) -> str:
        d = {"maps": self.maps, "comments": self.comments, "tags": self.tags,
             "files": [a.__dict__ for a in self.files]}
        return json.dumps(d, default=str)

    def map_value(self, key: str, default=None):
        """The first value of ``key`` in the image's map annotations (case-insensitive)."""
        for m in self.maps:
            if m.get("on") != "image":
                continue
            for k, v in m["pairs"]:
                if k.lower() == key.lower():
                    return v
        return default


def pull_annotations(conn, image_id: int) -> Annotations:
    """Map annotations, comments, tags and file attachments on an image and on its ROIs."""
    sess = as_session(conn)
    _, ctx = image_ctx(sess, image_id)
    q = sess.gateway.getQueryService()
    out = Annotations(group_id=ctx.getOmeroGroup())
    for query, on in ((Q_IMAGE_ANN_LINKS, "image"), (Q_ROI_ANN_LINKS, "roi")):
        try:
            links = q.findAllByQuery(query, _params(iid=int(image_id)), ctx)
        except Exception as e:  # noqa: BLE001
            raise translate_error(e, sess.target, f"reading the annotations of image {image_id}") from None
        for link in links or []:
            a = link.getChild()
            parent = M.unwrap(link.getParent().getId())
            kind = a.ice_id().split("::")[-1]
            base = {"id": M.unwrap(a.getId()), "ns": M.unwrap(a.getNs()), "on": on,
                    "parent_id": parent}
            if kind == "MapAnnotation":
                out.maps.append({**base, "pairs": M.map_pairs(a)})
            elif kind == "CommentAnnotation":
                out.comments.append({**base, "text": M.unwrap(a.getTextValue())})
            elif kind == "TagAnnotation":
                out.tags.append({**base, "text": M.unwrap(a.getTextValue())})
            elif kind == "FileAnnotation" and on == "image":
                f = a.getFile()
                loaded = f is not None and f.isLoaded()
                out.files.append(Attachment(
                    base["id"], M.unwrap(f.getId()) if f is not None else None,
                    M.unwrap(f.getName()) if loaded else "", base["ns"],
                    M.unwrap(f.getMimetype()) if loaded else None,
                    M.unwrap(f.getSize()) if loaded else None, M.unwrap(a.getDescription())))
    return out


def download_file(conn, attachment: Attachment, dest: str | os.PathLike, *, chunk: int = 4 << 20,
                  ctx=None) -> Path:
    """Download an attached file (RawFileStore, in chunks) atomically to ``dest``."""
    sess = as_session(conn)
    ctx = ctx if ctx is not None else sess.gateway.SERVICE_OPTS
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    store = sess.gateway.c.sf.createRawFileStore()
    try:
        store.setFileId(int(attachment.file_id), ctx)
        size = int(store.size())
        with open(tmp, "wb") as fh:
            pos = 0
            while pos < size:
                n = min(chunk, size - pos)
                fh.write(store.read(pos, n))
                pos += n
    except Exception as e:  # noqa: BLE001
        tmp.unlink(missing_ok=True)
        if _is_ice(e):
            raise translate_error(e, sess.target, f"downloading {attachment.name!r} (file {attachment.file_id})") from e
        raise
    finally:
        _close(store)
    os.replace(tmp, dest)
    return dest


# ----------------------------------------------------------------------------- counts sources
def read_omero_table(conn, attachment: Attachment, *, rows_per_read: int = 10000, ctx=None) -> pd.DataFrame:
    """An OMERO.table as a DataFrame (RoiColumn/ImageColumn values are ids; array columns as lists).

    Column names that a push had to make safe (``HLA-DRB1%2F3``: OMERO.tables refuse ``/``,
    :mod:`stimage_nb.names`) come back as the original names (``HLA-DRB1/3``); ``attrs["column_kinds"]``
    is keyed by the returned names.
    """
    import omero.model

    sess = as_session(conn)
    ctx = ctx if ctx is not None else sess.gateway.SERVICE_OPTS
    res = sess.gateway.c.sf.sharedResources()
    table = res.openTable(omero.model.OriginalFileI(int(attachment.file_id), False), ctx)
    if table is None:
        raise StimageInputError(f"OMERO file {attachment.file_id} ({attachment.name}) is not a readable table.")
    try:
        heads = table.getHeaders()
        n = int(table.getNumberOfRows())
        cols: dict[str, list] = {h.name: [] for h in heads}
        kinds = {h.name: type(h).__name__ for h in heads}
        for start in range(0, n, rows_per_read):
            data = table.read(list(range(len(heads))), start, min(n, start + rows_per_read))
            for col in data.columns:
                cols[col.name].extend(list(col.values))
    finally:
        _close(table)
    from ..names import looks_encoded, original_name, safe_name

    back = {c: original_name(c) for c in cols
            if looks_encoded(c) and safe_name(original_name(c), "omero_column") == c and original_name(c) not in cols}
    df = pd.DataFrame(cols).rename(columns=back)
    df.attrs["column_kinds"] = {back.get(c, c): k for c, k in kinds.items()}
    return df


def _counts_from_table(df: pd.DataFrame) -> tuple[pd.DataFrame, str] | None:
    """Counts (index = roi id or name) from a table with a RoiColumn or an id column."""
    kinds = df.attrs.get("column_kinds", {})
    key = next((c for c, k in kinds.items() if k == "RoiColumn"), None)
    key_kind = "roi_id"
    if key is None:
        for cand in ("spot", "spot_id", "barcode", "id", "name", "roi_name", "cell_id"):
            if cand in df.columns:
                key, key_kind = cand, "name"
                break
    if key is None:
        return None
    skip = {key, "x", "y", "pixel_x", "pixel_y", "image", "Image", "roi", "Roi", "shape", "Shape"}
    skip |= {c for c, k in kinds.items() if k in ("ImageColumn", "RoiColumn", "StringColumn", "WellColumn",
                                                  "PlateColumn", "DatasetColumn", "FileColumn", "MaskColumn")}
    genes = [c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c])
             and not pd.api.types.is_bool_dtype(df[c])]
    if not genes:
        return None
    counts = df[genes].astype(np.float32)
    counts.index = df[key].astype(np.int64 if key_kind == "roi_id" else str).to_numpy()
    return counts, key_kind


def _read_counts_file(path: Path) -> pd.DataFrame:
    name = path.name.lower()
    if name.endswith(".h5ad"):
        import anndata as ad

        a = ad.read_h5ad(path)
        X = a.layers["counts"] if "counts" in a.layers else a.X
        X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
        return pd.DataFrame(X.astype(np.float32), index=a.obs_names.astype(str), columns=a.var_names.astype(str))
    sep = "," if ".csv" in name else "\t"
    df = pd.read_csv(path, sep=sep, index_col=0, compression="infer")
    df.index = df.index.astype(str)
    return df


# ----------------------------------------------------------------------------- pull_section
def _regions_from_shapes(shapes: pd.DataFrame):
    """QuPath-style Region objects from polygon/rectangle shapes (full-resolution px)."""
    try:
        from ..qupath import Region
    except ImportError:  # pragma: no cover - qupath module absent: keep regions as plain dicts
        Region = None
    regs = []
    for _, s in shapes.iterrows():
        geom = s["geometry"]
        if not isinstance(geom, list) or len(geom) < 3:
            continue
        ring = [list(map(float, p)) for p in geom]
        if ring[0] != ring[-1]:
            ring.append(ring[0])
        d = {"name": s["roi_name"] or s["text"] or f"roi{s['roi_id']}", "classification": s["text"] or "",
             "colour": tuple(s["stroke"][:3]) if s["stroke"] else None,
             "geometry": {"type": "Polygon", "coordinates": [ring]}}
        regs.append(Region(**d) if Region is not None else d)
    return regs


def _obs_ids(obs: pd.DataFrame) -> list[str]:
    for col in ("roi_name", "text"):
        v = obs[col].fillna("").astype(str)
        if (v != "").all() and not v.duplicated().any():
            return v.tolist()
    return [f"roi{int(r)}" for r in obs["roi_id"]]


def pull_section(conn, image_id: int, *, name: str | None = None, counts: str | int | None = "auto",
                 observations: Sequence[str] | str = "auto", diameter_um: float | None = None,
                 include_predictions: bool = False, target_um_per_px: float | None = None,
                 um_per_px: float | None = None, genes: Sequence[str] | None = None, drop_missing_genes: bool = False,
                 dest: str | os.PathLike | None = None, progress: bool = True):
    """Build a training :class:`~stimage_nb.io.section.Section` entirely from OMERO objects.

    Parameters
    ----------
    conn
        Session or gateway.
    image_id
        The H&E image.
    name
        Section name (default: the image name without extension).
    counts
        ``"auto"`` (the first attached OMERO.table, h5ad or TSV/CSV whose rows match the ROIs),
        a FileAnnotation id, or None (no counts: a prediction-only section).
    observations
        Shape kinds that are observation points; ``"auto"``: points and ellipses (spots or cells),
        or polygons and masks when there are no points or ellipses (cell outlines). The remaining
        polygons and rectangles become regions (``obs["region"]``, ``uns["stimage_nb"]["regions"]``).
    diameter_um
        Spot/cell diameter for point ROIs (ellipses and outlines carry their own size); defaults to
        the image's map annotation ``spot_diameter_um``.
    include_predictions
        Keep ROIs that a stimage_nb push wrote (they are skipped by default).
    target_um_per_px, um_per_px, dest
        Passed to :func:`pull_image`.
    genes, drop_missing_genes
        Restrict the counts to a gene list (as :func:`stimage_nb.io.readers.read_manifest` does).

    Notes
    -----
    An attached Visium ``outs`` archive (``.zip``/``.tar.gz`` holding ``filtered_feature_bc_matrix.h5``)
    is used instead of ROIs when the image has no point/ellipse ROIs.
    """
    from ..io.section import Section, check_counts, make_section_adata, select_genes

    sess = as_session(conn)
    info = image_info(sess, image_id)
    slide = pull_image(sess, image_id, dest=dest, target_um_per_px=target_um_per_px, um_per_px=um_per_px,
                       progress=progress, info=info)
    src = pulled_source(slide.path)
    scale, um_full = float(src["image_scale"]), float(src["um_per_px_full"])
    nm = name or re.sub(r"\.(ome\.)?(tiff?|svs|ndpi|jpe?g|png|zarr|mrxs|scn|czi)$", "", info.name, flags=re.I)
    anns = pull_annotations(sess, image_id)
    shapes = pull_rois(sess, image_id, progress=progress)
    if not include_predictions and len(shapes):
        ours = shapes["roi_description"].map(lambda d: M.parse_tag(d) is not None)
        shapes = shapes[~ours.to_numpy(dtype=bool)]
    if observations == "auto":
        kinds = ["point", "ellipse"] if shapes["kind"].isin(["point", "ellipse"]).any() else ["polygon", "mask"]
    else:
        kinds = [observations] if isinstance(observations, str) else list(observations)
    obs_shapes = shapes[shapes["kind"].isin(kinds)].copy()
    region_shapes = shapes[shapes["kind"].isin(["polygon", "rectangle"]) & ~shapes["kind"].isin(kinds)]
    uns_omero = {"host": sess.target.host, "image_id": int(image_id), "image_name": info.name,
                 "annotations": anns.to_json()}
    patient = anns.map_value("patient")
    if len(obs_shapes) == 0:
        visium = _visium_attachment(sess, anns, image_id)
        if visium is not None:
            return _visium_section(visium, slide, nm, scale, um_full, uns_omero, genes, drop_missing_genes)
        log.warning("OMERO image %s has no %s ROIs: the section has no observation points", image_id, "/".join(kinds))
    obs_shapes = obs_shapes.drop_duplicates("roi_id")  # one observation per ROI (its first shape)
    ids = _obs_ids(obs_shapes) if len(obs_shapes) else []
    diam_default = diameter_um if diameter_um is not None else anns.map_value("spot_diameter_um")
    diam = []
    for _, s in obs_shapes.iterrows():
        if s["kind"] == "ellipse":
            diam.append(2.0 * math.sqrt(float(s["rx"]) * float(s["ry"])) * um_full)
        elif s["kind"] in ("polygon", "mask") and s["area"] > 0:
            diam.append(2.0 * math.sqrt(float(s["area"]) / math.pi) * um_full)
        elif diam_default is not None:
            diam.append(float(diam_default))
        else:
            raise StimageInputError(
                f"OMERO image {image_id}: point ROIs carry no size. Pass diameter_um= (CLI: --diameter-um), "
                "or add a map annotation spot_diameter_um to the image (e.g. 100 for legacy ST, 55 for Visium).")
    xy = obs_shapes[["x", "y"]].to_numpy(dtype=np.float64) * scale
    obs = pd.DataFrame({"roi_id": obs_shapes["roi_id"].astype("int64").to_numpy(),
                        "shape_kind": obs_shapes["kind"].astype(str).to_numpy(),
                        "omero_text": obs_shapes["text"].fillna("").astype(str).to_numpy()})
    X, gene_names, csrc = None, None, None
    if counts is not None and len(obs_shapes):
        found = _find_counts(sess, anns, obs_shapes, ids, counts, image_id)
        if found is not None:
            X, gene_names, csrc = found
    uns = {"section": nm, "patient": patient, "image": str(slide.path), "um_per_px": slide.um_per_px,
           "image_scale": scale, "counts": csrc, "omero": uns_omero, "source": "omero",
           "platform": str(anns.map_value("platform") or "unknown").lower()}
    adata = make_section_adata(ids, xy.reshape(-1, 2), np.asarray(diam, dtype=np.float64), counts=X, genes=gene_names,
                               obs=obs, uns=uns)
    if X is not None:
        check_counts(adata.X, csrc)
    regions = _regions_from_shapes(region_shapes) if len(region_shapes) else []
    if regions:
        try:
            from ..qupath import assign_regions, regions_json

            assign_regions(adata, regions, image_scale=scale)
            adata.uns[K.UNS][K.REGIONS] = regions_json(regions)
        except ImportError:  # pragma: no cover
            adata.uns[K.UNS][K.REGIONS] = json.dumps(regions)
    sec = Section(nm, adata, slide.path, slide.um_per_px, patient, {"image_scale": scale, "omero_image_id": int(image_id)})
    sec.image = slide
    sec, dropped = select_genes(sec, genes, drop_missing=drop_missing_genes, source=csrc)
    if dropped:
        sec.adata.uns[K.UNS]["dropped_genes"] = dropped
    log.info("pulled section %s from OMERO image %s: %d observations, %d genes, %d regions", nm, image_id,
             sec.adata.n_obs, sec.adata.n_vars, len(regions))
    return sec


def _find_counts(sess, anns: Annotations, obs_shapes: pd.DataFrame, ids: list[str], counts, image_id):
    """(X, genes, source) from the chosen/auto-detected attachment, or None."""
    roi_ids = obs_shapes["roi_id"].astype("int64").to_numpy()
    cands = [a for a in anns.files if a.ns not in M.OUR_NAMESPACES]
    if counts != "auto":
        cands = [a for a in anns.files if a.annotation_id == int(counts)]
        if not cands:
            raise StimageInputError(f"OMERO image {image_id}: no attachment with annotation id {counts} "
                                    f"(attached: {[(a.annotation_id, a.name) for a in anns.files]}).")
    cache = cache_dir() / "omero" / _safe(sess.target.host) / "files"
    for a in cands:
        try:
            if a.is_table:
                got = _counts_from_table(read_omero_table(sess, a, ctx=anns.ctx(sess.gateway)))
                if got is None:
                    continue
                df, key_kind = got
            elif re.search(r"\.(h5ad|tsv|csv|txt)(\.gz)?$", a.name or "", re.I):
                path = cache / f"{a.file_id}-{_safe(a.name)}"
                if not path.is_file():
                    download_file(sess, a, path, ctx=anns.ctx(sess.gateway))
                df, key_kind = _read_counts_file(path), "name"
            else:
                continue
        except StimageInputError:
            if counts != "auto":
                raise
            continue
        keys = roi_ids if key_kind == "roi_id" else np.asarray(ids)
        present = pd.Index(keys).isin(df.index)
        if present.mean() < 0.5:
            if counts != "auto":
                raise StimageInputError(
                    f"OMERO attachment {a.annotation_id} ({a.name}): only {int(present.sum())} of {len(keys)} ROIs "
                    f"have a row (matched by {'ROI id' if key_kind == 'roi_id' else 'ROI name'}).")
            continue
        if not present.all():
            log.warning("%s: %d of %d observations have no counts row; they get zeros", a.name,
                        int((~present).sum()), len(keys))
        df = df[~df.index.duplicated()]
        X = df.reindex(keys).fillna(0.0).to_numpy(dtype=np.float32)
        src = f"omero://{sess.target.host}/annotation/{a.annotation_id} ({a.name})"
        return X, [str(g) for g in df.columns], src
    if counts != "auto":
        raise StimageInputError(f"OMERO attachment {counts} holds no counts table matching the ROIs.")
    log.info("OMERO image %s: no attached counts table matches its ROIs (prediction-only section)", image_id)
    return None


def _visium_attachment(sess, anns: Annotations, image_id) -> Path | None:
    """Download and unpack an attached Visium ``outs`` archive; the outs folder, or None."""
    for a in anns.files:
        if not re.search(r"\.(zip|tar\.gz|tgz|tar)$", a.name or "", re.I):
            continue
        root = cache_dir() / "omero" / _safe(sess.target.host) / "files" / f"{a.file_id}-{_safe(a.name)}.d"
        if not root.is_dir():
            arch = root.with_suffix("")
            if not arch.is_file():
                download_file(sess, a, arch, ctx=anns.ctx(sess.gateway))
            tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if zipfile.is_zipfile(arch):
                with zipfile.ZipFile(arch) as z:
                    z.extractall(tmp)
            else:
                with tarfile.open(arch) as t:
                    t.extractall(tmp, filter="data")
            os.replace(tmp, root)
        hits = sorted(root.rglob("filtered_feature_bc_matrix.h5"))
        if hits:
            return hits[0].parent
    return None


def _visium_section(outs: Path, slide: SlideImage, name, scale, um_full, uns_omero, genes, drop_missing_genes):
    from ..io.readers import read_visium

    sec = read_visium(outs, image=slide.path, name=name, genes=genes, drop_missing_genes=drop_missing_genes)
    a = sec.adata
    if scale != 1.0:
        a.obsm[K.SPATIAL] = a.obsm[K.SPATIAL] * scale
        a.obs[K.PIXEL_X] = a.obsm[K.SPATIAL][:, 0]
        a.obs[K.PIXEL_Y] = a.obsm[K.SPATIAL][:, 1]
    vis_um = float(a.uns[K.UNS]["um_per_px"])
    if abs(vis_um - um_full) / um_full > 0.05:
        log.warning("%s: Visium scale factors give %.4g µm/px but OMERO records %.4g µm/px; using OMERO's",
                    outs, vis_um, um_full)
    a.uns[K.UNS].update({"image": str(slide.path), "um_per_px": slide.um_per_px, "image_scale": scale,
                         "omero": uns_omero})
    sec.um_per_px = slide.um_per_px
    sec.image = slide
    return sec
