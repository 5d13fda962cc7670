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


# ----------------------------------------------------------------------------- TCGA outcome tables
# key: (path under tcga/, URL, pooch known_hash). The TCGA-CDR comes from the GDC (PanCanAtlas publication
# page; the hash is the md5 the GDC lists for it), the others from the PORPOISE and SurvPath repositories
# (sha256 of the files in the offline bundle). URLs checked against the projects' repositories, not by
# downloading (no internet here): a wrong one fails with pooch's HTTP error, a changed file with its hash error.
_PORPOISE = "https://github.com/mahmoodlab/PORPOISE/raw/master/datasets_csv"
_SURVPATH = "https://github.com/mahmoodlab/SurvPath/raw/main"
TCGA_FILES = {
    "cdr": ("cdr/TCGA-CDR-SupplementalTableS1.xlsx",
            "https://api.gdc.cancer.gov/data/1b5f413e-a8d1-4d10-92eb-7c4ae739ed81",
            "md5:a4591b2dcee39591f59e5e25a6ce75fa"),
    "porpoise": ("brca_porpoise/tcga_brca_all_clean.csv.zip", f"{_PORPOISE}/tcga_brca_all_clean.csv.zip",
                 "sha256:4bc9de58ef6e8f8f7566fef6512c6c7db62cb827e4117b6f356d679e26e3e5f8"),
    "survpath_meta": ("brca_survpath/tcga_brca.csv", f"{_SURVPATH}/datasets_csv/metadata/tcga_brca.csv",
                      "sha256:0bcaea23c01d65c927d108549feeb4744cbd95f33981181eee14c05f33404e61"),
    "survpath_clinical": ("brca_survpath/tcga_brca_clinical.csv",
                          f"{_SURVPATH}/datasets_csv/clinical_data/tcga_brca_clinical.csv",
                          "sha256:a2e4d91b7f0f75963d91440794c9d484995e8f54277d9192fb64c6a33a0ba880"),
    **{f"survpath_split_{k}": (f"brca_survpath/splits/splits_{k}.csv",
                               f"{_SURVPATH}/splits/5foldcv/tcga_brca/splits_{k}.csv", h)
       for k, h in enumerate(["sha256:5ab6cdcf4ab73ff8beca32984d3d94e7cb64f46925dcc4adc381fe91157cd772",
                              "sha256:8ce02be781a3056adb4c55d181b4c257003fa4a9349b76ece2ba01f5d2599ff5",
                              "sha256:92ff7a0750bd3590f57c91700060aabc62b753ca1ee2f4d5873e8242b28c1a83",
                              "sha256:e48658b624323791f4c5261a4660f0f010fd7f13a5b7a23724b6f8f9c3f8d41a",
                              "sha256:c5306fb805c4ad2a375ecf11c42deffad7192d36c5a530b17aed5656b18b7dd4"])},
}


def fetch_tcga(dest: str | os.PathLike | None = None, keys=None) -> dict[str, Path]:
    """Paths of the TCGA outcome tables (``tcga/`` of the data bundle), downloading missing ones.

    Uses the bundle (``$STIMAGE_NB_DATA/tcga`` or ``../shared/data/tcga``) where it has a file; otherwise
    downloads it with pooch into ``dest`` (default ``<cache>/data/tcga``), checking its hash. Returns
    {key: path} for ``keys`` (default all of :data:`TCGA_FILES`).
    """
    keys = list(keys or TCGA_FILES)
    bundle = data_dir(required=False) / "tcga"
    target = Path(dest) if dest is not None else cache_dir() / "data" / "tcga"
    out = {}
    for k in keys:
        rel, url, known = TCGA_FILES[k]
        if (bundle / rel).is_file():
            out[k] = bundle / rel
            continue
        if (target / rel).is_file():
            out[k] = target / rel
            continue
        import pooch

        log.info("fetching %s from %s", rel, url)
        try:
            p = pooch.retrieve(url, known_hash=known, fname=Path(rel).name, path=target / Path(rel).parent,
                               progressbar=False)
        except Exception as e:  # noqa: BLE001
            raise ConnectionError(f"cannot download {url} ({type(e).__name__}: {e}). Check the internet "
                                  "connection, or point STIMAGE_NB_DATA at a copy of the data bundle.") from e
        out[k] = Path(p)
    return out
