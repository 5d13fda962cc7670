"""Single-cell platforms as cells: the real Xenium fixture (h5ad with swapped axes) and Xenium outs/ layouts."""

from __future__ import annotations

import json

import _platform_data as D
import numpy as np
import pandas as pd
import pytest

from stimage_nb import _keys as K
from stimage_nb.errors import StimageInputError
from stimage_nb.io import read_anndata, read_xenium
from stimage_nb.io.platforms import detect_platform


@pytest.fixture(scope="module")
def xen(data_dir):
    return D.xenium_fixture(data_dir)


@pytest.fixture(scope="module")
def saturation(xen):
    """Colour saturation of the fixture's H&E (glass ~0.04, stained tissue > 0.15)."""
    from PIL import Image
    from skimage.color import rgb2hsv

    return rgb2hsv(np.asarray(Image.open(xen / "NCBI858.jpg").convert("RGB")))[..., 1]


def _on_tissue(xy, sat, r: int = 4) -> np.ndarray:
    """Whether each point's neighbourhood (a (2r+1)^2 window) is stained tissue, not glass; False off-image."""
    h, w = sat.shape
    out = np.zeros(len(xy), bool)
    for i, (x, y) in enumerate(np.round(xy).astype(int)):
        if 0 <= x < w and 0 <= y < h:
            out[i] = sat[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1].mean() > 0.15
    return out


def test_xenium_h5ad_swapped_axes_put_cells_on_tissue(xen, saturation):
    """The fixture stores x_pixel = image ROW and y_pixel = image COLUMN. Read the right way round, the
    cells sit on stained tissue and inside the 1431x1249 image; read naively, most land on glass or off it."""
    kw = dict(um_per_px=D.XENIUM_HE_UM, platform="xenium", diameter_um=10.0)
    right = read_anndata(xen / "NCBI858.h5ad", xen / "NCBI858.jpg", xy_columns=("y_pixel", "x_pixel"), **kw)
    naive = read_anndata(xen / "NCBI858.h5ad", xen / "NCBI858.jpg", xy_columns=("x_pixel", "y_pixel"), **kw)
    assert right.platform == "xenium" and right.adata.uns[K.UNS][K.OBS_UNIT] == "cell"
    assert right.adata.n_obs == 200 and right.adata.n_vars == 338
    h, w = saturation.shape
    assert (right.xy[:, 0] < w).all() and (right.xy[:, 1] < h).all()
    assert (naive.xy[:, 1] >= h).any()  # y_pixel runs to 1395 > 1249 rows: it cannot be the row
    on_right, on_naive = _on_tissue(right.xy, saturation).mean(), _on_tissue(naive.xy, saturation).mean()
    assert on_right >= 0.85, on_right
    assert on_naive <= 0.5, on_naive
    assert (saturation > 0.15).mean() < 0.4  # not trivially true: most of the image is glass
    assert right.adata.uns[K.UNS]["coordinates"] == "obs['y_pixel'], obs['x_pixel']"


def test_xenium_outs_through_spatialdata_io_and_pandas(data_dir, tmp_path):
    """A Xenium outs/ (experiment.xenium, cells.parquet, cell_feature_matrix.h5) made from the fixture's real
    cells: read through spatialdata-io's xenium reader, and (only cells.csv.gz, as XOA 1.x also writes) with
    pandas; both put every cell back on its H&E pixel through the alignment matrix, with its counts."""
    ids, xy, X, genes = D.he_positions(data_dir)
    al = tmp_path / "he_imagealignment.csv"
    np.savetxt(al, D.alignment_matrix(), delimiter=",")
    img = D.xenium_fixture(data_dir) / "NCBI858.jpg"
    pq = D.xenium_outs(data_dir, tmp_path, cells="parquet", name="pq")
    gz = D.xenium_outs(data_dir, tmp_path, cells="csv.gz", name="gz")
    assert detect_platform(pq) == detect_platform(gz) == "xenium"
    a = read_xenium(pq, image=img, alignment=al)
    b = read_xenium(gz, image=img, alignment=al)
    assert a.adata.uns[K.UNS]["reader"] == "spatialdata_io.xenium" and b.adata.uns[K.UNS]["reader"] == "pandas"
    for s in (a, b):
        assert s.platform == "xenium"
        assert list(s.adata.obs_names) == ids
        np.testing.assert_allclose(s.xy, xy, atol=1e-6)
        assert s.um_per_px == pytest.approx(D.XENIUM_HE_UM)
        assert list(s.adata.var_names) == genes  # the negative-control probe is not a gene
        np.testing.assert_array_equal(s.adata.X.toarray(), X.astype(np.float32))
        area = pd.read_parquet(pq / "cells.parquet")["cell_area"].to_numpy()
        np.testing.assert_allclose(s.adata.obs[K.DIAMETER_UM], 2 * np.sqrt(area / np.pi))
    np.testing.assert_allclose(a.adata.obs[["x_um", "y_um"]], b.adata.obs[["x_um", "y_um"]])


def test_xenium_outs_versions_and_found_he(data_dir, tmp_path):
    """XOA 2.0+ needs cells.zarr.zip for spatialdata-io: without it the documented columns are read with
    pandas. An aligned H&E in outs/ (``*he_image.ome.tif`` + ``*he_imagealignment.csv``) is found."""
    import tifffile
    from PIL import Image

    outs = D.xenium_outs(data_dir, tmp_path, version="xenium-2.0.0.10", name="v2")
    rgb = np.asarray(Image.open(D.xenium_fixture(data_dir) / "NCBI858.jpg").convert("RGB"))
    tifffile.imwrite(outs / "NCBI858_he_image.ome.tif", rgb, photometric="rgb", metadata={"axes": "YXS"})
    np.savetxt(outs / "NCBI858_he_imagealignment.csv", D.alignment_matrix(), delimiter=",")
    s = read_xenium(outs)
    assert s.adata.uns[K.UNS]["reader"] == "pandas"
    assert s.image_path.name == "NCBI858_he_image.ome.tif"
    assert s.adata.uns[K.UNS]["alignment"].endswith("NCBI858_he_imagealignment.csv")
    np.testing.assert_allclose(s.xy, D.he_positions(data_dir)[1], atol=1e-6)
    assert s.image.width == rgb.shape[1] and s.image.um_per_px == pytest.approx(D.XENIUM_HE_UM)
    with pytest.raises(StimageInputError, match="needs cells.parquet, cell_feature_matrix.h5 .and cells.zarr.zip"):
        read_xenium(outs, reader="spatialdata")


def test_xenium_registered_he_without_alignment(data_dir, tmp_path):
    """An H&E registered to the Xenium frame (HEST-style): positions = µm / the H&E's µm/px."""
    s10 = D.XENIUM_HE_UM / D.XENIUM_PIXEL_SIZE
    outs = D.xenium_outs(data_dir, tmp_path, A=np.diag([s10, s10, 1.0]))
    img = D.xenium_fixture(data_dir) / "NCBI858.jpg"
    s = read_xenium(outs, image=img, um_per_px=D.XENIUM_HE_UM)
    np.testing.assert_allclose(s.xy, D.he_positions(data_dir)[1], atol=1e-6)
    with pytest.raises(StimageInputError, match=r"the pixel size \(µm/px\) is missing"):
        read_xenium(outs, image=img)  # a JPEG does not record it


def test_xenium_bad_inputs_name_the_file(data_dir, tmp_path):
    img = D.xenium_fixture(data_dir) / "NCBI858.jpg"
    outs = D.xenium_outs(data_dir, tmp_path)
    al = tmp_path / "al.csv"
    np.savetxt(al, D.alignment_matrix(), delimiter=",")
    with pytest.raises(StimageInputError, match=r"xenium_outs: no H&E for these Xenium cells .*alignment"):
        read_xenium(outs)
    with pytest.raises(StimageInputError, match=r"al.csv: the alignment implies 2.125 µm/px .* um_per_px=0.5"):
        read_xenium(outs, image=img, alignment=al, um_per_px=0.5)
    bad = tmp_path / "bad.csv"
    bad.write_text("1,0\n0,1\n")
    with pytest.raises(StimageInputError, match=r"bad.csv: the alignment must be an invertible 3x3 matrix"):
        read_xenium(outs, image=img, alignment=bad)
    spec = json.loads((outs / "experiment.xenium").read_text())
    (outs / "experiment.xenium").write_text(json.dumps({k: v for k, v in spec.items() if k != "pixel_size"}))
    with pytest.raises(StimageInputError, match=r"experiment.xenium: no valid pixel_size"):
        read_xenium(outs, image=img, alignment=al)
    (outs / "experiment.xenium").unlink()
    with pytest.raises(StimageInputError, match=r"xenium_outs: no experiment.xenium"):
        read_xenium(outs, image=img, alignment=al)
    gz = D.xenium_outs(data_dir, tmp_path, cells="csv.gz", name="gz")
    pd.read_csv(gz / "cells.csv.gz").drop(columns="y_centroid").to_csv(gz / "cells.csv.gz", index=False)
    with pytest.raises(StimageInputError, match=r"cells.csv.gz: the Xenium cell table lacks columns \['y_centroid'\]"):
        read_xenium(gz, image=img, alignment=al)
    (gz / "cell_feature_matrix.h5").unlink()
    (gz / "cells.csv.gz").unlink()
    with pytest.raises(StimageInputError, match=r"gz: no Xenium cell table"):
        read_xenium(gz, image=img, alignment=al)
    with pytest.raises(StimageInputError, match="Xenium outs/ folder not found"):
        read_xenium(tmp_path / "nowhere", image=img)
    xen = D.xenium_fixture(data_dir)
    with pytest.raises(StimageInputError, match=r"NCBI858.h5ad: no obs columns \['row'\] for the centres"):
        read_anndata(xen / "NCBI858.h5ad", img, xy_columns=("y_pixel", "row"), platform="xenium")
    with pytest.raises(StimageInputError, match=r"NCBI858.h5ad: no obsm\['spatial'\] .* name the obs columns with xy_columns"):
        read_anndata(xen / "NCBI858.h5ad", img, platform="xenium")
