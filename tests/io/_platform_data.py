"""Other members of each platform layout, made in tmp_path from the REAL fixtures of the data bundle.

- :func:`visium_variant`: the Space Ranger 1.0 fixture with its positions rewritten as Space Ranger 2+
  (``tissue_positions.csv`` with a header) or 3+ (``tissue_positions.parquet``).
- :func:`hd_variant`: the Visium HD field case (8 µm bins) re-binned to 16 µm (2x2 bins summed) or split
  to 2 µm (each 8 µm bin's counts spread over its 4x4 sub-bins), with matching scale factors.
- :func:`xenium_outs`: a Xenium ``outs/`` (``experiment.xenium``, ``cells.parquet`` or ``cells.csv.gz``,
  ``cell_feature_matrix.h5`` with a negative-control probe) from the real Xenium fixture's cells and
  counts, their µm positions made from the H&E positions through an alignment matrix.
- :func:`write_10x_h5`: a 10x feature-barcode matrix (HDF5 v3 layout).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

XENIUM_PIXEL_SIZE = 0.2125  # µm/px of Xenium's morphology image
XENIUM_HE_UM = 2.125        # the fixture's H&E (the 0.2125 µm/px original downsampled 10x)


def write_10x_h5(path: Path, X, barcodes, names, ids=None, feature_types=None) -> Path:
    """A 10x HDF5 v3 feature-barcode matrix (``matrix/`` group, features by column of a CSC matrix)."""
    import h5py

    X = sp.csc_matrix(sp.csr_matrix(X).T)  # features x barcodes
    ids = list(ids) if ids is not None else [f"ENSG{i:011d}" for i in range(len(names))]
    ft = list(feature_types) if feature_types is not None else ["Gene Expression"] * len(names)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g.create_dataset("barcodes", data=np.array([str(b).encode() for b in barcodes]))
        g.create_dataset("data", data=X.data.astype(np.int32))
        g.create_dataset("indices", data=X.indices.astype(np.int64))
        g.create_dataset("indptr", data=X.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array(X.shape, dtype=np.int32))
        fg = g.create_group("features")
        fg.create_dataset("name", data=np.array([str(n).encode() for n in names]))
        fg.create_dataset("id", data=np.array([str(n).encode() for n in ids]))
        fg.create_dataset("feature_type", data=np.array([t.encode() for t in ft]))
        fg.create_dataset("genome", data=np.array([b"GRCh38"] * len(names)))
        fg.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
    return path


def _copy_tree_links(src: Path, dst: Path, skip=()) -> Path:
    """dst mirrors src with symlinks to its files (the bundle is read-only), minus ``skip`` names."""
    for p in src.rglob("*"):
        rel = p.relative_to(src)
        if p.name in skip:
            continue
        q = dst / rel
        if p.is_dir():
            q.mkdir(parents=True, exist_ok=True)
        else:
            q.parent.mkdir(parents=True, exist_ok=True)
            q.symlink_to(p.resolve())
    return dst


def visium_variant(data_dir: Path, tmp: Path, kind: str) -> Path:
    """The Visium fixture with its positions as ``csv_header`` (SR 2+) or ``parquet`` (SR 3+)."""
    src = data_dir / "fixtures" / "visium_1.0.0"
    out = _copy_tree_links(src, tmp / f"visium_{kind}", skip=("tissue_positions_list.csv",))
    pos = pd.read_csv(src / "spatial" / "tissue_positions_list.csv", header=None,
                      names=["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"])
    if kind == "csv_header":
        pos.to_csv(out / "spatial" / "tissue_positions.csv", index=False)
    elif kind == "parquet":
        pos.to_parquet(out / "spatial" / "tissue_positions.parquet", index=False)
    else:
        raise ValueError(kind)
    return out


def hd_field_case(data_dir: Path) -> Path:
    return data_dir / "field_cases" / "visium_hd_parquet" / "outs"


def hd_variant(data_dir: Path, tmp: Path, bin_um: int, seed: int = 0) -> Path:
    """The HD field case (8 µm) as ``outs/binned_outputs/square_{bin_um:03d}um`` (2 or 16 µm)."""
    import scanpy as sc

    src = hd_field_case(data_dir) / "binned_outputs" / "square_008um"
    a = sc.read_10x_h5(src / "filtered_feature_bc_matrix.h5")
    pos = pd.read_parquet(src / "spatial" / "tissue_positions.parquet").set_index("barcode").loc[a.obs_names]
    sf = json.loads((src / "spatial" / "scalefactors_json.json").read_text())
    X = np.asarray(a.X.todense(), dtype=np.int64)
    p8 = float(sf["spot_diameter_fullres"])  # 8 µm in full-res px
    if bin_um == 16:
        r2, c2 = (pos["array_row"] // 2).to_numpy(), (pos["array_col"] // 2).to_numpy()
        groups = {k: np.flatnonzero((r2 == k[0]) & (c2 == k[1])) for k in dict.fromkeys(zip(r2.tolist(), c2.tolist()))}
        rows, Xn, rec = [], [], []
        for (r, c), idx in groups.items():
            Xn.append(X[idx].sum(0))
            rows.append((r, c))
            rec.append((pos["pxl_row_in_fullres"].to_numpy()[idx].mean(), pos["pxl_col_in_fullres"].to_numpy()[idx].mean()))
        Xn = np.array(Xn)
        new = pd.DataFrame({"barcode": [f"s_016um_{r:05d}_{c:05d}-1" for r, c in rows], "in_tissue": 1,
                            "array_row": [r for r, _ in rows], "array_col": [c for _, c in rows],
                            "pxl_row_in_fullres": [y for y, _ in rec], "pxl_col_in_fullres": [x for _, x in rec]})
        new_sf = dict(sf, bin_size_um=16.0, spot_diameter_fullres=2 * p8)
    elif bin_um == 2:
        rng = np.random.default_rng(seed)
        rec, Xn = [], []
        ar, ac = pos["array_row"].to_numpy(int), pos["array_col"].to_numpy(int)
        py, px = pos["pxl_row_in_fullres"].to_numpy(float), pos["pxl_col_in_fullres"].to_numpy(float)
        for i in range(len(pos)):
            split = np.stack([rng.multinomial(n, np.full(16, 1 / 16)) for n in X[i]], axis=1)  # 16 sub-bins x genes
            for k in range(16):
                di, dj = k // 4, k % 4
                r, c = 4 * ar[i] + di, 4 * ac[i] + dj
                rec.append({"barcode": f"s_002um_{r:05d}_{c:05d}-1", "in_tissue": 1, "array_row": r, "array_col": c,
                            "pxl_row_in_fullres": py[i] + (di - 1.5) * p8 / 4,
                            "pxl_col_in_fullres": px[i] + (dj - 1.5) * p8 / 4})
                Xn.append(split[k])
        new, Xn = pd.DataFrame(rec), np.array(Xn)
        new_sf = dict(sf, bin_size_um=2.0, spot_diameter_fullres=p8 / 4)
    else:
        raise ValueError(bin_um)
    dst = tmp / f"hd_{bin_um}" / "outs" / "binned_outputs" / f"square_{bin_um:03d}um"
    (dst / "spatial").mkdir(parents=True)
    for png in ("tissue_hires_image.png", "tissue_lowres_image.png"):
        (dst / "spatial" / png).symlink_to((src / "spatial" / png).resolve())
    (dst / "spatial" / "scalefactors_json.json").write_text(json.dumps(new_sf))
    new.to_parquet(dst / "spatial" / "tissue_positions.parquet", index=False)
    write_10x_h5(dst / "filtered_feature_bc_matrix.h5", Xn, new["barcode"], list(a.var_names),
                 ids=list(a.var["gene_ids"]))
    return dst.parent.parent


def xenium_fixture(data_dir: Path) -> Path:
    return data_dir / "fixtures" / "xenium_lung"


def he_positions(data_dir: Path):
    """The fixture's cells: (ids, (n, 2) H&E x = column, y = row, counts, genes)."""
    import anndata as ad

    a = ad.read_h5ad(xenium_fixture(data_dir) / "NCBI858.h5ad")
    xy = a.obs[["y_pixel", "x_pixel"]].to_numpy(np.float64)  # x_pixel is the image ROW, y_pixel the COLUMN
    return list(a.obs_names), xy, np.asarray(a.X), list(a.var_names)


def alignment_matrix(theta_deg: float = 3.0, tx: float = 250.0, ty: float = -120.0) -> np.ndarray:
    """H&E px -> morphology px: scale 10 (2.125 / 0.2125 µm/px), a small rotation, a shift."""
    s = XENIUM_HE_UM / XENIUM_PIXEL_SIZE
    t = np.deg2rad(theta_deg)
    return np.array([[s * np.cos(t), -s * np.sin(t), tx], [s * np.sin(t), s * np.cos(t), ty], [0, 0, 1.0]])


def xenium_outs(data_dir: Path, tmp: Path, *, cells: str = "parquet", version: str = "xenium-1.9.0.11",
                A: np.ndarray | None = None, name: str = "xenium_outs") -> Path:
    """A Xenium outs/ of the fixture's real cells; positions in µm through alignment ``A`` (H&E -> morphology)."""
    ids, xy, X, genes = he_positions(data_dir)
    A = alignment_matrix() if A is None else A
    morph = (A @ np.c_[xy, np.ones(len(xy))].T).T[:, :2]
    um = morph * XENIUM_PIXEL_SIZE
    out = tmp / name
    out.mkdir(parents=True)
    (out / "experiment.xenium").write_text(json.dumps({
        "major_version": 1, "minor_version": 9, "run_name": "NCBI858 (test layout)", "region_name": "fixture",
        "panel_name": "human lung (fixture)", "pixel_size": XENIUM_PIXEL_SIZE, "analysis_sw_version": version}))
    rng = np.random.default_rng(1)
    area = rng.uniform(40, 160, len(ids))  # µm²
    table = pd.DataFrame({"cell_id": ids, "x_centroid": um[:, 0], "y_centroid": um[:, 1],
                          "transcript_counts": X.sum(1), "control_probe_counts": 0, "control_codeword_counts": 0,
                          "unassigned_codeword_counts": 0, "deprecated_codeword_counts": 0,
                          "total_counts": X.sum(1), "cell_area": area, "nucleus_area": area / 3})
    if cells == "parquet":
        table.to_parquet(out / "cells.parquet", index=False)
    elif cells == "csv.gz":
        table.to_csv(out / "cells.csv.gz", index=False)
    else:
        raise ValueError(cells)
    neg = rng.poisson(0.2, (len(ids), 1))
    write_10x_h5(out / "cell_feature_matrix.h5", np.c_[X, neg], ids, genes + ["NegControlProbe_00001"],
                 feature_types=["Gene Expression"] * len(genes) + ["Negative Control Probe"])
    return out


def copy_he(data_dir: Path, dst: Path) -> Path:
    shutil.copy(xenium_fixture(data_dir) / "NCBI858.jpg", dst)
    return dst
