"""Reading sections and images: one data model (:class:`Section`) and one image interface (:class:`SlideImage`).

Slides and OME-Zarr are read in place (:func:`open_image`); copies are made only when asked
(:func:`convert_to_ome_zarr`); the caches are managed by :mod:`stimage_nb.io.cache`.
"""

from .convert import convert_to_ome_zarr
from .image import SlideImage, open_image
from .ngff import write_ome_zarr
from .platforms import PLATFORMS
from .pseudospots import aggregate_pseudospots, pseudospot_lattice
from .readers import manifest_platforms, read_anndata, read_gene_list, read_manifest, read_section_files, read_wsi
from .section import Section
from .visium import read_visium, read_visium_hd
from .xenium import read_xenium

__all__ = ["Section", "SlideImage", "open_image", "convert_to_ome_zarr", "write_ome_zarr", "read_manifest",
           "read_visium", "read_anndata", "read_wsi", "read_gene_list", "read_visium_hd", "read_xenium",
           "read_section_files", "aggregate_pseudospots", "pseudospot_lattice", "PLATFORMS", "manifest_platforms"]
