"""The GDC client against recorded GDC responses served on 127.0.0.1 (tests/gdc/fake_gdc.py), and the live API
when it can be reached (``pytest -m gdc``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_gdc import FakeGDC  # noqa: E402

from stimage_nb import gdc  # noqa: E402
from stimage_nb.errors import StimageInputError  # noqa: E402

SVS_MD5 = "1ad6e35c9d17e4d85fb7e3143b328efe"


@pytest.fixture()
def server(data_dir):
    svs = data_dir / "fixtures" / "wsi" / "cmu_small_region.svs"
    fake = FakeGDC()
    fake.data = {h["file_id"]: svs for h in fake.records["files"]}
    yield fake
    fake.close()


@pytest.fixture()
def client(server):
    with gdc.GDCClient(server.url, timeout=10) as c:
        yield c


def test_find_slides_pages_through_the_results(server, client):
    slides = gdc.find_slides("TCGA-BRCA", client=client)
    assert list(slides.columns) == list(gdc.SLIDE_COLUMNS)
    assert len(slides) == 6 and slides["patient_id"].nunique() == 4
    row = slides.iloc[0]
    assert row.slide_id == "TCGA-3C-AALI-01Z-00-DX1.F6E9A5DF-D8FB-45CF-B4BD-C6B76294C291"
    assert row.patient_id == "TCGA-3C-AALI" and row.project_id == "TCGA-BRCA" and row.file_size == 1938955
    # one request for 6 hits with the default page size; the filter is the real GDC filter tree
    body = server.requests[0]["body"]
    fields = {c["content"]["field"]: c["content"]["value"] for c in body["filters"]["content"]}
    assert fields["cases.project.project_id"] == ["TCGA-BRCA"]
    assert fields["files.experimental_strategy"] == ["Diagnostic Slide"]
    assert fields["files.data_type"] == ["Slide Image"] and fields["files.access"] == ["open"]
    assert body["from"] == 0 and "cases.submitter_id" in body["fields"].split(",")


def test_paging_uses_from_and_size_until_the_total(server, client):
    hits = client.search("files", gdc.slides_filter("TCGA-BRCA"), ["file_id", "file_name"], page_size=4)
    assert len(hits) == 6 and len({h["file_id"] for h in hits}) == 6
    assert [r["body"]["from"] for r in server.requests] == [0, 4]
    assert set(hits[0]) == {"id", "file_id", "file_name"}  # projected on the requested fields
    assert len(client.search("files", gdc.slides_filter("TCGA-BRCA"), ["file_id"], page_size=4, max_hits=5)) == 5


def test_unknown_project_and_api_errors_are_clear(server, client):
    with pytest.raises(StimageInputError, match="no open diagnostic slides for project 'TCGA-NOPE'"):
        gdc.find_slides("TCGA-NOPE", client=client)
    with pytest.raises(gdc.GDCError, match="HTTP 400 Unrecognized fields"):
        client.search("files", None, ["cases.not_a_field"])
    with pytest.raises(gdc.GDCError, match="cannot reach the GDC API"):
        with gdc.GDCClient("http://127.0.0.1:9", timeout=2) as dead:
            dead.search("files", None, ["file_id"])


def test_token_never_shown(server):
    c = gdc.GDCClient(server.url, token="s3cret-token")
    assert "s3cret" not in repr(c) and "***" in repr(c)
    c.close()


def test_manifest_round_trip_in_the_gdc_client_format(server, client, tmp_path):
    slides = gdc.find_slides("TCGA-BRCA", client=client)
    man = gdc.write_manifest(slides, tmp_path / "gdc_manifest.txt")
    header = man.read_text().splitlines()[0].split("\t")
    assert header == list(gdc.MANIFEST_COLUMNS)
    back = gdc.read_manifest(man)
    assert back["file_id"].tolist() == slides["file_id"].tolist() and (back["md5sum"] == SVS_MD5).all()
    bad = tmp_path / "bad.txt"
    bad.write_text("id,filename\n1,a.svs\n")
    with pytest.raises(StimageInputError, match="tab-separated columns id, filename, md5, size"):
        gdc.read_manifest(bad)
    bad.write_text("id\tfilename\tmd5\tsize\nx\t../../etc/passwd\tab\t10\n")
    with pytest.raises(StimageInputError, match="plain names"):
        gdc.read_manifest(bad)


def test_download_verifies_md5_and_skips_complete_files(server, client, tmp_path, data_dir):
    slides = gdc.find_slides("TCGA-BRCA", client=client).iloc[:2]
    rep = gdc.download(slides, tmp_path / "slides", client=client, progress=False)
    assert rep.ok and [r.status for r in rep.results] == ["downloaded", "downloaded"]
    p = Path(rep.results[0].path)
    assert p == tmp_path / "slides" / slides.iloc[0].file_id / slides.iloc[0].file_name
    assert gdc.md5_file(p) == SVS_MD5
    # a real slide: it opens as one
    from stimage_nb.io.readers import read_wsi

    sec = read_wsi(p, spacing_um=200, diameter_um=200)
    assert sec.image.width == 2220 and sec.adata.n_obs > 0
    n_get = sum(r["method"] == "GET" for r in server.requests)
    again = gdc.download(slides, tmp_path / "slides", client=client, progress=False)
    assert [r.status for r in again.results] == ["present", "present"]
    assert sum(r["method"] == "GET" for r in server.requests) == n_get  # nothing fetched again
    assert gdc.downloaded_paths(slides, tmp_path / "slides").notna().all()


def test_a_dropped_connection_resumes_with_a_range_request(server, client, tmp_path):
    slides = gdc.find_slides("TCGA-BRCA", client=client).iloc[:1]
    fid = slides.iloc[0].file_id
    server.drop_after[fid] = 700_000
    rep = gdc.download(slides, tmp_path, client=client, progress=False)
    r = rep.results[0]
    assert r.status == "downloaded" and r.resumed and gdc.md5_file(r.path) == SVS_MD5
    gets = [q for q in server.requests if q["method"] == "GET"]
    assert gets[0]["range"] is None and len(gets) == 2
    resumed_at = int(gets[1]["range"].removeprefix("bytes=").rstrip("-"))
    assert 700_000 - 65_536 <= resumed_at <= 700_000  # from what reached the disk (at most one chunk lost)
    assert r.bytes_received == 1938955  # every byte written once


def test_a_partial_file_from_an_earlier_run_is_resumed(server, client, tmp_path, data_dir):
    slides = gdc.find_slides("TCGA-BRCA", client=client).iloc[:1]
    row = slides.iloc[0]
    part = tmp_path / row.file_id / (row.file_name + ".partial")
    part.parent.mkdir(parents=True)
    part.write_bytes((data_dir / "fixtures" / "wsi" / "cmu_small_region.svs").read_bytes()[:1_000_000])
    rep = gdc.download(slides, tmp_path, client=client, progress=False)
    r = rep.results[0]
    assert r.status == "downloaded" and r.resumed and r.bytes_received == 1938955 - 1_000_000
    assert [q["range"] for q in server.requests if q["method"] == "GET"] == ["bytes=1000000-"]
    assert gdc.md5_file(r.path) == SVS_MD5 and not part.exists()


def test_a_server_that_ignores_range_restarts_the_file(server, client, tmp_path, data_dir):
    slides = gdc.find_slides("TCGA-BRCA", client=client).iloc[:1]
    row = slides.iloc[0]
    part = tmp_path / row.file_id / (row.file_name + ".partial")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 5000)  # garbage that must not survive
    server.ignore_range = True
    r = gdc.download(slides, tmp_path, client=client, progress=False).results[0]
    assert r.status == "downloaded" and gdc.md5_file(r.path) == SVS_MD5


def test_a_checksum_mismatch_fails_that_file_only_and_keeps_the_bytes(server, client, tmp_path):
    slides = gdc.find_slides("TCGA-BRCA", client=client).iloc[:2]
    bad_id = slides.iloc[0].file_id
    server.corrupt.add(bad_id)
    rep = gdc.download(slides, tmp_path, client=client, progress=False)
    assert not rep.ok and [r.status for r in rep.results] == ["failed", "downloaded"]
    err = rep.results[0].error
    assert "md5" in err and SVS_MD5 in err and "run again" in err
    final = tmp_path / bad_id / slides.iloc[0].file_name
    assert not final.exists()  # a file under its final name is always verified
    assert final.with_name(final.name + ".md5-mismatch").is_file()
    server.corrupt.clear()  # the next run fetches it again, from scratch
    rep2 = gdc.download(slides, tmp_path, client=client, progress=False)
    assert [r.status for r in rep2.results] == ["downloaded", "present"] and not rep2.results[0].resumed


def test_unknown_file_id_is_reported_not_raised(server, client, tmp_path):
    table = pd.DataFrame({"file_id": ["00000000-0000-0000-0000-000000000000"], "file_name": ["x.svs"],
                          "md5sum": [SVS_MD5], "file_size": [10]})
    r = gdc.download(table, tmp_path, client=client, progress=False).results[0]
    assert r.status == "failed" and "HTTP 404" in r.error


def test_clinical_derives_overall_survival(server, client):
    df = gdc.fetch_clinical("TCGA-BRCA", client=client)
    assert list(df.columns) == list(gdc.CLINICAL_COLUMNS)
    d = df.set_index("patient_id")
    assert d.loc["TCGA-BH-A0EA", "event"] == 1 and d.loc["TCGA-BH-A0EA", "time"] == 991
    assert d.loc["TCGA-3C-AALI", "event"] == 0 and d.loc["TCGA-3C-AALI", "time"] == 4005
    assert d.loc["TCGA-BH-A0EA", "age"] == pytest.approx(26548 / 365.25)
    assert d.loc["TCGA-A2-A0T2", "stage"] == "Stage IV"
    only = gdc.fetch_clinical("TCGA-BRCA", client=client, patients=["TCGA-3C-AALJ"])
    assert only["patient_id"].tolist() == ["TCGA-3C-AALJ"]


def test_cli_slides_download_clinical(server, tmp_path, monkeypatch, capsys):
    from stimage_nb.cli import main

    monkeypatch.setenv("STIMAGE_NB_GDC_API", server.url)
    assert main(["gdc", "slides", "--project", "TCGA-BRCA", "--out", str(tmp_path / "g"), "--max-slides", "2"]) == 0
    assert "2 slides of 1 patients" in capsys.readouterr().out
    slides = pd.read_csv(tmp_path / "g" / "slides.csv")
    assert slides["patient_id"].tolist() == ["TCGA-3C-AALI"] * 2
    assert main(["gdc", "download", "--manifest", str(tmp_path / "g" / "gdc_manifest.txt"),
                 "--dest", str(tmp_path / "s")]) == 0
    assert "2 downloaded, 0 already present, 0 failed" in capsys.readouterr().out
    assert main(["gdc", "clinical", "--project", "TCGA-BRCA", "--out", str(tmp_path / "c.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "c.csv")) == 5
    # bad input: one line, exit 2
    assert main(["gdc", "slides", "--project", "TCGA-NOPE", "--out", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "TCGA-NOPE" in err
    assert main(["gdc", "download", "--manifest", str(tmp_path / "none.txt"), "--dest", str(tmp_path)]) == 2
    assert "GDC manifest not found" in capsys.readouterr().err
    monkeypatch.setenv("STIMAGE_NB_GDC_API", "http://127.0.0.1:9")
    assert main(["gdc", "clinical", "--project", "TCGA-BRCA", "--out", str(tmp_path / "c2.csv")]) == 2
    assert "cannot reach the GDC API" in capsys.readouterr().err


def _gdc_reachable() -> bool:
    import requests

    try:
        return requests.get(f"{gdc.GDC_API}/status", timeout=5).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.gdc
def test_live_gdc_api(tmp_path):
    """The same calls against the real GDC API (skipped when it cannot be reached)."""
    if not _gdc_reachable():
        pytest.skip("the GDC API (api.gdc.cancer.gov) cannot be reached from here")
    with gdc.GDCClient(gdc.GDC_API) as c:
        slides = gdc.find_slides("TCGA-BRCA", client=c, max_slides=3)
        assert len(slides) == 3 and slides["patient_id"].str.startswith("TCGA-").all()
        assert slides["md5sum"].str.fullmatch(r"[0-9a-f]{32}").all() and (slides["file_size"] > 0).all()
        clin = gdc.fetch_clinical("TCGA-BRCA", client=c, patients=slides["patient_id"].unique().tolist())
        assert set(clin["patient_id"]) == set(slides["patient_id"]) and clin["event"].isin([0, 1]).all()
        # the smallest open diagnostic slide of a small project, downloaded and verified
        hits = c.search("files", gdc.slides_filter("TCGA-CHOL"), gdc._slides.SLIDE_FIELDS, sort="file_size:asc",
                        max_hits=1)
        small = pd.DataFrame([{"file_id": h["file_id"], "file_name": h["file_name"], "md5sum": h["md5sum"],
                               "file_size": h["file_size"]} for h in hits])
        rep = gdc.download(small, tmp_path, client=c, progress=False)
        assert rep.ok, rep.to_frame().to_string()


def test_cohort_gdc_slides_resolve_through_this_client(server, tmp_path, monkeypatch):
    """``gdc:<uuid>`` rows of a cohort table: the cohort's default resolver is this client's resolve_gdc_slide."""
    from stimage_nb.cohort import GDC_RESOLVER, CohortSlide, resolve_slide

    monkeypatch.setenv("STIMAGE_NB_GDC_API", server.url)
    fid = server.records["files"][2]["file_id"]
    assert GDC_RESOLVER == "stimage_nb.gdc:resolve_gdc_slide"
    path, fetched = resolve_slide(CohortSlide("s1", "TCGA-3C-AALJ", f"gdc:{fid}"), dest=tmp_path)
    assert fetched and path.name == server.records["files"][2]["file_name"] and gdc.md5_file(path) == SVS_MD5
    with pytest.raises(StimageInputError, match="the GDC has no file with this id"):
        gdc.resolve_gdc_slide("00000000-0000-0000-0000-000000000000", tmp_path)
    server.corrupt.add(fid)
    with pytest.raises(gdc.GDCError, match="md5"):
        gdc.resolve_gdc_slide(fid, tmp_path / "again")
