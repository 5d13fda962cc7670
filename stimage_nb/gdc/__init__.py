"""The NCI Genomic Data Commons (GDC) as a source of slides and clinical data (TCGA, CPTAC, ...).

>>> from stimage_nb import gdc                                               # doctest: +SKIP
>>> slides = gdc.find_slides("TCGA-BRCA")            # diagnostic slides + their cases (patient_id)
>>> gdc.write_manifest(slides, "gdc_manifest.txt")    # for gdc-client too
>>> report = gdc.download("gdc_manifest.txt", "slides/")   # resumable (HTTP Range), md5-verified
>>> clinical = gdc.fetch_clinical("TCGA-BRCA")        # patient_id, time (days), event, age, stage

The API contract (endpoints, filters, fields, ``size``/``from`` paging, ``/data`` with Range) is in
:mod:`~._client`'s docstring. ``stimage-nb gdc slides|download|clinical`` is the command line.
Tests run against recorded GDC responses served on 127.0.0.1 (``tests/gdc/``); ``pytest -m gdc``
adds a live test against the real API when it can be reached.
"""

from __future__ import annotations

from ._client import GDC_API, GDCChecksumError, GDCClient, GDCError, filter_in, filters_and
from ._clinical import CLINICAL_COLUMNS, fetch_clinical
from ._download import DownloadReport, DownloadResult, download, downloaded_paths, md5_file
from ._slides import MANIFEST_COLUMNS, SLIDE_COLUMNS, find_slides, read_manifest, slides_filter, write_manifest

__all__ = ["GDC_API", "GDCClient", "GDCError", "GDCChecksumError", "filters_and", "filter_in", "find_slides",
           "slides_filter", "write_manifest", "read_manifest", "download", "DownloadReport", "DownloadResult",
           "downloaded_paths", "md5_file", "fetch_clinical", "SLIDE_COLUMNS", "MANIFEST_COLUMNS",
           "CLINICAL_COLUMNS"]
