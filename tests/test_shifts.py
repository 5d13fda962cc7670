"""Simulated acquisition shifts (stimage_nb.shifts) on a real crop of section C4."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stimage_nb import _keys as K
from stimage_nb import shifts as S
from stimage_nb.errors import StimageInputError
from stimage_nb.io.ngff import write_ome_zarr


@pytest.fixture(scope="module")
def crop(tmp_path_factory, her2st_manifest):
    """A 30-spot crop of C4 as its own manifest row (image, spots, the real counts and cell types)."""
    from stimage_nb.io.readers import read_manifest

    (full,) = read_manifest(her2st_manifest, ["C4"])
    xy = full.xy
    near = np.argsort(np.linalg.norm(xy - np.median(xy, 0), axis=1))[:30]
    x0, y0 = (xy[near].min(0) - 200).astype(int)
    x1, y1 = (xy[near].max(0) + 200).astype(int)
    d = tmp_path_factory.mktemp("shift_crop")
    rgb = full.image.read_region(x0, y0, x1 - x0, y1 - y0)
    write_ome_zarr(rgb, d / "C4crop.ome.zarr", 0.69)
    spots = pd.read_csv(her2st_manifest.parent / "spots" / "C4_selection.tsv", sep="\t")
    spots.index = [f"{a}x{b}" for a, b in zip(spots.x, spots.y)]
    spots = spots.loc[list(full.adata.obs_names[near])]
    spots["pixel_x"] -= x0
    spots["pixel_y"] -= y0
    spots.to_csv(d / "C4crop_spots.tsv", sep="\t", index=False)
    base = her2st_manifest.parent
    pd.DataFrame([{"section": "C4crop", "patient": "C", "image": "C4crop.ome.zarr",
                   "counts": str(base / "counts" / "C4.tsv.gz"), "spots": "C4crop_spots.tsv", "um_per_px": 0.69,
                   "celltypes": str(base / "celltypes" / "major" / "C4-proportion.tsv")}]).to_csv(d / "m.csv", index=False)
    return {"dir": d, "manifest": d / "m.csv", "rgb": rgb, "section": read_manifest(d / "m.csv")[0]}


def _dyes(rgb: np.ndarray) -> tuple[float, float]:
    """Mean hematoxylin and eosin concentration over tissue pixels (the package's fixed deconvolution)."""
    from stimage_nb.baseline import _STAIN_INV

    od = -np.log(np.clip(rgb.reshape(-1, 3).astype(np.float32) / 255.0, 1 / 255, 1))
    tissue = od.sum(1) > 0.3
    c = np.clip(od[tissue] @ _STAIN_INV, 0, None)
    return float(c[:, 0].mean()), float(c[:, 1].mean())


def test_neutral_factors_give_the_image_back(crop):
    rgb = crop["rgb"]
    assert S.restain(rgb, 1.0, 1.0) is rgb
    out, um = S.apply_shift(rgb, S.Shift("same"), um_per_px=0.69)
    assert um == 0.69 and np.array_equal(out, rgb[: out.shape[0]])
    # the arithmetic path with factors of 1 (no shortcut) is exact to rounding
    od = S.restain(rgb, 1.0 + 1e-9, 1.0)
    assert np.abs(od.astype(int) - rgb.astype(int)).max() <= 1


def test_restaining_scales_the_measured_dyes(crop):
    h0, e0 = _dyes(crop["rgb"])
    h1, e1 = _dyes(S.restain(crop["rgb"], 1.3, 0.8))
    assert 1.2 < h1 / h0 < 1.35, (h0, h1)
    assert 0.75 < e1 / e0 < 0.9, (e0, e1)
    h2, e2 = _dyes(S.restain(crop["rgb"], 0.8, 1.3))
    assert h2 < h0 and e2 > e0


def test_strips_equal_one_pass(crop, monkeypatch):
    """The strip-wise reader (with a blur halo) gives the same image as the whole array at once."""
    sec = crop["section"]
    sh = S.Shift("both", scale=2, blur_um=2.0, hematoxylin=1.2)
    whole, _ = S.apply_shift(crop["rgb"], sh, um_per_px=0.69)
    monkeypatch.setattr(S, "STRIP_ROWS", 64)
    strips, um = S.apply_shift(sec.image, sh)
    assert um == pytest.approx(1.38)
    assert strips.shape == whole.shape and np.array_equal(strips, whole)


def test_a_coarser_scan_keeps_spots_counts_and_physical_tiles(crop, tmp_path):
    from stimage_nb.tiles import extract_tiles

    sec = crop["section"]
    coarse = S.shift_section(sec, S.Shift("scan_2x", scale=2), tmp_path)
    assert coarse.name == "C4crop__scan_2x" and coarse.um_per_px == pytest.approx(1.38)
    assert coarse.image.width == sec.image.width // 2 and coarse.image.um_per_px == pytest.approx(1.38)
    assert list(coarse.adata.obs_names) == list(sec.adata.obs_names)
    assert np.allclose(coarse.xy, sec.xy / 2)
    assert (coarse.adata.X != sec.adata.X).nnz == 0
    assert coarse.adata.obsm[K.CELLTYPE_PROPORTIONS].equals(sec.adata.obsm[K.CELLTYPE_PROPORTIONS])
    a = extract_tiles(sec.image, sec.xy, 150.0, 48, cache=False).astype(float)
    b = extract_tiles(coarse.image, coarse.xy, 150.0, 48, cache=False).astype(float)
    assert np.abs(a - b).mean() < 3
    # idempotent: the existing store is reused, not rewritten
    stamp = (tmp_path / "C4crop__scan_2x.ome.zarr" / ".zattrs").stat().st_mtime_ns
    S.shift_section(sec, S.Shift("scan_2x", scale=2), tmp_path)
    assert (tmp_path / "C4crop__scan_2x.ome.zarr" / ".zattrs").stat().st_mtime_ns == stamp


def test_shift_manifest_adds_rows_that_read_like_any_section(crop, tmp_path):
    from stimage_nb.io.readers import read_manifest

    shifts = S.parse_shifts("reference,scan_4x,stain_H0.8_E1.3")
    dest = S.shift_manifest(crop["manifest"], ["C4crop"], shifts, tmp_path / "sh")
    m = pd.read_csv(dest)
    assert list(m.section) == ["C4crop", "C4crop__reference", "C4crop__scan_4x", "C4crop__stain_H0.8_E1.3"]
    secs = {s.name: s for s in read_manifest(dest)}  # the original row still resolves (absolute paths)
    ref, c4, st = secs["C4crop__reference"], secs["C4crop__scan_4x"], secs["C4crop__stain_H0.8_E1.3"]
    assert c4.um_per_px == pytest.approx(2.76) and st.um_per_px == pytest.approx(0.69)
    assert list(c4.adata.obs_names) == list(ref.adata.obs_names) == list(crop["section"].adata.obs_names)
    assert np.allclose(c4.xy, ref.xy / 4)
    assert c4.celltypes == ref.celltypes and len(ref.celltypes) > 0
    assert c4.image.width == crop["rgb"].shape[1] // 4
    assert not np.array_equal(st.image.read_region(0, 0, 64, 64), ref.image.read_region(0, 0, 64, 64))
    with pytest.raises(StimageInputError, match="exist already"):
        S.shift_manifest(dest, ["C4crop"], shifts, tmp_path / "again")


def test_cli_and_bad_shifts(crop, tmp_path, capsys, monkeypatch):
    from stimage_nb.cli import main
    from stimage_nb.io.readers import read_manifest

    monkeypatch.chdir(tmp_path)  # a relative --out, as a user types it
    assert main(["shift", "--manifest", str(crop["manifest"]), "--sections", "C4crop", "--shifts", "jpeg_q30",
                 "--out", "cli"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "cli" / "manifest.csv") in out and "--sections C4crop__jpeg_q30" in out
    (sec,) = read_manifest(tmp_path / "cli" / "manifest.csv", ["C4crop__jpeg_q30"])  # its paths resolve
    assert sec.image.width == crop["rgb"].shape[1]
    assert main(["shift", "--manifest", str(crop["manifest"]), "--sections", "C4crop", "--shifts", "scan_3x",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "unknown shifts ['scan_3x']" in capsys.readouterr().err
    assert main(["shift", "--manifest", str(crop["manifest"]), "--sections", "C9", "--out", str(tmp_path / "b")]) == 2
    for bad in (dict(scale=1.5), dict(scale=0), dict(blur_um=-1), dict(eosin=0), dict(jpeg_quality=0)):
        with pytest.raises(StimageInputError):
            S.Shift("x", **bad)
    with pytest.raises(StimageInputError, match="without spaces"):
        S.Shift("a b")


def test_black_background_blackens_exactly_what_is_off_the_tissue_mask(her2st_manifest):
    from stimage_nb.io.readers import read_manifest
    from stimage_nb.io.tissue import tissue_mask
    from stimage_nb.stain import whiten_background

    (c4,) = read_manifest(her2st_manifest, ["C4"], genes=["ERBB2"])
    lev = 3  # the whole section (tissue and glass) as an array, 8x coarser than the scan
    H, W = c4.image.level_shapes[lev]
    rgb = c4.image.read_region(0, 0, W, H, level=lev)
    um = c4.um_per_px * c4.image.downsamples[lev]
    out, um_out = S.apply_shift(rgb, S.Shift("bb", background="black"), um_per_px=um)
    assert um_out == pytest.approx(um) and out.shape == rgb.shape
    m, ds = tissue_mask(S._ArrayImage(rgb, um))
    yi = np.clip((np.arange(H) / ds).astype(int), 0, m.shape[0] - 1)
    xi = np.clip((np.arange(W) / ds).astype(int), 0, m.shape[1] - 1)
    keep = m[yi][:, xi]
    assert 0.3 < (~keep).mean() < 0.95  # glass around the tissue
    assert (out[~keep] == 0).all() and np.array_equal(out[keep], rgb[keep])
    # the spots the her2st authors selected lie on the tissue that is kept
    xy = c4.xy / c4.image.downsamples[lev]
    assert keep[xy[:, 1].astype(int), xy[:, 0].astype(int)].mean() > 0.97
    # the model's background handling turns it back into glass; tissue stays (but for the darkest specks)
    white = whiten_background(out)
    assert (white[~keep] == 255).all()
    assert np.mean(white[keep] == rgb[keep]) > 0.999
    assert whiten_background(out, "keep") is out


def test_a_scan_to_a_given_pixel_size(crop):
    rgb = crop["rgb"]
    out, um = S.apply_shift(rgb, S.Shift("s4", um_per_px=4.0), um_per_px=0.69)
    f = 4.0 / 0.69
    assert um == pytest.approx(4.0)
    assert out.shape[:2] == (int(rgb.shape[0] // f), int(rgb.shape[1] // f))
    # a box-filtered area mean: the image's mean colour is kept (to rounding and the cropped edge)
    h, w = int(out.shape[0] * f), int(out.shape[1] * f)
    assert np.abs(out.reshape(-1, 3).mean(0) - rgb[:h, :w].reshape(-1, 3).mean(0)).max() < 2.0
    # an integer target goes through the exact area mean of `scale`
    two, um2 = S.apply_shift(rgb, S.Shift("s2", um_per_px=1.38), um_per_px=0.69)
    assert um2 == pytest.approx(1.38)
    assert np.array_equal(two, S.apply_shift(rgb, S.Shift("x", scale=2), um_per_px=0.69)[0])
    with pytest.raises(StimageInputError, match="already coarser"):
        S.apply_shift(rgb, S.Shift("fine", um_per_px=0.3), um_per_px=0.69)
    with pytest.raises(StimageInputError, match="not both"):
        S.Shift("both", scale=2, um_per_px=4.0)


def test_a_crop_around_the_spots_gives_the_same_tiles(crop, tmp_path):
    from stimage_nb.tiles import extract_tiles

    sec = crop["section"]
    sh = S.Shift("blur_stain", blur_um=1.5, hematoxylin=1.2)
    whole = S.shift_section(sec, sh, tmp_path / "whole")
    part = S.shift_section(sec, sh, tmp_path / "part", crop_margin_um=120.0)
    assert part.image.width < whole.image.width or part.image.height < whole.image.height
    assert part.meta["crop"]["margin_um"] == 120.0
    a = extract_tiles(whole.image, whole.xy, 150.0, 64, cache=False)
    b = extract_tiles(part.image, part.xy, 150.0, 64, cache=False)
    assert np.array_equal(a, b)
    assert list(part.adata.obs_names) == list(sec.adata.obs_names) and (part.adata.X != sec.adata.X).nnz == 0


@pytest.mark.parametrize("shift, others", [
    (S.Shift("coarse", um_per_px=3.0), [dict(um_per_px=2.0), dict(um_per_px=4.5)]),
    (S.Shift("defocus", blur_um=1.0), [dict(blur_um=0.5), dict(blur_um=2.0)]),
    (S.Shift("cheap", um_per_px=3.0, blur_um=1.0, jpeg_quality=60),
     [dict(um_per_px=2.0, blur_um=1.0, jpeg_quality=60), dict(um_per_px=4.5, blur_um=1.0, jpeg_quality=60)]),
], ids=lambda v: v.name if isinstance(v, S.Shift) else "")
def test_a_shift_of_cut_tiles_is_the_shift_of_the_slide(crop, tmp_path, shift, others):
    """The training views (shift_tiles on tiles already cut) look like the tiles of the slide re-made by that
    acquisition (shift_section, the validation path): closer to them than the unshifted tiles, and than the
    tiles shifted with a pixel size or blur off by a factor of ~1.5-2 (so the µm are converted right)."""
    import torch

    from stimage_nb.tiles import extract_tiles

    sec = crop["section"]
    um = 150.0 / 96
    tiles = extract_tiles(sec.image, sec.xy, 150.0, 96, cache=False)
    slide = S.shift_section(sec, shift, tmp_path / shift.name)
    want = extract_tiles(slide.image, slide.xy, 150.0, 96, cache=False).astype(np.float32)
    got = S.shift_tiles(tiles, shift, um)
    assert got.shape == tiles.shape and got.dtype == np.uint8
    err = np.abs(got - want).mean()
    assert err < 0.8 * np.abs(tiles - want).mean()
    for kw in others:
        assert err < np.abs(S.shift_tiles(tiles, S.Shift("other", **kw), um) - want).mean(), kw
    # torch in, torch out (same device), the same pixels
    back = S.shift_tiles(torch.from_numpy(tiles), shift, um)
    assert isinstance(back, torch.Tensor) and np.array_equal(back.numpy(), got)


def test_shift_tiles_restains_each_tile_and_refuses_what_it_cannot_do(crop):
    from stimage_nb.tiles import extract_tiles

    sec = crop["section"]
    tiles = extract_tiles(sec.image, sec.xy, 150.0, 64, cache=False)
    st = S.Shift("stain_H1.2_E0.85", hematoxylin=1.2, eosin=0.85)
    assert np.array_equal(S.shift_tiles(tiles, st, 150 / 64), np.stack([S.restain(t, 1.2, 0.85) for t in tiles]))
    assert S.shift_tiles(tiles, S.Shift("same"), 150 / 64) is tiles
    with pytest.raises(StimageInputError, match="whole image"):
        S.shift_tiles(tiles, S.Shift("bb", background="black"), 150 / 64)
    with pytest.raises(StimageInputError, match="uint8 tiles"):
        S.shift_tiles(tiles.astype(np.float32), st, 150 / 64)
    # the training set is not the validation harness's: no name or setting is shared
    assert not {s.name for s in S.TRAINING_SHIFTS} & {s.name for s in S.ACQUISITION_SHIFTS}
    assert not {(s.um_per_px, s.blur_um, s.hematoxylin, s.eosin, s.jpeg_quality) for s in S.TRAINING_SHIFTS} & \
        {(s.um_per_px, s.blur_um, s.hematoxylin, s.eosin, s.jpeg_quality) for s in S.ACQUISITION_SHIFTS}
