"""PAM50-like intrinsic-subtype calls from predicted (pseudo-bulk) expression: nearest centroid by correlation.

The method of Parker et al. (J Clin Oncol 27:1160, 2009): expression log2-transformed, each gene
median-centred across the cohort's samples, then each sample's Spearman correlation with each
subtype centroid over the genes both have; the call is the centroid it correlates with best. The
published PAM50 centroids (the 50 genes x 5 subtypes of the paper's supplement and the authors'
``bioclassifier`` files, also in Bioconductor's ``genefu``) **are not shipped**: no copy could be
obtained on these machines offline. Pass them as a file (:func:`read_centroids`: a table with one
row per gene, a gene column first, then one column per subtype). Old symbols are mapped to current ones
(:data:`stimage_nb.panels.ALIASES`, e.g. ORC6L -> ORC6).

Caveats (say them with every result): median-centring makes the calls depend on the cohort's mix of
subtypes (as in the original method, which needs a cohort of reasonably balanced subtypes); predicted
expression is smoother than measured expression, and a model that predicts a PAM50 gene poorly
(per-gene accuracy from ``stimage-nb evaluate``) adds noise to every call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import StimageInputError

MIN_GENES = 10


def read_centroids(path) -> pd.DataFrame:
    """A centroid table (genes x subtypes, float) from a CSV/TSV file.

    The first column holds gene symbols, the others one centroid each (header = subtype name). Old
    symbols are renamed to current HGNC symbols (``stimage_nb.panels.ALIASES``).

    Raises
    ------
    StimageInputError
        A missing or unreadable file, fewer than two subtype columns, non-numeric values or duplicate genes.
    """
    from ..panels import ALIASES

    p = Path(path)
    if not p.is_file():
        raise StimageInputError(f"{p}: centroid file not found.")
    try:
        df = pd.read_csv(p, sep=None, engine="python", index_col=0)
    except Exception as e:  # noqa: BLE001
        raise StimageInputError(f"{p}: cannot read the centroid table ({e}).") from e
    if df.shape[1] < 2:
        raise StimageInputError(f"{p}: a centroid table needs a gene column and at least two subtype columns, "
                                f"has columns {list(df.columns)}.")
    try:
        df = df.apply(pd.to_numeric, errors="raise").astype(np.float64)
    except (ValueError, TypeError) as e:
        raise StimageInputError(f"{p}: centroid values must be numbers ({e}).") from e
    df.index = [ALIASES.get(str(g).strip(), str(g).strip()) for g in df.index]
    if df.index.has_duplicates:
        raise StimageInputError(f"{p}: duplicate genes {df.index[df.index.duplicated()].tolist()[:5]}.")
    df.columns = [str(c).strip() for c in df.columns]
    return df


@dataclass(frozen=True)
class SubtypeCalls:
    """Nearest-centroid subtype calls of a set of samples (slides or patients).

    Attributes
    ----------
    calls
        Sample -> the subtype with the highest correlation.
    correlations
        Samples x subtypes Spearman correlations.
    genes
        Genes the correlations used (in the expression and the centroids).
    params
        Method settings (centring, transform, number of samples).
    """

    calls: pd.Series
    correlations: pd.DataFrame
    genes: tuple[str, ...]
    params: dict = field(default_factory=dict)

    def to_frame(self, prefix: str = "pam50_") -> pd.DataFrame:
        """One row per sample: ``<prefix>call``, ``<prefix>margin`` (best minus second correlation) and
        ``<prefix><subtype>`` correlations."""
        c = self.correlations
        srt = np.sort(c.to_numpy(), axis=1)
        out = pd.DataFrame({f"{prefix}call": self.calls,
                            f"{prefix}margin": srt[:, -1] - srt[:, -2] if c.shape[1] > 1 else np.nan}, index=c.index)
        return out.join(c.add_prefix(prefix))

    def to_json(self) -> str:
        return json.dumps({"calls": self.calls.to_dict(), "n_genes": len(self.genes), "genes": list(self.genes),
                           "params": self.params}, indent=1)


def subtype_calls(expression: pd.DataFrame, centroids: pd.DataFrame, *, log2: bool = True,
                  center: str | None = "median", min_genes: int = MIN_GENES) -> SubtypeCalls:
    """Call each sample's subtype by its Spearman correlation with each centroid (module docstring).

    Parameters
    ----------
    expression
        Samples x genes, non-negative expression (e.g. pseudo-bulk predicted counts per spot).
    centroids
        Genes x subtypes (:func:`read_centroids`).
    log2
        Transform the expression with log2(x + 1) first (as for the published centroids).
    center
        ``"median"`` (Parker et al.: each gene minus its median across samples) or ``None``.
    min_genes
        Fewest shared genes to call at all.

    Raises
    ------
    StimageInputError
        Fewer than ``min_genes`` shared genes, or median-centring with fewer than 3 samples.
    """
    from scipy.stats import rankdata

    genes = [g for g in centroids.index if g in set(expression.columns)]
    if len(genes) < min_genes:
        raise StimageInputError(f"only {len(genes)} genes are both predicted and in the centroids "
                                f"(at least {min_genes} needed): train with --genes breast_clinical or pam50.")
    X = expression[genes].to_numpy(dtype=np.float64)
    ok = np.isfinite(X).all(1)
    if log2:
        X = np.log2(np.clip(X, 0, None) + 1.0)
    if center == "median":
        if ok.sum() < 3:
            raise StimageInputError(f"median-centring needs at least 3 samples with expression, got {int(ok.sum())}; "
                                    "pass center=None for single samples (then the calls depend on the platform's scale).")
        X = X - np.median(X[ok], axis=0)
    elif center is not None:
        raise StimageInputError(f"center must be 'median' or None, not {center!r}")
    C = centroids.loc[genes].to_numpy(dtype=np.float64)

    def _rank_rows(M):
        R = np.apply_along_axis(rankdata, 1, M)
        R = R - R.mean(1, keepdims=True)
        return R / np.maximum(np.linalg.norm(R, axis=1, keepdims=True), 1e-12)

    r = np.full((len(X), C.shape[1]), np.nan)
    if ok.any():
        r[ok] = _rank_rows(X[ok]) @ _rank_rows(C.T).T
    corr = pd.DataFrame(r, index=expression.index, columns=list(centroids.columns))
    names = np.array(list(centroids.columns), dtype=object)
    calls = pd.Series([names[int(np.argmax(row))] if good else None for row, good in zip(r, ok)],
                      index=expression.index, dtype=object)
    return SubtypeCalls(calls, corr, tuple(genes), {"method": "Spearman correlation to centroids (Parker et al. 2009)",
                                                     "log2": log2, "center": center, "n_samples": int(ok.sum())})
