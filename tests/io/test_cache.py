"""The image and tile caches: size limit, least-recently-used eviction, ``stimage-nb cache`` and ``convert``."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from _wsikit import shrink, tissue, write_slide

from stimage_nb.errors import StimageInputError
from stimage_nb.io import cache


@pytest.fixture()
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("STIMAGE_NB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(cache.ENV_MAX, raising=False)
    return tmp_path / "cache"


def _entry(root, kind, name, mb, age_s):
    p = root / kind / name
    if kind == "images":  # a store: a folder of chunk files
        (p / "0").mkdir(parents=True)
        for i in range(4):
            (p / "0" / str(i)).write_bytes(b"\0" * int(mb * 2**20 / 4))
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\0" * int(mb * 2**20))
    t = time.time() - age_s
    os.utime(p, (t, t))
    return p


def test_least_recently_used_entries_go_first(root):
    old_img = _entry(root, "images", "a.ome.zarr", 4, 5000)
    old_tiles = _entry(root, "tiles", "b.npy", 3, 4000)
    recent = _entry(root, "tiles", "c.npy", 2, 3000)
    just_used = _entry(root, "images", "d.ome.zarr", 4, 10)  # within the grace period: never evicted
    info = cache.info()
    assert [os.path.basename(e.path) for e in info.entries] == ["d.ome.zarr", "c.npy", "b.npy", "a.ome.zarr"]
    assert info.total_bytes == pytest.approx(13 * 2**20, rel=0.01)
    removed = cache.enforce_limit(limit=7 * 2**20)
    assert [os.path.basename(e.path) for e in removed] == ["a.ome.zarr", "b.npy"]  # oldest first, until <= 7 MB
    assert not old_img.exists() and not old_tiles.exists() and recent.exists() and just_used.exists()
    cache.touch(recent)  # used again: now the most recent
    assert cache.enforce_limit(limit=1, grace_s=0, keep=[recent]) and recent.exists() and not just_used.exists()
    assert cache.enforce_limit(limit=0) == []  # 0: no limit


def test_limit_from_the_environment(root, monkeypatch):
    assert cache.limit_bytes() == int(cache.DEFAULT_MAX_GB * 2**30)
    monkeypatch.setenv(cache.ENV_MAX, "0.5")
    assert cache.limit_bytes() == 2**29
    monkeypatch.setenv(cache.ENV_MAX, "none")
    assert cache.limit_bytes() == 0
    monkeypatch.setenv(cache.ENV_MAX, "lots")
    with pytest.raises(StimageInputError, match="STIMAGE_NB_CACHE_MAX_GB='lots': give the cache limit in GB"):
        cache.limit_bytes()


def test_the_tile_cache_evicts_under_its_limit(root, monkeypatch, data_dir):
    """Real tiles: with a limit of ~1.5 entries, writing a second tile array evicts the first (LRU)."""
    from stimage_nb.io.image import open_image
    from stimage_nb.tiles import extract_tiles

    img = open_image(data_dir / "fixtures" / "wsi" / "cmu_small_region.svs")
    xy = np.array([[500.0, 500.0], [900.0, 1200.0], [1500.0, 2000.0]])
    a = extract_tiles(img, xy, 100.0, 64)
    (first,) = list((root / "tiles").iterdir())
    size = first.stat().st_size
    old = time.time() - 3600
    os.utime(first, (old, old))
    monkeypatch.setenv(cache.ENV_MAX, str(1.5 * size / 2**30))
    monkeypatch.setattr(cache, "GRACE_S", 0.0)
    np.testing.assert_array_equal(extract_tiles(img, xy, 100.0, 64), a)  # a hit: touched, not rewritten
    assert first.stat().st_mtime > old + 10 and len(list((root / "tiles").iterdir())) == 1
    os.utime(first, (old, old))
    extract_tiles(img, xy[:2], 100.0, 64)  # a new entry: over the limit, the older one goes
    remaining = list((root / "tiles").iterdir())
    assert len(remaining) == 1 and remaining[0] != first


def test_cache_cli_info_and_clear(root, capsys):
    from stimage_nb.cli import main

    _entry(root, "images", "a.ome.zarr", 2, 100)
    _entry(root, "tiles", "b.npy", 1, 100)
    (root / "tiles" / "c.npy.tmp-123.npy").write_bytes(b"0" * 10)  # a crashed writer's leftover
    (root / "data").mkdir()
    (root / "data" / "x").write_bytes(b"0" * 100)
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert "images        1 entries  2.0 MB" in out and "tiles         1 entries  1.0 MB" in out
    assert "data/" in out and "not managed" in out
    assert main(["cache", "info", "--json"]) == 0
    assert '"total_bytes": 3145728' in capsys.readouterr().out
    assert main(["cache", "clear", "--kind", "tiles"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert not any((root / "tiles").iterdir()) and (root / "images" / "a.ome.zarr").exists()
    assert main(["cache", "clear"]) == 0 and not any((root / "images").iterdir())
    assert (root / "data" / "x").exists()  # downloaded data is never touched


def test_convert_cli_writes_a_streamed_copy(root, tmp_path, capsys):
    from stimage_nb.cli import main
    from stimage_nb.io.image import open_image

    t = tissue(1024, 1536)
    src = write_slide(tmp_path / "s.tif", [t, shrink(t, 4)], 0.25, compression="zlib")
    assert main(["convert", str(src), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    store = tmp_path / "out" / "s.ome.zarr"
    assert capsys.readouterr().out.strip() == str(store)
    copy = open_image(store)
    assert copy.level_shapes == [(1024, 1536), (256, 384)] and copy.um_per_px == pytest.approx(0.25)
    np.testing.assert_array_equal(copy.read_region(0, 0, 1536, 1024), t)
    assert main(["convert", str(src), "--no-progress"]) == 0  # into the cache, counted as an image entry
    assert [e.kind for e in cache.info().entries] == ["images"]
    img = open_image(src, convert=True)  # open_image(convert=True) reuses that copy
    assert img.backend.startswith("OME-Zarr") and str(img.path).startswith(str(root))
    assert img.um_per_px_source.startswith("TIFF XResolution")
