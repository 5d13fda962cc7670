"""Visium (Space Ranger 1-3) and Visium HD readers on the real fixtures and variants made from them."""

from __future__ import annotations

import json
import shutil

import _platform_data as D
import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from stimage_nb import _keys as K
from stimage_nb.errors import StimageInputError
from stimage_nb.io import read_visium, read_visium_hd
from stimage_nb.io.platforms import detect_platform


def _nn_um(section) -> float:
    """Median centre-to-centre distance to the nearest neighbour, in µm."""
    d, _ = cKDTree(section.xy).query(section.xy, k=2)
    return float(np.median(d[:, 1]) * section.um_per_px)


@pytest.fixture(scope="module")
def visium_ref(data_dir):
    return read_visium(data_dir / "fixtures" / "visium_1.0.0")


@pytest.mark.parametrize("kind", ["csv_header", "parquet"])
def test_visium_position_files_of_every_space_ranger_version_read_alike(data_dir, tmp_path, visium_ref, kind):
    """SR 1.x tissue_positions_list.csv (no header, the fixture), SR 2+ tissue_positions.csv (header), SR 3+
    tissue_positions.parquet: the same spots, coordinates, counts and µm/px."""
    s = read_visium(D.visium_variant(data_dir, tmp_path, kind))
    ref = visium_ref
    assert s.platform == "visium" and s.adata.uns[K.UNS][K.PLATFORM] == "visium"
    assert list(s.adata.obs_names) == list(ref.adata.obs_names)
    np.testing.assert_array_equal(s.xy, ref.xy)
    assert (s.adata.X != ref.adata.X).nnz == 0
    assert s.um_per_px == pytest.approx(ref.um_per_px)
    assert s.adata.uns[K.UNS]["positions"] == {"csv_header": "tissue_positions.csv",
                                               "parquet": "tissue_positions.parquet"}[kind]
    assert ref.adata.uns[K.UNS]["positions"] == "tissue_positions_list.csv"


def test_visium_matches_squidpy_and_the_spot_geometry(data_dir, tmp_path, visium_ref):
    """Against the field's reader (squidpy.read.visium) on the layouts it reads, and against the physical
    layout: Visium spots are 100 µm apart centre to centre, so µm/px (from the 55 µm spot diameter) is right."""
    import squidpy as sq

    for outs in (data_dir / "fixtures" / "visium_1.0.0", D.visium_variant(data_dir, tmp_path, "csv_header")):
        ref = sq.read.visium(outs, library_id="lib")
        ref = ref[ref.obs["in_tissue"] == 1]
        s = read_visium(outs)
        assert list(s.adata.obs_names) == list(ref.obs_names)
        scale = s.adata.uns[K.UNS]["image_scale"]
        np.testing.assert_allclose(s.xy, np.asarray(ref.obsm["spatial"], float) * scale)
        np.testing.assert_array_equal(s.adata.X.toarray(), np.asarray(ref.X.todense(), dtype=np.float32))
    # the array: adjacent spots of a row are 2 array columns and 100 µm apart, rows 100·√3/2 µm apart
    o = visium_ref.adata.obs
    coef, *_ = np.linalg.lstsq(np.c_[o["array_col"], o["array_row"], np.ones(len(o))], visium_ref.xy, rcond=None)
    assert 2 * coef[0, 0] * visium_ref.um_per_px == pytest.approx(100.0, rel=0.01)
    assert coef[1, 1] * visium_ref.um_per_px == pytest.approx(100.0 * np.sqrt(3) / 2, rel=0.01)
    assert visium_ref.adata.obs[K.DIAMETER_UM].eq(55.0).all()


def test_visium_celltypes_from_cluster_labels(data_dir, tmp_path, visium_ref):
    """A Space Ranger-style ``Barcode,Cluster`` CSV gives hard labels and one-hot targets."""
    ids = list(visium_ref.adata.obs_names)
    lab = pd.DataFrame({"Barcode": ids, "Cluster": [1 + i % 3 for i in range(len(ids))]})
    lab["Cluster"] = lab["Cluster"].astype("Int64")
    lab.iloc[:2, 1] = pd.NA  # unlabelled spots: no target
    p = tmp_path / "clusters.csv"
    lab.to_csv(p, index=False)
    s = read_visium(data_dir / "fixtures" / "visium_1.0.0", celltypes=p)
    ct = s.adata.obsm[K.CELLTYPE_PROPORTIONS]
    assert list(ct.columns) == ["1", "2", "3"]
    assert ct.iloc[:2].isna().all().all()
    np.testing.assert_allclose(ct.iloc[2:].sum(axis=1), 1.0)
    assert list(s.adata.obs[K.CELLTYPE_LABEL].iloc[2:]) == lab["Cluster"].iloc[2:].astype(int).astype(str).tolist()


def test_visium_bad_inputs_name_the_file(data_dir, tmp_path):
    src = data_dir / "fixtures" / "visium_1.0.0"
    bad = D._copy_tree_links(src, tmp_path / "nopos", skip=("tissue_positions_list.csv",))
    with pytest.raises(StimageInputError, match=r"nopos/spatial: no tissue positions file.*tissue_positions.parquet"):
        read_visium(bad)
    cut = D._copy_tree_links(src, tmp_path / "cut", skip=("tissue_positions_list.csv",))
    rows = (src / "spatial" / "tissue_positions_list.csv").read_text().splitlines()
    (cut / "spatial" / "tissue_positions_list.csv").write_text("\n".join(",".join(r.split(",")[:4]) for r in rows))
    with pytest.raises(StimageInputError, match=r"tissue_positions_list.csv: a header-less positions file needs 6"):
        read_visium(cut)
    pq = D.visium_variant(data_dir, tmp_path, "parquet")
    pd.read_parquet(pq / "spatial" / "tissue_positions.parquet").drop(columns="barcode").to_parquet(
        pq / "spatial" / "tissue_positions.parquet")
    with pytest.raises(StimageInputError, match=r"tissue_positions.parquet: parquet tissue positions lack a 'barcode'"):
        read_visium(pq)
    nosf = D._copy_tree_links(src, tmp_path / "nosf", skip=("scalefactors_json.json",))
    with pytest.raises(StimageInputError, match=r"nosf/spatial/scalefactors_json.json: Visium scale factors .* not found"):
        read_visium(nosf)
    noh5 = D._copy_tree_links(src, tmp_path / "noh5", skip=("filtered_feature_bc_matrix.h5",))
    with pytest.raises(StimageInputError, match=r"noh5: no filtered_feature_bc_matrix.h5"):
        read_visium(noh5)
    with pytest.raises(StimageInputError, match="Visium outs/ folder not found"):
        read_visium(tmp_path / "nothing")
    junk = D._copy_tree_links(src, tmp_path / "junk", skip=("filtered_feature_bc_matrix.h5",))
    (junk / "filtered_feature_bc_matrix.h5").write_bytes(b"not hdf5")
    with pytest.raises(StimageInputError, match=r"junk/filtered_feature_bc_matrix.h5: not a readable 10x feature-barcode"):
        read_visium(junk)
    noimg = D._copy_tree_links(src, tmp_path / "noimg", skip=("tissue_lowres_image.png",))  # the hires is blank
    with pytest.raises(StimageInputError, match=r"noimg/spatial: no usable H&E image .* pass image="):
        read_visium(noimg)
    assert read_visium(noimg, image=src / "spatial" / "tissue_lowres_image.png").adata.uns[K.UNS]["image_scale"] == 1.0


# ---------------------------------------------------------------------------------------------- Visium HD
@pytest.fixture(scope="module")
def hd_truth(data_dir):
    return pd.read_csv(data_dir / "field_cases" / "visium_hd_parquet" / "truth_positions.csv").set_index("barcode")


def test_visium_hd_field_case(data_dir, hd_truth):
    """The 576 bins, at truth_positions.csv scaled to the hires PNG used, µm/px from microns_per_pixel,
    8 µm apart; the same from outs/, binned_outputs/ and the square_008um folder."""
    outs = D.hd_field_case(data_dir)
    assert detect_platform(outs) == "visium_hd"
    s = read_visium_hd(outs)
    assert s.platform == "visium_hd" and s.adata.n_obs == 576
    sf = json.loads((outs / "binned_outputs" / "square_008um" / "spatial" / "scalefactors_json.json").read_text())
    scale = sf["tissue_hires_scalef"]
    assert s.adata.uns[K.UNS]["image_scale"] == scale
    t = hd_truth.loc[s.adata.obs_names]
    np.testing.assert_allclose(s.xy, t[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy() * scale, atol=1e-9)
    assert s.um_per_px == pytest.approx(sf["microns_per_pixel"] / scale)
    assert _nn_um(s) == pytest.approx(8.0, rel=1e-6)
    assert s.adata.obs[K.DIAMETER_UM].eq(8.0).all() and s.adata.uns[K.UNS]["bin_um"] == 8.0
    assert s.image.width == 129
    for p in (outs / "binned_outputs", outs / "binned_outputs" / "square_008um"):
        r = read_visium_hd(p)
        np.testing.assert_array_equal(r.xy, s.xy)
        assert (r.adata.X != s.adata.X).nnz == 0
    assert read_visium(outs).platform == "visium_hd"  # a Visium HD outs/ handed to read_visium is read as HD


def test_visium_hd_with_the_full_resolution_image(data_dir, hd_truth, tmp_path):
    """Given the microscope image Space Ranger used, positions are its pixels and µm/px is microns_per_pixel."""
    from PIL import Image

    outs = D.hd_field_case(data_dir)
    sp = outs / "binned_outputs" / "square_008um" / "spatial"
    sf = json.loads((sp / "scalefactors_json.json").read_text())
    hi = Image.open(sp / "tissue_hires_image.png")
    n = int(round(hi.width / sf["tissue_hires_scalef"]))
    full = tmp_path / "fullres.png"
    hi.resize((n, n), Image.Resampling.BICUBIC).save(full)
    s = read_visium_hd(outs, image=full)
    np.testing.assert_allclose(s.xy, hd_truth.loc[s.adata.obs_names][["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy())
    assert s.um_per_px == pytest.approx(sf["microns_per_pixel"])
    assert s.adata.uns[K.UNS]["image_scale"] == 1.0


@pytest.mark.parametrize("bin_um,n_bins", [(16, 144), (2, 576 * 16)])
def test_visium_hd_2_and_16_um_bins(data_dir, tmp_path, bin_um, n_bins):
    """Other bin sizes of the same tissue: bins bin_um apart, the same µm/px, the same total counts."""
    ref = read_visium_hd(D.hd_field_case(data_dir))
    outs = D.hd_variant(data_dir, tmp_path, bin_um)
    s = read_visium_hd(outs, bin_um=bin_um)
    assert s.adata.n_obs == n_bins and s.adata.uns[K.UNS]["bin_um"] == bin_um
    assert _nn_um(s) == pytest.approx(bin_um, rel=1e-6)
    assert s.um_per_px == pytest.approx(ref.um_per_px)
    np.testing.assert_array_equal(np.asarray(s.adata.X.sum(0)).ravel(), np.asarray(ref.adata.X.sum(0)).ravel())
    # the bins lie where the 8 µm bins are: every bin centre within half an 8 µm bin (+ its own half) of one
    d, _ = cKDTree(ref.xy).query(s.xy)
    assert (d * s.um_per_px).max() <= (8.0 / 2 + bin_um / 2) * np.sqrt(2) + 1e-6
    with pytest.raises(StimageInputError, match=r"no Visium HD square_008um folder \(have \['square_0%02dum'\]\)" % bin_um):
        read_visium_hd(outs, bin_um=8)


def test_visium_hd_bad_inputs_name_visium_hd_and_the_file(data_dir, tmp_path):
    src = D.hd_field_case(data_dir)
    nopq = D._copy_tree_links(src, tmp_path / "nopq" / "outs", skip=("tissue_positions.parquet",))
    with pytest.raises(StimageInputError, match=r"Visium HD bins need spatial/tissue_positions.parquet .* missing"):
        read_visium_hd(nopq)
    nosf = D._copy_tree_links(src, tmp_path / "nosf" / "outs", skip=("scalefactors_json.json",))
    (nosf / "binned_outputs" / "square_008um" / "spatial" / "scalefactors_json.json").write_text(
        json.dumps({"tissue_hires_scalef": 0.08, "bin_size_um": 8.0}))
    with pytest.raises(StimageInputError, match=r"Visium HD scale factors give neither microns_per_pixel nor"):
        read_visium_hd(nosf)
    noh5 = D._copy_tree_links(src, tmp_path / "noh5" / "outs", skip=("filtered_feature_bc_matrix.h5",))
    with pytest.raises(StimageInputError, match=r"Visium HD bin folder without filtered_feature_bc_matrix.h5"):
        read_visium_hd(noh5)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StimageInputError, match=r"not a Visium HD output: no binned_outputs/square_NNNum"):
        read_visium_hd(empty)
    both = D._copy_tree_links(src, tmp_path / "both" / "outs")
    shutil.copytree(D.hd_variant(data_dir, tmp_path, 16) / "binned_outputs" / "square_016um",
                    both / "binned_outputs" / "square_016um", symlinks=True)
    assert read_visium_hd(both).adata.uns[K.UNS]["bin_um"] == 8.0  # 8 µm is the default when present
    assert read_visium_hd(both, bin_um=16).adata.n_obs == 144
