"""What predicted expression could deliver: measured values degraded to a measured per-gene accuracy.

**A simulation, not a prediction.** For each gene g with accuracy r_g (e.g. the Pearson r that
:func:`stimage_nb.evaluate.evaluate` measured between predicted and observed expression on held-out
sections), the standardised measured value z_g is replaced by ``r_g * z_g + sqrt(1 - r_g^2) * e`` with
independent standard normal noise e, so the simulated value correlates with the measurement with r_g
in expectation. Negative or undefined accuracies count as 0 (no information). The assumption this rests
on: that a slide-level prediction would agree with the patient's bulk measurement as well as spot-level
predictions agreed with spot-level counts; averaging over a slide may do better (noise averages out) or
worse (between-patient variation is not what a model trained on few patients learns).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import StimageInputError


def degrade_to_accuracy(X: pd.DataFrame, accuracy: pd.Series | dict, *, seed: int = 0) -> pd.DataFrame:
    """Patients x genes with each gene's values degraded to correlate ``accuracy[gene]`` with the originals.

    Parameters
    ----------
    X
        Patients x genes (any scale; each gene is standardised over the patients first).
    accuracy
        Per-gene target correlation (e.g. a ``metrics_per_gene.csv`` Pearson column); clipped to [0, 1].
    seed
        Seeds the noise.

    Returns
    -------
    DataFrame like ``X`` (standardised scale).

    Raises
    ------
    StimageInputError
        A gene of ``X`` without an accuracy.
    """
    acc = pd.Series(accuracy, dtype=float)
    missing = [g for g in X.columns if g not in acc.index]
    if missing:
        raise StimageInputError(f"no accuracy for genes {missing[:5]}" + (f" (+{len(missing) - 5})" if len(missing) > 5 else ""))
    r = np.clip(acc.reindex(X.columns).fillna(0.0).to_numpy(), 0.0, 1.0)
    Z = X.astype(float).to_numpy()
    sd = np.nanstd(Z, axis=0)
    Z = (Z - np.nanmean(Z, axis=0)) / np.where(sd > 0, sd, 1.0)
    rng = np.random.default_rng(seed)
    E = rng.standard_normal(Z.shape)
    out = r * Z + np.sqrt(1.0 - r ** 2) * E
    return pd.DataFrame(out, index=X.index, columns=X.columns)
