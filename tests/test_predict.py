"""Prediction AnnData contract, spots outside the image, other scan resolutions, manifests and the CLI."""

from __future__ import annotations

import copy
import re

import _modelkit as kit
import numpy as np
import pandas as pd
import pytest

from stimage_nb import _keys as K
from stimage_nb.ensemble import Ensemble
from stimage_nb.io.ngff import write_ome_zarr
from stimage_nb.io.section import Section, make_section_adata
from stimage_nb.predict import predict_manifest, predict_section

UNS_KEYS = {"section", "patient", "image", "um_per_px", "image_scale", "train_sections", "genes", "celltypes",
            "tile_um", "out_px", "backbone", "n_members", "run_id", "weights_sha256", "package_version", "created"}


@pytest.fixture(scope="module")
def ens():
    return Ensemble.load(kit.tiny_run(), "cpu")


def test_prediction_follows_the_contract(ens):
    s = kit.sections(("C4",))[0]
    a = predict_section(ens, s, progress=False)
    assert list(a.obs_names) == list(s.adata.obs_names) and a.obs_names[0].count("x") == 1  # "{x}x{y}" ids
    assert list(a.var_names) == kit.genes()
    assert a.X.dtype == np.float32 and np.all(a.X > 0)
    for key in (K.ALEATORIC, K.EPISTEMIC):
        assert a.layers[key].shape == a.shape and np.all(a.layers[key] >= 0)
    assert np.all(a.layers[K.ALEATORIC] >= a.X)  # NB variance >= mean
    for key in (K.CELLTYPE_MEAN, K.CELLTYPE_STD):
        df = a.obsm[key]
        assert isinstance(df, pd.DataFrame) and list(df.columns) == ens.celltypes and list(df.index) == list(a.obs_names)
    assert np.allclose(a.obsm[K.CELLTYPE_MEAN].sum(1), 1, atol=1e-5)
    assert np.allclose(a.obsm[K.SPATIAL], s.xy) and np.allclose(a.obs[K.PIXEL_X], s.xy[:, 0])
    assert np.all(a.obs[K.DIAMETER_UM] == 100.0)
    u = a.uns[K.UNS]
    assert UNS_KEYS <= set(u), UNS_KEYS - set(u)
    assert (u["section"], u["patient"], u["um_per_px"], u["image_scale"]) == ("C4", "C", 0.69, 1.0)
    assert u["train_sections"] == ["C2", "C3"] and u["n_members"] == 3 and u["backbone"] == "test_resnet"
    assert u["n_outside_image"] == 0


def test_spots_outside_the_image_are_excluded_and_counted(ens):
    s = kit.sections(("C4",))[0]
    xy = s.xy.copy()
    xy[[3, 7]] = [[s.image.width + 500, 100], [-400, 50]]
    s.adata.obsm[K.SPATIAL] = xy
    s.adata.obs[K.PIXEL_X] = xy[:, 0]
    a = predict_section(ens, s, progress=False)
    assert a.n_obs == 38 and a.uns[K.UNS]["n_outside_image"] == 2
    assert s.adata.obs_names[3] not in a.obs_names and s.adata.obs_names[7] not in a.obs_names


def _crop_sections(tmp_path):
    """The same tissue written at 0.69 µm/px (as scanned) and at 1.38 µm/px (a 2x coarser scan)."""
    from stimage_nb._settings import her2st_manifest
    from stimage_nb.io.readers import read_manifest

    full = read_manifest(her2st_manifest(), ["C4"], genes=kit.genes())[0]
    xy = full.xy
    centre = np.median(xy, 0)
    near = np.argsort(np.linalg.norm(xy - centre, axis=1))[:12]
    pts = xy[near]
    margin = 250
    x0, y0 = (pts.min(0) - margin).astype(int)
    x1, y1 = (pts.max(0) + margin).astype(int)
    rgb = full.image.read_region(x0, y0, x1 - x0, y1 - y0)
    half = rgb[: rgb.shape[0] // 2 * 2, : rgb.shape[1] // 2 * 2].reshape(rgb.shape[0] // 2, 2, rgb.shape[1] // 2, 2, 3)
    half = half.astype(np.float32).mean((1, 3)).round().astype(np.uint8)
    ids = full.adata.obs_names[near]
    out = []
    for name, img, um, scale in (("fine", rgb, 0.69, 1.0), ("coarse", half, 1.38, 0.5)):
        p = write_ome_zarr(img, tmp_path / f"{name}.ome.zarr", um)
        a = make_section_adata(ids, (pts - [x0, y0]) * scale, 100.0)
        out.append(Section(name, a, p, um, "C"))
    return out


def test_another_scan_resolution_is_resampled_to_the_same_tiles(ens, tmp_path):
    from stimage_nb.tiles import extract_tiles

    fine, coarse = _crop_sections(tmp_path)
    tf = extract_tiles(fine.image, fine.xy, ens.tile_um, ens.out_px, cache=False)
    tc = extract_tiles(coarse.image, coarse.xy, ens.tile_um, ens.out_px, cache=False)
    assert np.abs(tf.astype(float) - tc.astype(float)).mean() < 3  # same physical field of view
    a, b = predict_section(ens, fine, progress=False), predict_section(ens, coarse, progress=False)
    assert b.uns[K.UNS]["um_per_px"] == 1.38
    assert np.allclose(a.X, b.X, rtol=0.05)
    # whereas reading the coarse scan as if it had the fine scan's µm/px gives another field of view
    wrong = Section("wrong", coarse.adata.copy(), coarse.image_path, 0.69, "C")
    tw = extract_tiles(wrong.image, wrong.xy, ens.tile_um, ens.out_px, cache=False)
    assert np.abs(tf.astype(float) - tw.astype(float)).mean() > 3 * np.abs(tf.astype(float) - tc.astype(float)).mean()


def test_streamed_chunks_equal_one_pass(ens):
    nostain = copy.copy(ens)
    nostain.stain = None
    s = kit.sections(("C4",))[0]
    a = predict_section(nostain, s, progress=False, cache_tiles=True)
    b = predict_section(nostain, s, progress=False, cache_tiles=False, chunk=16, workers=2)
    assert list(a.obs_names) == list(b.obs_names)
    assert np.allclose(a.X, b.X, rtol=1e-5) and np.allclose(a.layers[K.EPISTEMIC], b.layers[K.EPISTEMIC], rtol=1e-4)


@pytest.mark.parametrize("chunk", [16, 2048])
def test_streaming_into_the_h5ad_equals_the_in_memory_prediction(ens, tmp_path, chunk):
    """predict_section_to_h5ad (rows written per chunk, bounded memory) writes what write_h5ad(predict_section)
    writes: same values, obs, obsm, provenance and domain score, read back through read_prediction."""
    from stimage_nb.io.prediction import read_prediction, write_h5ad
    from stimage_nb.predict import predict_section_to_h5ad

    s = kit.sections(("C4",))[0]
    s.adata.obs.iloc[:3, s.adata.obs.columns.get_loc(K.PIXEL_X)] = 1e6  # outside the image: dropped, counted
    s = Section(s.name, make_section_adata(list(s.adata.obs_names), np.c_[s.adata.obs[K.PIXEL_X], s.adata.obs[K.PIXEL_Y]],
                                           100.0, uns=dict(s.adata.uns[K.UNS])), s.image_path, s.um_per_px, s.patient)
    kw = dict(progress=False, cache_tiles=chunk > 100, chunk=chunk)
    a = read_prediction(write_h5ad(predict_section(ens, s, **kw), tmp_path / "mem" / "C4.h5ad"))
    p = predict_section_to_h5ad(ens, s, tmp_path / "stream" / "C4.h5ad", **kw)
    assert [f.name for f in p.parent.iterdir()] == ["C4.h5ad"]  # no temporary file left
    b = read_prediction(p)
    assert a.n_obs == b.n_obs == s.adata.n_obs - 3 and list(a.obs_names) == list(b.obs_names)
    np.testing.assert_array_equal(a.X, b.X)
    for key in (K.ALEATORIC, K.EPISTEMIC):
        np.testing.assert_array_equal(a.layers[key], b.layers[key])
    for key in (K.CELLTYPE_MEAN, K.CELLTYPE_STD):
        pd.testing.assert_frame_equal(a.obsm[key], b.obsm[key])
    np.testing.assert_array_equal(a.obsm[K.SPATIAL], b.obsm[K.SPATIAL])
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert (K.DOMAIN_PERCENTILE in b.obs) == (ens.domain is not None)
    ua, ub = dict(a.uns[K.UNS]), dict(b.uns[K.UNS])
    ua.pop("created"), ub.pop("created")
    assert ua.keys() == ub.keys() and ub["n_outside_image"] == 3
    assert all(np.all(np.asarray(ua[k]) == np.asarray(ub[k])) for k in ua if k != "domain")
    assert ua.get("domain") == ub.get("domain")


def test_streaming_at_a_given_depth_equals_the_in_memory_rescaling(ens, tmp_path):
    """A depth given to the streaming writer rescales the written rows in place by the same whole-section factor
    as predict_section (mean x f, epistemic x f^2, aleatoric f mean + f^2 (aleatoric - mean)); both record it."""
    from stimage_nb.io.prediction import read_prediction, write_h5ad
    from stimage_nb.predict import predict_section_to_h5ad

    s = kit.sections(("C4",))[0]
    kw = dict(progress=False, cache_tiles=False, chunk=16, depth=500.0)
    a = read_prediction(write_h5ad(predict_section(ens, s, **kw), tmp_path / "mem" / "C4.h5ad"))
    b = read_prediction(predict_section_to_h5ad(ens, s, tmp_path / "stream" / "C4.h5ad", **kw))
    assert np.isclose(b.X.sum(1).mean(), 500.0, rtol=1e-4)  # the asked-for mean counts per spot
    np.testing.assert_allclose(a.X, b.X, rtol=1e-5)
    for key in (K.ALEATORIC, K.EPISTEMIC):
        np.testing.assert_allclose(a.layers[key], b.layers[key], rtol=1e-4, atol=1e-6)
    da, db = a.uns[K.UNS]["depth"], b.uns[K.UNS]["depth"]
    assert float(db["given"]) == 500.0 and np.isclose(float(da["factor"]), float(db["factor"]), rtol=1e-6)
    assert float(db["factor"]) != 1.0


def _manifest_without_counts(tmp_path, sections=("C4",)):
    from stimage_nb._settings import her2st_manifest

    m = pd.read_csv(her2st_manifest())
    base = her2st_manifest().parent
    m = m[m.section.isin(sections)].drop(columns=["counts"])
    for col in ("image", "spots"):
        m[col] = [str(base / v) for v in m[col]]
    p = tmp_path / "predict_only.csv"
    m.to_csv(p, index=False)
    return p


def test_predict_manifest_rows_without_counts(tmp_path):
    import anndata as ad

    man = _manifest_without_counts(tmp_path)
    paths = predict_manifest(kit.tiny_run(), man, tmp_path / "pred", device="cpu", progress=False)
    assert [p.name for p in paths] == ["C4.h5ad"]
    a = ad.read_h5ad(paths[0])
    # all 187 selected spots of the spots file (3 of them have no counts in the counts table)
    assert a.n_obs == 187 and list(a.var_names) == kit.genes() and K.EPISTEMIC in a.layers
    assert sorted(x.name for x in (tmp_path / "pred").iterdir()) == ["C4.h5ad"]  # no temporary files left
    mtime = paths[0].stat().st_mtime_ns
    again = predict_manifest(kit.tiny_run(), man, tmp_path / "pred", device="cpu", progress=False)
    assert again == paths and paths[0].stat().st_mtime_ns >= mtime


def test_cli_train_then_predict(tmp_path, capsys):
    from stimage_nb._settings import her2st_manifest
    from stimage_nb.cli import main

    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(kit.genes()[:10]) + "\n")
    run = tmp_path / "run"
    rc = main(["train", "--manifest", str(her2st_manifest()), "--sections", "C2", "--val-sections", "C3",
               "--genes", str(genes), "--out", str(run), "--members", "1", "--epochs", "1",
               "--backbone", "test_resnet", "--device", "cpu", "--seed", "3"])
    assert rc == 0 and (run / "ensemble.json").is_file()
    rc = main(["predict", "--model", str(run), "--manifest", str(_manifest_without_counts(tmp_path)),
               "--out", str(tmp_path / "pred"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and re.search(re.escape(str(tmp_path / "pred" / "C4.h5ad")) + r"  domain-shift percentile [01]\.\d\d", out)
    # bad input: a model directory that is not one
    rc = main(["predict", "--model", str(tmp_path), "--manifest", str(her2st_manifest()), "--out", str(tmp_path / "p2")])
    assert rc == 2 and "ensemble.json" in capsys.readouterr().err


def test_predict_whole_slides_on_a_grid_over_tissue(tmp_path, data_dir, capsys):
    """A routine H&E slide without spots (the real SVS): one point per tile-sized square of tissue."""
    import anndata as ad
    from PIL import Image

    from stimage_nb.cli import main
    from stimage_nb.io.image import open_image
    from stimage_nb.io.tissue import in_mask, tissue_mask
    from stimage_nb.predict import predict_slides

    svs = data_dir / "fixtures" / "wsi" / "cmu_small_region.svs"
    (path,) = predict_slides(kit.tiny_run(), [svs], tmp_path / "pred", device="cpu", progress=False)
    a = ad.read_h5ad(path)
    img = open_image(svs)
    step = 150.0 / img.um_per_px  # the tiny model's tile side, in pixels
    xy = np.asarray(a.obsm[K.SPATIAL])
    full_grid = len(np.arange(step / 2, img.width, step)) * len(np.arange(step / 2, img.height, step))
    assert 20 < a.n_obs < full_grid and np.isfinite(a.X).all() and K.EPISTEMIC in a.layers
    np.testing.assert_allclose(np.diff(np.unique(np.round(xy[:, 0], 1))), step, rtol=1e-5)
    m, ds = tissue_mask(img)
    assert in_mask(xy, m, ds).all()  # every point lies on tissue
    assert a.obs_names[0] == f"{int(round(xy[0, 0]))}_{int(round(xy[0, 1]))}"
    assert a.uns["stimage_nb"]["image"] == str(svs) and a.uns["stimage_nb"]["um_per_px"] == pytest.approx(0.499)
    # the command line: a coarser grid, the same slide
    rc = main(["predict", "--model", str(kit.tiny_run()), "--image", str(svs), "--grid-um", "300",
               "--out", str(tmp_path / "cli"), "--device", "cpu"])
    assert rc == 0 and str(tmp_path / "cli" / "cmu_small_region.h5ad") in capsys.readouterr().out
    assert ad.read_h5ad(tmp_path / "cli" / "cmu_small_region.h5ad").n_obs < a.n_obs / 3
    # a blank slide is an error that says so, and writes nothing
    blank = tmp_path / "blank.png"
    Image.new("RGB", (800, 600), (245, 245, 245)).save(blank)
    rc = main(["predict", "--model", str(kit.tiny_run()), "--image", str(blank), "--um-per-px", "0.5",
               "--out", str(tmp_path / "blank"), "--device", "cpu"])
    assert rc == 2 and "no tissue found" in capsys.readouterr().err and not (tmp_path / "blank").exists()
