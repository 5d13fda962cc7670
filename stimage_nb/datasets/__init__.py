"""Public datasets, fetched with pooch into the data directory when the offline bundle is absent.

>>> from stimage_nb.datasets import fetch_her2st, fetch, list_datasets
>>> manifest = fetch_her2st()                  # the bundle's her2st/sections.csv, or a fresh download
>>> fetch("visium-ffpe-breast")                # 10x Visium FFPE breast cancer: outs/ + image + manifest
>>> fetch_tcga()                               # TCGA-BRCA outcome tables (TCGA-CDR, PORPOISE, SurvPath)

Every file has its source URL, its sha256 (where one is known; :mod:`._registry` says where each
comes from) and its place in the offline bundle's layout, so every reader works on either.
``stimage-nb fetch-data --list`` describes the datasets; ``stimage-nb fetch-data --dataset NAME`` fetches one.
"""

from ._fetch import RETRIES, TIMEOUT, default_dest, fetch, fetch_her2st, list_datasets
from ._genes import GENE_LIST, her2st_gene_list
from ._registry import DATASETS, HER2ST_SECTIONS, HER2ST_UM_PER_PX, DataFile, Dataset
from ._tcga import TCGA_FILES, fetch_tcga

__all__ = ["DATASETS", "DataFile", "Dataset", "GENE_LIST", "HER2ST_SECTIONS", "HER2ST_UM_PER_PX", "RETRIES",
           "TCGA_FILES", "TIMEOUT", "default_dest", "fetch", "fetch_her2st", "fetch_tcga", "her2st_gene_list",
           "list_datasets"]
