"""A slide larger than the memory the process may use is predicted (issue 14: bounded memory).

The slide: 61,440 x 40,960 px (7.5 GB as raw RGB) at 0.5 µm/px, a JPEG pyramid (1, 4, 16, 64) written tile by
tile, glass with a real her2st C3 region of tissue. The prediction runs in a subprocess whose address space is
limited (``RLIMIT_AS``) to what it holds after loading the model plus 2.5 GB, less than the slide's level 0:
the old reader (level 0 read whole, then copied to OME-Zarr) could not even allocate it there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _wsikit import shrink, tissue

H, W, T = 40960, 61440, 1024
PATCH = (16384, 20480, 4096)  # y, x, side of the tissue at level 0


def _write(path: Path) -> Path:
    import tifffile

    patch = tissue(PATCH[2], PATCH[2], y=2000, x=2000)
    white = {}
    with tifffile.TiffWriter(str(path), bigtiff=True) as tw:
        for i, f in enumerate((1, 4, 16, 64)):
            h, w = H // f, W // f
            t = min(T, w)
            white.setdefault(t, np.full((t, t, 3), 255, np.uint8))
            p = shrink(patch, f) if f > 1 else patch
            py, px = PATCH[0] // f, PATCH[1] // f

            def tiles(h=h, w=w, t=t, p=p, py=py, px=px):
                for y in range(0, h, t):
                    for x in range(0, w, t):
                        if y + t <= py or y >= py + len(p) or x + t <= px or x >= px + len(p):
                            yield white[t]
                            continue
                        tile = np.full((t, t, 3), 255, np.uint8)
                        y0, x0 = max(y, py), max(x, px)
                        y1, x1 = min(y + t, py + len(p), h), min(x + t, px + len(p), w)
                        tile[y0 - y:y1 - y, x0 - x:x1 - x] = p[y0 - py:y1 - py, x0 - px:x1 - px]
                        yield tile

            tw.write(tiles(), shape=(h, w, 3), dtype=np.uint8, tile=(t, t), compression="jpeg", compressionargs={"level": 90},
                     photometric="rgb", subfiletype=0 if i == 0 else 1,
                     resolution=(1e4 / (0.5 * f), 1e4 / (0.5 * f)), resolutionunit="CENTIMETER")
    return path


CHILD = textwrap.dedent("""
    import json, re, resource, sys
    import numpy as np
    from stimage_nb.predict import predict_slides
    import stimage_nb.ensemble, stimage_nb.io.tissue, stimage_nb.tiles, anndata, torch  # noqa: F401 - load first
    run, slide, out, raw = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    vm = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
    limit = vm + int(2.5 * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        np.empty(raw, np.uint8)  # the slide's level 0 as one array: what the old reader needed
        whole = True
    except MemoryError:
        whole = False
    (p,) = predict_slides(run, [slide], out, device="cpu", progress=False)
    a = anndata.read_h5ad(p)
    print(json.dumps({"limit": limit, "n_obs": a.n_obs, "finite": bool(np.isfinite(a.X).all()), "whole_fits": whole,
                      "peak_rss": int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024}))
""")


@pytest.mark.slow
def test_a_slide_larger_than_the_memory_limit_is_predicted(tmp_path):
    import _modelkit as kit

    run = kit.tiny_run()
    slide = _write(tmp_path / "big.tif")
    raw = H * W * 3
    env = dict(os.environ, MALLOC_ARENA_MAX="2", STIMAGE_NB_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", CHILD, str(run), str(slide), str(tmp_path / "pred"), str(raw)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert raw > res["limit"] and not res["whole_fits"]  # the slide cannot be held in this process
    side_pts = PATCH[2] * 0.5 / 150.0  # grid points (the tiny model's 150-µm tiles) across the tissue
    assert 0.5 * side_pts ** 2 < res["n_obs"] < 2 * side_pts ** 2 and res["finite"]
    assert res["peak_rss"] < 2.5 * 2**30
    assert not list((tmp_path / "cache").rglob("*.ome.zarr"))  # and no copy of the slide was made
