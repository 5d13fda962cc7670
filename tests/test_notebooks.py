"""The curated notebooks are code: each is executed here in its "smoke" setting (papermill) on the
real bundled data, and must be committed without outputs.

Every notebook in notebooks/ is picked up automatically; a new notebook only needs a first cell
tagged ``parameters`` that sets ``MODE = "smoke"`` by default, ``OUT`` for its outputs and a
``"full"`` setting for real runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS][:2] == ["01_train_and_predict.ipynb", "02_omero_round_trip.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_without_outputs(path):
    nb = _read(path)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} hold outputs or execution counts; clear them before committing "
                       "(JupyterLab: Edit > Clear Outputs of All Cells, or `jupyter nbconvert --clear-output --inplace`)")
    assert "widgets" not in nb.metadata, f"{path.name}: saved widget state in the metadata; clear it"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_first_cell_holds_the_parameters(path):
    nb = _read(path)
    first = nb.cells[0]
    assert first.cell_type == "code" and "parameters" in first.metadata.get("tags", []), \
        f"{path.name}: the first cell must be a code cell tagged 'parameters' (papermill)"
    src = first.source
    assert re.search(r'^MODE\s*=\s*"smoke"', src, re.M), f"{path.name}: MODE must default to \"smoke\""
    assert '"full"' in src and re.search(r"^OUT\s*=", src, re.M), f"{path.name}: document the full setting and OUT"
    assert not re.search(r"(?i)password\s*=\s*['\"][^'\"]+['\"]", "\n".join(c.source for c in nb.cells)), \
        f"{path.name}: a password is written in the notebook"
    kinds = [c.cell_type for c in nb.cells]
    assert kinds.count("markdown") >= 5, f"{path.name}: a guided walk needs prose"
    assert any("summary" in c.source.lower() for c in nb.cells if c.cell_type == "markdown"), \
        f"{path.name}: end with a summary of what was learned"


def _execute(path: Path, out_dir: Path, **params) -> "nbformat.NotebookNode":
    papermill = pytest.importorskip("papermill")
    out_nb = out_dir / path.name
    papermill.execute_notebook(str(path), str(out_nb), parameters={"MODE": "smoke", "OUT": str(out_dir / "out"), **params},
                               cwd=str(out_dir), kernel_name="python3", progress_bar=False, request_save_on_cell_execute=False)
    return _read(out_nb)


def _outputs(nb):
    for c in nb.cells:
        if c.cell_type == "code":
            yield from c.get("outputs", [])


def _text(nb) -> str:
    parts = []
    for o in _outputs(nb):
        if o.output_type == "stream":
            parts.append(o.text)
        elif o.output_type in ("execute_result", "display_data"):
            parts.extend(str(v) for k, v in o.data.items() if k.startswith("text/"))
    return "\n".join(parts)


def _n_images(nb) -> int:
    return sum(1 for o in _outputs(nb) if o.output_type in ("display_data", "execute_result") and "image/png" in o.data)


def _has_widget(nb) -> bool:
    return any(o.output_type in ("display_data", "execute_result")
               and "application/vnd.jupyter.widget-view+json" in o.data for o in _outputs(nb))


@pytest.mark.slow
def test_01_train_and_predict_runs_in_smoke_mode(tmp_path):
    nb = _execute(ROOT / "notebooks" / "01_train_and_predict.ipynb", tmp_path)
    text = _text(nb)
    out = tmp_path / "out"
    # every step left its product
    assert (out / "pred-smoke" / "C6.h5ad").is_file()
    assert (out / "eval-smoke" / "metrics.json").is_file()
    assert (out / "qupath-smoke" / "C6.geojson").is_file()
    assert (out / "ome-zarr-smoke" / "C6.ome.zarr" / ".zattrs").is_file()
    assert _n_images(nb) >= 5, "figures: tiles, loss, correlations/calibration, gene maps, cell-type maps"
    assert _has_widget(nb), "the overlay viewer is displayed"
    assert re.search(r"model -?\d\.\d{3} vs ridge baseline -?\d\.\d{3}", text), "the summary states model vs baseline"
    # the robustness section predicted the shifted copies of C6 and scored them with the domain-shift score
    assert (out / "pred-shifted-smoke" / "C6__scan_2x.h5ad").is_file()
    assert re.search(r"domain percentile [01]\.\d\d / [01]\.\d\d / [01]\.\d\d \(as scanned [01]\.\d\d\)", text)
    # the trained model and the predictions are real: the prediction holds both uncertainties
    import anndata as ad

    from stimage_nb import _keys as K

    pred = ad.read_h5ad(out / "pred-smoke" / "C6.h5ad")
    assert pred.n_obs > 150 and pred.n_vars == 16
    assert {K.ALEATORIC, K.EPISTEMIC} <= set(pred.layers) and (pred.layers[K.EPISTEMIC] >= 0).all()


@pytest.mark.slow
def test_02_omero_round_trip_runs_without_a_server(tmp_path, monkeypatch):
    for var in ("OMERO_HOST", "OMERO_USER", "OMERO_PASSWORD", "OMERO_PASS", "OMERO_SESSION_KEY"):
        monkeypatch.delenv(var, raising=False)
    nb = _execute(ROOT / "notebooks" / "02_omero_round_trip.ipynb", tmp_path)
    text = _text(nb)
    assert "No OMERO server is configured" in text
    assert "dry run" in text.lower()
    assert _n_images(nb) >= 1
    assert list((tmp_path / "out").rglob("*.ome.zarr")), "the local OME-Zarr stand-in was written"


@pytest.mark.slow
def test_02_server_path_against_the_omero_test_double(tmp_path, monkeypatch, her2st_manifest):
    """The notebook's OMERO branch, cell by cell, against the BlitzGateway test double (tests/omero):
    connect, browse, pull a real H&E with its spot ROIs, predict, dry-run + real push, read back, remove."""
    pytest.importorskip("Ice", reason="omero-py / zeroc-ice not installed (bash .ci/install_omero.sh)")
    import sys

    import matplotlib

    matplotlib.use("Agg")
    sys.path.insert(0, str(ROOT / "tests" / "omero"))
    from fake_omero import FakeOmeroServer

    import stimage_nb.omero as om
    from stimage_nb.io.readers import read_manifest
    from stimage_nb.omero import model as M
    from stimage_nb.omero.connection import as_session

    (c3,) = read_manifest(her2st_manifest, ["C3"])
    lev = 3
    H, W = c3.image.level_shapes[lev]
    ds = c3.image.downsamples[lev]
    server = FakeOmeroServer()
    try:
        did = server.add_dataset("patient C", server.add_project("her2st"))
        iid = server.add_image(c3.image.read_region(0, 0, W, H, level=lev), name="C3.jpg",
                               um_per_px=c3.um_per_px * ds, dataset_id=did)
        r = 50.0 / (c3.um_per_px * ds)
        gw = server.gateway()
        gw.getUpdateService().saveAndReturnIds(
            [M.roi(iid, [M.ellipse(float(x / ds), float(y / ds), r)], name=str(s)) for s, (x, y) in zip(c3.adata.obs_names, c3.xy)])
        gw.close()
        calls = []

        def fake_connect(*a, **kw):
            calls.append(kw)
            return as_session(server.gateway())

        monkeypatch.setattr(om, "connect", fake_connect)
        monkeypatch.setenv("OMERO_HOST", "omero.test")
        monkeypatch.setenv("OMERO_USER", "analyst")
        monkeypatch.setenv("OMERO_PASSWORD", "from-the-environment")
        monkeypatch.chdir(tmp_path)
        nb = _read(ROOT / "notebooks" / "02_omero_round_trip.ipynb")
        ns = {"display": lambda *a, **k: None}
        exec(nb.cells[0].source, ns)  # the parameters cell, then the values papermill would inject
        ns.update(OUT=str(tmp_path / "out"), OMERO_IMAGE_ID=iid, MODE="smoke")
        printed = []
        ns["print"] = lambda *a, **k: printed.append(" ".join(map(str, a)))
        for cell in nb.cells[1:]:
            if cell.cell_type == "code":
                exec(compile(cell.source, f"02_omero_round_trip cell {nb.cells.index(cell)}", "exec"), ns)
        matplotlib.pyplot.close("all")
    finally:
        server.close()
    assert ns["SERVER"] is True and calls and calls[0].get("prompt") is False
    text = "\n".join(printed)
    assert "No OMERO server" not in text and "OMERO server: omero.test" in text
    assert ns["section"].adata.n_obs == 180 and ns["pred"].n_obs == 180
    assert ns["plan"].mode == "fresh" and ns["plan"].rois_to_write == 180
    assert ns["result"].rois_written == 180 and len(ns["result"].table_file_ids) >= 4
    assert f"180 ROIs of this run on image {iid}" in text
    assert ns["removed"]["Roi"] == 180  # clean-up removed exactly what the run wrote
    assert server.roi_shapes_count() == 180  # the original spot ROIs are untouched


@pytest.mark.slow
def test_05_tcga_outcomes_runs_in_smoke_mode(tmp_path):
    nb = _execute(ROOT / "notebooks" / "05_tcga_outcomes.ipynb", tmp_path)
    text = _text(nb)
    out = tmp_path / "out"
    # real TCGA: the model's genes, the clinical baseline and random sets, each with a CI, in the same run
    assert re.search(r"71 genes: Harrell's C 0\.\d{3} \[0\.\d{3}, 0\.\d{3}\] · clinical: 0\.\d{3} \[", text)
    assert re.search(r"HER2 amplification: 71 measured genes AUC 0\.\d{3} \[0\.\d{3}, 0\.\d{3}\]", text)
    assert "simulated from the model's accuracy on patient B" in text
    # the chain: cohort prediction on the bundle's slides, features, the agreement check with its chance level
    feats = (out / "cohort-smoke" / "features.csv")
    assert feats.is_file() and (out / "cohort-smoke" / "pseudobulk.csv").is_file()
    import pandas as pd

    f = pd.read_csv(feats)
    assert (f["status"] == "done").all() and len(f) == 4 and any(c.startswith("pb_") for c in f.columns)
    assert re.search(r"per gene across 3 slides: median r -?\d\.\d\d \(slides shifted: ", text)
    assert (out / "eval-B4-smoke" / "metrics_per_gene.csv").is_file()
    assert _n_images(nb) >= 3, "comparison + KM curves, comparison + ROC, agreement"


@pytest.mark.slow
def test_03_cross_platform_validation_runs_in_smoke_mode(tmp_path):
    nb = _execute(ROOT / "notebooks" / "03_cross_platform_validation.ipynb", tmp_path)
    text = _text(nb)
    rep = tmp_path / "out" / "validate-smoke"
    assert (rep / "report.md").is_file() and (rep / "validation.csv").is_file()
    assert len(list((rep / "folds").glob("*.json"))) == 4  # lopo x 2 directions, acquisition x 2
    assert _n_images(nb) >= 5, "figures: correlations, calibration, acquisitions, maps, sparsification"
    assert re.search(r"held-out B4 \(fold test_B\): ensemble -?\d\.\d{3} vs ridge baseline -?\d\.\d{3}", text)
    assert re.search(r"\d+ genes measured on both platforms", text) and "train_st_test_xenium" in text


@pytest.mark.slow
def test_04_interpretation_runs_in_smoke_mode(tmp_path):
    nb = _execute(ROOT / "notebooks" / "04_interpretation_shap.ipynb", tmp_path)
    text = _text(nb)
    out = tmp_path / "out"
    # every step left its product: attributions, the QuPath cells and the OME-Zarr store
    assert (out / "attributions-smoke" / "C6" / "attributions.json").is_file()
    assert (out / "exports-smoke" / "C6.nuclei.geojson").is_file()
    assert (out / "exports-smoke" / "C6.attributions.ome.zarr" / "labels" / "nuclei").is_dir()
    assert _n_images(nb) >= 4, "figures: shap bar plot, side by side, curves, summary"
    assert _has_widget(nb), "the overlay viewer is displayed"
    assert re.search(r"additivity error \d\.\de[+-]\d+", text), "the summary states the additivity check"
    assert re.search(r"deletion gap vs random [+-]\d\.\d{3} \[", text)
    from stimage_nb.interpretation import read_attributions

    attr = read_attributions(out / "attributions-smoke" / "C6")
    assert len(attr.spots) == 2 and len(attr.genes) == 4 and (attr.spots["n_nuclei"] > 10).all()
