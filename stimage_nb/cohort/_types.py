"""Spatial types ("SpatioTypes", after Path2Space): spots of a whole cohort clustered on predicted expression.

1. **Fit** (:func:`fit_spatial_types`): a sample of spots from every slide (at most ``max_spots`` in all,
   the same number per slide so that large slides do not dominate), their predicted means
   depth-normalised and log-transformed (``sc.pp.normalize_total`` to 10,000, ``sc.pp.log1p``),
   standardised (``sc.pp.scale``, clipped at 10 SD), ``sc.pp.pca`` → ``sc.pp.neighbors`` →
   ``sc.tl.leiden`` (igraph). Each cluster is a spatial type ``ST1``, ``ST2``... ordered by size.
2. **Assign** (:meth:`SpatialTypes.assign`): every spot of a slide is standardised with the *reference
   sample's* means and SDs, projected on its principal axes, and takes the majority type of its
   ``k`` nearest reference spots (scikit-learn). This is scanpy's ``tl.ingest`` label transfer, except
   that the query is centred with the reference's statistics, not its own, so slides keep their
   differences (a slide that is all tumour stays so).
3. **Per slide** (:func:`type_features`): the composition (fraction of spots of each type) and
   squidpy's neighbourhood enrichment (``sq.gr.spatial_neighbors`` with a radius of 1.5 grid steps,
   ``sq.gr.nhood_enrichment``: z-scores of how often two types are neighbours against random
   relabelling).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import _keys as K
from ..errors import StimageInputError

log = logging.getLogger(__name__)

TYPE_KEY = "spatial_type"


def _lognorm(X) -> np.ndarray:
    """log1p of counts per 10,000 (scanpy's normalize_total + log1p) of predicted means, dense float32."""
    X = np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float64)
    tot = X.sum(1, keepdims=True)
    tot[tot <= 0] = 1.0
    return np.log1p(X / tot * 1e4).astype(np.float32)


@dataclass(frozen=True)
class SpatialTypes:
    """Spatial types fitted on a cohort sample; assigns any prediction's spots to them.

    Attributes
    ----------
    genes
        Genes used, in order.
    names
        Type names (``ST1``... by decreasing size in the sample).
    center, scale
        (genes,) the reference sample's mean and SD of log1p CP10k.
    components
        (n_pcs, genes) principal axes.
    ref_embedding, ref_labels
        The reference spots' PCA coordinates (n_ref, n_pcs) and type indices (n_ref,).
    profiles
        (types, genes) mean standardised log1p CP10k of each type's reference spots: what a type is.
    params
        Settings (``n_pcs``, ``n_neighbors``, ``resolution``, ``seed``, ``max_spots``, spots per slide).
    """

    genes: tuple[str, ...]
    names: tuple[str, ...]
    center: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    ref_embedding: np.ndarray
    ref_labels: np.ndarray
    profiles: np.ndarray
    params: dict = field(default_factory=dict)

    def embed(self, X) -> np.ndarray:
        """PCA coordinates (n, n_pcs) of predicted means ``X`` (n, genes) in this model's gene order."""
        Z = (_lognorm(X) - self.center) / self.scale
        return np.clip(Z, -10, 10) @ self.components.T

    def assign(self, pred) -> pd.Categorical:
        """The spatial type of every observation of a prediction AnnData (majority of its k nearest
        reference spots)."""
        from sklearn.neighbors import KNeighborsClassifier

        missing = [g for g in self.genes if g not in set(pred.var_names)]
        if missing:
            raise StimageInputError(f"the prediction lacks genes the spatial types were fitted on: {missing[:10]}")
        k = min(int(self.params.get("n_neighbors", 15)), len(self.ref_labels))
        knn = KNeighborsClassifier(n_neighbors=k).fit(self.ref_embedding, self.ref_labels)
        lab = knn.predict(self.embed(pred[:, list(self.genes)].X)) if pred.n_obs else np.zeros(0, int)
        return pd.Categorical.from_codes(lab.astype(int), categories=list(self.names))

    def to_json(self) -> str:
        """Settings, sizes and the type names (the arrays are in :meth:`save`'s npz)."""
        sizes = np.bincount(self.ref_labels, minlength=len(self.names))
        return json.dumps({"names": list(self.names), "n_genes": len(self.genes), "n_reference_spots":
                           int(len(self.ref_labels)), "reference_sizes": dict(zip(self.names, sizes.tolist())),
                           "params": self.params}, indent=1)

    def to_frame(self) -> pd.DataFrame:
        """:attr:`profiles` as a (types x genes) DataFrame: each type's mean standardised expression."""
        return pd.DataFrame(self.profiles, index=list(self.names), columns=list(self.genes))

    def save(self, path) -> None:
        """Write the arrays (npz) atomically."""
        from ..atomic import atomic_path

        with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: numpy adds no ".npz" to it
            np.savez_compressed(fh, genes=np.array(self.genes), names=np.array(self.names), center=self.center,
                                scale=self.scale, components=self.components, ref_embedding=self.ref_embedding,
                                ref_labels=self.ref_labels, profiles=self.profiles,
                                params=np.array(json.dumps(self.params)))

    @classmethod
    def load(cls, path) -> "SpatialTypes":
        with np.load(path, allow_pickle=False) as z:
            return cls(tuple(str(g) for g in z["genes"]), tuple(str(n) for n in z["names"]), z["center"], z["scale"],
                       z["components"], z["ref_embedding"], z["ref_labels"], z["profiles"], json.loads(str(z["params"])))


def sample_spots(pred, n: int, seed: int = 0, genes=None) -> np.ndarray:
    """Predicted means (n, genes) of up to ``n`` spots of one prediction, drawn without replacement."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(pred.n_obs, size=min(n, pred.n_obs), replace=False)) if pred.n_obs else []
    a = pred[:, list(genes)] if genes is not None else pred
    X = a.X[idx]
    return np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float32)


def fit_spatial_types(samples: "dict[str, np.ndarray]", genes, *, n_pcs: int = 20, n_neighbors: int = 15,
                      resolution: float = 0.5, seed: int = 0) -> SpatialTypes:
    """Cluster spots sampled from many slides into spatial types (module docstring, step 1).

    Parameters
    ----------
    samples
        ``{slide: predicted means (n_i, genes)}`` (:func:`sample_spots`).
    genes
        Their genes, in column order.
    n_pcs, n_neighbors, resolution, seed
        ``sc.pp.pca`` components, ``sc.pp.neighbors`` neighbours, ``sc.tl.leiden`` resolution, random seed.

    Raises
    ------
    StimageInputError
        Fewer than ``n_neighbors + 1`` spots in all.
    """
    import anndata as ad
    import scanpy as sc

    X = np.concatenate([v for v in samples.values() if len(v)]) if samples else np.zeros((0, len(genes)))
    if len(X) < n_neighbors + 1:
        raise StimageInputError(f"spatial types need at least {n_neighbors + 1} spots; the cohort has {len(X)}.")
    L = _lognorm(X)
    center = L.mean(0)
    scale = L.std(0)
    scale[scale == 0] = 1.0
    a = ad.AnnData(np.clip((L - center) / scale, -10, 10).astype(np.float32))
    n_pcs = int(min(n_pcs, a.n_obs - 1, a.n_vars - 1))
    sc.pp.pca(a, n_comps=n_pcs, zero_center=True, random_state=seed)
    sc.pp.neighbors(a, n_neighbors=n_neighbors, n_pcs=n_pcs, random_state=seed)
    sc.tl.leiden(a, flavor="igraph", n_iterations=2, directed=False, resolution=resolution, random_state=seed)
    raw = a.obs["leiden"].astype(int).to_numpy()
    order = np.argsort(-np.bincount(raw), kind="stable")  # ST1 = the largest
    remap = np.empty_like(order)
    remap[order] = np.arange(len(order))
    labels = remap[raw]
    names = tuple(f"ST{i + 1}" for i in range(len(order)))
    # the embedding in the same coordinates assign() uses (PCA of the zero-centred standardised data)
    comps = np.asarray(a.varm["PCs"].T, dtype=np.float64)
    Z = np.asarray(a.X, dtype=np.float64)
    emb = Z @ comps.T
    profiles = np.vstack([Z[labels == i].mean(0) for i in range(len(names))])
    log.info("spatial types: %d types from %d spots of %d slides", len(names), len(X), len(samples))
    return SpatialTypes(tuple(str(g) for g in genes), names, center.astype(np.float64), scale.astype(np.float64),
                        comps, emb, labels.astype(np.int64), profiles,
                        {"n_pcs": n_pcs, "n_neighbors": n_neighbors, "resolution": resolution, "seed": seed,
                         "n_slides": len(samples), "n_spots": int(len(X)),
                         "method": "log1p CP10k, scale, sc.pp.pca, sc.pp.neighbors, sc.tl.leiden(igraph)"})


def type_features(pred, labels: pd.Categorical, *, n_perms: int = 200, seed: int = 0,
                  radius_px: float | None = None) -> dict[str, float]:
    """Per-slide spatial-type features: ``spatialtype_<T>`` (fraction of spots) and ``nhood_<A>_<B>``
    (squidpy neighbourhood-enrichment z-score, A <= B; NaN where a type is absent or has no neighbours).
    """
    import anndata as ad
    import squidpy as sq

    from ._pseudobulk import neighbour_radius, quiet_squidpy

    names = list(labels.categories)
    n = len(labels)
    out: dict[str, float] = {}
    counts = pd.Series(labels).value_counts().reindex(names, fill_value=0)
    for t in names:
        out[f"spatialtype_{t}"] = float(counts[t] / n) if n else float("nan")
    pairs = [(names[i], names[j]) for i in range(len(names)) for j in range(i, len(names))]
    for p in pairs:
        out[f"nhood_{p[0]}_{p[1]}"] = float("nan")
    present = [t for t in names if counts[t] > 0]
    if n < 3 or len(present) < 2:
        return out
    xy = np.asarray(pred.obsm[K.SPATIAL], dtype=np.float64)
    g = ad.AnnData(obs=pd.DataFrame({TYPE_KEY: pd.Categorical(np.asarray(labels).astype(str), categories=present)},
                                    index=pred.obs_names.copy()))
    g.obsm["spatial"] = xy
    r = float(radius_px) if radius_px is not None else neighbour_radius(xy)
    with quiet_squidpy():
        sq.gr.spatial_neighbors(g, coord_type="generic", radius=r, delaunay=False)
        if g.obsp["spatial_connectivities"].nnz == 0:
            return out
        sq.gr.nhood_enrichment(g, cluster_key=TYPE_KEY, n_perms=n_perms, seed=seed, show_progress_bar=False,
                               n_jobs=1)
    z = np.asarray(g.uns[f"{TYPE_KEY}_nhood_enrichment"]["zscore"], dtype=np.float64)
    for i, a_ in enumerate(present):
        for j, b_ in enumerate(present):
            if names.index(a_) <= names.index(b_):
                out[f"nhood_{a_}_{b_}"] = float(z[i, j])
    return out
