"""Benchmark of the OMERO push and pull paths against the Ice-loopback server double.

**Push** (objects per second through the batching layer): a prediction of the real her2st section C3
(its 180 spots, real counts as the mean, 50 genes) is tiled ``--copies`` times over a larger virtual
slide, and pushed with :func:`stimage_nb.omero.push_predictions` at several batch sizes. Every ROI is
built as an ``omero.model`` object, marshalled by Ice, sent over a real loopback TCP connection,
unmarshalled and stored by the double, and the ids are mapped back by name. The figure is therefore
the client-side cost plus Ice's (a real server adds its database work on top).

**Pull** (MB/s from a local OME-Zarr): the double serves the pixels of C3's OME-Zarr conversion
(9270 x 9936 RGB, read lazily from the zarr store) through its ``RawPixelsStore``, and
:func:`stimage_nb.omero.pull_image` pulls the whole slide into a new OME-Zarr pyramid: tile requests,
big-endian decode, zarr writes, the lower levels. MB/s counts the uncompressed level-0 bytes. The
decoders are also compared on the same tiles: omero-py's ``PixelsWrapper.getTiles`` (``struct``) and
ours (``numpy.frombuffer``).

Usage::

    python benchmarks/bench_omero.py                  # ~1-2 min on 2 cores
    python benchmarks/bench_omero.py --copies 100 --out bench_out/omero.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "omero"), str(ROOT / "tests")]


class ZarrHWC:
    """A (3, H, W) zarr level seen as the (H, W, 3) array the server double serves."""

    def __init__(self, arr):
        self.arr = arr
        self.shape = (arr.shape[1], arr.shape[2], arr.shape[0])
        self.ndim = 3
        self.dtype = arr.dtype

    def __getitem__(self, key):
        ys, xs = key[0], key[1]
        c = key[2] if len(key) > 2 else slice(None)
        block = np.asarray(self.arr[c, ys, xs])
        return block if block.ndim == 2 else np.transpose(block, (1, 2, 0))


def _prediction(copies: int):
    """C3's real prediction tiled ``copies`` times side by side (unique spot ids, shifted centres)."""
    import anndata as ad
    import pandas as pd
    from _predictions import make_prediction

    from stimage_nb import _keys as K
    from stimage_nb._settings import data_dir, her2st_manifest
    from stimage_nb.io.readers import read_gene_list

    genes = read_gene_list(data_dir() / "her2st" / "genes_stimage_her2st.txt")[:50]
    base = make_prediction(her2st_manifest(), "C3", genes=genes)
    W, H = 9270, 9936
    side = int(np.ceil(np.sqrt(copies)))
    parts = []
    for k in range(copies):
        p = base.copy()
        dx, dy = (k % side) * W, (k // side) * H
        p.obs_names = [f"{n}_{k}" for n in base.obs_names]
        p.obsm[K.SPATIAL] = np.asarray(base.obsm[K.SPATIAL]) + [dx, dy]
        p.obs[K.PIXEL_X] = p.obsm[K.SPATIAL][:, 0]
        p.obs[K.PIXEL_Y] = p.obsm[K.SPATIAL][:, 1]
        parts.append(p)
    big = ad.concat(parts, merge="first", uns_merge="first")
    for key in (K.CELLTYPE_MEAN, K.CELLTYPE_STD):
        big.obsm[key] = pd.concat([p.obsm[key].set_axis(p.obs_names) for p in parts])
    big.uns[K.UNS] = dict(base.uns[K.UNS])
    return big, (side * W, side * H)


def bench_push(copies: int, batches: list[int]) -> list[dict]:
    from conftest import lazy_image
    from fake_omero import FakeOmeroServer

    from stimage_nb.omero.connection import OmeroSession, OmeroTarget
    from stimage_nb.omero.push import push_predictions

    pred, (W, H) = _prediction(copies)
    rows = []
    for batch in batches:
        for full in (False, True):
            srv = FakeOmeroServer()
            try:
                iid = srv.add_image(None, um_per_px=0.69, levels=[lazy_image(W, H)])
                sess = OmeroSession(OmeroTarget("bench"), srv.gateway(), factory=srv.gateway)
                t0 = time.perf_counter()
                res = push_predictions(sess, iid, pred, batch_size=batch, tables=full, attach_h5ad=full,
                                       attach_geojson=full, max_rois=10 ** 7, progress=False)
                dt = time.perf_counter() - t0
                assert len(srv.rois) == pred.n_obs == res.rois_written
                rows.append({"observations": pred.n_obs, "batch": batch, "what": "ROIs+tables+files" if full else "ROIs",
                             "seconds": round(dt, 2), "objects_per_s": round(pred.n_obs / dt, 1),
                             "save_calls": sum(1 for c in srv.calls if c[1] == "saveAndReturnIds"),
                             "tables": len(srv.tables)})
                print(rows[-1], flush=True)
                sess.close()
            finally:
                srv.close()
    return rows


def bench_pull(tmp: Path) -> dict:
    import zarr
    from fake_omero import FakeOmeroServer

    from stimage_nb._settings import data_dir
    from stimage_nb.io.image import open_image
    from stimage_nb.omero import pull as P
    from stimage_nb.omero.connection import OmeroSession, OmeroTarget

    src = open_image(data_dir() / "her2st" / "images" / "C3.jpg", um_per_px=0.69)
    g = zarr.open_group(str(src.path), mode="r")
    levels = [ZarrHWC(g[d]) for d in src.datasets]
    srv = FakeOmeroServer()
    try:
        iid = srv.add_image(None, name="C3.jpg", um_per_px=0.69, levels=levels, tile=(512, 512))
        sess = OmeroSession(OmeroTarget("bench"), srv.gateway(), factory=srv.gateway)
        t0 = time.perf_counter()
        img = P.pull_image(sess, iid, dest=tmp / "C3-pulled.ome.zarr", progress=False)
        dt = time.perf_counter() - t0
        raw = img.width * img.height * 3
        check = np.array_equal(img.read_region(4000, 4000, 512, 512), src.read_region(4000, 4000, 512, 512))
        tiles = sum(1 for c in srv.calls if c[1] == "getTile")
        out = {"image": f"{img.width}x{img.height} RGB", "levels": img.n_levels, "MB": round(raw / 1e6, 1),
               "seconds": round(dt, 2), "MB_per_s": round(raw / 1e6 / dt, 1), "getTile_calls": tiles,
               "identical_pixels": bool(check)}
        # decoders on the same 48 tiles of 512 x 512: omero-py's struct path and ours
        info = P.image_info(sess, iid)
        px = sess.gateway.getObject("Image", iid).getPrimaryPixels()
        spots = [(0, c, 0, (x, 2048, 512, 512)) for c in range(3) for x in range(0, 512 * 16, 512)]
        t0 = time.perf_counter()
        a = list(px.getTiles(spots))
        t_omero = time.perf_counter() - t0
        t0 = time.perf_counter()
        store = P._open_store(sess, info)
        b = [P.read_block(store, [c], x, y, w, h, info.pixels_type)[:, :, 0] for _, c, _, (x, y, w, h) in spots]
        store.close()
        t_ours = time.perf_counter() - t0
        assert all(np.array_equal(u, v) for u, v in zip(a, b))
        mb = len(spots) * 512 * 512 / 1e6
        out.update({"decode_tiles": len(spots), "omero_py_getTiles_MB_per_s": round(mb / t_omero, 1),
                    "read_block_MB_per_s": round(mb / t_ours, 1)})
        print(out, flush=True)
        sess.close()
        return out
    finally:
        srv.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=56, help="copies of C3's 180 spots (56 -> 10,080 ROIs)")
    ap.add_argument("--batches", default="100,500,2000", help="ROI batch sizes to compare")
    ap.add_argument("--no-pull", action="store_true")
    ap.add_argument("--no-push", action="store_true")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    res = {} if a.no_push else {"push": bench_push(a.copies, [int(b) for b in a.batches.split(",")])}
    if not a.no_pull:
        with tempfile.TemporaryDirectory() as tmp:
            res["pull"] = bench_pull(Path(tmp))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
