"""The public datasets the tutorials use, fetched into the cache when the offline bundle is absent.

her2st: Andersson A. et al., Nat Commun 12, 6012 (2021); public repository ``almaan/her2st`` on GitHub
(also Zenodo record 3957257). No licence file is stated there; cite the paper.

:func:`fetch_her2st` writes the same layout as the offline bundle (``her2st/sections.csv``,
``images/``, ``counts/``, ``spots/``, ``celltypes/major``), so every reader works on either.
The STimage 769-gene list is not part of the her2st repository: when the bundle's
``genes_stimage_her2st.txt`` is absent, :func:`her2st_gene_list` falls back to the most variable genes
of the training sections (documented in the returned list's provenance, ``source``).
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import shutil
import urllib.request
from pathlib import Path

from ._settings import cache_dir, data_dir

log = logging.getLogger(__name__)

HER2ST_RAW = os.environ.get("STIMAGE_NB_HER2ST_URL",
                            "https://raw.githubusercontent.com/almaan/her2st/master")
HER2ST_SECTIONS = {  # section: (patient, image path in the repository)
    "B4": ("B", "data/ST-imgs/B/B4/BT10737_D2_HE.jpg"),
    "C2": ("C", "data/ST-imgs/C/C2/5714_HE_BT_C2.jpg"),
    "C3": ("C", "data/ST-imgs/C/C3/5714_HE_BT_D1.jpg"),
    "C4": ("C", "data/ST-imgs/C/C4/5714_HE_BT_D2.jpg"),
    "C5": ("C", "data/ST-imgs/C/C5/5714_HE_BT_E1.jpg"),
    "C6": ("C", "data/ST-imgs/C/C6/5714_HE_BT_E2.jpg"),
}
HER2ST_UM_PER_PX = 0.69
_PROPS_MAJOR = "res/ST-deconv/props/major/{s}/W.2020-03-04130406.862404.tsv.gz"


def _download(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically; a clear error when offline."""
    if dest.exists() and dest.stat().st_size > 0:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
    except Exception as e:  # noqa: BLE001
        tmp.unlink(missing_ok=True)
        raise ConnectionError(f"cannot download {url} ({e}). Check the internet connection, or point "
                              "STIMAGE_NB_DATA at a local copy of the data bundle.") from e
    os.replace(tmp, dest)
    return dest


def fetch_her2st(dest: str | os.PathLike | None = None, sections=None) -> Path:
    """Fetch the six her2st sections the tutorials use; returns the manifest path.

    Does nothing when the offline bundle (``$STIMAGE_NB_DATA`` or ``../shared/data``) already has them.
    """
    if dest is None:
        existing = data_dir(required=False) / "her2st" / "sections.csv"
        if existing.is_file():
            return existing
        dest = cache_dir() / "data"
    root = Path(dest) / "her2st"
    sections = list(sections or HER2ST_SECTIONS)
    rows = ["section,patient,image,counts,spots,um_per_px"]
    for s in sections:
        patient, img = HER2ST_SECTIONS[s]
        log.info("fetching her2st section %s", s)
        _download(f"{HER2ST_RAW}/{img}", root / "images" / f"{s}.jpg")
        _download(f"{HER2ST_RAW}/data/ST-cnts/{s}.tsv.gz", root / "counts" / f"{s}.tsv.gz")
        _download(f"{HER2ST_RAW}/data/ST-spotfiles/{s}_selection.tsv", root / "spots" / f"{s}_selection.tsv")
        props = root / "celltypes" / "major" / f"{s}-proportion.tsv"
        if not props.exists():
            gz = _download(f"{HER2ST_RAW}/{_PROPS_MAJOR.format(s=s)}", root / "celltypes" / "raw" / f"{s}.tsv.gz")
            with gzip.open(gz, "rb") as f:
                text = io.TextIOWrapper(f).read()
            tmp = props.with_name(props.name + ".tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, props)
        rows.append(f"{s},{patient},images/{s}.jpg,counts/{s}.tsv.gz,spots/{s}_selection.tsv,{HER2ST_UM_PER_PX}")
    manifest = root / "sections.csv"
    tmp = manifest.with_name("sections.csv.tmp")
    tmp.write_text("\n".join(rows) + "\n")
    os.replace(tmp, manifest)
    return manifest


def her2st_gene_list(manifest: str | os.PathLike | None = None, n_top: int = 769, train_sections=None) -> list[str]:
    """The STimage her2st gene list, or (when absent) the ``n_top`` most variable genes of the training sections."""
    from .io.readers import read_gene_list, read_manifest

    manifest = Path(manifest) if manifest else data_dir() / "her2st" / "sections.csv"
    gl = manifest.parent / "genes_stimage_her2st.txt"
    if gl.is_file():
        return read_gene_list(gl)
    import numpy as np

    log.warning("%s not found; using the %d most variable genes of the training sections instead", gl, n_top)
    secs = read_manifest(manifest, train_sections)
    common = set.intersection(*(set(s.genes) for s in secs))
    genes = sorted(common)
    stats = []
    for s in secs:
        X = s.adata[:, genes].X
        X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
        stats.append(np.log1p(X))
    X = np.concatenate(stats)
    keep = X.mean(0) > 0.1
    order = np.argsort(-X.var(0) * keep)
    return [genes[i] for i in order[:n_top]]
