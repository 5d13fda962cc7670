"""How far a tile lies from the training data: a per-spot domain-shift score beside the uncertainty.

The ensemble's epistemic variance is the members' disagreement. Members that share a frozen feature
extractor barely disagree, even on a slide from another scanner or lab (``docs/robustness.md``: the 90%
intervals cover only 0.84-0.87 of the counts under simulated defocus or restaining), so the intervals
alone do not warn that a slide is unlike the training data. This module does, from the features the
model already computes:

- :meth:`DomainModel.fit` takes the member-0 features of the training tiles, standardises them and keeps
  their top ``k`` principal components (PCA). A tile's **distance** combines Hotelling's T² in those
  components and the squared residual outside them (SPE), each divided by its expected value on the
  training tiles, so an in-distribution tile scores about 1:
  ``distance = sqrt((T²/k + SPE/SPE_train) / 2)``.
- The distances of a **reference** set that was not fitted on (the validation sections when training
  has them) give the null distribution: a spot's **percentile** is the fraction of reference tiles closer
  than it. On data like the validation sections about 5% of spots lie beyond the 95th percentile; a
  section where many more do looks unlike the training data.

Prediction writes ``obs["domain_distance"]`` and ``obs["domain_percentile"]`` per spot and a summary in
``uns["stimage_nb"]["domain"]`` (median percentile, fraction beyond the 95th), and warns when the
section's median percentile exceeds :data:`FLAG_MEDIAN_PERCENTILE` (its typical spot is further from the
training data than 80% of the reference tiles). The score says "this looks new", not "this prediction is
wrong": check such sections against some measured spots. It is a section-level signal: within a section
the spots furthest from the training data are mostly sparse tissue, not the worse-predicted spots
(``docs/robustness.md``). :func:`fit_domain` adds a domain model to an
ensemble trained without one.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

N_QUANTILES = 101
DEFAULT_K = 20
#: A section is flagged when the median percentile of its spots exceeds this (~0.5 on data like the reference).
FLAG_MEDIAN_PERCENTILE = 0.8


class DomainModel:
    """PCA model of the training features with a reference distribution of distances (module docstring)."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, components: np.ndarray, variances: np.ndarray,
                 spe_train: float, quantiles: np.ndarray, meta: dict | None = None):
        self.mean = np.asarray(mean, np.float64)
        self.scale = np.asarray(scale, np.float64)
        self.components = np.asarray(components, np.float64)
        self.variances = np.asarray(variances, np.float64)
        self.spe_train = float(spe_train)
        self.quantiles = np.asarray(quantiles, np.float64)
        self.meta = dict(meta or {})

    @property
    def k(self) -> int:
        return int(self.components.shape[0])

    @classmethod
    def fit(cls, train_features, reference_features=None, *, k: int = DEFAULT_K, reference: str = "") -> "DomainModel":
        """Fit on ``(n, d)`` training features; the reference (default: the training features themselves,
        which makes the percentiles optimistic) sets the null distribution of distances."""
        X = np.asarray(train_features, np.float64)
        if X.ndim != 2 or X.shape[0] < 3:
            raise ValueError(f"need (n >= 3, d) training features, got {X.shape}")
        mean = X.mean(0)
        scale = X.std(0)
        scale = np.where(scale > 1e-8, scale, 1.0)
        Z = (X - mean) / scale
        _, S, Vt = np.linalg.svd(Z, full_matrices=False)
        var = S ** 2 / (X.shape[0] - 1)
        k = int(max(1, min(k, int((var > 1e-10 * var[0]).sum()), X.shape[1] - 1 if X.shape[1] > 1 else 1)))
        comps, variances = Vt[:k], var[:k]
        resid = Z - (Z @ comps.T) @ comps
        spe = float(np.mean((resid ** 2).sum(1)))
        model = cls(mean, scale, comps, variances, max(spe, 1e-12), np.zeros(N_QUANTILES))
        use_ref = reference_features is not None and len(reference_features) >= 20
        ref = np.asarray(reference_features if use_ref else X, np.float64)
        model.quantiles = np.quantile(model.distance(ref), np.linspace(0, 1, N_QUANTILES))
        model.meta = {"k": k, "n_fit": int(X.shape[0]), "n_features": int(X.shape[1]),
                      "reference": reference if use_ref else "training tiles (no held-out reference: optimistic)",
                      "n_reference": int(ref.shape[0])}
        return model

    def distance(self, features) -> np.ndarray:
        """Distance of each ``(n, d)`` feature row from the training data (about 1 in distribution)."""
        Z = (np.asarray(features, np.float64) - self.mean) / self.scale
        P = Z @ self.components.T
        t2 = (P ** 2 / self.variances).sum(1) / self.k
        spe = ((Z - P @ self.components) ** 2).sum(1) / self.spe_train
        return np.sqrt((t2 + spe) / 2.0)

    def percentile(self, distance) -> np.ndarray:
        """Fraction (0-1) of reference tiles closer to the training data than each distance."""
        d = np.asarray(distance, np.float64)
        q = self.quantiles
        p = np.interp(d, q, np.linspace(0, 1, len(q)))
        return np.where(d >= q[-1], 1.0, np.where(d <= q[0], 0.0, p))

    def summary(self, distance) -> dict:
        """Section-level numbers: median distance and percentile, fraction beyond the reference's 95th."""
        d = np.asarray(distance, np.float64)
        p = self.percentile(d)
        frac = float(np.mean(d > np.interp(0.95, np.linspace(0, 1, len(self.quantiles)), self.quantiles))) \
            if len(d) else float("nan")
        return {"median_distance": float(np.median(d)) if len(d) else float("nan"),
                "median_percentile": float(np.median(p)) if len(d) else float("nan"),
                "fraction_beyond_p95": frac,
                "flagged": bool(len(d) and np.median(p) > FLAG_MEDIAN_PERCENTILE),
                "reference": self.meta.get("reference", ""), "expected_fraction_beyond_p95": 0.05}

    # ------------------------------------------------------------------ persistence
    def tensors(self) -> dict:
        import torch

        return {"mean": torch.from_numpy(self.mean), "scale": torch.from_numpy(self.scale),
                "components": torch.from_numpy(np.ascontiguousarray(self.components)),
                "variances": torch.from_numpy(self.variances), "quantiles": torch.from_numpy(self.quantiles),
                "spe_train": torch.tensor([self.spe_train], dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, t: dict, meta: dict | None = None) -> "DomainModel":
        g = {k: v.double().cpu().numpy() for k, v in t.items()}
        return cls(g["mean"], g["scale"], g["components"], g["variances"], float(g["spe_train"][0]), g["quantiles"],
                   meta)


def fit_domain(ensemble, train_sections, reference_sections=(), *, batch_size: int = 256,
               progress: bool = False) -> DomainModel:
    """Fit (and attach) the domain model of a trained ensemble from its training sections' tiles.

    ``reference_sections`` (e.g. the validation sections, never fitted on) give the null distribution.
    Tiles are read through the tile cache and stain-normalised as prediction does. Save the ensemble
    afterwards (``ensemble.save(model_dir)``) to keep it.
    """
    from .tiles import extract_tiles

    def feats(sections):
        out = []
        for s in sections:
            t = extract_tiles(s.image, s.xy, ensemble.tile_um, ensemble.out_px, cache=True, progress=progress)
            out.append(ensemble.features(t, batch_size=batch_size))
        return np.concatenate(out) if out else None

    ref = list(reference_sections)
    model = DomainModel.fit(feats(list(train_sections)), feats(ref) if ref else None,
                            reference="sections " + ",".join(s.name for s in ref) if ref else "")
    ensemble.domain = model
    return model
