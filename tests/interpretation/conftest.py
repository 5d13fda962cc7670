"""Fixtures for the interpretation tests: small REAL models and sections (her2st), trained once per session.

- ``frozen_run``: the offline default recipe (frozen k-means + handcrafted features, low-rank NB heads,
  Macenko stain step), made small: 100 µm tiles at 48 px, K = 8, 2 members, trained on 40 spots each of
  C2 and C3 (C4 validates). Explanations run on the held-out section C6 (another section of the patient).
- ``timm_run``: ``tests/_modelkit.tiny_run()``, a 3-member ensemble of timm's ``test_resnet`` (differentiable).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: _modelkit, _predictions

GENES = 6


@functools.lru_cache(maxsize=None)
def _frozen_run() -> Path:
    import tempfile

    import _modelkit as kit

    from stimage_nb.train import TrainConfig, train

    out = Path(tempfile.mkdtemp(prefix="stimage_nb_interp_frozen_"))
    secs = kit.sections(("C2", "C3", "C4"))
    cfg = TrainConfig(tile_um=100.0, out_px=48, kmeans_k=8, kmeans_patches=3000, epochs=8, members=2, device="cpu")
    train(secs, genes=kit.genes()[:GENES], out=out, val_sections=["C4"], config=cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def frozen_run() -> Path:
    return _frozen_run()


@pytest.fixture(scope="session")
def frozen_ens(frozen_run):
    from stimage_nb.ensemble import Ensemble

    return Ensemble.load(frozen_run, "cpu")


@pytest.fixture(scope="session")
def timm_ens():
    import _modelkit as kit

    from stimage_nb.ensemble import Ensemble

    return Ensemble.load(kit.tiny_run(), "cpu")


@pytest.fixture(scope="session")
def c6(her2st_manifest, frozen_ens):
    """The held-out section C6 (all its spots), as a fresh object per session."""
    from stimage_nb.io.readers import read_manifest

    return read_manifest(her2st_manifest, ["C6"], genes=frozen_ens.genes)[0]


@functools.lru_cache(maxsize=None)
def _attributions(method: str, spots: tuple, max_evals: int, output: str = "log_mean"):
    from stimage_nb._settings import her2st_manifest
    from stimage_nb.ensemble import Ensemble
    from stimage_nb.interpretation import explain
    from stimage_nb.io.readers import read_manifest

    ens = Ensemble.load(_frozen_run(), "cpu")
    sec = read_manifest(her2st_manifest(), ["C6"], genes=ens.genes)[0]
    return explain(ens, sec, genes=ens.genes[:2], spots=list(spots), method=method, max_evals=max_evals,
                   progress=False, output=output)


@pytest.fixture(scope="session")
def attr_c6():
    """Partition attributions of two genes at three real C6 spots (shared by several tests; read-only)."""
    return _attributions("partition", ("19x13", "14x21", "12x20"), 300)


@pytest.fixture(scope="session")
def attr_c6_share():
    """The same spots and genes, explaining the depth-normalised output (log of the gene's share)."""
    return _attributions("partition", ("19x13", "14x21", "12x20"), 300, "log_share")
