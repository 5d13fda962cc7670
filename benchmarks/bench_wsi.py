"""A whole slide at its real size: lazy reading against an OME-Zarr copy, wall time, tiles/s and peak memory.

1. Writes, tile by tile (a generator of 512-px JPEG tiles handed to tifffile; never the slide in memory), a
   pyramidal JPEG TIFF of about 100,000 x 80,000 px at 0.25 µm/px (a 40x scan): a 4 x 3 mosaic of the
   bundle's six her2st H&E sections, each resampled from 0.69 to the level's µm/px, levels 1, 2, 4, ... 128.
2. Trains the default model (``TrainConfig()``: the offline default, 5 members) on C2-C5, unless ``--model``.
3. Runs ``stimage-nb predict --image SLIDE`` (the default batch size) in a subprocess: wall time, tiles/s
   (grid points predicted / wall time) and peak resident memory (the child's ``VmHWM``).
4. Copies the slide into an OME-Zarr (:func:`stimage_nb.io.convert.convert_to_ome_zarr`, streamed; timed) and
   runs the same command on the copy: the ceiling the lazy reader is measured against (target: >= 0.8 of its
   tiles/s) — the copy keeps the slide's own levels, so both runs read the same tiles and must give the same
   predictions (checked).
5. Model-only: the ensemble's ``predict_tiles`` on tiles already in memory; reading-only: ``extract_tiles`` of
   the same grid points from the slide and from the copy (where the time goes; the reading ratio).

    python benchmarks/bench_wsi.py --work /tmp/wsi_bench                 # ~100k x 80k px (1.1 GB TIFF, ~8 GB copy)
    python benchmarks/bench_wsi.py --work /tmp/wsi_bench --cols 2 --rows 1   # a smaller slide, same code

The slide, the model and the copy stay in ``--work`` for re-runs (``--clean`` removes the copy afterwards).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
SOURCE_UM = 0.69
SECTIONS = ("C2", "C3", "C4", "C5", "C6", "B4")


# ---------------------------------------------------------------------- the slide
def _sources():
    from PIL import Image

    from stimage_nb._settings import data_dir

    Image.MAX_IMAGE_PIXELS = None
    out = []
    for s in SECTIONS:
        im = Image.open(data_dir() / "her2st" / "images" / f"{s}.jpg")
        im.load()
        out.append(im.convert("RGB"))
    return out


def write_mosaic(path: Path, *, cols: int, rows: int, um_per_px: float, tile: int = 512, quality: int = 80,
                 min_size: int = 1024) -> dict:
    """Write the mosaic slide tile by tile; returns its geometry."""
    import tifffile
    from PIL import Image

    srcs = _sources()
    cw = int(max(s.size[0] for s in srcs) * SOURCE_UM / um_per_px)  # a mosaic cell at level 0
    ch = int(max(s.size[1] for s in srcs) * SOURCE_UM / um_per_px)
    W, H = cw * cols, ch * rows
    factors = [1]
    while max(W, H) // factors[-1] > min_size:
        factors.append(factors[-1] * 2)
    white = np.full((tile, tile, 3), 245, np.uint8)

    def tiles(f):
        """Tiles of level ``f``: each mosaic cell's section resampled (box filter down, bilinear up)."""
        h, w = H // f, W // f
        s = SOURCE_UM / (um_per_px * f)  # level pixels per source pixel
        for y0 in range(0, h, tile):
            for x0 in range(0, w, tile):
                out = None
                y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
                for r in range(rows):
                    for c in range(cols):
                        src = srcs[(r * cols + c) % len(srcs)]
                        cx0, cy0 = c * cw / f, r * ch / f  # the cell's origin in level pixels
                        sx, sy = src.size[0] * s, src.size[1] * s  # the section's extent in level pixels
                        ix0, iy0 = max(x0, cx0), max(y0, cy0)
                        ix1, iy1 = min(x1, cx0 + sx), min(y1, cy0 + sy)
                        if ix1 - ix0 < 1 or iy1 - iy0 < 1:
                            continue
                        a0, b0, a1, b1 = int(ix0), int(iy0), int(np.ceil(ix1)), int(np.ceil(iy1))
                        box = (max(0.0, (a0 - cx0) / s), max(0.0, (b0 - cy0) / s),
                               min(src.size[0], (a1 - cx0) / s), min(src.size[1], (b1 - cy0) / s))
                        part = np.asarray(src.resize((a1 - a0, b1 - b0), Image.Resampling.BILINEAR if s > 1
                                                     else Image.Resampling.BOX, box=box))
                        if out is None:
                            out = white.copy()
                        out[b0 - y0:b1 - y0, a0 - x0:a1 - x0] = part[:tile - (b0 - y0), :tile - (a0 - x0)]
                yield white if out is None else out

    t0 = time.perf_counter()
    with tifffile.TiffWriter(str(path), bigtiff=True) as tw:
        for i, f in enumerate(factors):
            tw.write(tiles(f), shape=(H // f, W // f, 3), dtype=np.uint8, tile=(tile, tile), compression="jpeg",
                     compressionargs={"level": quality}, photometric="rgb", subfiletype=1 if i else 0,
                     resolution=(1e4 / (um_per_px * f), 1e4 / (um_per_px * f)), resolutionunit="CENTIMETER")
            logging.info("level %d (1/%d) written, %.0f s", i, f, time.perf_counter() - t0)
    geo = {"width": W, "height": H, "um_per_px": um_per_px, "levels": len(factors), "tile": tile, "quality": quality,
           "bytes": path.stat().st_size, "raw_rgb_bytes": W * H * 3, "write_s": round(time.perf_counter() - t0, 1)}
    path.with_suffix(".json").write_text(json.dumps(geo))
    return geo


# ---------------------------------------------------------------------- model and runs
def default_model(work: Path) -> Path:
    from stimage_nb._settings import her2st_manifest
    from stimage_nb.io.readers import read_gene_list
    from stimage_nb.train import TrainConfig, train

    run = work / "model"
    if not (run / "ensemble.json").is_file():
        genes = read_gene_list(her2st_manifest().parent / "genes_stimage_her2st.txt")
        train(her2st_manifest(), genes=genes, out=run, sections=["C2", "C3", "C4", "C5"], val_sections=["C5"],
              config=TrainConfig(), progress=False, drop_missing_genes=True)
    return run


def predict_run(model: Path, image: Path, out: Path, env: dict) -> dict:
    """``stimage-nb predict --image`` in a child process: wall time and the child's peak RSS."""
    import anndata as ad

    args = ["predict", "--model", str(model), "--image", str(image), "--out", str(out), "--device", "cpu"]
    # VmHWM: the peak resident set of this process image (ru_maxrss would include the parent's at fork)
    wrapper = ("import re, sys\nfrom stimage_nb.cli import main\ntry:\n    rc = main(sys.argv[1:])\nfinally:\n"
               "    print('MAXRSS_KB', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1), "
               "file=sys.stderr)\nsys.exit(rc)")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", wrapper, *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"predict failed on {image}:\n{r.stderr[-3000:]}")
    peak_kb = int(next(ln.split()[1] for ln in r.stderr.splitlines() if ln.startswith("MAXRSS_KB")))
    h5 = Path(r.stdout.strip().splitlines()[-1].split()[0])
    a = ad.read_h5ad(h5)
    return {"image": str(image), "wall_s": round(wall, 1), "tiles": int(a.n_obs),
            "tiles_per_s": round(a.n_obs / wall, 1), "peak_rss_gb": round(peak_kb / 2**20, 2), "h5ad": str(h5)}


def read_only(images: dict, tile_um: float, out_px: int, n: int = 4096, chunk: int = 2048) -> dict:
    """Tiles/s of reading and resampling alone (:func:`stimage_nb.tiles.extract_tiles`, in the prediction's
    chunks of reading order) at the same grid points of each image."""
    from stimage_nb.io.image import open_image
    from stimage_nb.io.tissue import grid_points
    from stimage_nb.tiles import extract_tiles

    out, xy = {}, None
    for name, path in images.items():
        with open_image(path) as img:
            if xy is None:
                xy = grid_points(img, tile_um)
                xy = xy[:n]
            t0 = time.perf_counter()
            for i in range(0, len(xy), chunk):
                extract_tiles(img, xy[i:i + chunk], tile_um, out_px, cache=False)
            out[name] = round(len(xy) / (time.perf_counter() - t0), 1)
    out["tiles"] = int(len(xy))
    return out


def model_only(model: Path, slide: Path, n: int = 1024) -> float:
    """Tiles/s of ``Ensemble.predict_tiles`` on real tiles of the slide already in memory."""
    from stimage_nb.ensemble import Ensemble
    from stimage_nb.io.image import open_image
    from stimage_nb.io.tissue import grid_points
    from stimage_nb.tiles import extract_tiles

    ens = Ensemble.load(model, device="cpu")
    with open_image(slide) as img:
        xy = grid_points(img, ens.tile_um)
        tiles = extract_tiles(img, xy[np.linspace(0, len(xy) - 1, min(n, len(xy))).astype(int)], ens.tile_um,
                              ens.out_px, cache=False)
    src = ens.stain_source(tiles)
    ens.predict_tiles(tiles[:64], stain_source=src)  # warm-up
    t0 = time.perf_counter()
    ens.predict_tiles(tiles, stain_source=src)
    return len(tiles) / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="folder for the slide, the model, the copy, predictions")
    p.add_argument("--cols", type=int, default=4)
    p.add_argument("--rows", type=int, default=3)
    p.add_argument("--um-per-px", type=float, default=0.25)
    p.add_argument("--model", type=Path, default=None, help="a trained run (default: train the default model)")
    p.add_argument("--clean", action="store_true", help="remove the OME-Zarr copy at the end")
    p.add_argument("--reading-only", action="store_true",
                   help="only the reading comparison (and model-only), on the slide and copy of an earlier run")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               STIMAGE_NB_CACHE=str(work / "cache"))
    os.environ["STIMAGE_NB_CACHE"] = env["STIMAGE_NB_CACHE"]
    res: dict = {"load_before": os.getloadavg(), "cpus": os.cpu_count()}

    slide = work / f"mosaic_{a.cols}x{a.rows}_{a.um_per_px}.tif"
    if not slide.with_suffix(".json").is_file():
        res["slide"] = write_mosaic(slide, cols=a.cols, rows=a.rows, um_per_px=a.um_per_px)
    else:
        res["slide"] = json.loads(slide.with_suffix(".json").read_text())
    logging.info("slide: %s", res["slide"])
    model = a.model or default_model(work)
    store = work / "copy.ome.zarr"
    if a.reading_only:
        from stimage_nb.ensemble import Ensemble

        ens = Ensemble.load(model, device="cpu")
        res["read_only_tiles_per_s"] = read_only({"lazy": slide, "ome_zarr": store}, ens.tile_um, ens.out_px)
        res["read_only_ratio"] = round(res["read_only_tiles_per_s"]["lazy"] / res["read_only_tiles_per_s"]["ome_zarr"],
                                       3)
        res["model_only_tiles_per_s"] = round(model_only(model, slide), 1)
        res["load_after"] = os.getloadavg()
        print(json.dumps(res, indent=1))
        return res

    res["lazy"] = predict_run(model, slide, work / "pred_lazy", env)
    logging.info("lazy: %s", res["lazy"])

    from stimage_nb.io.convert import convert_to_ome_zarr

    reused = (store / "source.json").is_file()
    t0 = time.perf_counter()
    convert_to_ome_zarr(slide, store, progress=False)
    conv = time.perf_counter() - t0
    du = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    res["convert"] = {"reused": True, "bytes": du} if reused else {
        "seconds": round(conv, 1), "mpx_per_s": round(res["slide"]["width"] * res["slide"]["height"] / 1e6 / conv, 1),
        "bytes": du}
    logging.info("copy: %s", res["convert"])
    res["ome_zarr"] = predict_run(model, store, work / "pred_zarr", env)
    logging.info("ome-zarr: %s", res["ome_zarr"])

    import anndata as ad

    x, y = ad.read_h5ad(res["lazy"]["h5ad"]), ad.read_h5ad(res["ome_zarr"]["h5ad"])
    res["same_predictions"] = bool(x.n_obs == y.n_obs and np.array_equal(x.X, y.X))
    res["ratio_lazy_to_ome_zarr"] = round(res["lazy"]["tiles_per_s"] / res["ome_zarr"]["tiles_per_s"], 3)
    res["model_only_tiles_per_s"] = round(model_only(model, slide), 1)
    from stimage_nb.ensemble import Ensemble

    ens = Ensemble.load(model, device="cpu")
    res["read_only_tiles_per_s"] = read_only({"lazy": slide, "ome_zarr": store}, ens.tile_um, ens.out_px)
    res["read_only_ratio"] = round(res["read_only_tiles_per_s"]["lazy"] / res["read_only_tiles_per_s"]["ome_zarr"], 3)
    res["load_after"] = os.getloadavg()
    if a.clean:
        import shutil

        shutil.rmtree(store, ignore_errors=True)
    print(json.dumps(res, indent=1))
    print(f"\nslide {res['slide']['width']} x {res['slide']['height']} px at {a.um_per_px} µm/px "
          f"({res['slide']['raw_rgb_bytes'] / 2**30:.1f} GB raw, {res['slide']['bytes'] / 2**30:.2f} GB JPEG TIFF)")
    for k in ("lazy", "ome_zarr"):
        r = res[k]
        print(f"  {k:<9} {r['tiles']} tiles  {r['wall_s']:>7.1f} s  {r['tiles_per_s']:>6.1f} tiles/s  "
              f"peak RSS {r['peak_rss_gb']} GB")
    print(f"  lazy / OME-Zarr throughput: {res['ratio_lazy_to_ome_zarr']:.2f} (target >= 0.8); same predictions: "
          f"{res['same_predictions']}; model only: {res['model_only_tiles_per_s']} tiles/s; "
          f"copy: {res['convert'].get('seconds', 'reused')} s, {res['convert']['bytes'] / 2**30:.1f} GB; "
          f"reading alone: {res['read_only_tiles_per_s']} tiles/s (ratio {res['read_only_ratio']}); "
          f"load {res['load_before']} -> {res['load_after']}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
