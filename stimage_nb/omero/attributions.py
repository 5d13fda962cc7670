"""Push nucleus attributions to OMERO: one polygon ROI per nucleus, batched, namespaced, replaceable.

:func:`push_attributions` writes what :func:`stimage_nb.interpretation.explain` found for one section
onto its OMERO image, the way :func:`stimage_nb.omero.push_predictions` writes spots:

- one ROI per attributed nucleus, named by its id, holding a **polygon** (the nucleus outline, in
  full-resolution px) filled red (raises the gene's prediction) to blue (lowers it) on a symmetric
  scale of its attribution to the chosen gene, with the text ``"EPCAM SHAP +0.012 (spot 10x12)"``;
  saved with ``saveAndReturnIds`` in batches (default 500);
- a record (MapAnnotation, namespace :data:`NS_ATTRIBUTIONS`) with the genes, method, units, the
  colour scale and the state;
- every object carries the tag ``stimage_nb:run=<run id>;image=<id>;fp=<fingerprint>`` (ROIs in their
  description), where the run id is the model's run id + ``".shap"`` — never the spot push's run id,
  so the two never touch each other's objects. Pushing again finds the run's objects: identical
  content → nothing to do; a push that stopped half-way → the missing ROIs are added; other content
  (genes, values, colours) → the old ROIs and record are deleted and replaced. ``stimage-nb omero rm
  --run <run id>.shap`` removes it all.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pandas as pd

from ..errors import StimageInputError
from . import model as M
from .connection import OmeroError, as_session, require_omero, translate_error
from .pull import image_info
from .push import BATCH, FILL_ALPHA, _delete, _in_group, _update_record, run_state

log = logging.getLogger(__name__)

NS_ATTRIBUTIONS = f"{M.NS_ROOT}/attributions"   # the record of a pushed attribution run
NS_NUCLEUS_ROI = f"{M.NS_ROOT}/nucleus"          # written into each nucleus ROI's description
RUN_SUFFIX = ".shap"
PUSH_FORMAT = 1


def attribution_run_id(attr, run_id: str | None = None) -> str:
    """The run id of an attribution push: ``run_id`` or the model's run id + ``".shap"``."""
    return M.check_run_id(run_id or f"{attr.meta.get('run_id') or 'local'}{RUN_SUFFIX}")


def _table(attr, gene: str) -> pd.DataFrame:
    from ..interpretation import value_column

    per = attr.per_nucleus()
    if gene not in attr.genes:
        raise StimageInputError(f"gene {gene!r} was not explained (explained: {list(attr.genes)}).")
    return per.assign(value=per[value_column(gene)].to_numpy(dtype=np.float64))


def fingerprint(attr, gene: str, per: pd.DataFrame) -> str:
    """Hash of what the push writes: nucleus ids, outlines, values, gene and method."""
    h = hashlib.blake2b(digest_size=10)
    h.update(f"{PUSH_FORMAT}|{gene}|{attr.method}|{attr.output}|{','.join(attr.genes)}".encode())
    h.update("\x00".join(map(str, per.index)).encode())
    h.update(np.ascontiguousarray(per.filter(like="SHAP ").to_numpy(np.float32)).tobytes())
    pos = attr.nuclei.table.index.get_indexer(per.index)
    for i in pos:
        h.update(np.round(attr.nuclei.polygons[i], 2).astype(np.float32).tobytes())
    return h.hexdigest()


def nucleus_rois(attr, image_id: int, tag: str, per: pd.DataFrame, gene: str, rows=None) -> list:
    """``omero.model.RoiI`` objects (one polygon each) for rows of the per-nucleus table."""
    from ..interpretation._export import diverging_colours

    cols = diverging_colours(per["value"].to_numpy())
    pos = attr.nuclei.table.index.get_indexer(per.index)
    out = []
    for k in (range(len(per)) if rows is None else rows):
        nid = str(per.index[k])
        c = tuple(int(x) for x in cols[k])
        shape = M.polygon(attr.nuclei.polygons[pos[k]], text=f"{gene} SHAP {per['value'].iloc[k]:+.3g} "
                          f"(spot {per['spot'].iloc[k]})", fill=(*c, FILL_ALPHA), stroke=(*c, 255))
        out.append(M.roi(image_id, [shape], name=nid, description=tag))
    return out


def push_attributions(conn, image_id: int, attr, *, gene: str | None = None, run_id: str | None = None,
                      batch_size: int = BATCH, check_image: bool = True, force: bool = False,
                      dry_run: bool = False, progress: bool = True) -> dict:
    """Push one section's nucleus attributions onto its OMERO image (see the module docstring).

    Parameters
    ----------
    conn
        An :class:`~stimage_nb.omero.connection.OmeroSession` or a connected BlitzGateway.
    image_id
        The OMERO image the section's slide is (full-resolution pixel frame).
    attr
        :class:`~stimage_nb.interpretation.Attributions` (or a folder written by ``stimage-nb interpret``).
    gene
        The gene whose attribution colours the ROIs (default: the first explained gene); every ROI's
        text names its value.
    run_id
        Default: the model's run id + ``".shap"``.
    batch_size
        ROIs per ``saveAndReturnIds`` call.
    check_image
        Refuse when the image's µm/px or size does not fit the nuclei (wrong image id).
    force
        Replace the run's objects even when identical content is there.
    dry_run
        Only report what would be written or deleted.

    Returns
    -------
    dict
        ``image_id``, ``run_id``, ``mode`` (fresh, resume, replace, up-to-date), ``n_rois``,
        ``rois_written``, ``deleted`` (counts), ``record_id``, ``dry_run``.
    """
    require_omero()
    from ..interpretation import Attributions, read_attributions

    if not isinstance(attr, Attributions):
        attr = read_attributions(attr)
    gene = gene or attr.genes[0]
    per = _table(attr, gene)
    run_id = attribution_run_id(attr, run_id)
    fp = fingerprint(attr, gene, per)
    sess = as_session(conn)
    gw = sess.gateway
    try:
        info = image_info(sess, image_id, with_levels=False)
        if check_image:
            um = attr.nuclei.um_per_px
            if info.um_per_px is not None and abs(info.um_per_px - um) / um > 0.05:
                raise StimageInputError(f"OMERO image {image_id} ({info.name}) has {info.um_per_px:.4g} µm/px but the "
                                        f"nuclei were outlined on an image of {um:.4g} µm/px. Is this the right image?")
            b = attr.nuclei.bounds()
            if len(b) and (b[:, 2].max() > info.size_x * 1.01 or b[:, 3].max() > info.size_y * 1.01):
                raise StimageInputError(f"OMERO image {image_id} ({info.name}) is {info.size_x}x{info.size_y} px but "
                                        "the nuclei reach beyond it. Wrong image id?")
        ctx = gw.SERVICE_OPTS.copy()
        if info.group_id is not None:
            ctx.setOmeroGroup(int(info.group_id))
        state = run_state(gw, image_id, run_id, ctx)
        rec = state.annotations[state.annotations["ns"] == NS_ATTRIBUTIONS]
        same = state.rois[state.rois["fp"] == fp]
        names = [str(i) for i in per.index]
        if state.is_empty():
            mode = "fresh"
        elif force or len(same) < len(state.rois) or (len(rec) and (rec["fp"] != fp).any()):
            mode = "replace"
        else:
            mode = "resume"
        have = set(same["name"].astype(str)) if mode == "resume" else set()
        todo = [k for k, n in enumerate(names) if n not in have]
        if mode == "resume" and not todo and (rec["state"] == "complete").any():
            mode = "up-to-date"
        delete = {"Roi": [], "Annotation": [], "OriginalFile": []}
        if mode == "replace":
            delete = {"Roi": state.rois["id"].tolist(), "Annotation": state.annotations["id"].tolist(),
                      "OriginalFile": [int(f) for f in state.annotations["file_id"].dropna()] + state.orphan_files}
        elif mode == "resume":  # duplicates a retried batch may have left, and stale records
            dup = same[same.duplicated("name", keep="first")]
            delete["Roi"] = dup["id"].tolist()
            delete["Annotation"] = rec.loc[rec["fp"] != fp, "id"].tolist()
        res = {"image_id": int(image_id), "run_id": run_id, "mode": mode, "n_rois": len(names),
               "rois_written": 0 if (dry_run or mode == "up-to-date") else len(todo), "to_write": len(todo),
               "deleted": {k: len(v) for k, v in delete.items()}, "dry_run": bool(dry_run), "gene": gene,
               "fingerprint": fp, "record_id": int(rec["id"].iloc[0]) if len(rec) and mode != "replace" else None}
        if dry_run or mode == "up-to-date":
            if mode == "up-to-date":
                res["to_write"] = 0
            return res
        lim = float(np.percentile(np.abs(per["value"]), 99)) if len(per) else 0.0
        pairs = [("run_id", run_id), ("state", "incomplete"), ("section", attr.section), ("genes", ", ".join(attr.genes)),
                 ("coloured by", f"SHAP {gene}: red raises, blue lowers the prediction; RdBu_r, symmetric at "
                                 f"±{lim:.3g}"),
                 ("method", attr.method), ("output", attr.output), ("spots", len(attr.spots)), ("nuclei", len(names)),
                 ("model run", str(attr.meta.get("run_id", ""))), ("fingerprint", fp)]
        upd = gw.getUpdateService()
        with _in_group(gw, info.group_id):
            todel = {k: v for k, v in delete.items() if v}
            if todel:
                _delete(gw, todel, ctx)
            keep_rec = rec[rec["fp"] == fp] if mode == "resume" else rec.iloc[0:0]
            if len(keep_rec):
                record_id = int(keep_rec["id"].iloc[0])
                _update_record(gw, record_id, M.run_tag(run_id, image_id, fp, state="incomplete"), pairs, ctx)
            else:
                ann = M.map_annotation(pairs, ns=NS_ATTRIBUTIONS,
                                       description=M.run_tag(run_id, image_id, fp, state="incomplete"))
                record_id = int(M.unwrap(upd.saveAndReturnObject(M.image_link(image_id, ann), ctx).getChild().getId()))
            tag = M.run_tag(run_id, image_id, fp, ns=NS_NUCLEUS_ROI)
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(todo), desc=f"nuclei -> image {image_id}", unit="roi")
            for a in range(0, len(todo), int(batch_size)):
                batch = nucleus_rois(attr, image_id, tag, per, gene, rows=todo[a:a + int(batch_size)])
                ids = upd.saveAndReturnIds(batch, ctx)
                if len(ids) != len(batch):
                    raise OmeroError(f"saveAndReturnIds returned {len(ids)} ids for {len(batch)} ROIs")
                if bar is not None:
                    bar.update(len(batch))
            if bar is not None:
                bar.close()
            pairs[1] = ("state", "complete")
            _update_record(gw, record_id, M.run_tag(run_id, image_id, fp, state="complete"), pairs, ctx)
        res["record_id"] = record_id
        log.info("pushed attributions run %s onto image %s: %s, %d nucleus ROIs written", run_id, image_id, mode,
                 len(todo))
        return res
    except (OmeroError, StimageInputError):
        raise
    except Exception as e:  # noqa: BLE001
        if type(e).__module__.startswith(("Ice", "omero", "Glacier2")):
            raise translate_error(e, sess.target, f"pushing attributions {run_id} onto image {image_id} (run the "
                                  "same push again to resume)") from None
        raise
