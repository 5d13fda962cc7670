"""Tissue detection that does not assume glass (stimage_nb.io.tissue), on real H&E.

The field case (a region exported from a viewer, tissue from edge to edge) and other members of the kind
made from the bundle: all-tissue crops of other sections and another patient, tissue with a sliver of
glass (wide and narrow), a slide of bare glass (still refused). The her2st spot selections and the
Visium in_tissue flags (tests/test_io.py) keep the guarantees on whole slides.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stimage_nb.io.image import open_image
from stimage_nb.io.tissue import grid_points, in_mask, tissue_mask

FIELD = "field_cases/region_all_tissue/roi_all_tissue.png"


def _png(rgb: np.ndarray, path) -> object:
    Image.fromarray(np.ascontiguousarray(rgb)).save(path)
    return open_image(path, um_per_px=0.69, cache=False)


def _window(mask: np.ndarray, side: int, want: bool) -> tuple[int, int]:
    """Top-left (thumbnail px) of a side x side window that is all tissue (want=True) or all glass."""
    from scipy import ndimage as ndi

    m = mask if want else ~mask
    ok = ndi.minimum_filter(m.astype(np.uint8), size=side, mode="constant", cval=0).astype(bool)
    ys, xs = np.nonzero(ok)
    assert len(ys), "no such window"
    i = len(ys) // 2
    return int(xs[i] - side // 2), int(ys[i] - side // 2)


@pytest.fixture(scope="module")
def c3_b4(her2st_manifest):
    from stimage_nb.io.readers import read_manifest

    return {s.name: s for s in read_manifest(her2st_manifest, ["C3", "B4"], genes=["ERBB2"])}


def _crop(section, want_tissue: bool, side_px: int = 1024) -> np.ndarray:
    m, ds = tissue_mask(section.image)
    x, y = _window(m, int(np.ceil(side_px / ds)) + 2, want_tissue)
    return section.image.read_region(int((x + 1) * ds), int((y + 1) * ds), side_px, side_px)


def test_the_field_case_is_all_tissue(data_dir):
    img = open_image(data_dir / FIELD, um_per_px=0.69)
    m, _ = tissue_mask(img)
    assert m.all()
    xy = grid_points(img, 150.0)
    step = 150.0 / 0.69
    assert len(xy) == len(np.arange(step / 2, 1024, step)) ** 2  # the grid covers the whole region


@pytest.mark.parametrize("name", ["C3", "B4"])
def test_other_all_tissue_crops(c3_b4, name, tmp_path):
    """Crops inside the tissue of another section and another patient (other stain intensity)."""
    img = _png(_crop(c3_b4[name], True), tmp_path / f"{name}_inside.png")
    m, _ = tissue_mask(img)
    assert m.mean() >= 0.97, m.mean()


@pytest.mark.parametrize("glass_share", [0.15, 0.004])
def test_tissue_with_a_sliver_of_glass(data_dir, c3_b4, tmp_path, glass_share):
    """The field case with its right edge replaced by real glass of C3: the sliver is not tissue, the rest is."""
    rgb = np.asarray(Image.open(data_dir / FIELD).convert("RGB")).copy()
    glass = _crop(c3_b4["C3"], False)
    cut = max(1, int(round(glass_share * rgb.shape[1])))
    rgb[:, -cut:] = glass[:, -cut:]
    img = _png(rgb, tmp_path / "sliver.png")
    m, ds = tissue_mask(img)
    assert m[:, : -cut - 30].mean() >= 0.97            # the tissue (the closing may round its edge)
    if cut > 40:
        assert m[:, -cut + 30:].mean() <= 0.05         # the glass
    xy = grid_points(img, 100.0)
    assert (xy[:, 0] < rgb.shape[1] - cut).all() or cut < 50  # no grid point on the glass


def test_bare_glass_is_still_refused(c3_b4, tmp_path):
    from stimage_nb.errors import StimageInputError
    from stimage_nb.io.readers import read_wsi

    img = _png(_crop(c3_b4["C3"], False), tmp_path / "glass.png")
    m, _ = tissue_mask(img)
    assert not m.any()
    sec = read_wsi(tmp_path / "glass.png", um_per_px=0.69)
    assert sec.adata.n_obs == 0
    import _modelkit as kit

    from stimage_nb.predict import predict_slides
    with pytest.raises(StimageInputError, match="no tissue found"):
        predict_slides(kit.tiny_run(), [tmp_path / "glass.png"], tmp_path / "pred", um_per_px=0.69,
                       device="cpu", progress=False)


def test_predict_image_puts_a_grid_over_the_whole_field_region(data_dir, tmp_path, capsys):
    """`stimage-nb predict --image roi_all_tissue.png --um-per-px 0.69` (the field case, through the CLI)."""
    import _modelkit as kit
    import anndata as ad

    from stimage_nb.cli import main

    rc = main(["predict", "--model", str(kit.tiny_run()), "--image", str(data_dir / FIELD), "--um-per-px", "0.69",
               "--out", str(tmp_path / "pred"), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    a = ad.read_h5ad(tmp_path / "pred" / "roi_all_tissue.h5ad")
    step = 150.0 / 0.69  # the tiny model's tile side
    assert a.n_obs == len(np.arange(step / 2, 1024, step)) ** 2
    img = open_image(data_dir / FIELD, um_per_px=0.69)
    m, ds = tissue_mask(img)
    assert in_mask(np.asarray(a.obsm["spatial"]), m, ds).all()


def test_the_xenium_lung_h_and_e_cells_lie_on_the_tissue_mask(data_dir):
    """Another organ, scanner and resolution (Xenium lung H&E at 2.125 µm/px, the fixture's swapped x/y):
    the cells the instrument found lie on the mask, and the mask is not the whole image either."""
    import anndata as ad

    fx = data_dir / "fixtures" / "xenium_lung"
    a = ad.read_h5ad(fx / "NCBI858.h5ad")
    img = open_image(fx / "NCBI858.jpg", um_per_px=2.125, cache=False)
    mask, ds = tissue_mask(img)
    x, y = a.obs["y_pixel"].to_numpy(float), a.obs["x_pixel"].to_numpy(float)  # swapped in this fixture
    on = mask[(y / ds).astype(int).clip(0, mask.shape[0] - 1), (x / ds).astype(int).clip(0, mask.shape[1] - 1)]
    assert on.mean() >= 0.95, f"only {on.mean():.0%} of the Xenium cells lie on the tissue mask"
    assert mask.mean() < 0.98  # the image's bare areas are not tissue


def test_a_greyscale_slide_has_its_tissue_found_by_texture_and_darkness(data_dir, caplog):
    """The 16-bit greyscale field case (tissue along the bottom, glass above): without stain colour the
    tissue is found by texture and darkness against the glass, with a warning that the model sees an
    unfamiliar image; the same in 8 bits."""
    grey = data_dir / "field_cases" / "png_16bit_grey"
    masks = []
    for name in ("C3_crop_grey16.png", "reference_8bit.png"):
        with caplog.at_level("WARNING", logger="stimage_nb.io.tissue"):
            mask, _ = tissue_mask(open_image(grey / name, um_per_px=0.69, cache=False))
        assert "no colour (greyscale)" in caplog.text
        h = mask.shape[0]
        assert mask[: h // 3].mean() < 0.02 and mask[-h // 8:].mean() > 0.8  # glass on top, tissue at the bottom
        masks.append(mask)
    assert (masks[0] == masks[1]).mean() > 0.99
