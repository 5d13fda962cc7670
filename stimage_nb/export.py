"""Export predictions for viewers (QuPath GeoJSON, OME-Zarr) and import QuPath objects: API and CLI.

API
    :func:`export_predictions` (one file or store per section, named by the section),
    :func:`import_qupath_files` (QuPath GeoJSON → :class:`~stimage_nb.io.section.Section`).

CLI (registered by :func:`add_cli`)::

    stimage-nb export --pred PRED_DIR --format qupath|ome-zarr --out DIR [--genes G1,G2|genes.txt] [--manifest M.csv]
    stimage-nb import-qupath FILE.geojson [FILE2.geojson.gz ...] [--image IMG] [--um-per-px 0.5] [--out DIR]
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from . import _keys as K
from .errors import StimageInputError
from .io.prediction import read_prediction, write_h5ad
from .names import file_stem, name_of_file

log = logging.getLogger(__name__)

FORMATS = ("qupath", "ome-zarr")


def prediction_files(pred: str | os.PathLike, sections: Sequence[str] | None = None) -> list[Path]:
    """The ``<section>.h5ad`` files of a prediction directory (or the one file given)."""
    p = Path(pred).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(p.glob("*.h5ad"))
    else:
        raise StimageInputError(f"{p}: prediction directory not found (expected PRED_DIR/<section>.h5ad "
                                "as written by `stimage-nb predict`).")
    if not files:
        raise StimageInputError(f"{p}: holds no <section>.h5ad prediction files. Run `stimage-nb predict` first.")
    if sections is not None:
        want = set(sections)
        files = [f for f in files if name_of_file(f, ".h5ad") in want]
        missing = want - {name_of_file(f, ".h5ad") for f in files}
        if missing:
            raise StimageInputError(f"{p}: no predictions for sections {sorted(missing)}.")
    return files


def _resolve_genes(genes) -> list[str] | None:
    if genes is None:
        return None
    if isinstance(genes, (str, os.PathLike)):
        p = Path(genes)
        if p.is_file():
            from .io.readers import read_gene_list

            return read_gene_list(p)
        return [g.strip() for g in str(genes).split(",") if g.strip()]
    return [str(g) for g in genes]


def _manifest_images(manifest) -> dict[str, tuple[Path, float]]:
    import pandas as pd

    m = Path(manifest).expanduser()
    if not m.is_file():
        raise StimageInputError(f"{m}: manifest not found.")
    df = pd.read_csv(m, dtype=str)
    if not {"section", "image"} <= set(df.columns):
        raise StimageInputError(f"{m}: the manifest needs 'section' and 'image' columns.")
    out = {}
    for _, row in df.iterrows():
        img = Path(str(row["image"])).expanduser()
        img = img if img.is_absolute() else m.parent / img
        um = float(row["um_per_px"]) if "um_per_px" in df.columns and str(row.get("um_per_px")) not in ("", "nan") else None
        out[str(row["section"])] = (img, um)
    return out


def export_predictions(pred_dir: str | os.PathLike, format: str, out: str | os.PathLike,
                       genes: Sequence[str] | str | None = None, manifest: str | os.PathLike | None = None, *,
                       sections: Sequence[str] | None = None, max_mb: float | None = None, gzip: bool = False,
                       base_level: int = 0, heatmap_level: int | None = None, progress: bool = True) -> list[Path]:
    """Export every section of a prediction directory for QuPath or OME-Zarr viewers.

    Parameters
    ----------
    pred_dir
        ``PRED_DIR`` holding ``<section>.h5ad`` (or one such file).
    format
        ``"qupath"`` (``OUT/<section>.geojson[.gz]``) or ``"ome-zarr"`` (``OUT/<section>.ome.zarr``).
    out
        Output directory (created).
    genes
        Genes to export (list, comma-separated text or a gene-list file). QuPath: default all;
        OME-Zarr heatmaps: default the 6 most variable predictions.
    manifest
        Manifest CSV to find each section's image (default: the image recorded in the prediction).
    sections
        Only these sections.
    max_mb
        QuPath: keep each file under this size (drops genes from the end of ``genes``).
    gzip
        QuPath: write ``.geojson.gz``.
    base_level, heatmap_level
        OME-Zarr: source pyramid level of the store's level 0, and the level heatmaps are
        rendered onto (see :func:`stimage_nb.io.ome_zarr.write_prediction_ome_zarr`).
    progress
        Show progress bars.

    Returns
    -------
    list of Path
        The written files or stores, one per section.
    """
    from tqdm.auto import tqdm

    fmt = str(format).lower().replace("_", "-")
    if fmt in ("omezarr", "zarr", "ome.zarr"):
        fmt = "ome-zarr"
    if fmt not in FORMATS:
        raise StimageInputError(f"unknown export format {format!r}; choose one of {list(FORMATS)}.")
    gene_list = _resolve_genes(genes)
    images = _manifest_images(manifest) if manifest is not None else {}
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f in tqdm(prediction_files(pred_dir, sections), desc=f"export {fmt}", disable=not progress):
        a = read_prediction(f)
        name = str(a.uns[K.UNS].get("section") or name_of_file(f, ".h5ad"))
        if fmt == "qupath":
            from .qupath import export_qupath

            target = out / f"{file_stem(name)}.geojson{'.gz' if gzip else ''}"
            written.append(export_qupath(a, target, genes=gene_list, max_mb=max_mb))
        else:
            from .io.image import open_image
            from .io.ome_zarr import write_prediction_ome_zarr

            image = None
            if name in images:
                img_path, um = images[name]
                image = open_image(img_path, um_per_px=um)
            elif manifest is not None:
                raise StimageInputError(f"{manifest}: has no row for section {name!r} (prediction {f}).")
            written.append(write_prediction_ome_zarr(a, out / f"{file_stem(name)}.ome.zarr", image, base_level=base_level,
                                                     heatmap_level=heatmap_level, genes=gene_list,
                                                     progress=progress))
        log.info("%s -> %s", f, written[-1])
    return written


def import_qupath_files(paths: Sequence[str | os.PathLike], *, image: str | os.PathLike | None = None,
                        um_per_px: float | None = None, out: str | os.PathLike | None = None) -> list:
    """Import QuPath GeoJSON files as Sections; with ``out``, also write ``OUT/<name>.h5ad`` each."""
    from .qupath import import_qupath

    secs = []
    for p in paths:
        s = import_qupath(p, image=image, um_per_px=um_per_px)
        if out is not None:
            o = Path(out).expanduser()
            o.mkdir(parents=True, exist_ok=True)
            target = write_h5ad(s.adata, o / f"{file_stem(s.name)}.h5ad")
            s.meta["h5ad"] = str(target)
        secs.append(s)
    return secs


# ---------------------------------------------------------------------- CLI
def _cmd_export(a) -> int:
    paths = export_predictions(a.pred, a.format, a.out, genes=a.genes, manifest=a.manifest,
                               sections=[s for s in a.sections.split(",") if s] if a.sections else None,
                               max_mb=a.max_mb, gzip=a.gzip, base_level=a.base_level,
                               heatmap_level=a.heatmap_level, progress=not a.no_progress)
    for p in paths:
        print(p)
    return 0


def _cmd_import(a) -> int:
    import numpy as np

    secs = import_qupath_files(a.files, image=a.image, um_per_px=a.um_per_px, out=a.out)
    for s in secs:
        ad = s.adata
        from .qupath import as_regions

        regs = as_regions(ad.uns[K.UNS].get(K.REGIONS))
        types = ad.obs[K.OBJECT_TYPE].value_counts().to_dict() if ad.n_obs else {}
        classes = ad.obs[K.CLASSIFICATION].value_counts().to_dict() if ad.n_obs else {}
        line = (f"{s.name}: {ad.n_obs} objects {types}, classes {classes}, {len(regs)} annotations "
                f"{sorted({r.label for r in regs})}, {ad.n_vars} predicted genes")
        if K.REGION in ad.obs and ad.n_obs:
            line += f", in annotations: {int(np.sum(ad.obs[K.REGION].astype(str) != ''))}"
        if "h5ad" in s.meta:
            line += f" -> {s.meta['h5ad']}"
        print(line)
    return 0


def add_cli(subparsers) -> None:
    """Register ``export`` and ``import-qupath`` on the ``stimage-nb`` sub-command parser."""
    p = subparsers.add_parser("export", help="export predictions for QuPath (GeoJSON) or OME-Zarr viewers")
    p.add_argument("--pred", required=True, type=Path, help="prediction directory (PRED_DIR/<section>.h5ad)")
    p.add_argument("--format", required=True, choices=list(FORMATS))
    p.add_argument("--out", required=True, type=Path, help="output directory: one file/store per section")
    p.add_argument("--genes", default=None, help="comma-separated genes or a gene-list file")
    p.add_argument("--manifest", default=None, type=Path, help="manifest CSV locating each section's image")
    p.add_argument("--sections", default=None, help="comma-separated sections (default: all)")
    p.add_argument("--max-mb", type=float, default=None, help="qupath: keep each file under this size")
    p.add_argument("--gzip", action="store_true", help="qupath: write .geojson.gz (QuPath >= 0.4 imports it)")
    p.add_argument("--base-level", type=int, default=0, help="ome-zarr: source pyramid level of level 0")
    p.add_argument("--heatmap-level", type=int, default=None, help="ome-zarr: level the heatmaps are rendered on")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_export)

    q = subparsers.add_parser("import-qupath", help="read QuPath GeoJSON (annotations, detections, cells)")
    q.add_argument("files", nargs="+", type=Path, help=".geojson / .json / .geojson.gz exported by QuPath")
    q.add_argument("--image", type=Path, default=None, help="the image the objects belong to")
    q.add_argument("--um-per-px", type=float, default=None, help="full-resolution pixel size (µm)")
    q.add_argument("--out", type=Path, default=None, help="write OUT/<name>.h5ad for each file")
    q.set_defaults(func=_cmd_import)
