"""Nucleus segmentation: a rendered image with known nuclei, seams of tiled slides, real cellularity, QuPath."""

from __future__ import annotations

import numpy as np
import pytest
from _render import render_nuclei

from stimage_nb.errors import StimageInputError
from stimage_nb.interpretation import (
    MORPHOLOGY,
    Nuclei,
    SegmentationParams,
    hematoxylin_od,
    nuclei_from_qupath,
    segment_nuclei,
    segment_slide,
)


@pytest.mark.parametrize("seed", [0, 1])
def test_rendered_nuclei_are_found_with_their_size(seed):
    """Count and mean area within 10% of the truth, touching pairs split, each true nucleus matched once."""
    rgb, truth, areas = render_nuclei(seed=seed)
    nuc = segment_nuclei(rgb, 0.5)
    assert abs(len(nuc) - len(areas)) <= 0.1 * len(areas)
    assert abs(nuc.table["area_um2"].mean() - areas.mean()) <= 0.1 * areas.mean()
    lab = nuc.rasterise(0, 0, rgb.shape[1], rgb.shape[0])
    matched = 0
    for k in range(1, truth.max() + 1):
        t = truth == k
        hit = np.bincount(lab[t], minlength=len(nuc) + 1)[1:]
        j = int(hit.argmax())
        iou = hit[j] / float((t | (lab == j + 1)).sum())
        matched += iou > 0.6
    assert matched >= 0.9 * truth.max()  # the touching pairs are two nuclei, not one
    # the outlines' rasterisation keeps the measured areas (polygons <-> labels agree)
    raster_area = np.bincount(lab.ravel())[1:] * 0.25
    assert np.allclose(raster_area, nuc.table["area_um2"].to_numpy(), rtol=0.15, atol=2.0)
    t = nuc.table
    assert list(t.columns) == ["x", "y", *MORPHOLOGY]
    assert (t["eccentricity"].between(0, 1)).all() and (t["solidity"] > 0.8).median() and (t["circularity"] <= 1).all()
    assert (t["hematoxylin_od_mean"] > nuc.params["threshold_od"]).all()


def test_haematoxylin_of_pure_stains():
    """Colour deconvolution returns the haematoxylin OD a pixel was made with (Beer-Lambert, RUIFROK_HED)."""
    from stimage_nb.stain import RUIFROK_HED

    od = np.array([[0.8, 0.0], [0.0, 0.6], [0.5, 0.3]])  # (h, e) per pixel
    rgb = np.round(255 * 10 ** -(od @ RUIFROK_HED[:2])).astype(np.uint8).reshape(3, 1, 3)
    h = hematoxylin_od(rgb).ravel()
    assert np.allclose(h, od[:, 0], atol=0.02)


def test_bad_inputs_are_refused():
    with pytest.raises(StimageInputError, match="uint8"):
        segment_nuclei(np.zeros((10, 10, 3), np.float32), 0.5)
    with pytest.raises(StimageInputError, match="µm/px"):
        segment_nuclei(np.zeros((10, 10, 3), np.uint8), 500)
    with pytest.raises(StimageInputError, match="stardist"):
        segment_nuclei(np.zeros((10, 10, 3), np.uint8), 0.5, method="stardist")  # not installed: clear message
    with pytest.raises(StimageInputError, match="unknown nucleus segmentation"):
        segment_nuclei(np.zeros((10, 10, 3), np.uint8), 0.5, method="magic")
    assert len(segment_nuclei(np.full((64, 64, 3), 240, np.uint8), 0.5)) == 0  # glass: no nuclei


def test_tiled_slide_equals_one_piece_across_seams(data_dir):
    """A real region segmented whole and as a grid of 256 px cells (seams every 256 px) gives the same nuclei:
    none duplicated or split at the seams."""
    from stimage_nb.io.image import open_image

    img = open_image(data_dir / "field_cases" / "region_all_tissue" / "roi_all_tissue.png", um_per_px=0.69)
    tiled = segment_slide(img, cell_px=256)
    t = tiled.params["threshold"]
    whole = segment_nuclei(img.read_region(0, 0, img.width, img.height, 0), img.um_per_px,
                           params=SegmentationParams(threshold=t))
    assert len(tiled) > 1000 and tiled.table.index.is_unique
    same = set(tiled.ids) & set(whole.ids)
    assert len(same) >= 0.99 * len(whole)  # identical ids = identical centroids (differences: a big clump or two)
    a = tiled.table.loc[sorted(same), "area_um2"].to_numpy()
    assert np.allclose(a, whole.table.loc[sorted(same), "area_um2"].to_numpy())
    # nothing is segmented twice: no pixel belongs to two nuclei of different cells
    from skimage.draw import polygon as draw_polygon

    cover = np.zeros((img.height, img.width), np.int32)
    for poly in tiled.polygons:
        rr, cc = draw_polygon(poly[:, 1] - 0.5, poly[:, 0] - 0.5, shape=cover.shape)
        cover[rr, cc] += 1
    assert (cover > 1).sum() <= 0.001 * (cover > 0).sum()
    # nuclei straddling the seams (every 256 px) are there, whole: as many as in the one-piece segmentation
    def straddling(n):
        b = n.bounds()
        return sum(((b[:, 0] < s) & (b[:, 2] > s)).sum() + ((b[:, 1] < s) & (b[:, 3] > s)).sum() for s in (256, 512, 768))
    assert straddling(tiled) >= 30 and abs(straddling(tiled) - straddling(whole)) <= 0.05 * straddling(whole)
    # only some boxes (the tiles of spots): the same nuclei there as in the whole slide
    part = segment_slide(img, boxes=[[300, 300, 500, 450]])
    inside = part.table[(part.table.x > 320) & (part.table.x < 480) & (part.table.y > 320) & (part.table.y < 430)]
    assert len(inside) > 10 and len(set(inside.index) & set(tiled.ids)) >= 0.95 * len(inside)


def test_nuclei_per_spot_follow_the_spots_counts(her2st_manifest):
    """Cellularity on real tiles: spots with more nuclei have more UMIs (Spearman within each section, 16
    spots spread over each of three sections; measured on all 1,193 spots: 0.41-0.78 per section)."""
    from scipy.stats import spearmanr

    from stimage_nb.io.readers import read_manifest

    rhos, hema = [], []
    for s in read_manifest(her2st_manifest, ["B4", "C3", "C6"]):
        sub = s.subset(np.linspace(0, s.adata.n_obs - 1, 16).astype(int))
        r = 50.0 / s.um_per_px
        boxes = np.column_stack([sub.xy - r, sub.xy + r])
        nuc = segment_slide(s.image, boxes=boxes)
        n = nuc.count_in_discs(sub.xy, r)
        umi = np.asarray(sub.adata.X.sum(1)).ravel()
        assert np.median(n) >= 3
        rhos.append(spearmanr(n, umi)[0])
        # the simplest baseline beside it: the spot's mean haematoxylin OD
        h = [hematoxylin_od(s.image.read_region(int(x - r), int(y - r), int(2 * r), int(2 * r), 0)).mean()
             for x, y in sub.xy]
        hema.append(spearmanr(h, umi)[0])
    assert np.mean(rhos) > 0.3 and min(rhos) > 0.0, rhos
    print(f"nuclei per spot vs UMI, Spearman per section: {np.round(rhos, 2)}; mean haematoxylin OD baseline: "
          f"{np.round(hema, 2)}")


def test_nuclei_from_qupath_cells_and_detections(data_dir):
    """A QuPath cell's nucleusGeometry is its nucleus, a detection's geometry is the nucleus; areas in µm²."""
    from stimage_nb.qupath import _centroid_area, read_qupath

    path = data_dir / "fixtures" / "qupath" / "H_dual_compat.geojson"
    nuc = nuclei_from_qupath(path, um_per_px=0.5)
    objs = read_qupath(path)
    assert isinstance(nuc, Nuclei) and nuc.source == "qupath" and len(nuc) == len(objs.points)
    import json

    for oid, g, ng in zip(objs.points.index, objs.points["geometry"], objs.points["nucleus_geometry"]):
        geom = json.loads(ng or g)
        _, area_px = _centroid_area(geom)
        assert nuc.table.loc[oid, "area_um2"] == pytest.approx(area_px * 0.25, rel=0.15)
    assert nuc.table["hematoxylin_od_mean"].isna().all()  # no image given: no intensity
    with pytest.raises(StimageInputError, match="pixel size"):
        nuclei_from_qupath(path)
