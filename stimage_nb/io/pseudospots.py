"""Pseudo-spots: cells or bins aggregated into spots of a chosen diameter on a regular lattice.

A model trained on 100 µm legacy-ST spots predicts what a 100 µm spot would capture; to test it on
Visium HD bins or Xenium cells at a matched scale, the bins/cells are summed into pseudo-spots of
the same diameter (the practice of e.g. Chelebian et al. 2024 and the Xenium/Visium comparisons of
Janesick et al., Nat Commun 2023, who binned Xenium transcripts into Visium-sized spots).

Geometry (all in the section's level-0 pixels, converted from µm with its µm/px):

- a lattice of sites ``pitch_um`` apart (default: the diameter) starting at the lower-left corner of
  the points' bounding box: ``"hex"`` (rows ``pitch·√3/2`` apart, every other row shifted by half a
  pitch, as Visium's spots) or ``"square"``;
- every point (cell or bin centre) goes to its nearest site (:class:`scipy.spatial.cKDTree`), so no
  point is counted twice even when discs overlap;
- ``footprint="disc"`` (default) keeps only points within ``diameter_um / 2`` of their site, as a real
  spot captures only what lies under it (on a square lattice with pitch = diameter ~21% of the area
  between discs is dropped, on a hexagonal one ~9%); ``footprint="tile"`` keeps every point (the
  lattice's Voronoi cells tile the tissue: counts are conserved exactly);
- sites that receive fewer than ``min_points`` points (glass, gaps) are dropped, so the pseudo-spots
  lie over the tissue.

Counts are summed; cell-type composition is the fraction of each label among a pseudo-spot's cells
(``obs["celltype"]``), or the mean of the points' proportions (``obsm["celltype_proportions"]``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from .. import _keys as K
from ..errors import StimageInputError
from .section import Section, celltypes_from_labels, make_section_adata

LATTICES = ("hex", "square")
FOOTPRINTS = ("disc", "tile")


@dataclass(frozen=True)
class PseudospotLattice:
    """Pseudo-spot sites and the assignment of points to them (what :func:`pseudospot_lattice` returns).

    ``centres_px`` (m, 2) x, y of the kept sites in level-0 px; ``row``/``col`` (m,) their lattice
    indices; ``assignment`` (n,) the site index of each input point, -1 when it is in none;
    ``n_points`` (m,) points per site.
    """

    centres_px: np.ndarray
    row: np.ndarray
    col: np.ndarray
    assignment: np.ndarray
    diameter_um: float
    pitch_um: float
    um_per_px: float
    lattice: str
    footprint: str
    min_points: int
    n_points: np.ndarray = field(repr=False, default=None)

    @property
    def ids(self) -> list[str]:
        """Stable pseudo-spot ids ``"r{row}c{col}"`` (lattice indices)."""
        return [f"r{r}c{c}" for r, c in zip(self.row.tolist(), self.col.tolist())]

    def to_frame(self) -> pd.DataFrame:
        """One row per pseudo-spot: ``row, col, pixel_x, pixel_y, n_points`` indexed by id."""
        return pd.DataFrame({"row": self.row, "col": self.col, K.PIXEL_X: self.centres_px[:, 0],
                             K.PIXEL_Y: self.centres_px[:, 1], K.N_POINTS: self.n_points}, index=self.ids)

    def summary(self) -> dict:
        """The lattice's parameters and how many points it used (JSON-ready)."""
        return {"diameter_um": float(self.diameter_um), "pitch_um": float(self.pitch_um), "lattice": self.lattice,
                "footprint": self.footprint, "min_points": int(self.min_points),
                "n_source": int(len(self.assignment)), "n_used": int((self.assignment >= 0).sum()),
                "n_pseudospots": int(len(self.row))}

    def to_json(self) -> str:
        return json.dumps(self.summary())


def _check(diameter_um, pitch_um, lattice, footprint, min_points) -> tuple[float, float]:
    try:
        d = float(diameter_um)
    except (TypeError, ValueError):
        d = float("nan")
    if not np.isfinite(d) or d <= 0:
        raise StimageInputError(f"pseudo-spot diameter must be a positive number of µm (e.g. 55 or 100), got {diameter_um!r}.")
    p = d if pitch_um is None else float(pitch_um)
    if not np.isfinite(p) or p <= 0:
        raise StimageInputError(f"pseudo-spot pitch must be a positive number of µm, got {pitch_um!r}.")
    if lattice not in LATTICES:
        raise StimageInputError(f"pseudo-spot lattice must be one of {list(LATTICES)}, got {lattice!r}.")
    if footprint not in FOOTPRINTS:
        raise StimageInputError(f"pseudo-spot footprint must be one of {list(FOOTPRINTS)}, got {footprint!r}.")
    if int(min_points) < 1:
        raise StimageInputError(f"min_points must be at least 1, got {min_points!r}.")
    return d, p


def lattice_sites(origin_px, extent_px, pitch_px: float, lattice: str = "hex") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All lattice sites covering a box (one site of margin): (centres (k, 2) px, row (k,), col (k,))."""
    x0, y0 = (float(v) for v in origin_px)
    w, h = (float(v) for v in extent_px)
    dy = pitch_px * (np.sqrt(3.0) / 2.0 if lattice == "hex" else 1.0)
    rows = np.arange(-1, int(np.ceil(h / dy)) + 2)
    cols = np.arange(-1, int(np.ceil(w / pitch_px)) + 2)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    shift = 0.5 * (rr % 2) if lattice == "hex" else 0.0
    xy = np.c_[x0 + (cc + shift) * pitch_px, y0 + rr * dy]
    return xy, rr, cc


def pseudospot_lattice(xy_px, um_per_px: float, diameter_um: float, *, lattice: str = "hex",
                       pitch_um: float | None = None, footprint: str = "disc", min_points: int = 1) -> PseudospotLattice:
    """Assign points (level-0 px) to pseudo-spots of ``diameter_um`` (module docstring for the geometry).

    Parameters
    ----------
    xy_px
        (n, 2) point centres, x then y, in pixels of an image at ``um_per_px``.
    diameter_um, pitch_um
        Pseudo-spot diameter and centre-to-centre distance in µm (pitch defaults to the diameter).
    lattice, footprint, min_points
        ``"hex"``/``"square"``; ``"disc"``/``"tile"``; the fewest points a kept pseudo-spot has.

    Raises
    ------
    StimageInputError
        A non-positive diameter/pitch, an unknown lattice/footprint, no points.
    """
    from scipy.spatial import cKDTree

    d, p = _check(diameter_um, pitch_um, lattice, footprint, min_points)
    xy = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
    if len(xy) == 0:
        raise StimageInputError("no cells or bins to aggregate into pseudo-spots.")
    um = float(um_per_px)
    pitch_px, radius_px = p / um, 0.5 * d / um
    lo = xy.min(0)
    sites, rr, cc = lattice_sites(lo, xy.max(0) - lo, pitch_px, lattice)
    dist, idx = cKDTree(sites).query(xy)
    if footprint == "disc":
        idx = np.where(dist <= radius_px * (1 + 1e-9), idx, -1)
    n_per = np.bincount(idx[idx >= 0], minlength=len(sites))
    keep = np.flatnonzero(n_per >= int(min_points))
    new = np.full(len(sites), -1, dtype=np.int64)
    new[keep] = np.arange(len(keep))
    assign = np.where(idx >= 0, new[np.maximum(idx, 0)], -1)
    return PseudospotLattice(sites[keep], rr[keep], cc[keep], assign, d, p, um, lattice, footprint, int(min_points),
                             n_points=n_per[keep])


def _composition(section: Section, A) -> pd.DataFrame | None:
    """Mean cell-type composition per pseudo-spot (labels preferred over proportions); NaN-aware."""
    a = section.adata
    if K.CELLTYPE_LABEL in a.obs:
        props = celltypes_from_labels(a.obs[K.CELLTYPE_LABEL].astype(object).where(a.obs[K.CELLTYPE_LABEL].notna()))
    elif K.CELLTYPE_PROPORTIONS in a.obsm:
        props = pd.DataFrame(a.obsm[K.CELLTYPE_PROPORTIONS])
    else:
        return None
    P = props.to_numpy(dtype=np.float64)
    ok = ~np.isnan(P).any(axis=1)
    num = A[:, ok] @ P[ok]
    den = np.asarray(A[:, ok].sum(axis=1)).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den[:, None]
    return pd.DataFrame(out.astype(np.float32), columns=[str(c) for c in props.columns])


def aggregate_pseudospots(section: Section, diameter_um: float, *, lattice: str = "hex", pitch_um: float | None = None,
                          footprint: str = "disc", min_points: int = 1) -> Section:
    """A Section of pseudo-spots made from a section's cells or bins (module docstring).

    Parameters
    ----------
    section
        Cells (Xenium...) or bins (Visium HD) with centres in ``obsm["spatial"]`` (level-0 px).
    diameter_um
        Pseudo-spot diameter in µm (e.g. 100 to match legacy ST, 55 for Visium).
    lattice, pitch_um, footprint, min_points
        See :func:`pseudospot_lattice`.

    Returns
    -------
    Section on the same image and platform: obs names ``"r{row}c{col}"``; ``X`` = summed counts of the
    member points (float32 CSR); ``obs`` ``array_row, array_col, n_points``; ``obs["diameter_um"]`` =
    ``diameter_um``; ``obsm["celltype_proportions"]`` = composition when the points carry cell types;
    ``uns["stimage_nb"]["obs_unit"] = "pseudospot"`` and ``uns["stimage_nb"]["pseudospot"]`` (the lattice's
    parameters, points used).
    """
    import scipy.sparse as sp

    a = section.adata
    if a.n_obs == 0:
        raise StimageInputError(f"section {section.name!r} has no cells or bins to aggregate into pseudo-spots.")
    um = section.um_per_px if section.um_per_px is not None else section.image.um_per_px
    lat = pseudospot_lattice(section.xy, um, diameter_um, lattice=lattice, pitch_um=pitch_um, footprint=footprint,
                             min_points=min_points)
    m = len(lat.row)
    used = np.flatnonzero(lat.assignment >= 0)
    A = sp.csr_matrix((np.ones(len(used), np.float32), (lat.assignment[used], used)), shape=(m, a.n_obs))
    X = (A @ sp.csr_matrix(a.X)).astype(np.float32).tocsr() if a.n_vars else None
    ct = _composition(section, A)
    if ct is not None:
        ct.index = pd.Index(lat.ids)
    uns_in = dict(a.uns.get(K.UNS) or {})
    source_unit = uns_in.get(K.OBS_UNIT) or "point"
    uns_in.update({K.OBS_UNIT: "pseudospot", K.PSEUDOSPOT: {**lat.summary(), "source_unit": source_unit}})
    obs = pd.DataFrame({"array_row": lat.row, "array_col": lat.col, K.N_POINTS: lat.n_points.astype(np.int64)})
    new = make_section_adata(lat.ids, lat.centres_px, lat.diameter_um, counts=X,
                             genes=list(a.var_names) if a.n_vars else None, celltypes=ct, obs=obs, uns=uns_in)
    if a.n_vars:
        new.var = a.var.copy()
    return replace(section, adata=new, meta=dict(section.meta))
