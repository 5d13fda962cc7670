"""Whole slides read in place (issue 14): backends, level choice, the converted copy, damaged and unreadable files.

Slides are written tile by tile from the real her2st C3 H&E (``_wsikit``); the SVS is the bundle's real
Aperio fixture.
"""

from __future__ import annotations

import numpy as np
import pytest
from _wsikit import shrink, tissue, write_slide

from stimage_nb.errors import SlideReadError, StimageInputError
from stimage_nb.io.image import SlideImage, open_image


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STIMAGE_NB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def c3_4k():
    return tissue(4096, 4096)


@pytest.fixture(scope="module")
def svs_like(tmp_path_factory, c3_4k):
    """A JPEG pyramid with the levels an Aperio scanner writes (1, 4, 16), as pages, µm/px in resolution tags."""
    p = tmp_path_factory.mktemp("svs") / "svs_like.tif"
    return write_slide(p, [c3_4k, shrink(c3_4k, 4), shrink(c3_4k, 16)], 0.25)


def test_the_real_svs_is_read_in_place_and_equals_openslide(data_dir):
    """The bundle's Aperio SVS opens through tifffile's zarr view (no copy in the cache) and its pixels are
    the ones OpenSlide, the field's reference reader, decodes."""
    from stimage_nb._settings import cache_dir
    from stimage_nb.io._levels import OpenSlideLevels

    svs = data_dir / "fixtures" / "wsi" / "cmu_small_region.svs"
    img = open_image(svs)
    assert img.backend == "Aperio SVS (tifffile)" and img.path == svs
    assert img.um_per_px == pytest.approx(0.499) and img.um_per_px_source == "vendor property aperio.MPP"
    assert not (cache_dir() / "images").exists() or not any((cache_dir() / "images").iterdir())
    ref = SlideImage(levels=OpenSlideLevels(svs, "aperio"), source=str(svs))
    assert ref.um_per_px == pytest.approx(0.499) and ref.level_shapes == img.level_shapes
    for box in [(0, 0, 300, 200), (1000, 1500, 257, 311), (2100, 2900, 120, 67)]:
        a, b = img.read_region(*box).astype(int), ref.read_region(*box).astype(int)
        assert np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.2  # two libjpeg builds: rounding at most


def test_pyramid_levels_as_pages_or_subifds_read_the_same(tmp_path, c3_4k):
    levels = [c3_4k, shrink(c3_4k, 2), shrink(c3_4k, 4), shrink(c3_4k, 8)]
    a = open_image(write_slide(tmp_path / "pages.tif", levels, 0.5, compression="zlib"))
    b = open_image(write_slide(tmp_path / "subifds.tif", levels, 0.5, compression="zlib", subifds=True))
    assert a.level_shapes == b.level_shapes == [lv.shape[:2] for lv in levels]
    assert a.um_per_px == b.um_per_px == pytest.approx(0.5)
    for lev in range(4):
        np.testing.assert_array_equal(a.read_region(37, 91, 300, 200, level=lev), b.read_region(37, 91, 300, 200, level=lev))
        np.testing.assert_array_equal(a.read_region(37, 91, 300, 200, level=lev)[:min(200, levels[lev].shape[0] - 91)],
                                      levels[lev][91:291, 37:337])  # lossless: the written pixels


def test_tiles_come_from_the_level_nearest_the_model_resolution(svs_like):
    img = open_image(svs_like)
    assert img.downsamples == pytest.approx([1, 4, 16])
    # 150 µm at 112 px = 1.34 µm/px: level 1 (1.0 µm/px) is the coarsest still as fine
    level, x, y, n = img.tile_box(2000, 2000, 150.0, 112)
    assert (level, n) == (1, 150) and (x, y) == (425, 425)
    assert img.tile_box(2000, 2000, 150.0, 600)[0] == 0  # 0.25 µm/px wanted: level 0
    assert img.tile_box(2000, 2000, 1000.0, 100)[0] == 2  # 10 µm/px wanted: level 2 (4 µm/px)
    img.read_stats.clear()
    img.read_physical(2000, 2000, 150.0, 112)
    assert dict(img.read_stats) == {("regions", 1): 1, ("pixels", 1): 150 * 150}


def test_lazy_tiles_equal_tiles_of_the_converted_ome_zarr(svs_like, tmp_path):
    """The copy keeps the slide's own levels (1, 4, 16): same level choice, same pixels, same resampling."""
    from stimage_nb.io.convert import convert_to_ome_zarr
    from stimage_nb.io.tissue import grid_points
    from stimage_nb.tiles import extract_tiles

    lazy = open_image(svs_like)
    store = convert_to_ome_zarr(lazy, tmp_path / "copy.ome.zarr", progress=False)
    copy = SlideImage(store)
    assert copy.backend.startswith("OME-Zarr 0.4") and copy.um_per_px == pytest.approx(0.25)
    assert copy.level_shapes[:3] == lazy.level_shapes and copy.downsamples[:3] == pytest.approx(lazy.downsamples)
    assert copy.n_levels == 3  # the coarsest level (256 px) is already small: nothing added
    for lev in range(3):
        np.testing.assert_array_equal(copy.read_region(0, 0, *lazy.level_shapes[lev][::-1], level=lev),
                                      lazy.read_region(0, 0, *lazy.level_shapes[lev][::-1], level=lev))
    xy = grid_points(lazy, 150.0, tissue_only=False)
    for size_um, px in ((150.0, 112), (150.0, 32), (100.0, 400), (600.0, 64)):
        assert [lazy.tile_box(x, y, size_um, px) for x, y in xy[:50]] == [copy.tile_box(x, y, size_um, px)
                                                                          for x, y in xy[:50]]
        np.testing.assert_array_equal(extract_tiles(lazy, xy, size_um, px, cache=False),
                                      extract_tiles(copy, xy, size_um, px, cache=False))
    np.testing.assert_array_equal(grid_points(lazy, 150.0), grid_points(copy, 150.0))
    # a second conversion reuses the store (re-runs are idempotent)
    mtime = (store / "source.json").stat().st_mtime_ns
    assert convert_to_ome_zarr(lazy, store, progress=False) == store and (store / "source.json").stat().st_mtime_ns == mtime


def test_conversion_streams_block_by_block(svs_like, tmp_path):
    """No read larger than one chunk: the copy never holds a whole level."""
    from stimage_nb.io.convert import convert_to_ome_zarr

    img = open_image(svs_like)
    convert_to_ome_zarr(img, tmp_path / "c.ome.zarr", progress=False, chunk=512)
    regions = img.read_stats
    assert regions["pixels", 0] == 4096 * 4096 and regions["regions", 0] == 64  # 8 x 8 blocks of 512
    assert max(regions["pixels", lev] / regions["regions", lev] for lev in range(3)) <= 512 * 512


def test_the_tissue_mask_never_reads_level_0(tmp_path):
    """Tissue detection reads a low level (counted at the backend's own arrays), tiles the model's level."""
    from stimage_nb.io.tissue import grid_points

    big = tissue(6144, 6144, y=0, x=0)
    img = open_image(write_slide(tmp_path / "big.tif", [big, shrink(big, 2), shrink(big, 4), shrink(big, 8)], 0.5))
    calls = []
    arrays = img._levels._arrays

    class Counting:
        def __init__(self, a, lev):
            self.a, self.lev = a, lev

        def __getitem__(self, key):
            calls.append(self.lev)
            return self.a[key]

    img._levels._arrays = [Counting(a, i) for i, a in enumerate(arrays)]
    xy = grid_points(img, 150.0)
    assert 100 < len(xy) < (6144 * 0.5 / 150) ** 2
    assert set(calls) == {1} and img.read_stats["pixels", 0] == 0  # the 3072-px level, never the 6144-px level 0
    from stimage_nb.tiles import extract_tiles

    extract_tiles(img, xy[:200], 150.0, 112, cache=False)
    assert set(calls) == {1}  # 1.34 µm/px wanted: level 1 (1.0 µm/px)
    calls.clear()
    extract_tiles(img, xy[:200], 150.0, 32, cache=False)
    assert set(calls) == {3}  # 4.7 µm/px wanted: level 3 (4.0 µm/px)


def test_a_slide_without_pyramid_is_thumbnailed_in_strips(tmp_path, monkeypatch):
    from stimage_nb.io import image as image_mod

    flat = tissue(3000, 2600)
    img = open_image(write_slide(tmp_path / "flat.tif", [flat], 0.5, compression="zlib"))
    whole, ds_whole = img.thumbnail(512)
    monkeypatch.setattr(image_mod, "THUMBNAIL_READ_PX", 600 * 600)
    img.read_stats.clear()
    strips, ds = img.thumbnail(512)
    assert img.read_stats["regions", 0] > 5 and img.read_stats["pixels", 0] / img.read_stats["regions", 0] <= 600 * 600
    assert strips.shape == whole.shape and ds == pytest.approx(ds_whole, rel=0.02)
    assert np.corrcoef(strips.ravel(), whole.ravel())[0, 1] > 0.99


# ------------------------------------------------------------------------- damaged and unreadable files
def test_a_truncated_slide_names_the_level_and_the_tile(svs_like, tmp_path, capsys):
    import _modelkit as kit

    from stimage_nb.cli import main

    data = svs_like.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideReadError, match=r"cut.tif: truncated: .* tile at level 0, x \d+-\d+, y \d+-\d+") as e:
        open_image(cut)
    assert e.value.level == 0 and e.value.box is not None
    rc = main(["predict", "--model", str(kit.tiny_run()), "--image", str(cut), "--out", str(tmp_path / "p"),
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "truncated" in err and not (tmp_path / "p").exists()


def test_a_tile_that_fails_to_decode_names_its_level_and_position(svs_like, tmp_path):
    import tifffile

    from stimage_nb.tiles import extract_tiles

    bad = tmp_path / "bad.tif"
    data = bytearray(svs_like.read_bytes())
    with tifffile.TiffFile(svs_like) as t:
        page = t.series[0].levels[1].keyframe
        k = 1 * 4 + 2  # level 1 is 1024 x 1024 px in 256-px tiles: row 1, column 2
        off, n = page.dataoffsets[k], page.databytecounts[k]
    data[off + 20:off + n - 2] = bytes(np.random.default_rng(0).integers(0, 256, n - 22, dtype=np.uint8))
    bad.write_bytes(bytes(data))
    img = open_image(bad)  # complete file: opens
    img.read_region(0, 0, 256, 256, level=1)  # undamaged tiles read
    with pytest.raises(SlideReadError, match=r"bad.tif: the tile at level 1, x 512-768, y 256-512 .*cannot be decoded") as e:
        img.read_region(512, 256, 256, 256, level=1)
    assert (e.value.level, e.value.box) == (1, (512, 256, 768, 512))
    xy = np.array([[640 * 4, 384 * 4]])  # a tile centred on the damaged one, read at level 1
    with pytest.raises(SlideReadError, match="level 1"):
        extract_tiles(img, xy, 150.0, 112, cache=False)


def test_damaged_slide_in_predict_is_one_clear_error_and_writes_nothing(svs_like, tmp_path):
    """A cohort catches SlideReadError per slide: predict_slides raises it, leaves no partial file."""
    import _modelkit as kit
    import tifffile

    from stimage_nb.predict import predict_slides

    data = bytearray(svs_like.read_bytes())
    with tifffile.TiffFile(svs_like) as t:
        for lev in t.series[0].levels:  # damage the middle of every level, wherever the reads go
            pg = lev.keyframe
            k = len(pg.dataoffsets) // 2
            off, n = pg.dataoffsets[k], pg.databytecounts[k]
            data[off + 20:off + n - 2] = bytes(n - 22)
    bad = tmp_path / "bad.tif"
    bad.write_bytes(bytes(data))
    out = tmp_path / "pred"
    with pytest.raises(SlideReadError, match="cannot be decoded"):
        predict_slides(kit.tiny_run(), [bad], out, device="cpu", progress=False)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("suffix,what", [(".czi", "Zeiss CZI"), (".vsi", "Olympus/Evident VSI"),
                                         (".isyntax", "Philips iSyntax"), (".xyz", ".xyz files")])
def test_formats_without_a_lazy_reader_name_the_format_and_the_fix(tmp_path, suffix, what, capsys):
    import _modelkit as kit

    from stimage_nb.cli import main

    f = tmp_path / f"slide{suffix}"
    f.write_bytes(b"\x00" * 4096)
    with pytest.raises(SlideReadError, match=f"{what} slides cannot be read lazily.*bioformats2raw.*bfconvert"):
        open_image(f)
    rc = main(["predict", "--model", str(kit.tiny_run()), "--image", str(f), "--out", str(tmp_path / "p"),
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and what in err


def test_a_flat_jpeg_too_large_for_memory_is_refused_with_the_fix(tmp_path, monkeypatch):
    from PIL import Image

    f = tmp_path / "huge.jpg"
    Image.fromarray(tissue(600, 800)).save(f)
    import psutil

    class Mem:
        available = 1_000_000  # 1 MB free

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Mem())
    with pytest.raises(SlideReadError, match=r"flat JPEG of 800x600 px cannot be read lazily.*vips tiffsave"):
        open_image(f, um_per_px=0.5)


def test_not_an_image(tmp_path):
    with pytest.raises(StimageInputError, match="not found"):
        open_image(tmp_path / "missing.svs")
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"II*\x00" + b"\x00" * 100)
    with pytest.raises(SlideReadError, match="junk.svs: not a readable TIFF"):
        open_image(junk)
