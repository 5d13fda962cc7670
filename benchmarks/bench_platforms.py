"""How fast a full-size Visium HD slide is read and aggregated, as a ratio to reading its two files.

The bundle's Visium HD field case is a 576-bin crop; a real capture area (6.5 mm square) has ~700,000
8 µm bins (~11 million 2 µm bins). This benchmark writes a layout of that size in the documented 10x
format (a square grid of 8 µm bins, ``tissue_positions.parquet``, a 10x HDF5 v3 matrix of sparse
random counts: the files' sizes and structure are what matters for speed, not their biology) into a
temporary folder, then measures in one run:

- the ceiling: ``scanpy.read_10x_h5`` + ``pandas.read_parquet`` of the two files (what any reader must do);
- ``stimage_nb.io.read_visium_hd`` end to end (join, in-tissue filter, Section/AnnData assembly, checks);
- ``aggregate_pseudospots`` to 100 µm, against its ceiling (the KD-tree query that assigns the bins);
- peak memory.

    python benchmarks/bench_platforms.py                 # 840 x 840 bins (705,600), 200 genes
    python benchmarks/bench_platforms.py --side 300 --genes 50   # a quick run
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "io"))


def make_layout(root: Path, side: int, genes: int, density: float, seed: int = 0) -> Path:
    from _platform_data import write_10x_h5  # the test suite's writer of the 10x HDF5 v3 layout
    from PIL import Image

    rng = np.random.default_rng(seed)
    d = root / "outs" / "binned_outputs" / "square_008um"
    (d / "spatial").mkdir(parents=True)
    r, c = np.divmod(np.arange(side * side), side)
    um_px = 0.2738
    p8 = 8.0 / um_px
    pos = pd.DataFrame({"barcode": [f"s_008um_{a:05d}_{b:05d}-1" for a, b in zip(r, c)], "in_tissue": 1,
                        "array_row": r, "array_col": c, "pxl_row_in_fullres": 100 + r * p8,
                        "pxl_col_in_fullres": 100 + c * p8})
    pos.to_parquet(d / "spatial" / "tissue_positions.parquet", index=False)
    X = sp.random(len(pos), genes, density=density, format="csr", random_state=seed,
                  data_rvs=lambda k: rng.integers(1, 5, k))
    write_10x_h5(d / "filtered_feature_bc_matrix.h5", X, pos["barcode"], [f"GENE{i}" for i in range(genes)])
    full = int(200 + side * p8)
    (d / "spatial" / "scalefactors_json.json").write_text(json.dumps({
        "spot_diameter_fullres": p8, "bin_size_um": 8.0, "microns_per_pixel": um_px,
        "tissue_hires_scalef": 2000 / full, "tissue_lowres_scalef": 600 / full}))
    Image.fromarray(rng.integers(90, 250, (600, 600, 3)).astype(np.uint8)).save(d / "spatial" / "tissue_lowres_image.png")
    return root / "outs"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", type=int, default=840, help="bins per side (840: a full 6.7 mm capture area)")
    ap.add_argument("--genes", type=int, default=200)
    ap.add_argument("--density", type=float, default=0.05, help="fraction of non-zero counts")
    ap.add_argument("--pseudospot-um", type=float, default=100.0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    import scanpy as sc
    from scipy.spatial import cKDTree

    from stimage_nb.io import aggregate_pseudospots, read_visium_hd
    from stimage_nb.io.pseudospots import lattice_sites

    with tempfile.TemporaryDirectory(prefix="bench_platforms_") as tmp:
        outs = make_layout(Path(tmp), a.side, a.genes, a.density)
        d = outs / "binned_outputs" / "square_008um"
        t0 = time.perf_counter()
        sc.read_10x_h5(d / "filtered_feature_bc_matrix.h5")
        pd.read_parquet(d / "spatial" / "tissue_positions.parquet")
        t1 = time.perf_counter()
        s = read_visium_hd(outs)
        t2 = time.perf_counter()
        um = s.um_per_px
        xy = s.xy
        lo = xy.min(0)
        sites, _, _ = lattice_sites(lo, xy.max(0) - lo, a.pseudospot_um / um, "hex")
        cKDTree(sites).query(xy)
        t3 = time.perf_counter()
        p = aggregate_pseudospots(s, a.pseudospot_um)
        t4 = time.perf_counter()
    n = s.adata.n_obs
    res = {"bins": n, "genes": a.genes, "nnz": int(s.adata.X.nnz),
           "read_ceiling_s": t1 - t0, "read_visium_hd_s": t2 - t1, "read_ratio": (t1 - t0) / (t2 - t1),
           "read_bins_per_s": n / (t2 - t1),
           "pseudospots": int(p.adata.n_obs), "aggregate_ceiling_s": t3 - t2, "aggregate_s": t4 - t3,
           "aggregate_ratio": (t3 - t2) / (t4 - t3),
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    print(f"Visium HD, {n:,} bins x {a.genes} genes ({res['nnz']:,} non-zero):")
    print(f"  read:      ceiling (scanpy h5 + parquet) {res['read_ceiling_s']:.1f} s | read_visium_hd "
          f"{res['read_visium_hd_s']:.1f} s ({res['read_bins_per_s']:,.0f} bins/s) | ratio {res['read_ratio']:.2f}")
    print(f"  aggregate: ceiling (KD-tree assignment) {res['aggregate_ceiling_s']:.2f} s | aggregate_pseudospots "
          f"{res['aggregate_s']:.2f} s -> {res['pseudospots']:,} pseudo-spots of {a.pseudospot_um:g} µm | "
          f"ratio {res['aggregate_ratio']:.2f}")
    print(f"  peak memory {res['peak_rss_gb']:.2f} GB")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
