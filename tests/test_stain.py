"""Macenko stain normalisation and device augmentations, on real her2st tiles."""

from __future__ import annotations

import functools

import _modelkit as kit
import numpy as np
import pytest
import torch

from stimage_nb.augment import AugmentConfig, augment, dihedral_views, hed_jitter, to_float
from stimage_nb.stain import MacenkoNormalizer, estimate_stains, normalizer_from_dict
from stimage_nb.tiles import extract_tiles

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@functools.lru_cache(maxsize=None)
def _tiles(name: str) -> np.ndarray:
    s = kit.sections((name,), n=24)[0]
    return extract_tiles(s.image, s.xy, 150.0, 48)


def _shifted(tiles: np.ndarray) -> np.ndarray:
    """The same tiles as if stained by another lab: more hematoxylin, less eosin, shifted background."""
    x = to_float(torch.from_numpy(tiles), channels_last=False)
    n = x.shape[0]
    y = hed_jitter(x, torch.tensor([1.5, 0.6, 1.0]).repeat(n, 1), torch.tensor([0.05, -0.02, 0.0]).repeat(n, 1))
    return (y.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def _tissue_mae(a: np.ndarray, b: np.ndarray, ref: np.ndarray) -> float:
    tissue = ref.astype(float).mean(-1) < 200
    return float(np.abs(a.astype(float) - b.astype(float))[tissue].mean())


def test_stain_vectors_of_real_he_are_hematoxylin_then_eosin():
    he, maxc = estimate_stains(_tiles("C2"))
    assert he.shape == (3, 2) and maxc.shape == (2,)
    assert torch.allclose(torch.linalg.norm(he, dim=0), torch.ones(2), atol=1e-5)
    assert (he > 0).all()
    # hematoxylin absorbs red more than eosin does; eosin absorbs mostly green
    assert he[0, 0] > he[0, 1] and he[1, 1] > he[0, 1]
    assert (maxc > 0.1).all()


@pytest.mark.parametrize("device", DEVICES)
def test_normalising_a_restained_section_recovers_the_reference_colours(device):
    ref = _tiles("C2")
    norm = MacenkoNormalizer().fit(ref)
    assert norm.fitted
    # the reference itself is (nearly) unchanged
    same = norm.transform(ref, device=device).cpu().numpy()
    assert _tissue_mae(same, ref, ref) < 6
    # a differently stained copy is brought much closer to the reference colours
    shifted = _shifted(ref)
    before = _tissue_mae(shifted, ref, ref)
    after = _tissue_mae(norm.transform(shifted, device=device).cpu().numpy(), ref, ref)
    assert before > 15 and after < 0.5 * before
    # another section is mapped too, with the same dtype and shape
    other = norm.transform(_tiles("C3"), device=device)
    assert other.dtype == torch.uint8 and tuple(other.shape) == _tiles("C3").shape


def test_normalizer_json_round_trip_and_blank_tiles():
    norm = MacenkoNormalizer().fit(_tiles("C2"))
    back = normalizer_from_dict(norm.to_dict())
    assert torch.equal(back.transform(_tiles("C3")), norm.transform(_tiles("C3")))
    assert normalizer_from_dict({"method": "none"}) is None
    blank = np.full((4, 32, 32, 3), 245, np.uint8)
    assert estimate_stains(blank) is None
    assert np.array_equal(norm.transform(blank).numpy(), blank)


# ---------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("device", DEVICES)
def test_augment_on_device_shapes_ranges_and_reproducibility(device):
    x = torch.from_numpy(_tiles("C2")[:8]).to(device)
    a = augment(x, AugmentConfig(), torch.Generator().manual_seed(1))
    b = augment(x, AugmentConfig(), torch.Generator().manual_seed(1))
    c = augment(x, AugmentConfig(), torch.Generator().manual_seed(2))
    assert a.shape == (8, 3, 48, 48) and a.dtype == torch.float32 and a.device.type == device
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    off = AugmentConfig(flips=False, rot90=False, brightness=0, contrast=0, saturation=0, hed=0)
    assert torch.equal(augment(x, off), to_float(x))


def test_geometric_augmentation_gives_dihedral_views_only():
    x = torch.from_numpy(_tiles("C3")[:16])
    geo = AugmentConfig(brightness=0, contrast=0, saturation=0, hed=0)
    a = augment(x, geo, torch.Generator().manual_seed(0))
    views = dihedral_views(to_float(x))
    n_changed = 0
    for i in range(16):
        matches = [v for v in range(8) if torch.equal(a[i], views[v][i])]
        assert matches, f"tile {i} is not a dihedral view of its input"
        n_changed += 0 not in matches
    assert n_changed >= 8  # most tiles were flipped or rotated


def test_hed_jitter_identity_and_effect():
    x = to_float(torch.from_numpy(_tiles("C2")[:4]))
    ident = hed_jitter(x, torch.ones(4, 3), torch.zeros(4, 3))
    tissue = x.mean(1, keepdim=True).expand_as(x) < 0.8
    assert torch.allclose(ident[tissue], x[tissue], atol=1e-4)
    more_h = hed_jitter(x, torch.tensor([[1.5, 1.0, 1.0]]).repeat(4, 1), torch.zeros(4, 3))
    assert float(more_h[tissue].mean()) < float(x[tissue].mean())  # more stain, darker tissue
