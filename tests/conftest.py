"""Shared fixtures: the real public data bundle (see ../shared/data/README.md)."""

from __future__ import annotations

import pytest

from stimage_nb._settings import data_dir as _data_dir


@pytest.fixture(scope="session")
def data_dir():
    """The data bundle directory ($STIMAGE_NB_DATA or ../shared/data)."""
    return _data_dir()


@pytest.fixture(scope="session")
def her2st_manifest(data_dir):
    return data_dir / "her2st" / "sections.csv"


@pytest.fixture(scope="session")
def her2st_genes(data_dir):
    from stimage_nb.io.readers import read_gene_list

    return read_gene_list(data_dir / "her2st" / "genes_stimage_her2st.txt")
