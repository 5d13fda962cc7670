"""OMERO round trip: pull slides and annotations as OME-Zarr + Section, push predictions back.

Needs the ``omero`` extra (omero-py on zeroc-ice 3.6; ``bash .ci/install_omero.sh`` builds it).
Importing this package works without it; the functions raise an ImportError that says how to install.

>>> from stimage_nb import omero as om                                  # doctest: +SKIP
>>> with om.connect("omero.example.org", user="analyst") as conn:        # password: env or prompt
...     om.list_images(conn, dataset=51)
...     section = om.pull_section(conn, 1234)                            # image + spots + counts
...     om.push_predictions(conn, 1234, "pred/C3.h5ad", colour_by="ERBB2")

Modules: :mod:`~.connection` (credentials, errors), :mod:`~.browse`, :mod:`~.pull`, :mod:`~.push`,
:mod:`~.tables`, :mod:`~.model` (omero.model objects), :mod:`~.attributions` (nucleus attributions as
polygon ROIs), :mod:`~.cli` (``stimage-nb omero ...``).
"""

from __future__ import annotations

from .attributions import push_attributions
from .browse import list_datasets, list_images, list_projects
from .connection import (
    OmeroAuthError,
    OmeroConnectionError,
    OmeroError,
    OmeroNotFoundError,
    OmeroPermissionError,
    OmeroSession,
    Secret,
    connect,
)
from .pull import image_info, pull_annotations, pull_image, pull_rois, pull_section
from .push import list_runs, push_predictions, remove_run

__all__ = ["connect", "OmeroSession", "Secret", "OmeroError", "OmeroAuthError", "OmeroConnectionError",
           "OmeroNotFoundError", "OmeroPermissionError", "list_projects", "list_datasets", "list_images",
           "image_info", "pull_image", "pull_rois", "pull_annotations", "pull_section", "push_predictions",
           "list_runs", "remove_run", "push_attributions"]
