"""The domain-shift score (stimage_nb.domain): pure logic on synthetic features, then a real tiny ensemble."""

from __future__ import annotations

import _modelkit as kit
import numpy as np
import pytest

from stimage_nb import _keys as K
from stimage_nb.domain import DomainModel, fit_domain


def test_in_distribution_scores_near_the_middle_and_a_shift_is_flagged():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(30, 30))
    draw = lambda n, shift=0.0: rng.normal(size=(n, 30)) @ A + shift  # noqa: E731 - correlated features
    dm = DomainModel.fit(draw(600), draw(300), k=8, reference="held-out draw")
    same = dm.summary(dm.distance(draw(400)))
    assert 0.35 < same["median_percentile"] < 0.65 and 0.01 < same["fraction_beyond_p95"] < 0.1
    assert not same["flagged"] and same["reference"] == "held-out draw"
    sd = draw(2000).std(0)
    moved = dm.summary(dm.distance(draw(400, shift=np.r_[np.full(5, 2.0), np.zeros(25)] * sd)))
    assert moved["median_percentile"] > 0.9 and moved["flagged"]
    # a direction the training data never varied in (the SPE term) is noticed too
    X = draw(600)
    X[:, -1] = 0.0
    flat = DomainModel.fit(X, k=8)
    Y = draw(50)
    Y[:, -1] = 0.0
    Yo = Y.copy()
    Yo[:, -1] = 3.0
    assert np.all(flat.distance(Yo) > flat.distance(Y))
    back = DomainModel.from_tensors(dm.tensors(), dm.meta)
    V = draw(20)
    assert np.allclose(back.distance(V), dm.distance(V)) and back.k == 8
    with pytest.raises(ValueError):
        DomainModel.fit(np.zeros((2, 5)))


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    from stimage_nb.train import train

    out = tmp_path_factory.mktemp("domain_run")
    ens = train(kit.sections(("C2", "C3", "C4")), genes=kit.genes(), out=out, val_sections=["C4"],
                config=kit.tiny_frozen_config(), progress=False)
    return out, ens.to("cpu")


def _c5_tiles(ens):
    from stimage_nb.tiles import extract_tiles

    s = kit.sections(("C5",))[0]
    return s, extract_tiles(s.image, s.xy, ens.tile_um, ens.out_px)


def test_training_fits_it_and_other_acquisitions_score_further(frozen):
    from stimage_nb.shifts import blur, restain

    _, ens = frozen
    assert ens.domain is not None and ens.domain.meta["reference"] == "validation sections C4"
    assert ens.domain.meta["n_fit"] == 2 * kit.N_SPOTS and ens.domain.meta["n_reference"] == kit.N_SPOTS
    _, t = _c5_tiles(ens)
    same = ens.domain.summary(ens.predict_tiles(t)["domain_distance"])  # an unseen section of the same patient
    assert not same["flagged"] and same["median_percentile"] < 0.7, same
    blurred = ens.domain.summary(ens.predict_tiles(np.stack([blur(x, 1.0) for x in t]))["domain_distance"])
    assert blurred["median_percentile"] > same["median_percentile"] + 0.25 and blurred["flagged"], (same, blurred)
    # the default normalises stains per section (Macenko), so another staining looks familiar after it
    assert ens.stain is not None
    restained = ens.domain.summary(ens.predict_tiles(np.stack([restain(x, 1.5, 0.6) for x in t]))["domain_distance"])
    assert abs(restained["median_percentile"] - same["median_percentile"]) < 0.2 and not restained["flagged"]


def test_predictions_carry_it_and_it_survives_save_load(frozen, tmp_path):
    from stimage_nb.ensemble import Ensemble
    from stimage_nb.predict import predict_section

    run, ens = frozen
    s, t = _c5_tiles(ens)
    a = predict_section(ens, s, progress=False)
    assert np.all(np.isfinite(a.obs[K.DOMAIN_DISTANCE])) and a.obs[K.DOMAIN_PERCENTILE].between(0, 1).all()
    assert a.uns[K.UNS]["domain"]["reference"] == "validation sections C4"
    back = Ensemble.load(run, "cpu")
    b = predict_section(back, s, progress=False)
    assert np.array_equal(a.obs[K.DOMAIN_DISTANCE], b.obs[K.DOMAIN_DISTANCE])
    # an ensemble without a domain model gets one after the fact, from the same features
    bare = Ensemble.load(run, "cpu")
    bare.domain = None
    bare.save(tmp_path / "bare")
    assert not (tmp_path / "bare" / "domain.safetensors").exists()
    bare = Ensemble.load(tmp_path / "bare", "cpu")
    assert bare.domain is None and K.DOMAIN_DISTANCE not in predict_section(bare, s, progress=False).obs
    secs = kit.sections(("C2", "C3", "C4"))
    fit_domain(bare, secs[:2], secs[2:])
    assert np.allclose(bare.domain.quantiles, ens.domain.quantiles, rtol=1e-3, atol=1e-3)
