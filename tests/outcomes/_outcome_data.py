"""Helpers of the outcome tests."""

from __future__ import annotations

import numpy as np
import pandas as pd


def noise(index: pd.Index, n: int, seed: int = 0) -> pd.DataFrame:
    """Pure-noise features (no relation to any outcome by construction)."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.standard_normal((len(index), n)), index=index, columns=[f"noise{i}" for i in range(n)])
