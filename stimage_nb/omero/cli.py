"""``stimage-nb omero ...``: browse, pull, push and remove, as thin wrappers over the API.

::

    stimage-nb omero ls   [--project ID | --dataset ID | --image ID]
    stimage-nb omero pull IMAGE_ID [IMAGE_ID ...] [--out DIR] [--section] [--target-um-per-px 0.5]
    stimage-nb omero push --pred PRED_DIR|FILE.h5ad --image ID|SECTION=ID [...] [--colour-by ERBB2] [--dry-run]
    stimage-nb omero rm   --image ID --run RUN_ID [--dry-run]
    stimage-nb omero push-attributions --attributions OUT/SECTION --image ID [--gene G] [--dry-run]

Connection options (any sub-command): ``--host``, ``--port``, ``--user``, ``--group``, ``--insecure``,
``--cli-login``; defaults from ``OMERO_HOST``/``OMERO_PORT``/``OMERO_USER``/``OMERO_GROUP``. The password
comes from ``OMERO_PASSWORD``, a session key from ``OMERO_SESSION_KEY``, else you are prompted:
there is deliberately no option that takes a secret on the command line (it would end up in the
shell history and the process list).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from ..atomic import write_atomic, write_csv
from ..io.prediction import write_h5ad
from ..names import file_stem, name_of_file

log = logging.getLogger(__name__)


def _conn_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection (password: OMERO_PASSWORD, OMERO_SESSION_KEY or a prompt)")
    g.add_argument("--host", help="OMERO server (default $OMERO_HOST); wss://host/omero-ws for websockets")
    g.add_argument("--port", type=int, help="Ice port (default $OMERO_PORT or 4064)")
    g.add_argument("--user", help="user name (default $OMERO_USER)")
    g.add_argument("--group", help="group name (default $OMERO_GROUP or your default group)")
    g.add_argument("--insecure", action="store_true", help="after the TLS login, move data unencrypted "
                   "(faster on a trusted network; OMERO's own default)")
    g.add_argument("--cli-login", action="store_true", help="reuse the session of a current `omero login`")
    return p


def _connect(a):
    from .connection import connect

    return connect(a.host, a.port, a.user, group=a.group, secure=False if a.insecure else None,
                   use_cli_login=a.cli_login)


def _print_df(df) -> None:
    import pandas as pd

    with pd.option_context("display.max_rows", 500, "display.max_columns", 20, "display.width", 160):
        print(df.to_string(index=False) if len(df) else "(none)")


# ----------------------------------------------------------------------------- ls
def _cmd_ls(a) -> int:
    from .browse import list_datasets, list_images, list_projects

    with _connect(a) as conn:
        if a.image is not None:
            from .pull import image_info, pull_annotations
            from .push import list_runs

            info = image_info(conn, a.image)
            print(f"image {info.image_id} {info.name!r}: {info.size_x}x{info.size_y} px, C={info.size_c}, "
                  f"{info.pixels_type}, {info.um_per_px} µm/px, levels {info.levels}, tile {info.tile}")
            anns = pull_annotations(conn, a.image)
            for f in anns.files:
                print(f"  file annotation {f.annotation_id}: {f.name} ({f.mimetype}, {f.size} bytes, ns={f.ns})")
            for m in anns.maps:
                if m["on"] == "image":
                    print(f"  map annotation {m['id']} (ns={m['ns']}): {dict(m['pairs'])}")
            runs = list_runs(conn, a.image)
            print("stimage_nb runs:")
            _print_df(runs)
        elif a.dataset is not None:
            _print_df(list_images(conn, dataset=a.dataset))
        elif a.project is not None:
            _print_df(list_datasets(conn, project=a.project))
        else:
            _print_df(list_projects(conn))
    return 0


# ----------------------------------------------------------------------------- pull
def write_training_files(section, out: Path) -> Path:
    """Write a pulled Section as files ``stimage-nb train --manifest`` reads; returns the manifest row file.

    ``OUT/<name>.spots.tsv`` (x, y, pixel_x, pixel_y, selected; ``x``/``y`` are the ``{x}x{y}`` array
    coordinates when the ROI names have that form, else a running index), ``OUT/<name>.counts.tsv.gz``
    and one row in ``OUT/sections.csv`` (replaced when the section is pulled again). The section's
    AnnData is also written as ``OUT/<name>.h5ad`` (with the original observation ids).
    """
    import numpy as np
    import pandas as pd

    from .. import _keys as K

    out.mkdir(parents=True, exist_ok=True)
    a = section.adata
    name = section.name
    m = [re.fullmatch(r"(-?\d+)x(-?\d+)", str(i)) for i in a.obs_names]
    if all(m) and len({(g.group(1), g.group(2)) for g in m}) == len(m):
        ax = np.array([int(g.group(1)) for g in m])
        ay = np.array([int(g.group(2)) for g in m])
    else:
        ax, ay = np.arange(a.n_obs), np.zeros(a.n_obs, dtype=int)
    ids = [f"{x}x{y}" for x, y in zip(ax, ay)]
    spots = pd.DataFrame({"x": ax, "y": ay, K.PIXEL_X: a.obs[K.PIXEL_X].to_numpy(),
                          K.PIXEL_Y: a.obs[K.PIXEL_Y].to_numpy(), "selected": 1, "obs_id": list(a.obs_names)})
    stem = file_stem(name)  # a section name may hold '/' (stimage_nb.names)
    spath = out / f"{stem}.spots.tsv"
    write_csv(spots, spath, sep="\t")
    cpath = None
    if a.n_vars:
        X = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
        cpath = out / f"{stem}.counts.tsv.gz"
        write_atomic(cpath, lambda tmp: pd.DataFrame(X, index=ids, columns=list(a.var_names)).to_csv(
            tmp, sep="\t", compression="gzip"))
    row = {"section": name, "patient": section.patient or "", "image": str(section.image_path),
           "spots": spath.name, "counts": cpath.name if cpath else "", "um_per_px": section.um_per_px,
           "spot_diameter_um": float(np.median(a.obs[K.DIAMETER_UM])) if a.n_obs else ""}
    man = out / "sections.csv"
    df = pd.read_csv(man, dtype=str) if man.is_file() else pd.DataFrame(columns=list(row))
    df = df[df["section"] != name]
    df = pd.concat([df, pd.DataFrame([row]).astype(str)], ignore_index=True)
    write_csv(df, man)
    write_h5ad(a, out / f"{stem}.h5ad")
    return man


def _cmd_pull(a) -> int:
    from .pull import pull_image, pull_section

    counts = None if a.counts == "none" else ("auto" if a.counts == "auto" else int(a.counts))
    with _connect(a) as conn:
        for iid in a.image_ids:
            dest = None if a.out is None else Path(a.out) / f"image-{iid}.ome.zarr"
            if a.section:
                sec = pull_section(conn, iid, counts=counts, diameter_um=a.diameter_um, dest=dest,
                                   target_um_per_px=a.target_um_per_px, um_per_px=a.um_per_px,
                                   progress=not a.quiet)
                line = {"image_id": iid, "image": str(sec.image_path), "section": sec.name,
                        "observations": sec.adata.n_obs, "genes": sec.adata.n_vars}
                if a.out is not None:
                    line["manifest"] = str(write_training_files(sec, Path(a.out)))
            else:
                img = pull_image(conn, iid, dest=dest, target_um_per_px=a.target_um_per_px, um_per_px=a.um_per_px,
                                 progress=not a.quiet)
                line = {"image_id": iid, "image": str(img.path), "size": [img.width, img.height],
                        "um_per_px": img.um_per_px, "levels": img.n_levels}
            print(json.dumps(line))
    return 0


# ----------------------------------------------------------------------------- push
def _targets(a) -> list[tuple[Path, int]]:
    from ..errors import StimageInputError

    pred = Path(a.pred)
    files = [pred] if pred.is_file() else sorted(pred.glob("*.h5ad")) if pred.is_dir() else []
    if not files:
        raise StimageInputError(f"{pred}: no prediction .h5ad file(s) found (PRED_DIR/<section>.h5ad).")
    mapping, single = {}, None
    for item in a.image:
        if "=" in item:
            k, v = item.split("=", 1)
            mapping[k.strip()] = int(v)
        else:
            single = int(item)
    if single is not None:
        if len(files) != 1:
            raise StimageInputError(f"{pred} holds {len(files)} predictions; map each to its image with "
                                    "--image SECTION=ID (repeat the option).")
        return [(files[0], single)]
    out = []
    for f in files:
        sec = name_of_file(f, ".h5ad")
        if sec in mapping:
            out.append((f, mapping[sec]))
    missing = set(mapping) - {name_of_file(f, ".h5ad") for f, _ in out}
    if missing:
        raise StimageInputError(f"{pred}: no prediction for sections {sorted(missing)}.")
    if not out:
        raise StimageInputError("nothing to push: give --image ID (one file) or --image SECTION=ID.")
    return out


def _push_kwargs(a) -> dict:
    return dict(run_id=a.run_id, colour_by=a.colour_by, rois=("auto" if a.rois is None else a.rois),
                max_rois=a.max_rois, batch_size=a.batch_size, tables=not a.no_tables, max_columns=a.max_columns,
                attach_h5ad=not a.no_h5ad, attach_geojson=not a.no_geojson,
                label_image=("auto" if a.label_image is None else a.label_image), check_image=not a.no_check_image,
                force=a.force, dry_run=a.dry_run, progress=not a.quiet)


def _cmd_push(a) -> int:
    from .push import push_predictions

    targets = _targets(a)
    if a.dry_run and not (a.host or __import__("os").environ.get("OMERO_HOST")):
        from .push import offline_push_plan

        for f, iid in targets:
            print(json.dumps(offline_push_plan(f, image_id=iid, colour_by=a.colour_by,
                                               max_rois=a.max_rois), default=str, indent=1))
        return 0
    with _connect(a) as conn:
        for f, iid in targets:
            res = push_predictions(conn, iid, f, **_push_kwargs(a))
            print(res if a.dry_run else f"{f.name} -> image {iid}: {res!r}")
    return 0


def _cmd_push_attributions(a) -> int:
    from .attributions import push_attributions

    with _connect(a) as conn:
        res = push_attributions(conn, a.image, a.attributions, gene=a.gene, run_id=a.run_id, batch_size=a.batch_size,
                                force=a.force, dry_run=a.dry_run, progress=not a.quiet)
    print(json.dumps(res, default=str))
    return 0


def _cmd_rm(a) -> int:
    from .push import remove_run

    with _connect(a) as conn:
        counts = remove_run(conn, a.image, a.run, dry_run=a.dry_run)
    print(json.dumps({"image_id": a.image, "run_id": a.run, "dry_run": a.dry_run, "deleted": counts}))
    return 0


# ----------------------------------------------------------------------------- registration
def _guard(fn):
    """OMERO failures end the command with a one-line message (no traceback) and exit status 2."""
    def run(a) -> int:
        from ..errors import describe_error
        from .connection import OmeroError

        try:
            return fn(a)
        except (OmeroError, ImportError) as e:
            msg, code = describe_error(e)  # one line, like every other command (stimage_nb.cli.main)
            print(f"stimage-nb omero {a.omero_command}: error: {msg}", file=sys.stderr)
            return code
    run.__name__ = fn.__name__
    return run


def add_cli(subparsers) -> None:
    """Register ``stimage-nb omero {ls,pull,push,push-attributions,rm}``."""
    parent = _conn_parent()
    om = subparsers.add_parser("omero", help="OMERO: browse, pull images/annotations, push predictions",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = om.add_subparsers(dest="omero_command", required=True)

    p = sub.add_parser("ls", parents=[parent], help="list projects, datasets, images, or one image's runs")
    p.add_argument("--project", type=int, help="list this project's datasets")
    p.add_argument("--dataset", type=int, help="list this dataset's images (with µm/px)")
    p.add_argument("--image", type=int, help="describe one image: size, levels, attachments, pushed runs")
    p.set_defaults(func=_guard(_cmd_ls))

    p = sub.add_parser("pull", parents=[parent], help="pull images as local OME-Zarr (and ROIs+counts as a section)")
    p.add_argument("image_ids", nargs="+", type=int, metavar="IMAGE_ID")
    p.add_argument("--out", type=Path, help="folder for the pulled stores (default: the cache); with --section "
                   "also a training manifest sections.csv, spots/counts TSVs and <section>.h5ad")
    p.add_argument("--section", action="store_true", help="also pull ROIs, annotations and the counts table")
    p.add_argument("--counts", default="auto", help="'auto', a FileAnnotation id, or 'none'")
    p.add_argument("--diameter-um", type=float, help="spot diameter for point ROIs")
    p.add_argument("--target-um-per-px", type=float, help="pull the coarsest server level at most this fine")
    p.add_argument("--um-per-px", type=float, help="pixel size when the server records none")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_guard(_cmd_pull))

    p = sub.add_parser("push", parents=[parent], help="push predictions as ROIs, OMERO.tables and attachments")
    p.add_argument("--pred", required=True, type=Path, help="PRED_DIR or one <section>.h5ad")
    p.add_argument("--image", required=True, action="append", metavar="ID|SECTION=ID",
                   help="target image (repeat SECTION=ID for a prediction directory)")
    p.add_argument("--run-id", help="default: the prediction's uns['stimage_nb']['run_id']")
    p.add_argument("--colour-by", help="'celltype' (default when predicted) or a gene")
    rg = p.add_mutually_exclusive_group()
    rg.add_argument("--rois", dest="rois", action="store_true", default=None, help="one ROI per observation")
    rg.add_argument("--no-rois", dest="rois", action="store_false", help="no ROIs (tables and files only)")
    p.add_argument("--max-rois", type=int, default=50_000, help="above this many observations no ROIs (auto)")
    p.add_argument("--batch-size", type=int, default=500, help="ROIs per save call")
    p.add_argument("--no-tables", action="store_true")
    p.add_argument("--max-columns", type=int, default=500, help="columns per OMERO.table")
    p.add_argument("--no-h5ad", action="store_true", help="do not attach the prediction h5ad")
    p.add_argument("--no-geojson", action="store_true", help="do not attach the QuPath GeoJSON")
    p.add_argument("--label-image", dest="label_image", action="store_true", default=None,
                   help="attach a cell-type label image (default: when no ROIs are written)")
    p.add_argument("--no-check-image", action="store_true", help="push even if µm/px or extent do not match")
    p.add_argument("--force", action="store_true", help="replace the run's objects even if identical")
    p.add_argument("--dry-run", action="store_true", help="show what would be written; write nothing "
                   "(without a host: an offline plan)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_guard(_cmd_push))

    p = sub.add_parser("push-attributions", parents=[parent],
                       help="push nucleus attributions (stimage-nb interpret) as polygon ROIs")
    p.add_argument("--attributions", required=True, type=Path, help="OUT/<section> folder of `stimage-nb interpret`")
    p.add_argument("--image", required=True, type=int, help="the section's OMERO image")
    p.add_argument("--gene", help="gene whose attribution colours the ROIs (default: the first explained)")
    p.add_argument("--run-id", help="default: the model's run id + '.shap'")
    p.add_argument("--batch-size", type=int, default=500, help="ROIs per save call")
    p.add_argument("--force", action="store_true", help="replace the run's ROIs even if identical")
    p.add_argument("--dry-run", action="store_true", help="show what would be written; write nothing")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_guard(_cmd_push_attributions))

    p = sub.add_parser("rm", parents=[parent], help="delete everything a run pushed onto an image")
    p.add_argument("--image", required=True, type=int)
    p.add_argument("--run", required=True, help="run id")
    p.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    p.set_defaults(func=_guard(_cmd_rm))
