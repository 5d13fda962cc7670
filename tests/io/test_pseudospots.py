"""Pseudo-spots: lattice geometry (pure logic, synthetic points), then counts and composition on real cells/bins."""

from __future__ import annotations

import _platform_data as D
import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from stimage_nb import _keys as K
from stimage_nb.errors import StimageInputError
from stimage_nb.io import aggregate_pseudospots, pseudospot_lattice, read_anndata, read_visium_hd
from stimage_nb.io.pseudospots import lattice_sites


@pytest.mark.parametrize("lattice,n_neighbours", [("hex", 6), ("square", 4)])
def test_lattice_sites_are_one_pitch_apart(lattice, n_neighbours):
    sites, rr, cc = lattice_sites((10.0, 20.0), (500.0, 400.0), 37.0, lattice)
    d, _ = cKDTree(sites).query(sites, k=n_neighbours + 2)
    inner = (sites[:, 0] > 100) & (sites[:, 0] < 400) & (sites[:, 1] > 100) & (sites[:, 1] < 350)
    np.testing.assert_allclose(d[inner, 1:n_neighbours + 1], 37.0)  # every inner site: its neighbours at the pitch
    assert (d[inner, n_neighbours + 1] > 37.0 * 1.4).all()          # and no more of them
    assert len(set(zip(rr.tolist(), cc.tolist()))) == len(sites)


@pytest.mark.parametrize("lattice", ["hex", "square"])
def test_points_go_to_their_nearest_site_within_the_disc(lattice):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 2000, (4000, 2))  # px
    um = 0.5
    disc = pseudospot_lattice(xy, um, 100.0, lattice=lattice)
    tile = pseudospot_lattice(xy, um, 100.0, lattice=lattice, footprint="tile")
    r_px = 50.0 / um
    # brute force: the nearest of all lattice sites
    sites, _, _ = lattice_sites(xy.min(0), xy.max(0) - xy.min(0), 100.0 / um, lattice)
    dist = np.linalg.norm(xy[:, None, :] - sites[None, :, :], axis=2)
    nearest = sites[dist.argmin(1)]
    assert (tile.assignment >= 0).all()
    np.testing.assert_allclose(tile.centres_px[tile.assignment], nearest)
    kept = disc.assignment >= 0
    np.testing.assert_array_equal(kept, dist.min(1) <= r_px)
    np.testing.assert_allclose(disc.centres_px[disc.assignment[kept]], nearest[kept])
    # the disc keeps pi/4 of a square cell, pi/(2 sqrt 3) of a hexagon
    frac = np.pi / 4 if lattice == "square" else np.pi / (2 * np.sqrt(3))
    assert kept.mean() == pytest.approx(frac, abs=0.03)
    assert disc.n_points.sum() == kept.sum() and (disc.n_points >= 1).all()
    assert len(set(disc.ids)) == len(disc.ids)
    f = disc.to_frame()
    assert list(f.columns) == ["row", "col", K.PIXEL_X, K.PIXEL_Y, K.N_POINTS] and f[K.N_POINTS].sum() == kept.sum()


def test_pseudospot_bad_arguments():
    xy = np.zeros((3, 2))
    for kw, msg in [(dict(diameter_um=0), "diameter must be a positive"), (dict(diameter_um="a"), "diameter must"),
                    (dict(diameter_um=55, lattice="tri"), "lattice must be one of"),
                    (dict(diameter_um=55, footprint="x"), "footprint must be one of"),
                    (dict(diameter_um=55, pitch_um=-1), "pitch must be a positive")]:
        with pytest.raises(StimageInputError, match=msg):
            pseudospot_lattice(xy, 0.5, **kw)
    with pytest.raises(StimageInputError, match="no cells or bins"):
        pseudospot_lattice(np.zeros((0, 2)), 0.5, 55)


# -------------------------------------------------------------------------------------------- real cells
@pytest.fixture(scope="module")
def cells(data_dir):
    xen = D.xenium_fixture(data_dir)
    return read_anndata(xen / "NCBI858.h5ad", xen / "NCBI858.jpg", um_per_px=D.XENIUM_HE_UM,
                        xy_columns=("y_pixel", "x_pixel"), platform="xenium", diameter_um=10.0)


@pytest.mark.parametrize("diameter", [55.0, 100.0])
def test_xenium_cells_into_pseudospots_conserve_counts(cells, diameter):
    """Every cell's counts land in exactly one pseudo-spot (tile footprint); with the disc footprint the
    pseudo-spots hold exactly the counts of the cells within diameter/2 of their centre."""
    X = cells.adata.X.toarray()
    tile = aggregate_pseudospots(cells, diameter, footprint="tile")
    np.testing.assert_array_equal(np.asarray(tile.adata.X.sum(0)).ravel(), X.sum(0))
    disc = aggregate_pseudospots(cells, diameter)
    assert disc.platform == "xenium" and disc.adata.uns[K.UNS][K.OBS_UNIT] == "pseudospot"
    ps = disc.adata.uns[K.UNS][K.PSEUDOSPOT]
    assert ps["diameter_um"] == diameter and ps["source_unit"] == "cell" and ps["n_source"] == 200
    assert disc.adata.obs[K.DIAMETER_UM].eq(diameter).all()
    # brute force: each pseudo-spot = the cells within the radius of its centre
    d = np.linalg.norm(cells.xy[:, None, :] - disc.xy[None, :, :], axis=2) * cells.um_per_px
    member = d <= diameter / 2 + 1e-9
    assert member.sum(1).max() <= 1  # pitch = diameter: discs do not overlap
    np.testing.assert_array_equal(disc.adata.obs[K.N_POINTS].to_numpy(), member.sum(0))
    np.testing.assert_allclose(disc.adata.X.toarray(), member.T.astype(float) @ X)
    assert ps["n_used"] == member.any(1).sum() < 200
    # the centres: sites of a hexagonal lattice with the requested pitch from the cells' lower-left corner
    p = diameter / cells.um_per_px
    rel = disc.xy - cells.xy.min(0)
    row, col = disc.adata.obs["array_row"].to_numpy(), disc.adata.obs["array_col"].to_numpy()
    np.testing.assert_allclose(rel[:, 1], row * p * np.sqrt(3) / 2, atol=1e-9)
    np.testing.assert_allclose(rel[:, 0], (col + 0.5 * (row % 2)) * p, atol=1e-9)
    nn, _ = cKDTree(disc.xy).query(disc.xy, k=2)
    assert (nn[:, 1] * cells.um_per_px >= diameter * (1 - 1e-9)).all()


def test_pseudospot_celltype_composition_from_cell_labels(data_dir, cells, tmp_path):
    """Cell labels (e.g. Xenium Explorer's cell groups) give each pseudo-spot the fraction of each type."""
    X = cells.adata.X.toarray()
    markers = [g for g in ("EPCAM", "PTPRC", "COL1A2", "PECAM1") if g in cells.genes]
    assert len(markers) >= 3
    lab = np.array(markers)[X[:, [cells.genes.index(g) for g in markers]].argmax(1)]
    lab[::17] = ""  # a few unlabelled cells: no target, not counted in the fractions
    p = tmp_path / "cell_groups.csv"
    pd.DataFrame({"cell_id": cells.adata.obs_names, "group": lab}).to_csv(p, index=False)
    lab_cells = read_anndata(D.xenium_fixture(data_dir) / "NCBI858.h5ad", cells.image_path, um_per_px=D.XENIUM_HE_UM, xy_columns=("y_pixel", "x_pixel"),
                             platform="xenium", diameter_um=10.0, celltypes=p)
    assert lab_cells.adata.obsm[K.CELLTYPE_PROPORTIONS].iloc[::17].isna().all().all()
    ps = aggregate_pseudospots(lab_cells, 100.0, footprint="tile")
    comp = ps.adata.obsm[K.CELLTYPE_PROPORTIONS]
    assert list(comp.columns) == sorted(set(lab) - {""})
    lat = pseudospot_lattice(lab_cells.xy, lab_cells.um_per_px, 100.0, footprint="tile")
    for j, sid in enumerate(ps.adata.obs_names):
        members = lab[lat.assignment == j]
        members = members[members != ""]
        if len(members) == 0:
            assert comp.loc[sid].isna().all()
        else:
            exp = pd.Series(members).value_counts(normalize=True).reindex(comp.columns, fill_value=0.0)
            np.testing.assert_allclose(comp.loc[sid].to_numpy(), exp.to_numpy(), atol=1e-6)


def test_visium_hd_bins_of_2_and_8_um_give_the_same_pseudospots(data_dir, tmp_path):
    """The same tissue binned at 2 µm and at 8 µm, aggregated to 100 µm pseudo-spots: the same total counts,
    and per pseudo-spot nearly the same counts (the lattices start half a 2 µm bin apart)."""
    b8 = read_visium_hd(D.hd_field_case(data_dir))
    b2 = read_visium_hd(D.hd_variant(data_dir, tmp_path, 2), bin_um=2)
    p8 = aggregate_pseudospots(b8, 100.0, lattice="square", footprint="tile")
    p2 = aggregate_pseudospots(b2, 100.0, lattice="square", footprint="tile")
    np.testing.assert_array_equal(np.asarray(p2.adata.X.sum(0)), np.asarray(p8.adata.X.sum(0)))
    assert p2.adata.uns[K.UNS][K.PSEUDOSPOT]["source_unit"] == "bin"
    common = p8.adata.obs_names.intersection(p2.adata.obs_names)
    assert len(common) >= 0.9 * p8.adata.n_obs
    tot8 = np.asarray(p8.adata[common].X.sum(1)).ravel()
    tot2 = np.asarray(p2.adata[common].X.sum(1)).ravel()
    assert np.corrcoef(tot8, tot2)[0, 1] > 0.95
    assert p8.adata.obs[K.N_POINTS].sum() == 576 and p2.adata.obs[K.N_POINTS].sum() == 576 * 16


def test_pseudospots_of_an_empty_section(cells):
    with pytest.raises(StimageInputError, match="has no cells or bins to aggregate"):
        aggregate_pseudospots(cells.subset(np.zeros(cells.adata.n_obs, bool)), 100.0)
