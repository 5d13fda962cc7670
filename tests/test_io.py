"""Readers and the image interface, on the real bundled data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stimage_nb import _keys as K
from stimage_nb.errors import StimageInputError
from stimage_nb.io.image import SlideImage, open_image
from stimage_nb.io.ngff import write_ome_zarr
from stimage_nb.io.readers import read_anndata, read_gene_list, read_manifest, read_visium, read_wsi

EXPECTED = {"B4": (283, 9272, 9923), "C2": (187, 9274, 9911), "C3": (180, 9270, 9936),
            "C4": (184, 9278, 9916), "C5": (181, 9272, 9901), "C6": (178, 9288, 9907)}


@pytest.fixture(scope="module")
def sections(her2st_manifest, her2st_genes):
    return {s.name: s for s in read_manifest(her2st_manifest, genes=her2st_genes)}


def test_manifest_reads_all_sections(sections, her2st_genes):
    assert set(sections) == set(EXPECTED)
    for name, s in sections.items():
        n_spots, w, h = EXPECTED[name]
        assert s.adata.n_obs == n_spots
        assert s.genes == her2st_genes
        assert s.um_per_px == pytest.approx(0.69)
        assert s.patient == name[0]
        ct = s.adata.obsm[K.CELLTYPE_PROPORTIONS]
        assert ct.shape == (n_spots, 8) and "Epithelial" in ct.columns
        np.testing.assert_allclose(ct.sum(1), 1.0, atol=1e-3)
        assert s.adata.obs_names[0].count("x") == 1
        X = s.adata.X.toarray()
        assert X.min() >= 0 and np.allclose(X, np.round(X))


def test_counts_match_raw_tsv(sections, data_dir):
    s = sections["C3"]
    raw = pd.read_csv(data_dir / "her2st" / "counts" / "C3.tsv.gz", sep="\t", index_col=0)
    sid, gene = s.adata.obs_names[7], "SCD"
    assert s.adata[sid, gene].X.toarray()[0, 0] == raw.loc[sid, gene]


def test_image_is_ome_zarr_pyramid_matching_the_jpeg(sections):
    s = sections["C2"]
    img = s.image
    assert isinstance(img, SlideImage)
    assert (img.width, img.height) == EXPECTED["C2"][1:]
    assert img.n_levels >= 5 and img.downsamples[1] == pytest.approx(2.0, rel=1e-3)
    assert img.path.name.endswith(".ome.zarr")
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(s.image_path) as im:
        ref = np.asarray(im.crop((4000, 5000, 4064, 5032)).convert("RGB"))
    np.testing.assert_array_equal(img.read_region(4000, 5000, 64, 32), ref)
    # outside the image: white padding, no error
    edge = img.read_region(img.width - 10, img.height - 10, 20, 20)
    assert edge.shape == (20, 20, 3) and (edge[15:, 15:] == 255).all()


def test_ome_zarr_readable_by_ome_zarr_py(sections):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    img = sections["C2"].image
    nodes = list(Reader(parse_url(str(img.path)))())
    ms = nodes[0].metadata
    assert len(nodes[0].data) == img.n_levels
    assert nodes[0].data[0].shape == (3, img.height, img.width)
    assert ms["coordinateTransformations"][0][0]["scale"][-1] == pytest.approx(0.69)


def test_tiles_comparable_across_scan_resolutions(sections, tmp_path):
    """The same tissue scanned at 0.69 and 1.38 µm/px gives nearly the same physical tile."""
    s = sections["C3"]
    cx, cy = s.xy[10]
    crop = s.image.read_region(int(cx) - 400, int(cy) - 400, 800, 800)
    half = np.asarray(Image.fromarray(crop).resize((400, 400), Image.Resampling.BOX))
    lo = SlideImage(write_ome_zarr(half, tmp_path / "lo.ome.zarr", um_per_px=1.38))
    hi = SlideImage(write_ome_zarr(crop, tmp_path / "hi.ome.zarr", um_per_px=0.69))
    t_hi = hi.read_physical(400, 400, 150.0, 64).astype(float)
    t_lo = lo.read_physical(200, 200, 150.0, 64).astype(float)
    assert t_hi.shape == t_lo.shape == (64, 64, 3)
    r = np.corrcoef(t_hi.ravel(), t_lo.ravel())[0, 1]
    assert r > 0.95, r
    assert np.abs(t_hi - t_lo).mean() < 8
    # a tile of another physical size is clearly different
    other = hi.read_physical(400, 400, 400.0, 64).astype(float)
    assert np.corrcoef(t_hi.ravel(), other.ravel())[0, 1] < r


def test_svs_slide(data_dir):
    img = open_image(data_dir / "fixtures" / "wsi" / "cmu_small_region.svs")
    assert (img.width, img.height) == (2220, 2967)
    assert img.um_per_px == pytest.approx(0.499)
    sec = read_wsi(data_dir / "fixtures" / "wsi" / "cmu_small_region.svs", spacing_um=100)
    # tissue covers part of the region: some but not all grid points kept
    step = 100 / 0.499
    n_all = len(np.arange(step / 2, 2220, step)) * len(np.arange(step / 2, 2967, step))
    assert 10 < sec.adata.n_obs < n_all
    assert sec.adata.n_vars == 0


def test_tissue_mask_keeps_the_spots_the_authors_selected(sections):
    """Every her2st spot the original study kept as under tissue falls in the mask (pale stroma and
    fat included), and the mask does not spread over the glass or the eosin haze beside the section:
    outside the spots' convex hull grown by one spot pitch (200 µm) lies at most 5% of it."""
    from scipy import ndimage as ndi
    from scipy.spatial import Delaunay

    from stimage_nb.io.tissue import in_mask, tissue_mask

    for s in sections.values():
        m, ds = tissue_mask(s.image)
        assert in_mask(s.xy, m, ds).mean() >= 0.99, s.name
        yy, xx = np.mgrid[0:m.shape[0], 0:m.shape[1]]
        hull = (Delaunay(s.xy / ds).find_simplex(np.c_[xx.ravel(), yy.ravel()]) >= 0).reshape(m.shape)
        hull = ndi.binary_dilation(hull, iterations=int(200 / s.image.um_per_px / ds))
        assert (m & ~hull).sum() <= 0.05 * m.sum(), s.name
        assert 0.1 < m.mean() < 0.4, s.name  # a section, not the slide


def test_tissue_mask_agrees_with_space_ranger(data_dir):
    """Another platform and scale (Visium lowres, ~14 µm/px): Space Ranger's in_tissue flags."""
    import json

    from stimage_nb.io.tissue import in_mask, tissue_mask

    d = data_dir / "fixtures" / "visium_1.0.0" / "spatial"
    sf = json.loads((d / "scalefactors_json.json").read_text())
    img = open_image(d / "tissue_lowres_image.png", um_per_px=65.0 / sf["spot_diameter_fullres"] / sf["tissue_lowres_scalef"])
    pos = pd.read_csv(d / "tissue_positions_list.csv", header=None)
    xy = pos[[5, 4]].to_numpy(float) * sf["tissue_lowres_scalef"]
    flag = pos[1].to_numpy() == 1
    m, ds = tissue_mask(img)
    got = in_mask(xy, m, ds)
    assert got[flag].mean() >= 0.98          # tissue spots kept
    assert (~got[~flag]).mean() >= 0.85      # off-tissue spots (incl. beside the fiducial frame) dropped
    assert (got == flag).mean() >= 0.97


def test_visium_outs(data_dir):
    s = read_visium(data_dir / "fixtures" / "visium_1.0.0")
    assert s.adata.n_vars == 100
    assert 0 < s.adata.n_obs <= 100
    scale = s.adata.uns[K.UNS]["image_scale"]
    assert scale == pytest.approx(0.045004502)  # the hires PNG is a blank placeholder -> lowres used
    assert s.um_per_px == pytest.approx(65 / 89.42751063343188 / scale)  # spot_diameter_fullres spans 65 µm
    assert s.image.width == 600
    assert (s.xy >= 0).all() and (s.xy < 600).all()


def test_manifest_rows_can_be_visium_outs(data_dir, her2st_manifest, tmp_path):
    """A `visium` column names a Space Ranger outs/ folder: such rows train and predict through the
    same manifest as the her2st layout, in one file."""
    outs = data_dir / "fixtures" / "visium_1.0.0"
    h = pd.read_csv(her2st_manifest, dtype=str).set_index("section").loc["C3"]
    base = her2st_manifest.parent
    man = tmp_path / "mixed.csv"
    pd.DataFrame([
        {"section": "C3", "patient": "C", "image": str(base / h["image"]), "counts": str(base / h["counts"]),
         "spots": str(base / h["spots"]), "um_per_px": h["um_per_px"], "visium": ""},
        {"section": "heart", "patient": "P1", "image": "", "counts": "", "spots": "", "um_per_px": "",
         "visium": str(outs)},
    ]).to_csv(man, index=False)
    c3, heart = read_manifest(man, genes=None)
    ref = read_visium(outs)
    assert c3.name == "C3" and c3.adata.n_obs == 180
    assert heart.name == "heart" and heart.patient == "P1" and heart.adata.n_obs == ref.adata.n_obs
    assert heart.um_per_px == pytest.approx(ref.um_per_px)
    assert (heart.adata.X != ref.adata.X).nnz == 0 and list(heart.adata.obs_names) == list(ref.adata.obs_names)
    # only `section` + `visium` are needed for an all-Visium manifest
    only = tmp_path / "visium.csv"
    only.write_text(f"section,visium\nheart,{outs}\n")
    assert read_manifest(only)[0].adata.n_obs == ref.adata.n_obs
    # a missing outs/ folder names the section; a her2st row in a visium manifest still needs its columns
    only.write_text(f"section,visium\nheart,{tmp_path / 'nope'}\n")
    with pytest.raises(StimageInputError, match="Visium outs/ folder of section heart not found"):
        read_manifest(only)
    only.write_text(f"section,visium\nheart,{outs}\nC3,\n")
    with pytest.raises(StimageInputError, match="section C3 has no visium folder, so it needs the columns"):
        read_manifest(only)


def test_anndata_with_image(sections, tmp_path):
    s = sections["C4"]
    p = tmp_path / "c4.h5ad"
    a = s.adata.copy()
    a.obsm["props"] = a.obsm.pop(K.CELLTYPE_PROPORTIONS)
    a.write_h5ad(p)
    r = read_anndata(p, s.image_path, um_per_px=0.69, diameter_um=100, celltype_key="props")
    assert list(r.adata.obs_names) == list(s.adata.obs_names)
    np.testing.assert_array_equal(r.xy, s.xy)
    assert r.celltypes == s.celltypes
    with pytest.raises(StimageInputError, match="obsm"):
        read_anndata(p, s.image_path, um_per_px=0.69, spatial_key="xy")


# --------------------------------------------------------------------------- bad input
@pytest.fixture()
def mini(tmp_path, data_dir):
    """A writable one-section manifest (C5, 40 spots, real files) to corrupt in tests."""
    src = data_dir / "her2st"
    spots = pd.read_csv(src / "spots" / "C5_selection.tsv", sep="\t")
    counts = pd.read_csv(src / "counts" / "C5.tsv.gz", sep="\t", index_col=0)
    ids = [f"{x}x{y}" for x, y in zip(spots.x, spots.y)]
    spots = spots[pd.Index(ids).isin(counts.index) & (spots.selected == 1)].head(40)
    spots.to_csv(tmp_path / "spots.tsv", sep="\t", index=False)
    ids = [f"{x}x{y}" for x, y in zip(spots.x, spots.y)]
    counts.loc[counts.index.intersection(ids), ["ERBB2", "GAPDH", "KRT19", "CD74"]].to_csv(tmp_path / "counts.tsv", sep="\t")
    (tmp_path / "sections.csv").write_text(
        f"section,patient,image,counts,spots,um_per_px\nC5,C,{src / 'images' / 'C5.jpg'},counts.tsv,spots.tsv,0.69\n")
    return tmp_path


def test_mini_manifest_ok(mini):
    (s,) = read_manifest(mini / "sections.csv")
    assert s.adata.n_obs == 40 and s.genes == ["ERBB2", "GAPDH", "KRT19", "CD74"]


def test_missing_image(mini):
    m = mini / "sections.csv"
    m.write_text(m.read_text().replace("C5.jpg", "nope.jpg"))
    with pytest.raises(StimageInputError, match="nope.jpg.*not found"):
        read_manifest(m)


def test_corrupt_image(mini, data_dir):
    bad = mini / "bad.jpg"
    bad.write_bytes((data_dir / "her2st" / "images" / "C5.jpg").read_bytes()[:20000])
    m = mini / "sections.csv"
    m.write_text(m.read_text().replace(str(data_dir / "her2st" / "images" / "C5.jpg"), "bad.jpg"))
    (s,) = read_manifest(m)
    with pytest.raises(StimageInputError, match="bad.jpg.*cannot decode"):
        _ = s.image


def test_spots_outside_image_are_counted_and_excluded(mini, caplog):
    spots = pd.read_csv(mini / "spots.tsv", sep="\t")
    spots.loc[:2, "pixel_x"] = 50_000
    spots.to_csv(mini / "spots.tsv", sep="\t", index=False)
    (s,) = read_manifest(mini / "sections.csv")
    inside = s.drop_outside_image()
    assert inside.adata.n_obs == 37
    assert inside.adata.uns[K.UNS]["n_outside_image"] == 3
    assert "3 of 40 spots lie outside" in caplog.text


def test_all_spots_outside_image(mini):
    spots = pd.read_csv(mini / "spots.tsv", sep="\t")
    spots["pixel_x"] += 1e6
    spots.to_csv(mini / "spots.tsv", sep="\t", index=False)
    (s,) = read_manifest(mini / "sections.csv")
    with pytest.raises(StimageInputError, match="all 40 spots"):
        s.drop_outside_image()


def test_spot_ids_not_matching_counts(mini):
    c = pd.read_csv(mini / "counts.tsv", sep="\t", index_col=0)
    c.index = [f"spot{i}" for i in range(len(c))]
    c.to_csv(mini / "counts.tsv", sep="\t")
    with pytest.raises(StimageInputError, match="counts.tsv: none of its 40 spot ids"):
        read_manifest(mini / "sections.csv")


def test_missing_genes_named_or_dropped(mini):
    with pytest.raises(StimageInputError, match=r"1 of 3 requested genes.*\['NOTAGENE'\].*drop_missing_genes"):
        read_manifest(mini / "sections.csv", genes=["ERBB2", "NOTAGENE", "CD74"])
    (s,) = read_manifest(mini / "sections.csv", genes=["ERBB2", "NOTAGENE", "CD74"], drop_missing_genes=True)
    assert s.genes == ["ERBB2", "CD74"]
    assert s.adata.uns[K.UNS]["dropped_genes"] == ["NOTAGENE"]


@pytest.mark.parametrize("value,match", [("", "missing"), ("nan", "missing"), ("690", "outside the plausible"),
                                         ("-1", "outside the plausible")])
def test_bad_um_per_px(mini, value, match):
    m = mini / "sections.csv"
    m.write_text(m.read_text().replace(",0.69", f",{value}"))
    with pytest.raises(StimageInputError, match=match):
        read_manifest(m)


@pytest.mark.parametrize("bad,match", [(np.nan, "NaN"), (-3, "negative")])
def test_bad_counts(mini, bad, match):
    c = pd.read_csv(mini / "counts.tsv", sep="\t", index_col=0)
    c.iloc[3, 1] = bad
    c.to_csv(mini / "counts.tsv", sep="\t")
    with pytest.raises(StimageInputError, match=f"counts.tsv.*{match}"):
        read_manifest(mini / "sections.csv")


def test_prediction_only_row_without_counts(mini):
    m = mini / "sections.csv"
    m.write_text(m.read_text().replace("counts.tsv", ""))
    (s,) = read_manifest(m)
    assert s.adata.n_obs == 40 and s.adata.n_vars == 0 and not s.has_counts


def test_unknown_section_and_bad_manifest(mini):
    with pytest.raises(StimageInputError, match="unknown sections"):
        read_manifest(mini / "sections.csv", sections=["Z9"])
    (mini / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(StimageInputError, match="lacks columns"):
        read_manifest(mini / "bad.csv")


def test_gene_list(tmp_path, her2st_genes):
    assert len(her2st_genes) == 769
    (tmp_path / "g.txt").write_text("A\nB\nA\n")
    with pytest.raises(StimageInputError, match="duplicate"):
        read_gene_list(tmp_path / "g.txt")


# --------------------------------------------------------------------------- tile extraction
def test_grouped_tile_reads_equal_single_reads(sections, data_dir):
    from stimage_nb.tiles import extract_tiles

    s = sections["C3"]
    xy = s.xy[:60]
    tiles = extract_tiles(s.image, xy, 150.0, 48, cache=False)
    single = np.stack([s.image.read_physical(x, y, 150.0, 48) for x, y in xy])
    np.testing.assert_array_equal(tiles, single)
    w = read_wsi(data_dir / "fixtures" / "wsi" / "cmu_small_region.svs", spacing_um=55)
    np.testing.assert_array_equal(extract_tiles(w.image, w.xy[:80], 80.0, 32, cache=False),
                                  np.stack([w.image.read_physical(x, y, 80.0, 32) for x, y in w.xy[:80]]))


def test_read_groups_bands_for_dense_grids_singles_for_sparse_points():
    from stimage_nb.tiles import _read_groups

    n = 100
    grid = np.array([(x, y) for y in range(0, 600, 130) for x in range(0, 1300, 130)])
    groups = _read_groups(grid, n)
    assert [len(g) for g in groups] == [50]  # the dense grid fits one 1024-px band: one read
    assert sorted(len(g) for g in _read_groups(grid, n, max_height=n)) == [10] * 5  # bands of one row: per row
    tall = np.array([(x, y) for y in range(0, 4000, 130) for x in range(0, 1300, 130)])
    for g in _read_groups(tall, n):  # regions stay within max_height x max_width
        assert np.ptp(tall[g][:, 1]) + n <= 1024 and np.ptp(tall[g][:, 0]) + n <= 8192
    assert sorted(np.concatenate(_read_groups(tall, n)).tolist()) == list(range(len(tall)))
    sparse = np.array([[0, 0], [5000, 10], [9000, 20]])
    assert [len(g) for g in _read_groups(sparse, n)] == [1, 1, 1]
    wide = np.array([(x, 0) for x in range(0, 20000, 130)])
    assert all(np.ptp(wide[g][:, 0]) + n <= 8192 for g in _read_groups(wide, n))
