"""Agreement of predicted pseudo-bulk with measured bulk (or measured pseudo-bulk) expression.

Per gene **across slides**: for each gene, the correlation between its predicted and measured level over
the slides (or patients). This is what a slide-level biomarker needs: does the prediction rank the slides
as the measurement does? The correlation **across genes within a slide** is reported beside it only as
the number it is often mistaken for: it mostly restates that highly expressed genes are highly expressed
(each gene's mean level), and is high even for a prediction that knows nothing about the slide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import StimageInputError
from ._results import _f, _frame_json

if TYPE_CHECKING:  # pragma: no cover
    import anndata


@dataclass(frozen=True)
class AgreementResult:
    """Per-gene agreement across slides (``per_gene``: gene, r, p_value, n, mean_predicted, mean_measured) and
    the across-genes correlation of each slide (``per_slide``: slide, r_across_genes)."""

    per_gene: pd.DataFrame
    per_slide: pd.DataFrame
    method: str
    params: dict = field(default_factory=dict)

    def summary(self) -> dict:
        r = self.per_gene["r"]
        return {"method": self.method, "n_genes": int(len(r)), "n_defined": int(r.notna().sum()),
                "n_slides": int(self.per_gene["n"].max()) if len(r) else 0,
                "mean_r": _f(r.mean()) if r.notna().any() else None,
                "median_r": _f(r.median()) if r.notna().any() else None, "n_r_gt_0.3": int((r > 0.3).sum()),
                "mean_r_across_genes_within_slide": _f(self.per_slide["r_across_genes"].mean())}

    def to_frame(self) -> pd.DataFrame:
        return self.per_gene.copy()

    def to_json(self) -> dict:
        return {"summary": self.summary(), "per_gene": _frame_json(self.per_gene),
                "per_slide": _frame_json(self.per_slide), "params": self.params}

    def plot(self, ax=None):
        from ._plots import agreement_plot

        return agreement_plot(self, ax=ax)


def pseudobulk_log_cp10k(samples: Mapping[str, "anndata.AnnData"], genes: Sequence[str] | None = None) -> pd.DataFrame:
    """Slides x genes pseudo-bulk on the log1p CP10k scale: each sample's ``X`` summed over its observations.

    Works for measured counts (a :class:`~stimage_nb.io.Section`'s ``adata``) and for predictions (``X`` =
    predicted mean counts) alike, so both sides of :func:`pseudobulk_agreement` are made the same way.
    The CP10k scaling is over ``genes`` (default: the genes all samples share), as
    :func:`stimage_nb.evaluate.transform` does for spots; it removes each slide's depth and tissue area.

    Raises
    ------
    StimageInputError
        No samples, or no gene shared by all of them.
    """
    from ..evaluate import _dense
    from ..metrics import transform

    if not samples:
        raise StimageInputError("no samples to aggregate")
    if genes is None:
        common = None
        for a in samples.values():
            have = set(a.var_names)
            common = list(a.var_names) if common is None else [g for g in common if g in have]
        genes = common
    genes = list(genes or [])
    if not genes:
        raise StimageInputError("the samples share no gene")
    rows = []
    for name, a in samples.items():
        missing = [g for g in genes if g not in a.var_names]
        if missing:
            raise StimageInputError(f"{name}: lacks genes {missing[:5]}")
        rows.append(_dense(a[:, genes].X).sum(axis=0))
    return pd.DataFrame(transform(np.vstack(rows), "log1p_cp10k"), index=list(samples), columns=genes)


def pseudobulk_agreement(predicted: pd.DataFrame, measured: pd.DataFrame, *, method: str = "pearson",
                         min_slides: int = 3) -> AgreementResult:
    """Correlate predicted and measured expression per gene across slides.

    Parameters
    ----------
    predicted, measured
        Slides (or patients) x genes on comparable scales (e.g. log1p CP10k of the mean predicted counts and
        of the summed measured counts); matched by index and column names.
    method
        ``"pearson"`` or ``"spearman"`` (scipy.stats).
    min_slides
        Fewest shared slides for a per-gene correlation.

    Raises
    ------
    StimageInputError
        No shared slides or genes, fewer than ``min_slides`` slides, an unknown method.
    """
    from scipy import stats

    if method not in ("pearson", "spearman"):
        raise StimageInputError(f"method must be 'pearson' or 'spearman', not {method!r}")
    slides = predicted.index.intersection(measured.index)
    genes = predicted.columns.intersection(measured.columns)
    if len(genes) == 0:
        raise StimageInputError("predicted and measured tables share no gene")
    if len(slides) < min_slides:
        raise StimageInputError(f"{len(slides)} slides in both tables; per-gene agreement needs at least {min_slides}")
    P = predicted.loc[slides, genes].astype(float)
    M = measured.loc[slides, genes].astype(float)
    fn = stats.pearsonr if method == "pearson" else stats.spearmanr
    rows = []
    for g in genes:
        p, m = P[g].to_numpy(), M[g].to_numpy()
        ok = np.isfinite(p) & np.isfinite(m)
        r = pv = np.nan
        if ok.sum() >= min_slides and np.ptp(p[ok]) > 0 and np.ptp(m[ok]) > 0:
            res = fn(p[ok], m[ok])
            r, pv = float(res[0]), float(res[1])
        rows.append({"gene": g, "r": r, "p_value": pv, "n": int(ok.sum()), "mean_predicted": float(np.nanmean(p)),
                     "mean_measured": float(np.nanmean(m))})
    per_slide = []
    for s in slides:
        p, m = P.loc[s].to_numpy(), M.loc[s].to_numpy()
        ok = np.isfinite(p) & np.isfinite(m)
        r = float(fn(p[ok], m[ok])[0]) if ok.sum() >= 3 and np.ptp(p[ok]) > 0 and np.ptp(m[ok]) > 0 else np.nan
        per_slide.append({"slide": s, "r_across_genes": r})
    return AgreementResult(pd.DataFrame(rows), pd.DataFrame(per_slide), method,
                           {"n_slides": int(len(slides)), "n_genes": int(len(genes)), "min_slides": min_slides})
