"""The TCGA-BRCA outcome tables the outcome analyses read (TCGA-CDR, PORPOISE, SurvPath), from the bundle or
downloaded with pooch against known hashes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .._settings import cache_dir, data_dir
from ..errors import DataUnavailableError, one_line

log = logging.getLogger(__name__)

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
        except Exception as e:  # noqa: BLE001 - any failure of the download is the same for the user
            raise DataUnavailableError(
                f"TCGA table {rel} is not in the data bundle and cannot be downloaded from {url} "
                f"({type(e).__name__}: {one_line(e, 200)}). Check the internet connection, or point "
                "STIMAGE_NB_DATA at a copy of the data bundle.") from e
        out[k] = Path(p)
    return out
