"""Where cohort slides come from: local paths, gdc:<uuid> through a resolver (the hook the GDC client
fills), omero:<id> pulled through stimage_nb.omero (against the Ice test double of tests/omero)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _modelkit import tiny_run

pytest.importorskip("distributed")

FETCHED: list = []


def fetch_gdc(file_id: str, dest: Path) -> Path:
    """A stand-in GDC downloader: 'downloads' the bundle's real SVS under the file id."""
    from stimage_nb._settings import data_dir

    p = Path(dest) / f"{file_id}.svs"
    shutil.copyfile(data_dir() / "fixtures" / "wsi" / "cmu_small_region.svs", p)
    FETCHED.append(p)
    return p


def _opts():
    from stimage_nb.cluster import ClusterOptions

    return ClusterOptions(n_workers=1, processes=False)


def test_read_cohort_rows(tmp_path):
    from stimage_nb.cohort import read_cohort

    p = tmp_path / "c.csv"
    p.write_text("slide,patient_id,um_per_px,stage\nimgs/a b.svs,P1,,II\nomero:1201,P2,0.5,I\n"
                 "gdc:0fa2-77,P2,,III\n")
    rows = read_cohort(p)
    assert [r.slide_id for r in rows] == ["a_b", "omero-1201", "gdc-0fa2-77"]
    assert [r.scheme for r in rows] == ["file", "omero", "gdc"]
    assert rows[0].source == str((tmp_path / "imgs" / "a b.svs").resolve()) and rows[1].identifier == "1201"
    assert rows[1].um_per_px == 0.5 and rows[2].extra == {"stage": "III"}


def test_gdc_slides_through_a_resolver_and_without_one(tmp_path):
    from stimage_nb.cohort import predict_cohort

    csv = tmp_path / "c.csv"
    pd.DataFrame({"slide": ["gdc:5b1c0e3a-aaaa", "gdc:77d0-bbbb"], "patient_id": ["TCGA-01", "TCGA-02"]}).to_csv(csv, index=False)
    # without a downloader each GDC slide fails with the fix in its error, and nothing else breaks
    r = predict_cohort(tiny_run(), csv, tmp_path / "none", grid_um=300, cluster_options=_opts(), features=False,
                       progress=False)
    errs = r.status["error"].tolist()
    assert (r.status["status"] == "failed").all() and all("--resolver gdc=module:function" in e for e in errs)
    # with one (given as module:function, as a cluster worker imports it) they are fetched, predicted, deleted
    sys.modules.setdefault("test_sources", sys.modules[__name__])
    FETCHED.clear()
    r = predict_cohort(tiny_run(), csv, tmp_path / "out", grid_um=300, cluster_options=_opts(), features=False,
                       resolvers={"gdc": "test_sources:fetch_gdc"}, progress=False)
    assert (r.status["status"] == "done").all(), r.status["error"].tolist()
    assert sorted(p.name for p in FETCHED) == ["5b1c0e3a-aaaa.svs", "77d0-bbbb.svs"]
    assert not any(p.exists() for p in FETCHED)                   # downloads removed once predicted
    assert (tmp_path / "out" / "slides" / "gdc-5b1c0e3a-aaaa.h5ad").is_file()
    r = predict_cohort(tiny_run(), csv, tmp_path / "keep", grid_um=300, cluster_options=_opts(), features=False,
                       resolvers={"gdc": fetch_gdc}, keep_downloads=True, progress=False)
    assert (r.status["status"] == "done").all() and all(p.exists() for p in FETCHED[-2:])


def test_omero_slides_are_pulled(tmp_path, monkeypatch):
    pytest.importorskip("Ice")
    pytest.importorskip("omero.gateway")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "omero"))
    from fake_omero import FakeOmeroServer

    from stimage_nb import omero
    from stimage_nb._settings import data_dir
    from stimage_nb.cohort import predict_cohort
    from stimage_nb.io.image import open_image
    from stimage_nb.omero.connection import OmeroSession, OmeroTarget
    from stimage_nb.tiles import extract_tiles

    img = open_image(data_dir() / "her2st" / "images" / "C3.jpg", um_per_px=0.69)
    crop = img.read_region(4000, 4000, 3000, 3000)              # C3: tissue and glass, 2 mm square
    server = FakeOmeroServer()
    try:
        iid = server.add_image(crop, um_per_px=0.69)
        monkeypatch.setattr(omero, "connect", lambda **kw: OmeroSession(OmeroTarget("fake-omero.test", 4064),
                                                                        server.gateway(), factory=server.gateway))
        monkeypatch.setenv("STIMAGE_NB_CACHE", str(tmp_path / "cache"))
        csv = tmp_path / "c.csv"
        csv.write_text(f"slide,patient_id\nomero:{iid},P1\n")
        r = predict_cohort(tiny_run(), csv, tmp_path / "out", grid_um=300, cluster_options=_opts(), features=False,
                           progress=False)
        assert r.status.loc[0, "status"] == "done", r.status.loc[0, "error"]
        assert any(c[0] == "RawPixelsStore" for c in server.calls)   # the pixels came through OMERO
    finally:
        server.close()
    from stimage_nb.io.prediction import read_prediction

    a = read_prediction(tmp_path / "out" / "slides" / f"omero-{iid}.h5ad")
    # pulled at the server level nearest the model's 150 um / 32 px (4x coarser), which the prediction records
    assert a.n_obs > 4 and a.uns["stimage_nb"]["um_per_px"] == pytest.approx(2.76)
    assert a.uns["stimage_nb"]["image_scale"] == pytest.approx(0.25)
    # the tiles it saw are the crop's own pixels
    xy = np.asarray(a.obsm["spatial"])[:2]
    ours = extract_tiles(img, xy / 0.25 + 4000, 150.0, 32, cache=False)
    pulled = extract_tiles(open_image(a.uns["stimage_nb"]["image"]), xy, 150.0, 32, cache=False)
    assert np.abs(ours.astype(int) - pulled.astype(int)).mean() < 2
