"""Small REAL her2st inputs for the model-layer tests (shared across test modules, built once).

Sections C2, C3, C4 of the bundled data, 40 spots each (spread over the section), 30 genes of the
STimage list; a 3-member ensemble of timm's ``test_resnet`` on 32 px tiles trained for 2 epochs.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np

N_SPOTS = 40
N_GENES = 30
OUT_PX = 32


@functools.lru_cache(maxsize=None)
def _sections(names: tuple, n: int):
    from stimage_nb._settings import her2st_manifest
    from stimage_nb.io.readers import read_manifest

    secs = read_manifest(her2st_manifest(), list(names), genes=genes())
    return [s.subset(np.linspace(0, s.adata.n_obs - 1, n).astype(int)) for s in secs]


def sections(names=("C2", "C3", "C4"), n: int = N_SPOTS):
    """Fresh copies (tests may modify them) of small real sections."""
    return [s.subset(np.ones(s.adata.n_obs, bool)) for s in _sections(tuple(names), n)]


@functools.lru_cache(maxsize=None)
def genes() -> list[str]:
    from stimage_nb._settings import data_dir
    from stimage_nb.io.readers import read_gene_list

    return read_gene_list(data_dir() / "her2st" / "genes_stimage_her2st.txt")[:N_GENES]


def tiny_config(**kw):
    from stimage_nb.train import TrainConfig

    d = dict(frozen=False, backbone="test_resnet", out_px=OUT_PX, epochs=2, members=3, batch_size=16, device="cpu",
             patience=5)
    d.update(kw)
    return TrainConfig(**d)


def tiny_frozen_config(**kw):
    """The default recipe (frozen k-means + handcrafted features, low-rank NB heads), made small and fast."""
    from stimage_nb.train import TrainConfig

    d = dict(out_px=OUT_PX, kmeans_k=8, kmeans_patches=3000, epochs=6, members=3, device="cpu")
    d.update(kw)
    return TrainConfig(**d)


@functools.lru_cache(maxsize=None)
def tiny_run() -> Path:
    """A trained 3-member ensemble (train C2+C3, validate C4); returns its run directory."""
    from stimage_nb.train import train

    out = Path(tempfile.mkdtemp(prefix="stimage_nb_tiny_run_"))
    tr, va = sections(("C2", "C3", "C4"))[:2], sections(("C2", "C3", "C4"))[2:]
    train(tr + va, genes=genes(), out=out, val_sections=[va[0].name], config=tiny_config(), progress=False)
    return out
