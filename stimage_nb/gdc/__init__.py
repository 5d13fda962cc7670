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

import importlib

# name -> private module, imported on first use (PEP 562): the CLI's parser does not load pandas
_EXPORTS = {
    "GDC_API": "_client", "GDCClient": "_client", "GDCError": "_client", "GDCChecksumError": "_client",
    "filters_and": "_client", "filter_in": "_client", "find_slides": "_slides", "slides_filter": "_slides",
    "write_manifest": "_slides", "read_manifest": "_slides", "SLIDE_COLUMNS": "_slides", "MANIFEST_COLUMNS": "_slides",
    "download": "_download", "DownloadReport": "_download", "DownloadResult": "_download",
    "downloaded_paths": "_download", "md5_file": "_download", "resolve_gdc_slide": "_download", "fetch_clinical": "_clinical",
    "CLINICAL_COLUMNS": "_clinical",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
