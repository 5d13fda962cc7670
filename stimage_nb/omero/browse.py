"""Browse OMERO: projects, datasets and images (with their physical pixel size) as DataFrames."""

from __future__ import annotations

import logging

import pandas as pd

from .connection import as_session, translate_error

log = logging.getLogger(__name__)


def _all_groups(gw):
    """Context manager-free cross-group read: set group -1, return the old value to restore."""
    old = gw.SERVICE_OPTS.getOmeroGroup()
    gw.SERVICE_OPTS.setOmeroGroup("-1")
    return old


def _owner(obj) -> str:
    try:
        return obj.getOwnerOmeName() or ""
    except Exception:  # noqa: BLE001
        return ""


def list_projects(conn) -> pd.DataFrame:
    """Projects the user can read (all groups): ``id, name, owner, datasets``."""
    sess = as_session(conn)
    gw = sess.gateway
    old = _all_groups(gw)
    try:
        rows = [{"id": int(p.getId()), "name": p.getName(), "owner": _owner(p),
                 "datasets": int(p.countChildren() or 0)} for p in gw.getObjects("Project")]
    except Exception as e:  # noqa: BLE001
        raise translate_error(e, sess.target, "listing projects") from None
    finally:
        gw.SERVICE_OPTS.setOmeroGroup(old)
    return pd.DataFrame(rows, columns=["id", "name", "owner", "datasets"])


def list_datasets(conn, project: int | None = None) -> pd.DataFrame:
    """Datasets (of one project, or all): ``id, name, project, owner, images``."""
    sess = as_session(conn)
    gw = sess.gateway
    old = _all_groups(gw)
    try:
        opts = {"project": int(project)} if project is not None else None
        rows = [{"id": int(d.getId()), "name": d.getName(), "project": project, "owner": _owner(d),
                 "images": int(d.countChildren() or 0)} for d in gw.getObjects("Dataset", opts=opts)]
    except Exception as e:  # noqa: BLE001
        raise translate_error(e, sess.target, "listing datasets") from None
    finally:
        gw.SERVICE_OPTS.setOmeroGroup(old)
    return pd.DataFrame(rows, columns=["id", "name", "project", "owner", "images"])


def _image_row(img, dataset=None) -> dict:
    size = img.getPixelSizeX(units="MICROMETER")
    return {"id": int(img.getId()), "name": img.getName(), "dataset": dataset, "size_x": int(img.getSizeX()),
            "size_y": int(img.getSizeY()), "size_c": int(img.getSizeC()), "pixels_type": str(img.getPixelsType()),
            "um_per_px": float(size.getValue()) if size is not None else None, "owner": _owner(img)}


def list_images(conn, dataset: int | None = None, project: int | None = None) -> pd.DataFrame:
    """Images of a dataset, of every dataset of a project, or the user's orphaned images.

    Columns: ``id, name, dataset, size_x, size_y, size_c, pixels_type, um_per_px, owner``;
    ``um_per_px`` is None where the server records no physical pixel size (pull then needs one).
    """
    sess = as_session(conn)
    gw = sess.gateway
    old = _all_groups(gw)
    try:
        if dataset is not None:
            rows = [_image_row(i, int(dataset)) for i in gw.getObjects("Image", opts={"dataset": int(dataset)})]
        elif project is not None:
            rows = []
            for d in gw.getObjects("Dataset", opts={"project": int(project)}):
                rows += [_image_row(i, int(d.getId())) for i in gw.getObjects("Image", opts={"dataset": int(d.getId())})]
        else:
            rows = [_image_row(i) for i in gw.getObjects("Image", opts={"orphaned": True})]
    except Exception as e:  # noqa: BLE001
        raise translate_error(e, sess.target, "listing images") from None
    finally:
        gw.SERVICE_OPTS.setOmeroGroup(old)
    return pd.DataFrame(rows, columns=["id", "name", "dataset", "size_x", "size_y", "size_c", "pixels_type",
                                       "um_per_px", "owner"])
