"""Downloads through pooch against a local server holding the bundle's real her2st files.

What a user on a fresh machine relies on: the fetched files are the bundle's bytes in the bundle's
layout (so every reader works on either), a corrupt or truncated transfer never leaves a file behind,
an interrupted fetch resumes with only what is missing, and offline is one clear error.
"""

from __future__ import annotations

import hashlib
import io
import re
import socket
import tarfile
from pathlib import Path

import pytest
from _fetch_server import _her2st_routes, _serve

from stimage_nb.datasets import DATASETS, DataFile, Dataset, fetch, fetch_her2st
from stimage_nb.errors import DataUnavailableError, StimageInputError

# (the fixtures live here, not in a conftest.py: a second tests/*/conftest.py would shadow the
# `from conftest import ...` of tests/omero under pytest's prepend import mode)


@pytest.fixture(scope="module")
def _routes(data_dir):
    return _her2st_routes(data_dir)


@pytest.fixture
def her2st_server(_routes):
    """A fresh server (no faults, empty request log) over the bundle's her2st files."""
    httpd, state = _serve(dict(_routes))
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def closed_port_url():
    """A URL on 127.0.0.1 where nothing listens (connection refused: what 'offline' looks like)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


C3_IMAGE = "/data/ST-imgs/C/C3/5714_HE_BT_D1.jpg"
C3_COUNTS = "/data/ST-cnts/C3.tsv.gz"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _no_partials(root: Path) -> None:
    left = [p for p in root.rglob("*") if p.is_file() and (re.fullmatch(r"tmp[a-z0-9_]{8}", p.name) or ".tmp" in p.name)]
    assert not left, f"partial downloads left behind: {left}"


def test_registry_hashes_are_the_bundle_bytes(data_dir):
    """The registry's sha256 are those of the bundle's verbatim copies (and of the gunzipped tables)."""
    root = data_dir / "her2st"
    ds = DATASETS["her2st"]
    assert len(ds.files) == 6 * 5
    for f in ds.files:
        want = f.sha256_processed if f.gunzip else f.sha256
        assert want == _sha(root / f.path), f.path
        assert f.gunzip == (f.sha256 is None)  # only the derived tables lack a download hash


def test_every_dataset_says_where_it_comes_from():
    for name, d in DATASETS.items():
        assert d.name == name and d.licence and d.citation and d.page.startswith("https://")
        assert d.base_url.startswith("https://") and all(m.startswith("https://") for m in d.mirrors)
        for f in d.files:
            assert f.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", f.sha256), (name, f.path)
        if any(f.sha256 is None and not f.gunzip for f in d.files):
            assert d.checksums.startswith("none"), f"{name}: files without a checksum must say so"
    assert {"visium-ffpe-breast", "xenium-breast-rep1"} <= set(DATASETS)
    assert any(f.path.endswith("he_image.ome.tif") for f in DATASETS["xenium-breast-rep1"].files)


def test_fetch_section_equals_the_bundle_and_reads(her2st_server, tmp_path, data_dir):
    from stimage_nb.io.readers import read_manifest

    root = fetch("her2st", tmp_path, sections=["C3"], base_url=her2st_server.url, progress=False)
    assert root == tmp_path / "her2st"
    assert _files(root) == {"sections.csv", "images/C3.jpg", "counts/C3.tsv.gz", "spots/C3_selection.tsv",
                            "celltypes/major/C3-proportion.tsv", "celltypes/minor/C3-proportion.tsv"}
    for rel in _files(root) - {"sections.csv"}:
        assert _sha(root / rel) == _sha(data_dir / "her2st" / rel), rel
    (sec,) = read_manifest(root / "sections.csv", ["C3"], genes=["ERBB2", "GNAS"])
    (ref,) = read_manifest(data_dir / "her2st" / "sections.csv", ["C3"], genes=["ERBB2", "GNAS"])
    assert sec.adata.n_obs == ref.adata.n_obs == 180 and sec.um_per_px == 0.69
    assert (sec.adata.X != ref.adata.X).nnz == 0

    n = len(her2st_server.requests)
    assert fetch_her2st(tmp_path, ["C3"], base_url=her2st_server.url, progress=False) == root / "sections.csv"
    assert len(her2st_server.requests) == n, "a complete fetch downloads nothing again"


def test_corrupt_file_is_refused_and_nothing_is_kept(her2st_server, tmp_path):
    her2st_server.corrupt.add(C3_IMAGE)
    with pytest.raises(DataUnavailableError) as e:
        fetch("her2st", tmp_path, sections=["C3"], base_url=her2st_server.url, progress=False, retries=1)
    msg = str(e.value)
    assert "images/C3.jpg" in msg and "checksum" in msg and "nothing was kept" in msg and "\n" not in msg
    assert her2st_server.count(C3_IMAGE) == 2  # retried once, refused both times
    root = tmp_path / "her2st"
    assert "images/C3.jpg" not in _files(root)
    _no_partials(root)
    her2st_server.corrupt.clear()
    fetch("her2st", tmp_path, sections=["C3"], base_url=her2st_server.url, progress=False)
    assert "images/C3.jpg" in _files(root)


def test_dropped_connection_is_retried(her2st_server, tmp_path, data_dir):
    her2st_server.drop[C3_COUNTS] = 1  # the first transfer stops half-way
    root = fetch("her2st", tmp_path, sections=["C3"], base_url=her2st_server.url, progress=False, retries=2)
    assert her2st_server.count(C3_COUNTS) == 2
    assert _sha(root / "counts/C3.tsv.gz") == _sha(data_dir / "her2st/counts/C3.tsv.gz")
    _no_partials(root)


def test_interrupted_fetch_resumes_with_what_is_missing(her2st_server, tmp_path):
    her2st_server.fail.add(C3_COUNTS)  # the server fails on the second file: the run stops there
    with pytest.raises(DataUnavailableError, match="counts/C3.tsv.gz"):
        fetch("her2st", tmp_path, sections=["C3"], base_url=her2st_server.url, progress=False, retries=0)
    root = tmp_path / "her2st"
    assert _files(root) == {"images/C3.jpg"}  # what was done is kept; no manifest for a partial dataset
    _no_partials(root)
    her2st_server.fail.clear()
    fetch("her2st", tmp_path, sections=["C3"], base_url=her2st_server.url, progress=False)
    assert her2st_server.count(C3_IMAGE) == 1, "the image fetched before the interruption is not fetched again"
    assert her2st_server.count(C3_COUNTS) == 2
    assert "sections.csv" in _files(root)


def test_offline_is_one_clear_error(closed_port_url, tmp_path):
    with pytest.raises(DataUnavailableError) as e:
        fetch("her2st", tmp_path, sections=["C3"], base_url=closed_port_url, progress=False, retries=0)
    msg = str(e.value)
    assert "no connection" in msg and "STIMAGE_NB_DATA" in msg and "fetch-data" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # no files, no empty folders
    with pytest.raises(DataUnavailableError):
        fetch("her2st", tmp_path / "new" / "data", sections=["C3"], base_url=closed_port_url, retries=0,
              progress=False)
    assert not (tmp_path / "new").exists()


def test_unknown_names_are_refused():
    with pytest.raises(StimageInputError, match="no dataset named"):
        fetch("nope")
    with pytest.raises(StimageInputError, match="no sections"):
        fetch("her2st", sections=["Z9"])


def test_visium_dataset_is_extracted_into_an_outs_folder(data_dir, tmp_path, monkeypatch):
    """The 10x path (tar.gz of spatial/ extracted beside the matrix, a manifest row) on the real Visium fixture."""
    from stimage_nb.datasets import _fetch
    from stimage_nb.io.readers import read_manifest, read_visium

    fx = data_dir / "fixtures" / "visium_1.0.0"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(fx / "spatial", arcname="spatial")
    tgz = buf.getvalue()
    h5 = (fx / "filtered_feature_bc_matrix.h5").read_bytes()
    ds = Dataset(name="visium-test", title="t", description="d", licence="BSD-3-Clause", citation="c",
                 page="https://example.org", base_url="https://example.org", size="1 MB", checksums="test",
                 files=(DataFile("outs/filtered_feature_bc_matrix.h5", "m.h5", hashlib.sha256(h5).hexdigest()),
                        DataFile("outs/spatial.tar.gz", "s.tar.gz", hashlib.sha256(tgz).hexdigest(), extract=".")),
                 manifest=("section,patient,visium", "heart,P1,outs"))
    monkeypatch.setitem(_fetch.DATASETS, "visium-test", ds)
    httpd, state = _serve({"/m.h5": h5, "/s.tar.gz": tgz})
    try:
        root = fetch("visium-test", tmp_path, base_url=state.url, progress=False)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert (root / "outs/spatial/scalefactors_json.json").is_file()
    (sec,) = read_manifest(root / "sections.csv")
    ref = read_visium(fx)
    assert sec.adata.n_obs == ref.adata.n_obs > 0 and list(sec.adata.obs_names) == list(ref.adata.obs_names)



def test_fetch_data_uses_the_bundle_when_it_is_here(capsys, her2st_manifest, closed_port_url, monkeypatch):
    """`stimage-nb fetch-data` without --dest downloads nothing when the offline bundle is here."""
    from stimage_nb.cli import main

    monkeypatch.setenv("STIMAGE_NB_HER2ST_URL", closed_port_url)  # a download would fail
    assert main(["fetch-data", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(her2st_manifest)
