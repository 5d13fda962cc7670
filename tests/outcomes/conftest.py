"""Real TCGA-BRCA outcomes (the bundle's PORPOISE table) for the outcome tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


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
