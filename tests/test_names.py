"""Names that become identifiers elsewhere (stimage_nb.names): made safe, mapped back, on real names.

The her2st minor cell-type tier holds a real member of the kind ("CAFs MSC/iCAF-like"); the others are
the issue's examples (``NK/T cells``, ``HLA-DRB1/3``) and more members made here (a ``:`` that QuPath
splits on, ``%``, names of dots, Windows device names, leading blanks).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from _predictions import make_prediction

from stimage_nb import _keys as K
from stimage_nb.errors import StimageInputError
from stimage_nb.names import TARGETS, name_mapping, original_name, safe_name

TRICKY = ["NK/T cells", "HLA-DRB1/3", "T cells: CD8", "50% tumour", "%2F", "..", ".", "CON", "nul.txt", "a\\b",
          " leading", "trailing ", "__meta", "tab\there", "line\nbreak", "plain", "CAFs MSC/iCAF-like", "ß/µm"]


@pytest.mark.parametrize("target", TARGETS)
def test_round_trip_and_injective(target):
    safe = [safe_name(n, target) for n in TRICKY]
    assert [original_name(s) for s in safe] == TRICKY
    assert len(set(safe)) == len(TRICKY)
    assert safe_name("plain", target) == "plain" and safe_name("ERBB2", target) == "ERBB2"
    assert safe_name("B 50%", target) == "B 50%"  # a '%' alone needs no escape
    assert safe_name("50%2F", target) == "50%252F"  # ... but one that reads as an escape does


@pytest.mark.parametrize("target", TARGETS)
def test_round_trip_and_injective_on_random_names(target):
    """3,000 random names over an alphabet of the troublesome characters (fixed seed)."""
    rng = np.random.default_rng(7)
    alphabet = list("aB2F%/:. _\\\n") + ["µ", "ß"]
    names = {"".join(rng.choice(alphabet, size=int(rng.integers(1, 7)))) for _ in range(3000)}
    names = [n for n in names if n.strip() or target != "qupath_class"]
    safe = {n: safe_name(n, target) for n in names}
    assert all(original_name(v) == k for k, v in safe.items())
    assert len(set(safe.values())) == len(safe)
    refused = {"omero_column": "/", "zarr_key": "/\\", "h5_key": "/", "file_name": "/\\:", "qupath_class": ":\n"}
    assert all(not set(v) & set(refused[target]) for v in safe.values())


def test_each_target_refuses_what_its_system_refuses():
    assert safe_name("NK/T cells", "omero_column") == "NK%2FT cells"
    assert safe_name("P(NK/T cells)", "omero_column") == "P(NK%2FT cells)"
    assert safe_name("NK/T cells", "qupath_class") == "NK/T cells"       # QuPath takes '/' ...
    assert safe_name("T cells: CD8", "qupath_class") == "T cells%3A CD8"  # ... but splits classes on ':'
    assert safe_name(" x ", "qupath_class") == "%20x%20"                  # and strips blanks
    assert safe_name("T cells: CD8", "omero_column") == "T cells: CD8"
    assert safe_name("a/b:c", "file_name") == "a%2Fb%3Ac" and safe_name("CON", "file_name") == "%43ON"
    assert safe_name("..", "zarr_key") == "%2E." and safe_name("__x", "zarr_key") == "%5F_x"
    for target in TARGETS:
        for n in TRICKY:
            s = safe_name(n, target)
            if target != "qupath_class":
                assert "/" not in s
    with pytest.raises(StimageInputError, match="empty"):
        safe_name("", "omero_column")
    with pytest.raises(StimageInputError, match="duplicate"):
        name_mapping(["A", "A"], "omero_column")


def test_mapping_says_what_changes():
    m = name_mapping(["ERBB2", "HLA-DRB1/3"], "omero_column")
    assert m.renamed == {"HLA-DRB1/3": "HLA-DRB1%2F3"} and m["ERBB2"] == "ERBB2"
    assert "1 of 2 genes" in m.describe("genes") and "HLA-DRB1%2F3" in m.describe("genes")
    assert json.loads(m.to_json())["renamed"] == {"HLA-DRB1/3": "HLA-DRB1%2F3"}
    assert m.to_frame()["changed"].tolist() == [False, True]


@pytest.fixture(scope="module")
def slash_pred(her2st_manifest):
    """A prediction of real C3 with the minor-tier cell types (real '/' names) and a gene renamed HLA-DRB1/3."""
    from stimage_nb.io.readers import read_manifest

    p = make_prediction(her2st_manifest, "C3")
    (sec,) = read_manifest(her2st_manifest, ["C3"], genes=["ERBB2"], celltype_level="minor")
    minor = sec.adata.obsm[K.CELLTYPE_PROPORTIONS].loc[p.obs_names].astype(np.float32)
    assert "CAFs MSC/iCAF-like" in minor.columns  # a real name of the kind
    top = minor.idxmax(axis=1).value_counts().index  # rename the two commonest classes, so spots carry them
    minor = minor.rename(columns={top[0]: "NK/T cells", top[1]: "T cells: CD8"})
    p.obsm[K.CELLTYPE_MEAN] = minor
    p.obsm[K.CELLTYPE_STD] = (0.1 * minor).astype(np.float32)
    p.var_names = ["HLA-DRB1/3"] + list(p.var_names[1:])
    p.uns[K.UNS]["section"] = "C3/left"
    p.uns[K.UNS]["celltypes"] = list(minor.columns)
    return p


def test_h5ad_keeps_the_names_without_hdf5_path_separators(slash_pred, tmp_path):
    import anndata as ad

    from stimage_nb.io.prediction import read_prediction, write_h5ad

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # anndata warns that '/' in keys will be refused
        p = write_h5ad(slash_pred, tmp_path / "x.h5ad")
    raw = ad.read_h5ad(p)
    assert "NK%2FT cells" in raw.obsm[K.CELLTYPE_MEAN].columns  # on disk
    back = read_prediction(p)
    assert list(back.obsm[K.CELLTYPE_MEAN].columns) == list(slash_pred.obsm[K.CELLTYPE_MEAN].columns)
    assert list(back.var_names) == list(slash_pred.var_names) and "stimage_nb_h5_names" not in back.uns
    assert "NK/T cells" in list(slash_pred.obsm[K.CELLTYPE_MEAN].columns)  # the caller's object is untouched


def test_qupath_round_trip_keeps_class_names(slash_pred, tmp_path):
    from stimage_nb.qupath import export_qupath, import_qupath

    f = export_qupath(slash_pred, tmp_path / "c3.geojson")
    feats = json.loads(f.read_text())["features"]
    classes = {ft["properties"]["classification"]["name"] for ft in feats if "classification" in ft["properties"]}
    assert not any(":" in c for c in classes), classes  # QuPath would make derived classes of them
    sec = import_qupath(f, um_per_px=0.69)
    want = slash_pred.obsm[K.CELLTYPE_MEAN].idxmax(axis=1)
    assert (sec.adata.obs[K.CLASSIFICATION].to_numpy() == want.loc[sec.adata.obs_names].to_numpy()).all()
    assert {"T cells: CD8", "NK/T cells"} <= set(sec.adata.obs[K.CLASSIFICATION])
    assert "T cells%3A CD8" in classes
    assert list(sec.adata.obsm[K.CELLTYPE_MEAN].columns) == list(slash_pred.obsm[K.CELLTYPE_MEAN].columns)
    assert list(sec.adata.var_names) == list(slash_pred.var_names)


def test_file_names_and_zarr_keys(slash_pred, tmp_path, data_dir):
    from stimage_nb.export import export_predictions, prediction_files
    from stimage_nb.io.ome_zarr import add_label_array, read_labels
    from stimage_nb.io.prediction import write_h5ad

    pred_dir = tmp_path / "pred"
    write_h5ad(slash_pred, pred_dir / "C3%2Fleft.h5ad")
    assert prediction_files(pred_dir, sections=["C3/left"]) == [pred_dir / "C3%2Fleft.h5ad"]
    (gj,) = export_predictions(pred_dir, "qupath", tmp_path / "qp", progress=False)
    assert gj.parent == tmp_path / "qp" and gj.name == "C3%2Fleft.geojson"
    # zarr: a label image named by a cell type is one group, not nested groups, and reads back by its name
    store = tmp_path / "crop.ome.zarr"
    from PIL import Image

    from stimage_nb.io.ngff import write_ome_zarr

    rgb = np.asarray(Image.open(data_dir / "field_cases/region_all_tissue/roi_all_tissue.png").convert("RGB"))[:64, :64]
    write_ome_zarr(np.ascontiguousarray(rgb), store, 0.69, name="crop")
    lab = np.zeros((64, 64), np.int32)
    lab[10:20, 10:20] = 1
    add_label_array(store, "NK/T cells", lab, colors={1: (255, 0, 0)}, properties={1: {"class": "NK/T cells"}})
    assert (store / "labels" / "NK%2FT cells").is_dir() and not (store / "labels" / "NK").exists()
    labels = read_labels(store)
    assert "NK/T cells" in labels and labels["NK/T cells"].properties[1]["class"] == "NK/T cells"
