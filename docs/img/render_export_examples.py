"""Render the PNG examples of docs/qupath_ome_zarr.md from real exports of her2st section C3.

Run from the repository root:  .venv/bin/python docs/img/render_export_examples.py

The prediction is the test stand-in (tests/_predictions.py: observed counts as the mean, real
stereoscope proportions as cell-type probabilities), exported with the package's own writers and
read back with the package's readers (QuPath GeoJSON) and ome-zarr-py's Reader (OME-Zarr). The
pictures are drawn with matplotlib from those files; they are not QuPath or napari screenshots.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from _predictions import make_prediction  # noqa: E402

from stimage_nb._settings import her2st_manifest  # noqa: E402
from stimage_nb.io.image import SlideImage  # noqa: E402
from stimage_nb.io.ome_zarr import read_heatmaps, read_labels, write_prediction_ome_zarr  # noqa: E402
from stimage_nb.qupath import export_qupath  # noqa: E402

OUT = Path(__file__).resolve().parent
GENE = "FASN"


def _save(fig, name):
    p = OUT / name
    fig.savefig(p, dpi=80)
    plt.close(fig)
    im = Image.open(p).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    im.save(p, optimize=True)
    print(p, p.stat().st_size // 1024, "KB")


def main() -> None:
    pred = make_prediction(her2st_manifest(), "C3")
    tmp = Path(tempfile.mkdtemp())
    store = write_prediction_ome_zarr(pred, tmp / "C3.ome.zarr", base_level=3, genes=[GENE], progress=False)
    geo = export_qupath(pred, tmp / "C3.geojson", genes=[GENE])
    img = SlideImage(store)
    ds = 2 ** 3  # store level 0 = source level 3
    xy = pred.obsm["spatial"] / ds
    x0, y0 = (xy.min(0) - 40).astype(int)
    x1, y1 = (xy.max(0) + 40).astype(int)
    rgb = img.read_region(0, 0, img.width, img.height)
    extent = dict(xlim=(x0, x1), ylim=(y1, y0))

    # 1. QuPath export: classification colours and a measurement map, drawn from the GeoJSON itself
    feats = json.loads(geo.read_text())["features"]
    polys = [np.asarray(f["geometry"]["coordinates"][0]) / ds for f in feats]
    cls = [f["properties"]["classification"] for f in feats]
    vals = np.array([next(m["value"] for m in f["properties"]["measurements"] if m["name"] == f"{GENE}: mean")
                     for f in feats])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax in axes:
        ax.imshow(rgb)
        ax.set(**extent)
        ax.set_axis_off()
    axes[0].add_collection(PolyCollection(polys, facecolors=[np.array(c["color"]) / 255 for c in cls],
                                          edgecolors="k", linewidths=0.3, alpha=0.85))
    names = sorted({c["name"] for c in cls})
    col = {c["name"]: np.array(c["color"]) / 255 for c in cls}
    axes[0].legend(handles=[Patch(color=col[n], label=n) for n in names], loc="lower left", fontsize=7)
    axes[0].set_title("classification (predicted cell type, colour in file)", fontsize=9)
    pc = PolyCollection(polys, array=vals, cmap="viridis", edgecolors="none")
    axes[1].add_collection(pc)
    fig.colorbar(pc, ax=axes[1], fraction=0.04, label=f'"{GENE}: mean" (expected counts)')
    axes[1].set_title(f'measurement map of "{GENE}: mean"', fontsize=9)
    fig.suptitle("C3.geojson (QuPath export, ellipse detections) over the H&E", fontsize=10)
    fig.tight_layout()
    _save(fig, "qupath_export_C3.png")

    # 2. OME-Zarr labels read back with ome-zarr-py's Reader: colours and properties from the metadata
    labels = read_labels(store)
    ct = labels["cell_types"]
    lab = np.asarray(ct.levels[0])
    lut = np.zeros((max(ct.colors) + 1, 4))
    for v, c in ct.colors.items():
        lut[v] = np.array(c) / 255
    fig, ax = plt.subplots(figsize=(6.2, 5.0))
    ax.imshow(rgb)
    ax.imshow(lut[lab] * [1, 1, 1, 0.75])
    ax.set(**extent)
    handles = [Patch(color=lut[v][:3], label=f'{v}: {p["class"]} (n={p["n_observations"]})')
               for v, p in sorted(ct.properties.items()) if p["n_observations"]]
    ax.legend(handles=handles, loc="lower left", fontsize=7, title="labels/cell_types", title_fontsize=7)
    ax.set_axis_off()
    ax.set_title("C3.ome.zarr: labels/cell_types (colors + properties per label value)", fontsize=9)
    fig.tight_layout()
    _save(fig, "ome_zarr_labels_C3.png")

    # 3. Heatmaps with their documented colour scale (linear black -> channel colour over the window)
    h = read_heatmaps(store)
    level_ds = 2 ** h.attrs["stimage_nb"]["image_level"]
    small = rgb[::level_ds, ::level_ds]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.9))
    for ax, q in zip(axes, ("mean", "aleatoric SD", "epistemic SD")):
        name = f"{GENE} {q}"
        i = h.channels.index(name)
        (start, end), hexc = h.windows[i], h.colours[i]
        cmap = LinearSegmentedColormap.from_list(hexc, ["#000000", "#" + hexc])
        data = h.channel(name)
        ax.imshow(small[: data.shape[0], : data.shape[1]], alpha=0.5)
        im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=start, vmax=end)
        fig.colorbar(im, ax=ax, fraction=0.04, label=f"window {start:g}–{end:.3g}")
        ax.set(xlim=(x0 / level_ds, x1 / level_ds), ylim=(y1 / level_ds, y0 / level_ds))
        ax.set_title(f"heatmaps: {name}  (#{hexc})", fontsize=9)
        ax.set_axis_off()
    fig.suptitle("C3.ome.zarr/heatmaps: NaN (transparent) outside spots; colour scale from the omero block",
                 fontsize=10)
    fig.tight_layout()
    _save(fig, "ome_zarr_heatmaps_C3.png")


if __name__ == "__main__":
    main()
