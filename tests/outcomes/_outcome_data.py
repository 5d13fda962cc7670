"""Fixtures and helpers of the outcome tests: real TCGA-BRCA outcomes (the bundle's PORPOISE table).

Imported by the test modules (not a conftest.py: tests/omero imports its conftest by name, and a second
conftest module on the path would shadow it).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


def noise(index: pd.Index, n: int, seed: int = 0) -> pd.DataFrame:
    """Pure-noise features (no relation to any outcome by construction)."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.standard_normal((len(index), n)), index=index, columns=[f"noise{i}" for i in range(n)])


@pytest.fixture(scope="session")
def bulk():
    from stimage_nb.outcomes import tcga_brca_bulk

    return tcga_brca_bulk()


@pytest.fixture(scope="session")
def os_outcome(bulk) -> pd.DataFrame:
    """Overall survival (months) of the TCGA-BRCA patients, event 1 = death."""
    y = bulk.clinical[["time", "event"]]
    return y[y["time"] > 0]


@pytest.fixture(scope="session")
def os_subset(os_outcome) -> pd.DataFrame:
    """400 real patients (a fixed random subset, ~50 deaths): small enough for quick nested CV."""
    rng = np.random.default_rng(1)
    return os_outcome.loc[np.sort(rng.choice(os_outcome.index, 400, replace=False))]
