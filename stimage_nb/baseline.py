"""The handcrafted baseline every model is compared with: ridge regression on colour/texture statistics.

Per-gene Pearson correlations on spatial transcriptomics are dominated by cellularity (spots with more
nuclei have more UMIs for nearly every gene), so a deep model's numbers mean little without a baseline
that only sees simple image statistics. This module computes 40 colour and texture statistics per tile
(:func:`handcrafted_features`), standardises them and fits a ridge regression on ``log1p`` counts per
gene, with the penalty chosen by cross-validation grouped by section inside the training sections
(:class:`RidgeBaseline`). Cell-type proportions get the same ridge, clipped at zero and renormalised.

The features are computed from the same uint8 tiles the model uses
(:func:`stimage_nb.tiles.section_tiles`), so model and baseline see identical pixels.

Examples
--------
>>> from stimage_nb.baseline import RidgeBaseline
>>> rb = RidgeBaseline().fit(train_sections)               # doctest: +SKIP
>>> pred = rb.predict_sections(test_sections)              # doctest: +SKIP
>>> pred["C6"].log1p                                       # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from . import _keys as K
from .errors import StimageInputError
from .stain import RUIFROK_HED

log = logging.getLogger(__name__)

_STAIN_INV = np.linalg.inv(RUIFROK_HED).astype(np.float32)  # od (.., 3) @ inv -> concentrations (H, E, DAB)

#: Names of the columns returned by :func:`handcrafted_features`, in order.
FEATURE_NAMES: tuple[str, ...] = (
    # colour: RGB
    "r_mean", "g_mean", "b_mean", "r_std", "g_std", "b_std",
    # HSV
    "sat_mean", "sat_std", "val_mean", "val_std", "hue_cos", "hue_sin",
    # optical density
    "od_r_mean", "od_g_mean", "od_b_mean", "od_sum_mean", "od_sum_std",
    # colour deconvolution (hematoxylin, eosin)
    "hema_mean", "hema_std", "hema_p10", "hema_p50", "hema_p90", "hema_p99",
    "eosin_mean", "eosin_std", "eosin_p50", "eosin_p90", "hema_eosin_ratio",
    # tissue and nuclei
    "tissue_frac", "dark_frac", "nuclear_frac", "nuclear_blob_frac",
    # grey-level texture
    "grad_energy", "lap_energy", "glcm_contrast", "glcm_homogeneity", "glcm_corr",
    "lbp_entropy", "coarse_std", "grey_entropy",
)


def _as_tiles(tiles) -> np.ndarray:
    t = np.asarray(tiles)
    if t.ndim == 3 and t.shape[-1] == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[-1] != 3:
        raise StimageInputError(f"tiles must be an (n, h, w, 3) RGB array, got shape {t.shape}. "
                                "Use stimage_nb.tiles.section_tiles to extract them.")
    if t.shape[1] < 8 or t.shape[2] < 8:
        raise StimageInputError(f"tiles of {t.shape[1]}x{t.shape[2]} px are too small for texture features "
                                "(need at least 8x8); extract larger tiles (out_px).")
    return t


def _entropy(hist: np.ndarray) -> np.ndarray:
    p = hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)
    return -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(axis=1)


def _features_chunk(t: np.ndarray) -> np.ndarray:
    n = t.shape[0]
    f = t.astype(np.float32) / 255.0                                    # (n, h, w, 3)
    flat = f.reshape(n, -1, 3)
    out: list[np.ndarray] = []
    # RGB
    out += [flat.mean(1), flat.std(1)]
    # HSV
    mx, mn = flat.max(2), flat.min(2)
    sat = np.where(mx > 1e-6, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    r, g, b = flat[..., 0], flat[..., 1], flat[..., 2]
    hue = np.arctan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)              # circular hue, weighted by saturation
    out += [sat.mean(1, keepdims=True), sat.std(1, keepdims=True), mx.mean(1, keepdims=True), mx.std(1, keepdims=True),
            (sat * np.cos(hue)).mean(1, keepdims=True), (sat * np.sin(hue)).mean(1, keepdims=True)]
    # optical density
    od = -np.log(np.clip(flat, 1.0 / 255.0, 1.0))                       # (n, p, 3)
    od_sum = od.sum(2)
    out += [od.mean(1), od_sum.mean(1, keepdims=True), od_sum.std(1, keepdims=True)]
    # hematoxylin / eosin concentrations
    conc = od @ _STAIN_INV
    hema, eos = np.clip(conc[..., 0], 0, None), np.clip(conc[..., 1], 0, None)
    hq = np.percentile(hema, [10, 50, 90, 99], axis=1).T
    eq = np.percentile(eos, [50, 90], axis=1).T
    hm, em = hema.mean(1, keepdims=True), eos.mean(1, keepdims=True)
    out += [hm, hema.std(1, keepdims=True), hq, em, eos.std(1, keepdims=True), eq, hm / (hm + em + 1e-3)]
    # tissue, dark and nuclear pixels
    tissue = (sat > 0.07) & (mx < 0.92)
    grey = f @ np.array([0.299, 0.587, 0.114], dtype=np.float32)          # (n, h, w)
    dark = grey.reshape(n, -1) < 0.45
    nuclear = (hema > 0.45) & tissue
    hs = nuclear.reshape(grey.shape)
    # nuclear pixels whose 4 neighbours are nuclear too: blob-like (nuclei) rather than thin (stroma edges)
    core = hs[:, 1:-1, 1:-1] & hs[:, :-2, 1:-1] & hs[:, 2:, 1:-1] & hs[:, 1:-1, :-2] & hs[:, 1:-1, 2:]
    out += [tissue.mean(1, keepdims=True), dark.mean(1, keepdims=True), nuclear.mean(1, keepdims=True),
            core.reshape(n, -1).mean(1, keepdims=True)]
    # grey-level texture: gradient and Laplacian energy
    gx = grey[:, :, 2:] - grey[:, :, :-2]
    gy = grey[:, 2:, :] - grey[:, :-2, :]
    grad = np.sqrt(gx[:, 1:-1, :] ** 2 + gy[:, :, 1:-1] ** 2)
    lap = (grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1] + grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:] - 4 * grey[:, 1:-1, 1:-1])
    out += [grad.reshape(n, -1).mean(1, keepdims=True), np.sqrt((lap.reshape(n, -1) ** 2).mean(1, keepdims=True))]
    # GLCM-like statistics of 16-level grey, offsets (0, 1) and (1, 0)
    q = np.clip((grey * 16).astype(np.int32), 0, 15)
    pairs = [(q[:, :, :-1], q[:, :, 1:]), (q[:, :-1, :], q[:, 1:, :])]
    contrast = np.zeros((n, 1), np.float32)
    homog = np.zeros((n, 1), np.float32)
    corr = np.zeros((n, 1), np.float32)
    for a, b2 in pairs:
        a = a.reshape(n, -1).astype(np.float32)
        b2 = b2.reshape(n, -1).astype(np.float32)
        d = a - b2
        contrast += (d ** 2).mean(1, keepdims=True) / 2
        homog += (1.0 / (1.0 + np.abs(d))).mean(1, keepdims=True) / 2
        am, bm = a - a.mean(1, keepdims=True), b2 - b2.mean(1, keepdims=True)
        den = np.sqrt((am ** 2).mean(1) * (bm ** 2).mean(1))
        corr[:, 0] += np.where(den > 1e-8, (am * bm).mean(1) / np.maximum(den, 1e-8), 1.0) / 2
    out += [contrast, homog, corr]
    # LBP-ish: entropy of the 8-neighbour sign pattern histogram
    c = grey[:, 1:-1, 1:-1]
    code = np.zeros(c.shape, np.int32)
    shifts = [(0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0)]
    h, w = grey.shape[1], grey.shape[2]
    for bit, (dy, dx) in enumerate(shifts):
        code |= ((grey[:, dy:h - 2 + dy, dx:w - 2 + dx] >= c).astype(np.int32) << bit)
    code = code.reshape(n, -1)
    lbp_hist = np.stack([np.bincount(row, minlength=256) for row in code]).astype(np.float64)
    # coarse structure: std of the 4x4-block means (tissue architecture beyond single nuclei)
    hh, ww = (h // 4) * 4, (w // 4) * 4
    blocks = grey[:, :hh, :ww].reshape(n, hh // 4, 4, ww // 4, 4).mean((2, 4))
    grey_hist = np.stack([np.bincount(row, minlength=16) for row in q.reshape(n, -1)]).astype(np.float64)
    out += [_entropy(lbp_hist)[:, None].astype(np.float32), blocks.reshape(n, -1).std(1, keepdims=True),
            _entropy(grey_hist)[:, None].astype(np.float32)]
    res = np.concatenate([np.asarray(o, dtype=np.float64).reshape(n, -1) for o in out], axis=1)
    return res


def handcrafted_features(tiles, *, chunk: int = 128, progress: bool = False) -> np.ndarray:
    """Colour and texture statistics of RGB tiles.

    Parameters
    ----------
    tiles
        ``(n, h, w, 3)`` uint8 tiles (e.g. from :func:`stimage_nb.tiles.section_tiles`); a single
        ``(h, w, 3)`` tile is accepted too.
    chunk
        Tiles processed at once (bounds memory).
    progress
        Show a ``tqdm`` progress bar.

    Returns
    -------
    ``(n, len(FEATURE_NAMES))`` float64 array: RGB/HSV/optical-density/hematoxylin/eosin means, spreads
    and percentiles, tissue, dark and nuclear pixel fractions, gradient and Laplacian energy, GLCM-like
    contrast/homogeneity/correlation, LBP-pattern entropy, coarse (4x4-block) grey spread and grey-level
    entropy. Deterministic; finite for any input, including blank tiles.
    """
    t = _as_tiles(tiles)
    if t.dtype != np.uint8:
        if np.issubdtype(t.dtype, np.floating) and t.size and float(np.nanmax(t)) <= 1.0:
            t = t * 255.0
        t = np.clip(np.nan_to_num(t), 0, 255).astype(np.uint8)
    starts = range(0, len(t), chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="features", leave=False)
    parts = [_features_chunk(t[i:i + chunk]) for i in starts]
    res = np.concatenate(parts) if parts else np.zeros((0, len(FEATURE_NAMES)))
    assert res.shape[1] == len(FEATURE_NAMES), (res.shape, len(FEATURE_NAMES))
    return np.nan_to_num(res, nan=0.0, posinf=0.0, neginf=0.0)


def per_gene_pearson(pred: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """Pearson correlation per column; columns constant in ``obs`` or ``pred`` count as r = 0.

    This is the convention used for every model and baseline number in this package: a gene that does
    not vary in the held-out section (or a constant prediction) gets 0, so means over genes are taken
    over the same gene set for every method.
    """
    p = np.asarray(pred, np.float64)
    o = np.asarray(obs, np.float64)
    if p.shape != o.shape:
        raise ValueError(f"prediction {p.shape} and observation {o.shape} shapes differ")
    pc, oc = p - p.mean(0), o - o.mean(0)
    den = np.sqrt((pc ** 2).sum(0) * (oc ** 2).sum(0))
    ok = den > 1e-12 * max(1.0, float(len(p)))
    r = np.zeros(p.shape[1])
    r[ok] = (pc[:, ok] * oc[:, ok]).sum(0) / den[ok]
    return r


def _ridge_solve(Xs: np.ndarray, Y: np.ndarray, alphas: Sequence[float]) -> list[np.ndarray]:
    """Ridge coefficients (intercept handled by centring) for several penalties via one SVD."""
    xm, ym = Xs.mean(0), Y.mean(0)
    U, s, Vt = np.linalg.svd(Xs - xm, full_matrices=False)
    UtY = U.T @ (Y - ym)
    out = []
    for a in alphas:
        d = s / (s ** 2 + a)
        W = Vt.T @ (d[:, None] * UtY)
        out.append((W, ym - xm @ W))
    return out


@dataclass
class BaselinePrediction:
    """Ridge-baseline prediction for one section.

    Attributes
    ----------
    log1p
        ``(n_obs, n_genes)`` predictions on the ``log1p(counts)`` scale (what the ridge fits).
    genes
        Gene names (columns of ``log1p``).
    celltypes
        Predicted cell-type proportions (rows sum to 1), or ``None`` when no targets were given.
    obs_names
        Observation ids (when predicted from a Section).
    """

    log1p: np.ndarray
    genes: list[str]
    celltypes: pd.DataFrame | None = None
    obs_names: list[str] | None = None

    @property
    def counts(self) -> np.ndarray:
        """Expected counts scale (``expm1`` of the log1p prediction, floored at 0)."""
        return np.clip(np.expm1(self.log1p), 0, None)


class RidgeBaseline:
    """Ridge regression of ``log1p`` counts (and cell-type proportions) on handcrafted tile features.

    Parameters
    ----------
    alphas
        Candidate ridge penalties (on standardised features); chosen by grouped cross-validation.
    tile_um, out_px
        Tile geometry used when fitting/predicting from Sections (``None`` tile_um: the default
        of :func:`stimage_nb.tiles.default_tile_um`, as for the model).
    cv_metric
        ``"pearson"`` (mean per-gene Pearson over held-out groups, the evaluation metric) or ``"mse"``.

    Attributes
    ----------
    alpha_
        Chosen penalty. ``cv_scores_`` holds the CV score of every candidate.
    """

    def __init__(self, alphas: Sequence[float] = tuple(np.logspace(-1, 4, 11)), *, tile_um: float | None = None,
                 out_px: int = 112, cv_metric: str = "pearson"):
        if cv_metric not in ("pearson", "mse"):
            raise ValueError("cv_metric must be 'pearson' or 'mse'")
        self.alphas = [float(a) for a in alphas]
        self.tile_um = tile_um
        self.out_px = int(out_px)
        self.cv_metric = cv_metric
        self.genes: list[str] = []
        self.celltypes: list[str] = []

    # ----------------------------------------------------------------- fitting
    def _tiles_of(self, section) -> np.ndarray:
        from .tiles import section_tiles

        return section_tiles(section, tile_um=self.tile_um, out_px=self.out_px)

    def fit(self, data, counts=None, groups=None, *, celltypes=None, genes: Sequence[str] | None = None,
            features: np.ndarray | None = None, progress: bool = False) -> "RidgeBaseline":
        """Fit on Sections, or on tiles with counts and section groups.

        Parameters
        ----------
        data
            A list of :class:`~stimage_nb.io.section.Section` with counts, or an ``(n, h, w, 3)`` tile array
            (then ``counts`` and ``groups`` are required), or ``None`` with ``features`` given.
        counts
            ``(n, n_genes)`` raw counts (only with tiles/features).
        groups
            Section label per observation; penalties are chosen by leave-one-group-out CV (GroupKFold
            over at most 5 groups). With one group, 5 contiguous blocks are used instead.
        celltypes
            Optional ``(n, n_types)`` proportions (DataFrame or array) for the cell-type ridge.
        features
            Precomputed :func:`handcrafted_features` (skips feature extraction).
        """
        if data is not None and not isinstance(data, np.ndarray) and len(data) and hasattr(data[0], "adata"):
            sections = list(data)
            no_counts = [s.name for s in sections if not s.has_counts]
            if no_counts:
                raise StimageInputError(f"sections {no_counts} have no counts; the baseline needs counts to fit.")
            genes0 = sections[0].genes
            for s in sections[1:]:
                if s.genes != genes0:
                    raise StimageInputError(f"section {s.name} has other genes than {sections[0].name}; read "
                                            "all sections with the same gene list (genes=...).")
            feats = [handcrafted_features(self._tiles_of(s), progress=progress) for s in sections]
            features = np.concatenate(feats)
            counts = np.concatenate([_dense(s.adata.X) for s in sections])
            groups = np.concatenate([[s.name] * s.adata.n_obs for s in sections])
            genes = genes0
            cts = [s.adata.obsm.get(K.CELLTYPE_PROPORTIONS) for s in sections]
            if all(c is not None for c in cts):
                celltypes = pd.concat(cts)
        else:
            if features is None:
                features = handcrafted_features(data, progress=progress)
            if counts is None or groups is None:
                raise StimageInputError("fit(tiles, counts, groups): counts and groups are required with tiles.")
        X = np.asarray(features, np.float64)
        Y = np.log1p(np.asarray(_dense(counts), np.float64))
        groups = np.asarray(groups)
        if len(X) != len(Y) or len(groups) != len(X):
            raise StimageInputError(f"fit: {len(X)} tiles/features, {len(Y)} count rows and {len(groups)} groups differ.")
        if len(X) < 3:
            raise StimageInputError(f"fit: {len(X)} observations are too few for a baseline.")
        self.genes = [str(g) for g in genes] if genes is not None else [str(i) for i in range(Y.shape[1])]
        self.mu_ = X.mean(0)
        self.sd_ = X.std(0)
        self.sd_[self.sd_ < 1e-12] = 1.0
        Xs = (X - self.mu_) / self.sd_
        folds = _folds(groups)
        self.cv_scores_ = self._cv(Xs, Y, folds)
        best = int(np.argmax(self.cv_scores_))
        self.alpha_ = self.alphas[best]
        (self.coef_, self.intercept_), = _ridge_solve(Xs, Y, [self.alpha_])
        log.info("ridge baseline: alpha=%g (CV %s %.3f over %d folds), %d obs, %d features, %d genes",
                 self.alpha_, self.cv_metric, self.cv_scores_[best], len(folds), len(X), X.shape[1], Y.shape[1])
        self.ct_coef_ = None
        if celltypes is not None:
            C = np.asarray(celltypes.to_numpy() if isinstance(celltypes, pd.DataFrame) else celltypes, np.float64)
            ok = np.isfinite(C).all(1)
            self.celltypes = list(celltypes.columns) if isinstance(celltypes, pd.DataFrame) else [str(i) for i in range(C.shape[1])]
            if ok.sum() >= 3:
                ct_scores = self._cv(Xs[ok], C[ok], _folds(groups[ok]), metric="mse")
                self.ct_alpha_ = self.alphas[int(np.argmax(ct_scores))]
                (self.ct_coef_, self.ct_intercept_), = _ridge_solve(Xs[ok], C[ok], [self.ct_alpha_])
        return self

    def _cv(self, Xs, Y, folds, metric: str | None = None) -> np.ndarray:
        metric = metric or self.cv_metric
        scores = np.zeros(len(self.alphas))
        for tr, va in folds:
            fits = _ridge_solve(Xs[tr], Y[tr], self.alphas)
            for i, (W, b) in enumerate(fits):
                P = Xs[va] @ W + b
                if metric == "pearson":
                    scores[i] += per_gene_pearson(P, Y[va]).mean() / len(folds)
                else:
                    scores[i] -= ((P - Y[va]) ** 2).mean() / len(folds)
        return scores

    # -------------------------------------------------------------- prediction
    def _check_fitted(self):
        if not hasattr(self, "coef_"):
            raise RuntimeError("RidgeBaseline is not fitted; call fit() first.")

    def predict(self, tiles=None, *, features: np.ndarray | None = None) -> np.ndarray:
        """``log1p``-scale expression predictions ``(n, n_genes)`` for tiles (or precomputed features)."""
        self._check_fitted()
        X = handcrafted_features(tiles) if features is None else np.asarray(features, np.float64)
        return ((X - self.mu_) / self.sd_) @ self.coef_ + self.intercept_

    def predict_celltypes(self, tiles=None, *, features: np.ndarray | None = None) -> np.ndarray | None:
        """Cell-type proportions ``(n, n_types)``: ridge output clipped at 0 and renormalised to sum 1."""
        self._check_fitted()
        if self.ct_coef_ is None:
            return None
        X = handcrafted_features(tiles) if features is None else np.asarray(features, np.float64)
        P = np.clip(((X - self.mu_) / self.sd_) @ self.ct_coef_ + self.ct_intercept_, 0, None)
        s = P.sum(1, keepdims=True)
        k = P.shape[1]
        return np.where(s > 1e-12, P / np.maximum(s, 1e-12), 1.0 / k)

    def predict_sections(self, sections, *, progress: bool = False) -> dict[str, BaselinePrediction]:
        """Predict every Section (counts not needed); returns ``{section name: BaselinePrediction}``."""
        out = {}
        for s in sections:
            X = handcrafted_features(self._tiles_of(s), progress=progress)
            ct = self.predict_celltypes(features=X)
            obs = list(s.adata.obs_names)
            ctdf = None if ct is None else pd.DataFrame(ct, index=obs, columns=self.celltypes)
            out[s.name] = BaselinePrediction(self.predict(features=X), list(self.genes), ctdf, obs)
        return out


def _dense(X) -> np.ndarray:
    import scipy.sparse as sp

    return X.toarray() if sp.issparse(X) else np.asarray(X)


def _folds(groups: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import GroupKFold, KFold

    uniq = np.unique(groups)
    if len(uniq) >= 2:
        return list(GroupKFold(n_splits=min(5, len(uniq))).split(groups, groups=groups))
    log.warning("ridge baseline fitted on a single section: alpha chosen by 5 contiguous blocks, not by section")
    return list(KFold(n_splits=min(5, len(groups))).split(groups))


def evaluate_baseline(train_sections, test_sections, *, tile_um: float | None = None, out_px: int = 112,
                      progress: bool = False) -> pd.DataFrame:
    """Fit the baseline on ``train_sections`` and score it on held-out ``test_sections``.

    Returns a DataFrame indexed by gene with one column per test section: the Pearson correlation
    between the prediction and ``log1p(counts)`` (genes constant in a section count as r = 0, see
    :func:`per_gene_pearson`). ``df.mean()`` gives the mean Pearson per section.
    """
    rb = RidgeBaseline(tile_um=tile_um, out_px=out_px).fit(train_sections, progress=progress)
    preds = rb.predict_sections(test_sections, progress=progress)
    cols = {}
    for s in test_sections:
        if not s.has_counts:
            continue
        obs = np.log1p(_dense(s.adata[:, rb.genes].X))
        cols[s.name] = per_gene_pearson(preds[s.name].log1p, obs)
    return pd.DataFrame(cols, index=rb.genes)
