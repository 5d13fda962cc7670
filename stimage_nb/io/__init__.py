"""Reading sections and images: one data model (:class:`Section`) and one image interface (:class:`SlideImage`)."""

from .image import SlideImage, open_image
from .ngff import write_ome_zarr
from .readers import read_anndata, read_gene_list, read_manifest, read_visium, read_wsi
from .section import Section

__all__ = ["Section", "SlideImage", "open_image", "write_ome_zarr", "read_manifest", "read_visium",
           "read_anndata", "read_wsi", "read_gene_list"]
