"""Push predictions back to OMERO: ROIs, OMERO.tables, attachments; replace, resume, remove.

What one push of a prediction AnnData (``PRED_DIR/<section>.h5ad``) onto an image writes:

- **spots** (up to ``max_rois``, default 50,000): one ROI per observation, named by its id, holding
  one ellipse of the spot's diameter filled with a colour from a chosen gene's predicted mean
  (viridis, log1p, 1st–99th percentile) or from the predicted cell type (the shared class colours),
  with a short text (``"ERBB2 12.3 (SD 4.1)"`` / ``"Tumor p=0.62"``); saved with
  ``saveAndReturnIds`` in batches (default 500) with a progress bar. **Cells** (more than
  ``max_rois``, or ``rois=False``): no ROI per cell; the tables, files and a cell-type label image
  (OME-TIFF) carry them.
- **OMERO.tables** with the predictive mean and both variances for every gene, split to respect the
  ~500-column limit (:mod:`stimage_nb.omero.tables`), with a ``Roi`` column when ROIs were pushed.
- **attachments**: the prediction itself (h5ad) and its QuPath GeoJSON (``.geojson.gz``).
- a **run record** (MapAnnotation, namespace ``.../run``) with the provenance and the state.

Every object carries a namespace and the tag ``stimage_nb:run=<run id>;image=<id>;fp=<fingerprint>``
(in ``description``; ROIs, which have no namespace, carry it too). Pushing the same run onto the
same image again therefore finds its earlier objects: identical content → nothing to do; a push that
stopped half-way (connection dropped) → it resumes, re-sending only what is missing; different
content → the old objects are deleted and replaced. :func:`remove_run` deletes a run cleanly and
``dry_run=True`` reports what would be written or deleted without writing anything.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .. import _keys as K
from ..atomic import write_atomic
from ..errors import StimageInputError
from ..io.prediction import read_prediction, write_h5ad
from ..names import safe_name
from . import model as M
from . import tables as T
from .connection import OmeroConnectionError, OmeroError, as_session, is_connection_loss, require_omero, translate_error
from .pull import _params, image_info

log = logging.getLogger(__name__)

MAX_ROIS = 50_000
BATCH = 500
MAX_RETRIES = 3
FILL_ALPHA = 140
PUSH_FORMAT = 1

# HQL used by this module (the test double in tests/omero answers exactly these).
Q_RUN_ROIS = ("select r.id, r.name, r.description from Roi as r where r.image.id = :iid "
              "and r.description like :tag order by r.id")
Q_RUN_ANNS = "select a.id, a.ns, a.description from Annotation as a where a.description like :tag"
Q_RUN_FILES = "select fa.id, f.id from FileAnnotation as fa join fa.file as f where fa.description like :tag"
Q_RUN_TABLE_FILES = "select f.id, f.name from OriginalFile as f where f.name like :name"
UPLOAD_CHUNK = 1 << 20


# ----------------------------------------------------------------------------- the prediction
def load_prediction(pred):
    """The prediction (object or ``.h5ad`` path, strictly checked) and its source path or ``None``."""
    src = pred if isinstance(pred, (str, os.PathLike)) else None
    return read_prediction(pred, strict=True), src


def fingerprint(pred, options: dict) -> str:
    """Hash of what a push writes: observation ids and centres, predicted values, and the options."""
    h = hashlib.blake2b(digest_size=10)
    h.update(repr(sorted(options.items())).encode())
    h.update("\x00".join(map(str, pred.obs_names)).encode())
    for arr in (pred.obsm[K.SPATIAL], pred.obs[K.DIAMETER_UM].to_numpy(), pred.X,
                pred.layers.get(K.ALEATORIC), pred.layers.get(K.EPISTEMIC),
                pred.obsm.get(K.CELLTYPE_MEAN), pred.obsm.get(K.CELLTYPE_STD)):
        if arr is None:
            h.update(b"-")
            continue
        if hasattr(arr, "toarray"):
            arr = arr.toarray()
        a = np.ascontiguousarray(np.asarray(arr, dtype=np.float32))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    h.update(" ".join(map(str, pred.var_names)).encode())
    if K.CELLTYPE_MEAN in pred.obsm:
        h.update(" ".join(map(str, pred.obsm[K.CELLTYPE_MEAN].columns)).encode())
    return h.hexdigest()


def _prov(pred) -> dict:
    return dict(pred.uns.get(K.UNS) or {})


def _full_res_geometry(pred) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(xy full-res px, radius full-res px, µm/px of full resolution, image_scale)."""
    prov = _prov(pred)
    scale = float(prov.get("image_scale") or 1.0)
    um_img = float(prov["um_per_px"])
    um_full = um_img * scale
    xy = np.asarray(pred.obsm[K.SPATIAL], dtype=np.float64)[:, :2] / scale
    r = pred.obs[K.DIAMETER_UM].to_numpy(dtype=np.float64) / 2.0 / um_full
    return xy, r, um_full, scale


def _as_dense(M) -> np.ndarray:
    return np.asarray(M.toarray() if hasattr(M, "toarray") else M)


def roi_styles(pred, colour_by: str | None) -> tuple[list[str], np.ndarray, str]:
    """Per observation: text, (n, 4) RGBA fill, and a legend line describing the colour scale."""
    from .._colours import class_colours

    n = pred.n_obs
    if colour_by in (None, "celltype") and K.CELLTYPE_MEAN in pred.obsm and pred.obsm[K.CELLTYPE_MEAN].shape[1]:
        P = pred.obsm[K.CELLTYPE_MEAN]
        names = [str(c) for c in P.columns]
        arr = np.asarray(P, dtype=np.float64)
        best = np.nanargmax(np.nan_to_num(arr, nan=-1.0), axis=1)
        cols = class_colours(names, _prov(pred).get(K.CLASS_COLOURS))
        rgb = np.array([cols[names[i]] for i in best], dtype=np.int64)
        texts = [f"{names[i]} p={arr[k, i]:.2f}" for k, i in enumerate(best)]
        legend = "cell type: " + ", ".join(f"{c}=#{r:02X}{g:02X}{b:02X}" for c, (r, g, b) in cols.items())
    else:
        if colour_by in (None, "celltype"):
            if colour_by == "celltype":
                raise StimageInputError("colour_by='celltype' but the prediction has no obsm['celltype_mean'].")
            colour_by = str(pred.var_names[0])
        if colour_by not in pred.var_names:
            raise StimageInputError(f"colour_by={colour_by!r} is neither 'celltype' nor a predicted gene "
                                    f"(e.g. {list(pred.var_names[:5])}).")
        j = pred.var_names.get_loc(colour_by)
        mean = _as_dense(pred.X[:, j]).ravel().astype(np.float64)
        var = np.zeros(n)
        for layer in (K.ALEATORIC, K.EPISTEMIC):
            if layer in pred.layers:
                var = var + _as_dense(pred.layers[layer][:, j]).ravel()
        sd = np.sqrt(np.clip(var, 0, None))
        rgb8, (lo, hi) = M.value_colours(mean)
        rgb = rgb8.astype(np.int64)
        texts = [f"{colour_by} {m:.3g} (SD {s:.2g})" for m, s in zip(mean, sd)]
        legend = f"{colour_by} predicted mean, viridis over log1p in [{math.expm1(lo):.3g}, {math.expm1(hi):.3g}]"
    fill = np.concatenate([rgb, np.full((n, 1), FILL_ALPHA)], axis=1)
    return texts, fill, legend


def roi_geometry(pred, colour_by: str | None = None) -> tuple:
    """(names, xy, radius, texts, fill) of every observation, in full-resolution px (see build_rois)."""
    xy, r, _, _ = _full_res_geometry(pred)
    texts, fill, _ = roi_styles(pred, colour_by)
    return list(map(str, pred.obs_names)), xy, r, texts, fill


def build_rois(pred, image_id: int, tag: str, *, colour_by: str | None = None, rows: Sequence[int] | None = None,
               geometry: tuple | None = None):
    """omero.model RoiI objects (one ellipse each) for the given observation rows (default all).

    ``geometry`` is :func:`roi_geometry`'s result, computed once when building in batches.
    """
    names, xy, r, texts, fill = geometry or roi_geometry(pred, colour_by)
    out = []
    for i in (range(pred.n_obs) if rows is None else rows):
        f = fill[i]
        shape = M.ellipse(xy[i, 0], xy[i, 1], r[i], text=texts[i], fill=tuple(int(c) for c in f),
                          stroke=(int(f[0]), int(f[1]), int(f[2]), 255))
        out.append(M.roi(image_id, [shape], name=str(names[i]), description=tag))
    return out


def celltype_label_image(pred, size_xy_full: tuple[int, int], *, um_per_px_label: float = 2.0
                         ) -> tuple[np.ndarray, float, dict[int, str]]:
    """A uint8/uint16 raster of the predicted cell type (value k+1 = k-th type, 0 = none) at ``um_per_px_label``.

    Each observation is painted as a disc of its diameter (at least one pixel). Returns the image,
    its µm/px and the value → cell-type legend.
    """
    P = pred.obsm[K.CELLTYPE_MEAN]
    names = [str(c) for c in P.columns]
    best = np.nanargmax(np.nan_to_num(np.asarray(P, dtype=np.float64), nan=-1.0), axis=1) + 1
    xy, r, um_full, _ = _full_res_geometry(pred)
    f = um_full / float(um_per_px_label)
    W, H = max(1, int(math.ceil(size_xy_full[0] * f))), max(1, int(math.ceil(size_xy_full[1] * f)))
    lab = np.zeros((H, W), dtype=np.uint8 if len(names) < 255 else np.uint16)
    cx, cy, rr = xy[:, 0] * f, xy[:, 1] * f, np.maximum(r * f, 0.5)
    for rad in np.unique(np.round(rr * 2) / 2):  # group by radius (half-pixel steps) and paint vectorised
        sel = np.nonzero(np.round(rr * 2) / 2 == rad)[0]
        k = int(math.ceil(rad))
        dy, dx = np.mgrid[-k:k + 1, -k:k + 1]
        keep = dx ** 2 + dy ** 2 <= max(rad, 0.5) ** 2
        dx, dy = dx[keep], dy[keep]
        X = (np.floor(cx[sel])[:, None] + dx[None, :]).astype(np.int64)
        Y = (np.floor(cy[sel])[:, None] + dy[None, :]).astype(np.int64)
        V = np.broadcast_to(best[sel][:, None], X.shape)
        ok = (X >= 0) & (X < W) & (Y >= 0) & (Y < H)
        lab[Y[ok], X[ok]] = V[ok]
    return lab, float(um_per_px_label), {i + 1: n for i, n in enumerate(names)}


def _write_label_tiff(lab: np.ndarray, um: float, path: Path) -> Path:
    import tifffile

    return write_atomic(path, lambda tmp: tifffile.imwrite(
        tmp, lab, ome=True, compression="zlib", photometric="minisblack",
        metadata={"axes": "YX", "PhysicalSizeX": um, "PhysicalSizeY": um,
                  "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}))


# ----------------------------------------------------------------------------- server state of a run
@dataclass
class RunState:
    """What a (run, image) already has on the server."""

    rois: pd.DataFrame                     # id, name, fp
    annotations: pd.DataFrame              # id, ns, fp, state, obj, file_id
    orphan_files: list = field(default_factory=list)  # table files of the run that no annotation holds

    @property
    def record(self) -> pd.DataFrame:
        return self.annotations[self.annotations["ns"] == M.NS_RUN]

    def is_empty(self) -> bool:
        return len(self.rois) == 0 and len(self.annotations) == 0 and not self.orphan_files


def _projection(gw, query: str, params, ctx) -> list[list]:
    rows = gw.getQueryService().projection(query, params, ctx)
    return [[M.unwrap(v) for v in row] for row in rows or []]


def _paged_projection(gw, query: str, params_fn, ctx, page: int = 10000) -> list[list]:
    out, off = [], 0
    while True:
        p = params_fn()
        p.page(off, page)
        rows = _projection(gw, query, p, ctx)
        out.extend(rows)
        if len(rows) < page:
            return out
        off += page


def run_state(gw, image_id: int, run_id: str, ctx) -> RunState:
    """Find every object of (run, image): ROIs by their description tag, annotations and their files."""
    like = M.run_tag_prefix(run_id, image_id) + "%"
    rows = _paged_projection(gw, Q_RUN_ROIS, lambda: _params(iid=int(image_id), tag=like), ctx)
    recs = []
    for rid, name, desc in rows:
        t = M.parse_tag(desc)
        if t and t.get("run") == run_id and t.get("image") == str(int(image_id)):
            recs.append({"id": int(rid), "name": name, "fp": t.get("fp")})
    rois = pd.DataFrame(recs, columns=["id", "name", "fp"])
    files = {int(a): int(f) for a, f in _projection(gw, Q_RUN_FILES, _params(tag=like), ctx)}
    anns = []
    for aid, ns, desc in _projection(gw, Q_RUN_ANNS, _params(tag=like), ctx):
        t = M.parse_tag(desc)
        if t and t.get("run") == run_id and t.get("image") == str(int(image_id)):
            anns.append({"id": int(aid), "ns": ns, "fp": t.get("fp"), "state": t.get("state"), "obj": t.get("obj"),
                         "file_id": files.get(int(aid))})
    held = {a["file_id"] for a in anns}
    tprefix = T.table_prefix(run_id, image_id)
    orphans = [int(fid) for fid, name in _projection(gw, Q_RUN_TABLE_FILES, _params(name=tprefix + "%"), ctx)
               if str(name).startswith(tprefix) and int(fid) not in held]
    return RunState(rois, pd.DataFrame(anns, columns=["id", "ns", "fp", "state", "obj", "file_id"]), orphans)


def _delete(gw, targets: dict[str, list[int]], ctx, *, chunk: int = 5000) -> None:
    """Delete objects with Delete2 commands, waiting for each and failing on errors or timeouts.

    ROIs go in chunks of ``chunk``; annotations and their original files go together in one request
    (deleting a FileAnnotation takes its file along, so a second request for the file would name an
    object that no longer exists).
    """
    import omero.cmd

    requests = []
    rois = sorted({int(i) for i in targets.get("Roi", [])})
    for a in range(0, len(rois), chunk):
        requests.append({"Roi": rois[a:a + chunk]})
    rest = {k: sorted({int(i) for i in v}) for k, v in targets.items() if k != "Roi" and v}
    if rest:
        requests.append(rest)
    for t in requests:
        handle = gw.c.sf.submit(omero.cmd.Delete2(targetObjects=t), ctx)
        gw.c.waitOnCmd(handle, loops=1200, ms=500, failonerror=True, failontimeout=True, closehandle=True)


@contextmanager
def _in_group(gw, group_id):
    """Make the gateway's default context the image's group (new objects are created there)."""
    opts = gw.SERVICE_OPTS
    old = opts.getOmeroGroup()
    if group_id is not None:
        opts.setOmeroGroup(int(group_id))
    try:
        yield
    finally:
        opts.setOmeroGroup(old)  # None removes the key again


# ----------------------------------------------------------------------------- plan and result
@dataclass
class PushPlan:
    """What a push will do (``dry_run=True`` returns only this)."""

    image_id: int
    run_id: str
    section: str
    fingerprint: str
    mode: str                                  # fresh | resume | replace | up-to-date
    n_obs: int
    rois_to_write: int
    rois_kept: int
    delete: dict = field(default_factory=dict)  # {"Roi": [...], "Annotation": [...], "OriginalFile": [...]}
    tables: list = field(default_factory=list)  # [(name, rows, columns, "write"|"keep")]
    files: list = field(default_factory=list)   # [(name, "write"|"keep")]
    colour_legend: str = ""
    renamed: dict = field(default_factory=dict)  # {gene or P(<cell type>): OMERO.table column name} (stimage_nb.names)

    def __str__(self) -> str:
        lines = [f"push run {self.run_id!r} of section {self.section!r} onto OMERO image {self.image_id}: "
                 f"{self.mode} (fingerprint {self.fingerprint})",
                 f"  ROIs: {self.rois_to_write} to write, {self.rois_kept} already there ({self.n_obs} observations)",
                 "  delete: " + (", ".join(f"{len(v)} {k}" for k, v in self.delete.items() if v) or "nothing")]
        for name, rows, cols, what in self.tables:
            lines.append(f"  table {name!r}: {rows} rows x {cols} columns ({what})")
        for name, what in self.files:
            lines.append(f"  file {name!r} ({what})")
        if self.colour_legend:
            lines.append(f"  colours: {self.colour_legend}")
        if self.renamed:
            lines.append(f"  {_renamed_line(self.renamed)}")
        return "\n".join(lines)


def _renamed_line(renamed: dict) -> str:
    shown = ", ".join(f"{o!r} -> {c!r}" for o, c in list(renamed.items())[:6])
    more = f" (+{len(renamed) - 6} more)" if len(renamed) > 6 else ""
    return (f"renamed columns (OMERO.tables refuse '/' in column names; the description keeps the name, "
            f"stimage_nb.names.original_name maps it back): {shown}{more}")


@dataclass
class PushResult:
    """What a push did."""

    plan: PushPlan
    roi_ids: pd.Series                          # observation id -> ROI id
    table_file_ids: dict = field(default_factory=dict)
    file_annotation_ids: dict = field(default_factory=dict)
    record_id: int | None = None
    seconds: float = 0.0
    rois_written: int = 0
    attempts: int = 1

    def __repr__(self) -> str:
        return (f"PushResult(image={self.plan.image_id}, run={self.plan.run_id!r}, mode={self.plan.mode}, "
                f"rois_written={self.rois_written}, rois={len(self.roi_ids)}, tables={len(self.table_file_ids)}, "
                f"files={len(self.file_annotation_ids)}, {self.seconds:.1f} s)")


# ----------------------------------------------------------------------------- push
def push_predictions(conn, image_id: int, pred, *, run_id: str | None = None, colour_by: str | None = None,
                     rois: bool | str = "auto", max_rois: int = MAX_ROIS, batch_size: int = BATCH,
                     tables: bool = True, max_columns: int = T.MAX_COLUMNS, attach_h5ad: bool = True,
                     attach_geojson: bool = True, label_image: bool | str = "auto", label_um_per_px: float = 2.0,
                     check_image: bool = True, force: bool = False, dry_run: bool = False,
                     progress: bool = True) -> PushResult | PushPlan:
    """Push one section's predictions onto an OMERO image (see the module docstring).

    Parameters
    ----------
    conn
        :class:`~stimage_nb.omero.connection.OmeroSession` (reconnects and resumes by itself after a
        dropped connection) or a connected BlitzGateway (run the push again to resume).
    image_id
        The OMERO image the prediction was made on (its full-resolution pixel frame).
    pred
        Prediction AnnData or ``.h5ad`` path.
    run_id
        Default ``uns["stimage_nb"]["run_id"]``.
    colour_by
        ``"celltype"`` (default when cell types were predicted) or a gene name.
    rois
        ``"auto"``: one ROI per observation when there are at most ``max_rois``; True/False force it.
    batch_size
        ROIs per ``saveAndReturnIds`` call.
    tables, max_columns
        Write OMERO.tables, each at most ``max_columns`` columns wide.
    attach_h5ad, attach_geojson
        Attach the prediction (h5ad) and its QuPath GeoJSON (``.geojson.gz``).
    label_image, label_um_per_px
        Attach a cell-type label image (OME-TIFF at ``label_um_per_px``); ``"auto"``: when no ROIs
        are written and cell types were predicted.
    check_image
        Refuse when the prediction's pixel size or extent does not fit the image (wrong image id).
    force
        Replace the run's objects even when identical content is already there.
    dry_run
        Only report (a :class:`PushPlan`); nothing is written or deleted.
    progress
        Progress bars.
    """
    require_omero()
    pred, src = load_prediction(pred)
    prov = _prov(pred)
    run_id = M.check_run_id(run_id or prov.get("run_id"))
    if rois == "auto":
        do_rois = pred.n_obs <= int(max_rois)
        if not do_rois:
            log.info("%d observations > max_rois=%d: no ROI per observation (tables, files and a label image "
                     "carry them)", pred.n_obs, max_rois)
    else:
        do_rois = bool(rois)
    has_ct = K.CELLTYPE_MEAN in pred.obsm and pred.obsm[K.CELLTYPE_MEAN].shape[1] > 0
    do_label = (not do_rois and has_ct) if label_image == "auto" else bool(label_image)
    if do_label and not has_ct:
        raise StimageInputError("label_image=True needs predicted cell types (obsm['celltype_mean']).")
    opts = {"rois": do_rois, "colour_by": colour_by, "tables": bool(tables), "max_columns": int(max_columns),
            "h5ad": bool(attach_h5ad), "geojson": bool(attach_geojson), "label": bool(do_label),
            "label_um": float(label_um_per_px), "format": PUSH_FORMAT}
    fp = fingerprint(pred, opts)
    sess = as_session(conn)
    attempts = 0
    while True:
        attempts += 1
        try:
            res = _push_once(sess, int(image_id), pred, src, run_id, fp, opts, batch_size=int(batch_size),
                             check_image=check_image, force=force and attempts == 1, dry_run=dry_run,
                             progress=progress)
            if isinstance(res, PushResult):
                res.attempts = attempts
            return res
        except OmeroConnectionError as e:  # already translated (e.g. by get_image): a reconnect may cure it
            if sess.factory is not None and attempts <= MAX_RETRIES:
                log.warning("connection to %s lost during the push; reconnecting and resuming (%d/%d)",
                            sess.target, attempts, MAX_RETRIES)
                sess.reconnect()
                continue
            raise e
        except (OmeroError, StimageInputError):
            raise
        except Exception as e:  # noqa: BLE001
            if is_connection_loss(e) and sess.factory is not None and attempts <= MAX_RETRIES:
                log.warning("connection to %s lost during the push (%s); reconnecting and resuming (%d/%d)",
                            sess.target, type(e).__name__, attempts, MAX_RETRIES)
                sess.reconnect()
                continue
            if type(e).__module__.startswith(("Ice", "omero", "Glacier2")):
                raise translate_error(e, sess.target, f"pushing run {run_id} onto image {image_id} (nothing is "
                                      "lost: run the same push again to resume)") from None
            raise


def _plan(state: RunState, pred, image_id, run_id, fp, opts, specs, file_names, force, legend) -> PushPlan:
    same = state.rois["fp"] == fp if len(state.rois) else pd.Series(dtype=bool)
    rec = state.record
    rec_same = rec[rec["fp"] == fp]
    names = pd.Index(map(str, pred.obs_names))
    if state.is_empty():
        mode = "fresh"
    elif force or (len(rec) and not len(rec_same)) or (len(state.rois) and not same.any() and not len(rec_same)):
        mode = "replace"
    else:
        mode = "resume"
    delete = {"Roi": [], "Annotation": [], "OriginalFile": []}
    kept_rois = pd.DataFrame(columns=["id", "name", "fp"])
    anns = state.annotations
    if mode == "replace":
        delete["Roi"] = state.rois["id"].tolist()
        delete["Annotation"] = anns["id"].tolist()
        delete["OriginalFile"] = [int(f) for f in anns["file_id"].dropna()]
        anns = anns.iloc[0:0]
    elif mode == "resume":
        r = state.rois
        ok = (r["fp"] == fp) & r["name"].astype(str).isin(names) & ~r.duplicated("name", keep="first")
        if not opts["rois"]:
            ok &= False
        kept_rois = r[ok]
        delete["Roi"] = r.loc[~ok, "id"].tolist()
        # stale: another fingerprint, or a table/file that was never finished (records with this
        # fingerprint are updated in place, not deleted)
        stale = (anns["fp"] != fp) | ((anns["ns"] != M.NS_RUN) & (anns["state"] != "done"))
        delete["Annotation"] = anns.loc[stale, "id"].tolist()
        delete["OriginalFile"] = [int(f) for f in anns.loc[stale, "file_id"].dropna()]
        anns = anns[~stale]
    if state.orphan_files:  # a table created just before a dropped connection, never linked
        delete["OriginalFile"] = sorted(set(delete["OriginalFile"]) | set(state.orphan_files))
    done_objs = set(anns.loc[(anns["ns"] != M.NS_RUN) & (anns["state"] == "done"), "obj"].dropna())
    n_write = (len(names) - len(kept_rois)) if opts["rois"] else 0
    tables = [(s.name, s.n_rows, s.n_columns, "keep" if _obj(s.name) in done_objs else "write") for s in specs]
    files = [(f, "keep" if _obj(f) in done_objs else "write") for f in file_names]
    if mode == "resume" and n_write == 0 and not any(w == "write" for *_, w in tables) \
            and not any(w == "write" for _, w in files) and not any(delete.values()) \
            and (rec_same["state"] == "complete").any():
        mode = "up-to-date"
    return PushPlan(int(image_id), run_id, str(_prov(pred).get("section") or ""), fp, mode, pred.n_obs, n_write,
                    len(kept_rois), delete, tables, files, legend, T.renamed_columns(specs))


def _obj(name: str) -> str:
    """An object name usable inside a tag."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name)[:100]


def _file_names(pred, opts) -> list[str]:
    sec = safe_name(str(_prov(pred).get("section") or "prediction"), "file_name")
    out = []
    if opts["h5ad"]:
        out.append(f"{sec}.h5ad")
    if opts["geojson"]:
        out.append(f"{sec}.geojson.gz")
    if opts["label"]:
        out.append(f"{sec}.celltypes.ome.tif")
    return out


def _check_image(info, pred, image_id):
    xy, r, um_full, scale = _full_res_geometry(pred)
    if info.um_per_px is not None and abs(info.um_per_px - um_full) / um_full > 0.05:
        raise StimageInputError(
            f"OMERO image {image_id} ({info.name}) has {info.um_per_px:.4g} µm/px but the prediction was made on "
            f"an image of {um_full:.4g} µm/px at full resolution. Is this the right image? (check_image=False, "
            "CLI --no-check-image, pushes anyway.)")
    over_x = xy[:, 0].max() > info.size_x * 1.01 or xy[:, 1].max() > info.size_y * 1.01
    if over_x or xy.min() < -0.01 * max(info.size_x, info.size_y):
        raise StimageInputError(
            f"OMERO image {image_id} ({info.name}) is {info.size_x}x{info.size_y} px but the prediction's centres "
            f"reach ({xy[:, 0].max():.0f}, {xy[:, 1].max():.0f}) full-resolution px. Wrong image id, or a "
            "prediction made at another resolution without uns['stimage_nb']['image_scale']?")


def _push_once(sess, image_id, pred, src, run_id, fp, opts, *, batch_size, check_image, force, dry_run, progress):
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    gw = sess.gateway
    info = image_info(sess, image_id, with_levels=False)
    if check_image:
        _check_image(info, pred, image_id)
    ctx = gw.SERVICE_OPTS.copy()
    if info.group_id is not None:
        ctx.setOmeroGroup(int(info.group_id))
    specs = T.plan_tables(pred, run_id=run_id, max_columns=opts["max_columns"], with_roi=opts["rois"],
                          image_id=image_id) if opts["tables"] else []
    if T.renamed_columns(specs):  # checked before anything is written (the server refuses '/' mid-push)
        log.warning("%s", _renamed_line(T.renamed_columns(specs)))
    texts_legend = roi_styles(pred, opts["colour_by"])[2] if opts["rois"] else ""
    state = run_state(gw, image_id, run_id, ctx)
    plan = _plan(state, pred, image_id, run_id, fp, opts, specs, _file_names(pred, opts), force, texts_legend)
    log.info("%s", plan)
    if dry_run:
        return plan
    if plan.mode == "up-to-date":
        anns = state.annotations
        ids = (_roi_map(gw, image_id, run_id, fp, ctx).reindex(list(map(str, pred.obs_names))).astype("int64")
               if opts["rois"] else pd.Series(dtype="int64"))
        tabs = anns[anns["ns"] == M.NS_TABLE]
        files = anns[anns["ns"] == M.NS_FILE]
        return PushResult(plan, ids, {o: int(f) for o, f in zip(tabs["obj"], tabs["file_id"]) if pd.notna(f)},
                          {o: int(i) for o, i in zip(files["obj"], files["id"])},
                          int(state.record["id"].iloc[0]) if len(state.record) else None,
                          time.perf_counter() - t0, 0)
    upd = gw.getUpdateService()
    with _in_group(gw, info.group_id):
        # 1. deletions (replaced run, stale leftovers)
        todel = {k: v for k, v in plan.delete.items() if v}
        if todel:
            log.info("deleting %s", {k: len(v) for k, v in todel.items()})
            _delete(gw, todel, ctx)
        # 2. the run record (state=incomplete until everything is written)
        rec = state.record[state.record["fp"] == fp] if plan.mode == "resume" else state.record.iloc[0:0]
        pairs = _record_pairs(pred, src, run_id, fp, opts, plan, state="incomplete")
        if len(rec):
            record_id = int(rec["id"].iloc[0])
            _update_record(gw, record_id, M.run_tag(run_id, image_id, fp, state="incomplete"), pairs, ctx)
        else:
            ann = M.map_annotation(pairs, ns=M.NS_RUN, description=M.run_tag(run_id, image_id, fp, state="incomplete"))
            link = upd.saveAndReturnObject(M.image_link(image_id, ann), ctx)
            record_id = int(M.unwrap(link.getChild().getId()))
        # 3. ROIs in batches; ids are mapped by name afterwards (saveAndReturnIds returns them unordered)
        written = 0
        if opts["rois"]:
            have = set(state.rois.loc[(state.rois["fp"] == fp), "name"].astype(str)) if plan.mode == "resume" else set()
            todo = [i for i, nm in enumerate(map(str, pred.obs_names)) if nm not in have]
            tag = M.run_tag(run_id, image_id, fp, ns=M.NS_ROI)
            geom = roi_geometry(pred, opts["colour_by"])
            names = geom[0]
            bar = tqdm(total=len(todo), desc=f"ROIs -> image {image_id}", unit="roi", disable=not progress)
            try:
                for a in range(0, len(todo), batch_size):
                    batch = build_rois(pred, image_id, tag, rows=todo[a:a + batch_size], geometry=geom)
                    ids = upd.saveAndReturnIds(batch, ctx)
                    if len(ids) != len(batch):
                        raise OmeroError(f"saveAndReturnIds returned {len(ids)} ids for {len(batch)} ROIs")
                    written += len(batch)
                    bar.update(len(batch))
            finally:
                bar.close()
            roi_map = _roi_map(gw, image_id, run_id, fp, ctx)
            roi_ids = roi_map.reindex(names)
            if roi_ids.isna().any():
                raise OmeroError(f"{int(roi_ids.isna().sum())} ROIs are missing after the push "
                                 f"(e.g. {list(roi_ids[roi_ids.isna()].index[:3])}); run the push again.")
            roi_ids = roi_ids.astype("int64")
        else:
            roi_ids = pd.Series(dtype="int64")
        # 4. tables (each linked as soon as it exists; state=done once filled)
        table_ids = {}
        done = {o: (int(i), f) for o, i, f, st, ns in zip(state.annotations["obj"], state.annotations["id"],
                                                          state.annotations["file_id"], state.annotations["state"],
                                                          state.annotations["ns"])
                if st == "done" and o and ns != M.NS_RUN} if plan.mode == "resume" else {}
        if specs:
            xy_full, _, _, _ = _full_res_geometry(pred)
            spot_ids = list(map(str, pred.obs_names))
            for spec, (_, _, _, what) in zip(specs, plan.tables):
                key = _obj(spec.name)
                if what == "keep" and key in done:
                    table_ids[spec.name] = int(done[key][1]) if pd.notna(done[key][1]) else None
                    continue
                holder = {}

                def on_created(fid, spec=spec, key=key, holder=holder):
                    fa = M.file_annotation_ref(fid, ns=M.NS_TABLE,
                                               description=M.run_tag(run_id, image_id, fp, state="partial", obj=key))
                    link = upd.saveAndReturnObject(M.image_link(image_id, fa), ctx)
                    holder["ann"] = link.getChild()

                fid = T.write_table(gw, spec, image_id=image_id, spot_ids=spot_ids, xy_full=xy_full,
                                    roi_ids=roi_ids.to_numpy() if opts["rois"] else None, ctx=ctx,
                                    on_created=on_created)
                from omero.rtypes import rstring

                ann = holder["ann"]
                ann.setDescription(rstring(M.run_tag(run_id, image_id, fp, state="done", obj=key)))
                upd.saveAndReturnObject(ann, ctx)
                table_ids[spec.name] = fid
        # 5. files: the prediction (h5ad), its QuPath GeoJSON, the cell-type label image
        file_ids = {}
        with tempfile.TemporaryDirectory(prefix="stimage_nb-push-") as tmp:
            for name, what in plan.files:
                key = _obj(name)
                if what == "keep" and key in done:
                    file_ids[name] = done[key][0]
                    continue
                path = _make_file(pred, src, name, Path(tmp), info, opts)
                if path is None:
                    continue
                file_ids[name] = upload_file(gw, path, name, image_id=image_id, ns=M.NS_FILE, ctx=ctx,
                                             description=M.run_tag(run_id, image_id, fp, state="partial", obj=key),
                                             done_description=M.run_tag(run_id, image_id, fp, state="done", obj=key))
        # 6. the record says complete
        pairs = _record_pairs(pred, src, run_id, fp, opts, plan, state="complete", n_rois=len(roi_ids),
                              tables=list(table_ids), files=list(file_ids))
        _update_record(gw, record_id, M.run_tag(run_id, image_id, fp, state="complete"), pairs, ctx)
    dt = time.perf_counter() - t0
    log.info("pushed run %s onto image %s: %d ROIs written (%d total), %d tables, %d files in %.1f s", run_id,
             image_id, written, len(roi_ids), len(table_ids), len(file_ids), dt)
    return PushResult(plan, roi_ids, table_ids, file_ids, record_id, dt, written)


def upload_file(gw, path: Path, name: str, *, image_id: int, ns: str, ctx, description: str,
                done_description: str | None = None, mimetype: str | None = None, chunk: int = UPLOAD_CHUNK) -> int:
    """Attach a local file to an image; returns the FileAnnotation id.

    The annotation, its (empty) OriginalFile and the link to the image are saved in one graph first, so
    the file can never exist without its tagged annotation; then the bytes go up through a
    RawFileStore in ``chunk``-byte writes; then the description is switched to ``done_description``.
    A connection lost half-way leaves a findable ``state=partial`` annotation that the next push
    deletes and redoes (omero-py's ``createFileAnnfromLocalFile`` saves the file first and could leave
    an orphan OriginalFile that nothing points to).
    """
    import hashlib

    import omero.model
    from omero.rtypes import rlong, rstring

    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    f = omero.model.OriginalFileI()
    f.setName(rstring(name))
    f.setPath(rstring("stimage_nb/"))
    f.setMimetype(rstring(mimetype or _mimetype(name)))
    f.setSize(rlong(size))
    f.setHash(rstring(h.hexdigest()))
    algo = omero.model.ChecksumAlgorithmI()
    algo.setValue(rstring(omero.model.enums.ChecksumAlgorithmSHA1160))
    f.setHasher(algo)
    fa = omero.model.FileAnnotationI()
    fa.setFile(f)
    fa.setNs(rstring(ns))
    fa.setDescription(rstring(description))
    upd = gw.getUpdateService()
    link = upd.saveAndReturnObject(M.image_link(image_id, fa), ctx)
    ann = link.getChild()
    fid = int(M.unwrap(ann.getFile().getId()))
    store = gw.c.sf.createRawFileStore()
    try:
        store.setFileId(fid, ctx)
        with open(path, "rb") as fh:
            pos = 0
            for block in iter(lambda: fh.read(chunk), b""):
                store.write(block, pos, len(block), ctx)
                pos += len(block)
        store.save(ctx)
    finally:
        try:
            store.close()
        except Exception:  # noqa: BLE001
            pass
    if done_description is not None:
        ann.setDescription(rstring(done_description))
        ann = upd.saveAndReturnObject(ann, ctx)
    return int(M.unwrap(ann.getId()))


def _roi_map(gw, image_id, run_id, fp, ctx) -> pd.Series:
    """ROI id per observation name for this run (duplicates, which a retried batch could leave, deleted)."""
    st = run_state(gw, image_id, run_id, ctx).rois
    st = st[st["fp"] == fp].sort_values("id")
    dup = st[st.duplicated("name", keep="first")]
    if len(dup):
        log.warning("deleting %d duplicate ROIs of run %s", len(dup), run_id)
        _delete(gw, {"Roi": dup["id"].tolist()}, ctx)
        st = st.drop(dup.index)
    return pd.Series(st["id"].to_numpy(dtype=np.int64), index=st["name"].astype(str).to_numpy())


def _update_record(gw, record_id: int, description: str, pairs, ctx) -> None:
    import omero.model
    from omero.rtypes import rstring

    obj = gw.getObject("MapAnnotation", int(record_id))
    if obj is None:
        raise OmeroError(f"run record {record_id} vanished during the push; run the push again.")
    a = obj._obj
    a.setDescription(rstring(description))
    a.setMapValue([omero.model.NamedValue(str(k), M._kv_text(v)) for k, v in pairs])
    gw.getUpdateService().saveAndReturnObject(a, ctx)


def _record_pairs(pred, src, run_id, fp, opts, plan, *, state, n_rois=None, tables=None, files=None) -> list:
    from .. import __version__

    prov = _prov(pred)
    ct = list(pred.obsm[K.CELLTYPE_MEAN].columns) if K.CELLTYPE_MEAN in pred.obsm else []
    pairs = [("run_id", run_id), ("state", state), ("section", prov.get("section", "")),
             ("patient", prov.get("patient", "")), ("platform", prov.get("platform", "")),
             ("observations", pred.n_obs), ("genes", pred.n_vars),
             ("cell types", ", ".join(map(str, ct))), ("colour", plan.colour_legend),
             ("backbone", prov.get("backbone", "")), ("members", prov.get("n_members", "")),
             ("weights sha256", prov.get("weights_sha256", "")), ("predicted", prov.get("created", "")),
             ("pushed", datetime.now(timezone.utc).isoformat(timespec="seconds")),
             ("stimage_nb", __version__), ("fingerprint", fp), ("source", str(src or "in-memory AnnData"))]
    if opts.get("label") and ct:
        pairs.append(("label image values", "; ".join(f"{i + 1}={c}" for i, c in enumerate(ct))
                      + f" (0 = none; {opts['label_um']:g} µm/px)"))
    if plan.renamed:  # the names as they are on the server, and what they stand for (stimage_nb.names)
        pairs.append(("renamed columns", "; ".join(f"{c} = {o}" for o, c in plan.renamed.items())))
    if n_rois is not None:
        pairs.append(("ROIs", n_rois))
    if tables is not None:
        pairs.append(("tables", "; ".join(tables)))
    if files is not None:
        pairs.append(("files", "; ".join(files)))
    return [(k, v) for k, v in pairs if v is not None]


def _mimetype(name: str) -> str:
    if name.endswith(".h5ad"):
        return "application/x-hdf5"
    if name.endswith(".geojson.gz"):
        return "application/gzip"
    if name.endswith(".tif"):
        return "image/tiff"
    return "application/octet-stream"


def _make_file(pred, src, name: str, tmp: Path, info, opts) -> Path | None:
    """Write one attachment into ``tmp``; None when its writer is unavailable."""
    path = tmp / name
    if name.endswith(".h5ad"):
        if src is not None:
            return Path(src)
        return write_h5ad(pred, path)  # atomic; names that HDF5 refuses encoded (stimage_nb.names)
    if name.endswith(".geojson.gz"):
        try:
            from ..qupath import export_qupath
        except ImportError:
            # HOOK: stimage_nb.qupath.export_qupath writes the QuPath GeoJSON; without it no GeoJSON is attached.
            log.warning("stimage_nb.qupath is not available: no QuPath GeoJSON attached")
            return None
        return export_qupath(pred, path)
    if name.endswith(".celltypes.ome.tif"):
        lab, um, _ = celltype_label_image(pred, (info.size_x, info.size_y), um_per_px_label=opts["label_um"])
        return _write_label_tiff(lab, um, path)
    return None


# ----------------------------------------------------------------------------- runs: list and remove
def list_runs(conn, image_id: int) -> pd.DataFrame:
    """The stimage_nb runs pushed onto an image: run id, state, fingerprint, record id and its key-values."""
    from .pull import pull_annotations

    sess = as_session(conn)
    anns = pull_annotations(sess, image_id)
    rows = []
    for m in anns.maps:
        if m["ns"] != M.NS_RUN or m["on"] != "image":
            continue
        d = dict(m["pairs"])
        rows.append({"run_id": d.get("run_id"), "state": d.get("state"), "section": d.get("section"),
                     "fingerprint": d.get("fingerprint"), "record_id": m["id"], "pushed": d.get("pushed"),
                     "ROIs": d.get("ROIs"), "tables": d.get("tables"), "files": d.get("files")})
    return pd.DataFrame(rows, columns=["run_id", "state", "section", "fingerprint", "record_id", "pushed", "ROIs",
                                       "tables", "files"])


def remove_run(conn, image_id: int, run_id: str, *, dry_run: bool = False) -> dict:
    """Delete everything a run pushed onto an image (ROIs, tables, files, the record); returns the counts."""
    require_omero()
    sess = as_session(conn)
    run_id = M.check_run_id(run_id)
    info = image_info(sess, image_id, with_levels=False)
    gw = sess.gateway
    ctx = gw.SERVICE_OPTS.copy()
    if info.group_id is not None:
        ctx.setOmeroGroup(int(info.group_id))
    try:
        st = run_state(gw, image_id, run_id, ctx)
        targets = {"Roi": st.rois["id"].tolist(), "Annotation": st.annotations["id"].tolist(),
                   "OriginalFile": [int(f) for f in st.annotations["file_id"].dropna()] + st.orphan_files}
        counts = {k: len(v) for k, v in targets.items()}
        if dry_run or not any(counts.values()):
            return counts
        _delete(gw, {k: v for k, v in targets.items() if v}, ctx)
    except (OmeroError, StimageInputError):
        raise
    except Exception as e:  # noqa: BLE001
        if type(e).__module__.startswith(("Ice", "omero", "Glacier2")):
            raise translate_error(e, sess.target, f"removing run {run_id} from image {image_id}") from None
        raise
    log.info("removed run %s from image %s: %s", run_id, image_id, counts)
    return counts


# ----------------------------------------------------------------------------- without a server
def offline_push_plan(pred, *, image_id: int | None = None, out=None, colour_by: str | None = None,
                      max_rois: int | None = None) -> dict:
    """What a push of ``pred`` would write to OMERO, worked out without a server (a local dry run).

    Uses the same building blocks as :func:`stimage_nb.omero.push_predictions` (ROI styles, the
    table plan under the column limit, the attachments); with ``out`` the attachments (the h5ad and
    its QuPath GeoJSON) are written there so they can be inspected. Needs neither omero-py nor a
    connection, so it also runs on Binder.
    """
    from ..qupath import export_qupath

    pred = read_prediction(pred)
    prov = dict(pred.uns.get(K.UNS) or {})
    run_id = str(prov.get("run_id") or "local")
    max_rois = MAX_ROIS if max_rois is None else int(max_rois)
    do_rois = pred.n_obs <= max_rois
    texts, fill, legend = roi_styles(pred, colour_by)
    specs = T.plan_tables(pred, run_id=run_id, with_roi=do_rois)
    res = {"dry_run": True, "server": None, "image_id": image_id, "run_id": run_id,
           "section": str(prov.get("section") or ""), "n_obs": int(pred.n_obs),
           "n_rois": int(pred.n_obs) if do_rois else 0, "example_roi_text": texts[0] if texts else "",
           "colour_legend": legend, "tables": [(s.name, s.n_rows, s.n_columns) for s in specs],
           "max_table_columns": max((s.n_columns for s in specs), default=0), "files": [],
           "renamed_columns": T.renamed_columns(specs)}
    if res["renamed_columns"]:
        log.warning("%s", _renamed_line(res["renamed_columns"]))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        name = safe_name(res["section"] or "prediction", "file_name")
        files = [write_h5ad(pred, out / f"{name}.h5ad"), export_qupath(pred, out / f"{name}.geojson.gz")]
        res["files"] = [str(f) for f in files]
    return res


def push_summary(result) -> dict:
    """A plain dict of a :class:`~stimage_nb.omero.push.PushPlan` or ``PushResult`` (for widget traits)."""
    plan = getattr(result, "plan", None)
    if plan is None:  # a PushPlan (dry run)
        p = result
        return {"dry_run": True, "image_id": p.image_id, "run_id": p.run_id, "mode": p.mode,
                "n_rois": p.rois_to_write, "rois_kept": p.rois_kept, "tables": len(p.tables),
                "delete": {k: len(v) for k, v in p.delete.items()}, "renamed_columns": dict(p.renamed),
                "plan": str(p)}
    return {"dry_run": False, "image_id": plan.image_id, "run_id": plan.run_id, "mode": plan.mode,
            "n_rois": len(result.roi_ids), "rois_written": result.rois_written,
            "tables": len(result.table_file_ids), "files": len(result.file_annotation_ids),
            "record_id": result.record_id, "seconds": round(result.seconds, 2)}
