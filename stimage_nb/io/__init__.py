"""Reading sections and images: one data model (:class:`Section`) and one image interface (:class:`SlideImage`).

Slides and OME-Zarr are read in place (:func:`open_image`); copies are made only when asked
(:func:`convert_to_ome_zarr`); the caches are managed by :mod:`stimage_nb.io.cache`.
"""

from .convert import convert_to_ome_zarr
from .image import SlideImage, open_image
from .ngff import write_ome_zarr
from .readers import read_anndata, read_gene_list, read_manifest, read_visium, read_wsi
from .section import Section

__all__ = ["Section", "SlideImage", "open_image", "convert_to_ome_zarr", "write_ome_zarr", "read_manifest",
           "read_visium", "read_anndata", "read_wsi", "read_gene_list"]
