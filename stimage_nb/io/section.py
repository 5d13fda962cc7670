"""The data model: a tissue section = an image + observation points + their counts and labels.

A :class:`Section` holds

- ``image``: a lazily opened :class:`~stimage_nb.io.image.SlideImage` (OME-Zarr pyramid, µm/px known);
- ``adata``: an AnnData whose observations are the spots or cells (obs names = stable ids, e.g. the
  ``"{x}x{y}"`` of a legacy ST counts table or a Visium barcode), with their centres in the image's
  level-0 pixels (``obs.pixel_x/pixel_y`` and ``obsm["spatial"]``), their diameter in µm, raw counts
  in ``X`` (zero genes when the section has none) and soft cell-type targets in
  ``obsm["celltype_proportions"]``;
- ``platform``: where the observations come from (``"st"``, ``"visium"``, ``"visium_hd"``, ``"xenium"``,
  ``"cosmx"``, ``"merscope"``, ``"image"``, ``"unknown"``; :mod:`stimage_nb.io.platforms`), also
  recorded in ``adata.uns["stimage_nb"]["platform"]``. A keyword-only field: when it is not given, the
  value already in ``uns`` is used (so a copy of a section's AnnData keeps its platform), else
  ``"unknown"``.

Every reader in :mod:`stimage_nb.io.readers` returns Sections, and every later step (tiling, training,
prediction, export, OMERO) takes them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .. import _keys as K
from ..errors import StimageInputError
from .image import SlideImage, open_image

log = logging.getLogger(__name__)


@dataclass
class Section:
    """A tissue section: image + points + counts/labels (see module docstring)."""

    name: str
    adata: "anndata.AnnData"  # noqa: F821
    image_path: Path | None = None
    um_per_px: float | None = None
    patient: str | None = None
    meta: dict = field(default_factory=dict)
    _image: SlideImage | None = field(default=None, repr=False)
    platform: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        uns = self.adata.uns.get(K.UNS)
        if not isinstance(uns, dict):
            uns = dict(uns or {})
            self.adata.uns[K.UNS] = uns
        if self.platform is None:
            self.platform = uns.get(K.PLATFORM) or "unknown"
        self.platform = str(self.platform).strip().lower()
        uns[K.PLATFORM] = self.platform

    @property
    def image(self) -> SlideImage:
        """The section's image, opened (and converted to OME-Zarr if needed) on first use."""
        if self._image is None:
            if self.image_path is None:
                raise StimageInputError(f"section {self.name!r} has no image.")
            self._image = open_image(self.image_path, um_per_px=self.um_per_px)
            if self.um_per_px is None:
                self.um_per_px = self._image.um_per_px
        return self._image

    @image.setter
    def image(self, value: SlideImage) -> None:
        self._image = value
        self.um_per_px = value.um_per_px

    @property
    def has_counts(self) -> bool:
        return self.adata.n_vars > 0

    @property
    def genes(self) -> list[str]:
        return list(self.adata.var_names)

    @property
    def celltypes(self) -> list[str]:
        ct = self.adata.obsm.get(K.CELLTYPE_PROPORTIONS)
        return [] if ct is None else list(ct.columns)

    @property
    def xy(self) -> np.ndarray:
        """(n, 2) centres in level-0 pixels of the image."""
        return np.asarray(self.adata.obsm[K.SPATIAL], dtype=np.float64)

    @property
    def diameter_um(self) -> float:
        return float(np.median(self.adata.obs[K.DIAMETER_UM]))

    def __repr__(self) -> str:
        return (f"Section({self.name!r}, patient={self.patient!r}, platform={self.platform!r}, n_obs={self.adata.n_obs}, "
                f"n_genes={self.adata.n_vars}, um_per_px={self.um_per_px}, image={str(self.image_path)!r})")

    def subset(self, mask) -> "Section":
        """A section restricted to some observations (boolean mask or ids)."""
        return replace(self, adata=self.adata[mask].copy(), meta=dict(self.meta))

    def drop_outside_image(self, margin_px: float = 0.0) -> "Section":
        """Exclude points whose centre lies outside the image; count and report them."""
        img = self.image
        x, y = self.xy[:, 0], self.xy[:, 1]
        inside = (x >= -margin_px) & (y >= -margin_px) & (x < img.width + margin_px) & (y < img.height + margin_px)
        n_out = int((~inside).sum())
        self.adata.uns.setdefault(K.UNS, {})["n_outside_image"] = n_out
        if n_out:
            ids = list(self.adata.obs_names[~inside][:5])
            log.warning("%s: %d of %d spots lie outside the %dx%d image and are excluded (e.g. %s)",
                        self.name, n_out, self.adata.n_obs, img.width, img.height, ids)
            if n_out == self.adata.n_obs:
                raise StimageInputError(
                    f"{self.image_path}: all {n_out} spots of section {self.name!r} lie outside the "
                    f"{img.width}x{img.height} image. Are the coordinates for another image or resolution "
                    "(e.g. a lowres PNG instead of the full-resolution scan)?")
            sub = self.subset(inside)
            sub.adata.uns.setdefault(K.UNS, {})["n_outside_image"] = n_out
            return sub
        return self


def make_section_adata(ids, xy, diameter_um, counts=None, genes=None, celltypes: pd.DataFrame | None = None,
                       obs: pd.DataFrame | None = None, uns: dict | None = None):
    """Build a section AnnData with the package's keys (see :mod:`stimage_nb._keys`)."""
    import anndata as ad
    import scipy.sparse as sp

    ids = pd.Index([str(i) for i in ids])
    if ids.has_duplicates:
        dup = ids[ids.duplicated()].unique()[:5].tolist()
        raise StimageInputError(f"duplicate observation ids: {dup}")
    xy = np.asarray(xy, dtype=np.float64).reshape(len(ids), 2)
    o = pd.DataFrame(index=ids) if obs is None else obs.copy().set_axis(ids)
    o[K.PIXEL_X] = xy[:, 0]
    o[K.PIXEL_Y] = xy[:, 1]
    o[K.DIAMETER_UM] = np.broadcast_to(np.asarray(diameter_um, dtype=np.float64), (len(ids),)).copy()
    if counts is None:
        X = sp.csr_matrix((len(ids), 0), dtype=np.float32)
        var = pd.DataFrame(index=pd.Index([], dtype=str))
    else:
        X = sp.csr_matrix(np.asarray(counts, dtype=np.float32)) if not sp.issparse(counts) else counts.tocsr().astype(np.float32)
        var = pd.DataFrame(index=pd.Index([str(g) for g in genes]))
    a = ad.AnnData(X=X, obs=o, var=var)
    a.obsm[K.SPATIAL] = xy
    if celltypes is not None:
        a.obsm[K.CELLTYPE_PROPORTIONS] = celltypes.reindex(ids).astype(np.float32)
    a.uns[K.UNS] = dict(uns or {})
    return a


def celltypes_from_labels(labels: pd.Series) -> pd.DataFrame:
    """One-hot cell-type targets (float32, one column per label, sorted) from hard per-cell labels.

    Missing labels (NaN/empty) give a row of NaN (no target).
    """
    lab = labels.astype("string").str.strip()
    missing = lab.isna() | (lab == "")
    cats = sorted(lab[~missing].unique().tolist())
    out = pd.DataFrame(0.0, index=labels.index, columns=cats, dtype=np.float32)
    for c in cats:
        out.loc[(lab == c).fillna(False).to_numpy(), c] = 1.0
    out.loc[missing.to_numpy(), :] = np.nan
    return out


def read_celltype_targets(path: str | os.PathLike, ids) -> tuple[pd.DataFrame, pd.Series | None]:
    """Cell-type targets for observations ``ids`` from a CSV/TSV keyed by id (first column).

    One column = hard labels, names or cluster numbers (e.g. Xenium Explorer's ``cell_id,group`` export or
    Space Ranger's ``Barcode,Cluster``): returns one-hot proportions and the labels (as strings).
    Several numeric columns = proportions (rows should sum to 1, e.g. a deconvolution's output). Ids
    without a row get NaN (no target).
    """
    p = Path(path)
    if not p.is_file():
        raise StimageInputError(f"{p}: cell-type file not found.")
    sep = "\t" if any(x in p.name.lower() for x in (".tsv", ".txt")) else ","
    try:
        df = pd.read_csv(p, sep=sep, index_col=0, dtype=str)  # labels as written ("1", not 1.0)
    except Exception as e:  # noqa: BLE001
        raise StimageInputError(f"{p}: cannot read the cell-type table ({type(e).__name__}: {e}).") from e
    df.index = df.index.astype(str)
    if df.shape[1] == 0:
        raise StimageInputError(f"{p}: the cell-type table has an id column but no labels or proportions.")
    ids = pd.Index([str(i) for i in ids])
    n_hit = int(ids.isin(df.index).sum())
    if n_hit == 0:
        raise StimageInputError(f"{p}: none of its {len(df)} ids (e.g. {list(df.index[:2])}) match the observations "
                                f"(e.g. {list(ids[:2])}).")
    if n_hit < len(ids):
        log.warning("%s: %d of %d observations have no cell type (NaN targets)", p, len(ids) - n_hit, len(ids))
    if df.shape[1] == 1:
        labels = df.iloc[:, 0].str.strip().replace("", np.nan).reindex(ids)
        return celltypes_from_labels(labels), labels
    try:
        props = df.reindex(ids).astype(np.float32)
    except ValueError as e:
        raise StimageInputError(f"{p}: cell-type proportions must be numeric, or give a single label column ({e}).") from e
    return props, None


def check_counts(X, source: str | os.PathLike) -> None:
    """Refuse NaN or negative counts, naming the file."""
    import scipy.sparse as sp

    data = X.data if sp.issparse(X) else np.asarray(X)
    if data.size == 0:
        return
    if not np.all(np.isfinite(data)):
        raise StimageInputError(f"{source}: the counts contain NaN or infinite values "
                                f"({int((~np.isfinite(data)).sum())} entries). Provide raw integer UMI counts.")
    if (data < 0).any():
        raise StimageInputError(f"{source}: the counts contain {int((data < 0).sum())} negative values. "
                                "Provide raw UMI counts, not log-normalised or scaled values.")
    if not np.allclose(data, np.round(data)):
        log.warning("%s: counts are not integers; the negative-binomial likelihood expects raw UMI counts", source)


def select_genes(section: Section, genes: list[str] | None, *, drop_missing: bool = False,
                 source: str | os.PathLike | None = None) -> tuple[Section, list[str]]:
    """Restrict a section's counts to ``genes`` (in that order).

    Genes absent from the counts raise an error naming them, unless ``drop_missing`` (then they are
    dropped and returned as the second value).
    """
    if genes is None or not section.has_counts:
        return section, []
    genes = [str(g) for g in genes]
    have = set(section.adata.var_names)
    missing = [g for g in genes if g not in have]
    if missing and not drop_missing:
        raise StimageInputError(
            f"{source or section.name}: {len(missing)} of {len(genes)} requested genes are not in the counts: "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}. Fix the gene list, or pass "
            "drop_missing_genes=True (CLI: --drop-missing-genes) to drop them.")
    keep = [g for g in genes if g in have]
    a = section.adata[:, keep].copy()
    a.uns = section.adata.uns
    return replace(section, adata=a), missing


def section_depth(section: Section, genes: list[str] | None = None) -> float:
    """A section's sequencing depth: the mean over its spots of the counts summed over ``genes`` (default: all
    its genes), at least 1. The mean, not the median, because the predicted means scale with it (on a shallow
    section most spots hold a handful of counts and the median is a coarse integer)."""
    import scipy.sparse as sp

    X = section.adata.X if genes is None else section.adata[:, list(genes)].X
    tot = np.asarray(X.sum(axis=1)).ravel() if sp.issparse(X) else np.asarray(X, dtype=np.float64).sum(1)
    return max(float(np.mean(tot)) if len(tot) else 0.0, 1.0)
