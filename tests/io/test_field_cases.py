"""The image files users really have (issue 10 §2): each ``field_cases`` example, and other members of its kind
made here from the real her2st C3 pixels.

Kinds: every bit depth and colour mode scaled to 8-bit RGB (alpha onto white); every NGFF layout a converter or
OMERO produces; µm/px from every standard place, else one clear error naming them.
"""

from __future__ import annotations

import numpy as np
import pytest
from _wsikit import shrink, tissue, write_slide
from PIL import Image

from stimage_nb.errors import StimageInputError
from stimage_nb.io.image import SlideImage, open_image


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STIMAGE_NB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def fc(data_dir):
    return data_dir / "field_cases"


@pytest.fixture(scope="module")
def ref():
    """Real 8-bit RGB pixels (C3) every variant is made from."""
    return tissue(384, 512)


def _whole(img: SlideImage) -> np.ndarray:
    return img.read_region(0, 0, img.width, img.height)


# ------------------------------------------------------------------------- bit depths and colour modes
def test_png_16bit_grey_is_scaled_not_clamped(fc):
    img = open_image(fc / "png_16bit_grey" / "C3_crop_grey16.png", um_per_px=0.69)
    got = _whole(img)
    want = np.asarray(Image.open(fc / "png_16bit_grey" / "reference_8bit.png")).astype(float)
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 0] == got[..., 2]).all()  # grey as three equal channels
    assert np.corrcoef(got[..., 0].ravel().astype(float), want.ravel())[0, 1] > 0.99
    assert (got < 255).mean() > 0.5 and np.abs(got[..., 0] - want).mean() < 1.0  # the 8-bit values, not white


def _grey(rgb):
    return np.asarray(Image.fromarray(rgb).convert("L"))


@pytest.mark.parametrize("kind", ["I;16 full range", "I;16 12-bit values", "L", "LA", "P", "P transparent",
                                  "CMYK", "RGB 16-bit PNG", "RGBA"])
def test_every_pillow_mode_becomes_the_same_rgb(kind, ref, tmp_path):
    """Flat rasters (converted once): each mode gives the pixels of the 8-bit reference (JPEG-free formats)."""
    import imagecodecs

    g8 = _grey(ref)
    f = tmp_path / "x.png"
    want = ref
    if kind == "I;16 full range":  # 16-bit PNGs written by libpng (imagecodecs), as scanners' software does
        f.write_bytes(imagecodecs.png_encode(g8.astype(np.uint16) * 257))
        want = np.repeat(g8[..., None], 3, 2)
    elif kind == "I;16 12-bit values":  # a 12-bit camera in 16-bit words: scaled by 4095, not 65535
        f.write_bytes(imagecodecs.png_encode((g8.astype(np.uint32) * 4095 // 255).astype(np.uint16)))
        want = np.repeat(g8[..., None], 3, 2)
    elif kind == "L":
        Image.fromarray(g8).save(f)
        want = np.repeat(g8[..., None], 3, 2)
    elif kind == "LA":
        la = np.stack([g8, np.full_like(g8, 255)], -1)
        la[:, :100, 1] = 0  # an unscanned strip
        Image.fromarray(la, "LA").save(f)
        want = np.repeat(g8[..., None], 3, 2).copy()
        want[:, :100] = 255
    elif kind.startswith("P"):
        p = Image.fromarray(ref).quantize(64)
        if kind == "P transparent":
            idx = np.asarray(p)
            p.save(f, transparency=int(idx[0, 0]))
            want = np.asarray(p.convert("RGB")).copy()
            want[idx == idx[0, 0]] = 255
        else:
            p.save(f)
            want = np.asarray(p.convert("RGB"))
    elif kind == "CMYK":
        cmyk = Image.fromarray(ref).convert("CMYK")  # a CMYK JPEG (print workflows): Pillow's own conversion
        f = tmp_path / "x.jpg"
        cmyk.save(f, quality=100)
        want = np.asarray(Image.open(f).convert("RGB"))
    elif kind == "RGB 16-bit PNG":
        f.write_bytes(imagecodecs.png_encode(ref.astype(np.uint16) * 257))
    elif kind == "RGBA":
        rgba = np.concatenate([ref, np.full(ref.shape[:2] + (1,), 255, np.uint8)], 2)
        rgba[:50, :, 3] = 0
        Image.fromarray(rgba).save(f)
        want = ref.copy()
        want[:50] = 255
    got = _whole(open_image(f, um_per_px=0.5))
    assert got.shape == want.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, kind


@pytest.mark.parametrize("kind", ["uint16 RGB", "uint16 12-bit grey", "int32 grey", "float32 [0,1]",
                                  "float32 [0,255]", "miniswhite", "planar RGB", "RGBA associated",
                                  "RGBA unassociated", "palette"])
def test_every_tiff_sample_format_becomes_the_same_rgb(kind, ref, tmp_path):
    """Slides and flat TIFFs read lazily (tifffile): bit depths, signed/float samples, planar, alpha, palette."""
    import tifffile

    g8 = _grey(ref)
    grey = np.repeat(g8[..., None], 3, 2)
    f = tmp_path / "x.tif"
    kw = dict(resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER", tile=(128, 128))
    want = ref
    if kind == "uint16 RGB":
        tifffile.imwrite(f, ref.astype(np.uint16) * 257, photometric="rgb", **kw)
    elif kind == "uint16 12-bit grey":
        tifffile.imwrite(f, (g8.astype(np.uint32) * 4095 // 255).astype(np.uint16), photometric="minisblack", **kw)
        want = grey
    elif kind == "int32 grey":
        tifffile.imwrite(f, g8.astype(np.int32) * 257, photometric="minisblack", **kw)
        want = grey
    elif kind == "float32 [0,1]":
        tifffile.imwrite(f, ref.astype(np.float32) / 255, photometric="rgb", **kw)
    elif kind == "float32 [0,255]":
        tifffile.imwrite(f, ref.astype(np.float32), photometric="rgb", **kw)
    elif kind == "miniswhite":
        tifffile.imwrite(f, 255 - g8, photometric="miniswhite", **kw)
        want = grey
    elif kind == "planar RGB":
        tifffile.imwrite(f, np.moveaxis(ref, 2, 0), photometric="rgb", planarconfig="separate", **kw)
    elif kind.startswith("RGBA"):
        a = np.full(ref.shape[:2], 255, np.uint8)
        a[:, :64] = 0
        rgb = ref.copy()
        if kind == "RGBA associated":
            rgb[:, :64] = 0  # premultiplied: colour times alpha
        tifffile.imwrite(f, np.dstack([rgb, a]), photometric="rgb",
                         extrasamples=["assocalpha" if kind == "RGBA associated" else "unassalpha"], **kw)
        want = ref.copy()
        want[:, :64] = 255
    elif kind == "palette":
        p = Image.fromarray(ref).quantize(64)
        cmap = np.zeros((3, 256), np.uint16)
        pal = np.asarray(p.getpalette()[:192], np.uint16).reshape(-1, 3)
        cmap[:, :64] = pal.T * 257
        tifffile.imwrite(f, np.asarray(p), photometric="palette", colormap=cmap, **kw)
        want = np.asarray(p.convert("RGB"))
    img = open_image(f)
    assert img.backend == "TIFF (tifffile)" and img.um_per_px == pytest.approx(0.5)
    got = _whole(img)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, kind


def test_rgba_transparent_area_is_glass(fc):
    """field case: the transparent third reads as white; tissue mask, grid points and tiles equal the reference's."""
    from stimage_nb.io.tissue import grid_points, tissue_mask
    from stimage_nb.tiles import extract_tiles

    img = open_image(fc / "rgba_transparent" / "slide_rgba.png", um_per_px=0.69)
    want = open_image(fc / "rgba_transparent" / "reference_on_white.png", um_per_px=0.69)
    np.testing.assert_array_equal(_whole(img), _whole(want))
    np.testing.assert_array_equal(tissue_mask(img)[0], tissue_mask(want)[0])
    xy = grid_points(img, 55.0)
    np.testing.assert_array_equal(xy, grid_points(want, 55.0))
    assert len(xy) > 0 and xy[:, 0].min() > img.width / 3 - 55 / 0.69  # nothing on the unscanned third
    np.testing.assert_array_equal(extract_tiles(img, xy, 55.0, 32, cache=False),
                                  extract_tiles(want, xy, 55.0, 32, cache=False))


def test_a_transparent_region_of_a_slide_is_white(ref, tmp_path):
    """The same kind in a slide: an RGBA pyramidal TIFF whose unscanned area is transparent."""
    rgba = np.concatenate([ref, np.full(ref.shape[:2] + (1,), 255, np.uint8)], 2)
    rgba[:, 256:, 3] = 0
    img = open_image(write_slide(tmp_path / "a.tif", [rgba, shrink(rgba, 2)], 0.5, compression="zlib",
                                 extrasamples=["unassalpha"], tile=128))
    got = _whole(img)
    np.testing.assert_array_equal(got[:, :256], ref[:, :256])
    assert (got[:, 256:] == 255).all() and (img.read_region(0, 0, 256, 192, level=1)[:, 128:] == 255).all()


# ------------------------------------------------------------------------- NGFF layouts
def test_ome_zarr_05_opens_like_04(fc):
    img = open_image(fc / "ome_zarr_v05" / "C3_crop.ome.zarr")
    assert img.backend == "OME-Zarr 0.5" and (img.width, img.height) == (768, 768) and img.n_levels == 2
    assert img.um_per_px == pytest.approx(0.69) and img.downsamples == pytest.approx([1, 2])
    np.testing.assert_array_equal(_whole(img), np.asarray(Image.open(fc / "ome_zarr_v05" / "reference.png")))


def _write_ngff(path, levels_cyx, fmt, axes, scales, *, root_attrs=None, sub=None):
    """An OME-Zarr written by ome-zarr-py itself (its writer, its format versions)."""
    import zarr
    from ome_zarr.writer import write_multiscale

    g = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    if root_attrs:
        g.attrs.update(root_attrs)
    target = g.require_group(sub) if sub else g
    names = [a["name"] for a in axes]
    write_multiscale(levels_cyx, target, axes=axes, fmt=fmt, scale=dict(zip(names, scales[0])))
    written = [d["coordinateTransformations"][0]["scale"] for d in (target.attrs.get("ome") or dict(target.attrs))
               ["multiscales"][0]["datasets"]]
    assert np.allclose(written, scales)  # ome-zarr-py derived each level's scale from the pyramid
    return path


@pytest.mark.parametrize("layout", ["0.4", "0.5", "bioformats2raw", "5-D tczyx nanometer", "millimeter",
                                    "16-bit", "yx grey"])
def test_every_ngff_layout_opens(layout, ref, tmp_path):
    from ome_zarr.format import FormatV04, FormatV05

    cyx = np.moveaxis(ref, 2, 0)
    lv = [cyx, np.moveaxis(shrink(ref, 2), 2, 0)]
    um = [0.5, 1.0]
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"}]
    scales = [[1.0, u, u] for u in um]
    p = tmp_path / "img.ome.zarr"
    want, kind = ref, "OME-Zarr 0.4"
    if layout == "0.4":
        _write_ngff(p, lv, FormatV04(), axes, scales)
    elif layout == "0.5":
        _write_ngff(p, lv, FormatV05(), axes, scales)
        kind = "OME-Zarr 0.5"
    elif layout == "bioformats2raw":  # the root holds the layout marker and OME-XML; the image is series 0
        _write_ngff(p, lv, FormatV04(), axes, scales, root_attrs={"bioformats2raw.layout": 3}, sub="0")
        (p / "OME").mkdir()
        (p / "OME" / "METADATA.ome.xml").write_text(
            '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="Image:0" Name="C3">'
            '<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="512" SizeY="384" SizeC="3" '
            'SizeZ="1" SizeT="1" PhysicalSizeX="0.5"/></Image></OME>')
        kind = "OME-Zarr 0.4 (bioformats2raw layout)"
    elif layout == "5-D tczyx nanometer":
        ax5 = [{"name": "t", "type": "time"}, axes[0], {"name": "z", "type": "space", "unit": "nanometer"},
               {"name": "y", "type": "space", "unit": "nanometer"}, {"name": "x", "type": "space", "unit": "nanometer"}]
        _write_ngff(p, [a[None, :, None] for a in lv], FormatV04(), ax5, [[1.0, 1.0, 1000.0, u * 1e3, u * 1e3] for u in um])
    elif layout == "millimeter":
        mm = [dict(a, unit="millimeter") if a["type"] == "space" else a for a in axes]
        _write_ngff(p, lv, FormatV04(), mm, [[1.0, u / 1e3, u / 1e3] for u in um])
    elif layout == "16-bit":
        _write_ngff(p, [a.astype(np.uint16) * 257 for a in lv], FormatV04(), axes, scales)
    elif layout == "yx grey":
        g8 = _grey(ref)
        _write_ngff(p, [g8, shrink(g8[..., None], 2)[..., 0]], FormatV04(), axes[1:], [s[1:] for s in scales])
        want = np.repeat(g8[..., None], 3, 2)
    img = open_image(p)
    assert img.backend == kind and img.um_per_px == pytest.approx(0.5) and img.n_levels == 2, layout
    assert img.level_shapes == [(384, 512), (192, 256)]
    assert np.abs(_whole(img).astype(int) - want.astype(int)).max() <= 1, layout


def test_an_ngff_store_without_an_image_is_refused(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "empty.zarr"), mode="w", zarr_format=2).attrs["foo"] = 1
    with pytest.raises(StimageInputError, match=r"empty.zarr: not a readable OME-Zarr image \(no NGFF 'multiscales'"):
        open_image(tmp_path / "empty.zarr")


# ------------------------------------------------------------------------- µm/px from every standard place
def test_ome_tiff_pixel_size_only_in_the_ome_xml(fc):
    from stimage_nb.tiles import extract_tiles

    img = open_image(fc / "ome_tiff_physical_size" / "roi.ome.tif")
    assert img.um_per_px == pytest.approx(0.69) and img.um_per_px_source.startswith("OME-XML PhysicalSizeX")
    assert img.backend == "OME-TIFF (tifffile)" and img.level_shapes == [(768, 768), (384, 384), (192, 192)]
    want = np.asarray(Image.open(fc / "ome_tiff_physical_size" / "reference.png").convert("RGB"))
    assert np.abs(_whole(img).astype(int) - want.astype(int)).mean() < 2  # the same pixels (JPEG tiles)
    img.read_stats.clear()
    extract_tiles(img, np.array([[384.0, 384.0]]), 150.0, 64, cache=False)  # 2.3 µm/px wanted: the 1.38 level
    assert {lev for _, lev in img.read_stats} == {1}


@pytest.mark.parametrize("place,expect", [
    ("ome nm", "OME-XML PhysicalSizeX (nm)"), ("ome mm", "OME-XML PhysicalSizeX (mm)"),
    ("ome no unit", "OME-XML PhysicalSizeX (µm)"), ("tiff cm", "TIFF XResolution/ResolutionUnit (centimeter)"),
    ("tiff inch", "TIFF XResolution/ResolutionUnit (inch)"), ("aperio", "vendor property aperio.MPP"),
    ("png pHYs", "image density"), ("given", "given")])
def test_pixel_size_from_every_standard_place(place, expect, ref, tmp_path):
    import tifffile

    f = tmp_path / "x.tif"
    um = None
    if place.startswith("ome"):
        meta = {"axes": "YXS", "PhysicalSizeX": 0.69, "PhysicalSizeY": 0.69}
        if place == "ome nm":
            meta.update(PhysicalSizeX=690.0, PhysicalSizeXUnit="nm")
        elif place == "ome mm":
            meta.update(PhysicalSizeX=0.00069, PhysicalSizeXUnit="mm")
        f = tmp_path / "x.ome.tif"
        tifffile.imwrite(f, ref, photometric="rgb", tile=(128, 128), metadata=meta)
    elif place == "tiff cm":
        write_slide(f, [ref], 0.69, tile=128, resolutionunit="CENTIMETER")
    elif place == "tiff inch":
        write_slide(f, [ref], 0.69, tile=128, resolutionunit="INCH")
    elif place == "aperio":
        f = tmp_path / "x.svs"
        write_slide(f, [ref], None, tile=128, description="Aperio Image Library v12.0.15\r\n512x384 (128x128) JPEG/RGB "
                    "Q=70|AppMag = 20|MPP = 0.69|ScanScope ID = SS1234")
    elif place == "png pHYs":
        f = tmp_path / "x.png"
        Image.fromarray(ref).save(f, dpi=(25400 / 0.69, 25400 / 0.69))
    else:
        write_slide(f, [ref], None, tile=128)
        um = 0.69
    img = open_image(f, um_per_px=um)
    assert img.um_per_px == pytest.approx(0.69, rel=1e-4) and img.um_per_px_source.startswith(expect), place


def test_no_pixel_size_anywhere_is_one_error_naming_every_place(ref, tmp_path, capsys):
    import _modelkit as kit

    from stimage_nb.cli import main

    f = tmp_path / "screen.tif"  # a 72-dpi TIFF (a screen default, not a scan): ignored, and said so
    write_slide(f, [ref], 25400 / 72, tile=128, resolutionunit="INCH")
    with pytest.raises(StimageInputError) as e:
        open_image(f)
    msg = str(e.value)
    for place in ("OME-XML PhysicalSizeX", "TIFF XResolution", "Aperio MPP", "NGFF coordinateTransformations",
                  "352.8 µm/px (not a microscope", "--um-per-px"):
        assert place in msg, place
    rc = main(["predict", "--model", str(kit.tiny_run()), "--image", str(f), "--out", str(tmp_path / "p"),
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "pixel size (µm/px) is missing" in err
    assert open_image(f, um_per_px=0.69).um_per_px == 0.69  # the fix the message names
