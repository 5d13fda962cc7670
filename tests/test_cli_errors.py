"""Every error of the real command line is one clear line (exit 2), never a traceback.

The whole kind, run as a user runs it (``python -m stimage_nb.cli`` in a subprocess): wrong paths,
corrupt and truncated files of every type the commands read, missing genes, no data and no network,
an unreachable OMERO server, a folder that cannot be written, usage errors; Ctrl-C during a download
ends in one line (exit 130) and leaves no partial file.
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMERO_", "STIMAGE_NB_HER2ST"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _run(args, cwd, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "stimage_nb.cli", *args], cwd=cwd, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bad(tmp_path_factory, data_dir):
    """A folder of bad inputs, each made from the real bundle (truncated, corrupted, wrong kind)."""
    d = tmp_path_factory.mktemp("bad_inputs")
    h = data_dir / "her2st"
    (d / "genes_unknown.txt").write_text("ERBB2\nNOT_A_GENE_XYZ\n")
    (d / "genes_empty.txt").write_text("")
    (d / "trunc.jpg").write_bytes((h / "images/C3.jpg").read_bytes()[:3000])
    (d / "trunc.tsv.gz").write_bytes((h / "counts/C3.tsv.gz").read_bytes()[:5000])
    (d / "garbage.csv").write_bytes(bytes(range(256)) * 8)
    (d / "notgzip.tsv.gz").write_text("x\ty\n1\t2\n")
    row = "C3,C,{img},{cnt},{spots},0.69\n"
    head = "section,patient,image,counts,spots,um_per_px\n"
    (d / "m_trunc_image.csv").write_text(head + row.format(img=d / "trunc.jpg", cnt=h / "counts/C3.tsv.gz",
                                                            spots=h / "spots/C3_selection.tsv"))
    (d / "m_trunc_counts.csv").write_text(head + row.format(img=h / "images/C3.jpg", cnt=d / "trunc.tsv.gz",
                                                             spots=h / "spots/C3_selection.tsv"))
    (d / "m_notgzip.csv").write_text(head + row.format(img=h / "images/C3.jpg", cnt=d / "notgzip.tsv.gz",
                                                       spots=h / "spots/C3_selection.tsv"))
    (d / "m_no_image.csv").write_text(head + row.format(img=d / "missing.jpg", cnt=h / "counts/C3.tsv.gz",
                                                        spots=h / "spots/C3_selection.tsv"))
    (d / "m_bad_um.csv").write_text(head + row.format(img=h / "images/C3.jpg", cnt=h / "counts/C3.tsv.gz",
                                                      spots=h / "spots/C3_selection.tsv").replace(",0.69", ",abc"))
    (d / "pred_bad").mkdir()
    (d / "pred_bad/C3.h5ad").write_bytes(os.urandom(4096))
    (d / "model_bad").mkdir()
    (d / "model_bad/ensemble.json").write_text("{nope")
    (d / "bad.geojson").write_text('{"type": "FeatureCollection", "features": [')
    (d / "trunc.geojson.gz").write_bytes(gzip.compress(b'{"type": "FeatureCollection", "features": []}')[:20])
    (d / "empty").mkdir()
    (d / "a_file").write_text("not a folder")  # an output path under a file cannot be created (even by root)
    return d


def _cases(d: Path, h: Path, closed: str) -> list[tuple[str, list[str], dict, str]]:
    """(case, argv, extra environment, a fragment the one line must contain)."""
    M, G = str(h / "sections.csv"), str(h / "genes_stimage_her2st.txt")
    return [
        ("manifest missing", ["train", "--manifest", str(d / "nope.csv"), "--genes", G, "--out", "o"], {}, "manifest not found"),
        ("manifest is garbage", ["train", "--manifest", str(d / "garbage.csv"), "--genes", G, "--out", "o"], {},
         "garbage.csv"),
        ("gene list missing", ["train", "--manifest", M, "--genes", str(d / "nope.txt"), "--out", "o"], {},
         "gene list not found"),
        ("gene list empty", ["train", "--manifest", M, "--genes", str(d / "genes_empty.txt"), "--out", "o"], {},
         "empty"),
        ("gene missing from the counts", ["train", "--manifest", M, "--genes", str(d / "genes_unknown.txt"),
                                          "--sections", "C3", "--out", "o"], {}, "NOT_A_GENE_XYZ"),
        ("unknown section", ["train", "--manifest", M, "--genes", G, "--sections", "Z9", "--out", "o"], {}, "Z9"),
        ("truncated counts", ["train", "--manifest", str(d / "m_trunc_counts.csv"), "--genes", G, "--out", "o"], {},
         "trunc.tsv.gz"),
        ("counts not gzip", ["train", "--manifest", str(d / "m_notgzip.csv"), "--genes", G, "--out", "o"], {},
         "notgzip.tsv.gz"),
        ("image missing", ["shift", "--manifest", str(d / "m_no_image.csv"), "--sections", "C3", "--out", "o"], {},
         "missing.jpg"),
        ("truncated image", ["shift", "--manifest", str(d / "m_trunc_image.csv"), "--sections", "C3", "--out", "o"],
         {}, "trunc.jpg"),
        ("bad µm/px", ["shift", "--manifest", str(d / "m_bad_um.csv"), "--sections", "C3", "--out", "o"], {},
         "um_per_px"),
        ("model missing", ["predict", "--model", str(d / "nope"), "--manifest", M, "--out", "o"], {}, "ensemble.json"),
        ("image is a folder", ["convert", str(d), "--out", "o"], {}, "a folder, not an image"),
        ("model corrupt", ["predict", "--model", str(d / "model_bad"), "--manifest", M, "--out", "o"], {},
         "ensemble.json"),
        ("prediction corrupt (evaluate)", ["evaluate", "--pred", str(d / "pred_bad"), "--manifest", M,
                                           "--no-baseline"], {}, "C3.h5ad"),
        ("prediction corrupt (export)", ["export", "--pred", str(d / "pred_bad"), "--format", "qupath",
                                         "--out", "o"], {}, "C3.h5ad"),
        ("predictions missing", ["export", "--pred", str(d / "nope"), "--format", "ome-zarr", "--out", "o"], {},
         "prediction directory not found"),
        ("geojson invalid", ["import-qupath", str(d / "bad.geojson")], {}, "bad.geojson"),
        ("geojson.gz truncated", ["import-qupath", str(d / "trunc.geojson.gz")], {}, "trunc.geojson.gz"),
        ("output cannot be created", ["shift", "--manifest", M, "--sections", "C3", "--out", str(d / "a_file/sub")],
         {}, "a_file"),
        ("fetch offline", ["fetch-data", "--dest", str(d / "fetched"), "--sections", "C3", "--base-url", closed,
                           "--quiet"], {}, "no connection"),
        ("fetch offline (URL from the environment)", ["fetch-data", "--dest", str(d / "fetched2"), "--quiet"],
         {"STIMAGE_NB_HER2ST_URL": closed}, "no connection"),
        ("fetch unknown dataset", ["fetch-data", "--dataset", "nope"], {}, "no dataset named"),
        ("demo without data and network", ["demo", "--out", str(d / "demo_out"), "--quick"],
         {"STIMAGE_NB_DATA": str(d / "empty"), "STIMAGE_NB_HER2ST_URL": closed}, "fetch-data"),
        ("data directory missing", ["demo", "--out", str(d / "demo_out2")],
         {"STIMAGE_NB_DATA": str(d / "nope_dir"), "STIMAGE_NB_HER2ST_URL": closed}, "fetch-data"),
        ("omero without a host", ["omero", "ls"], {}, "OMERO host"),
        ("omero server unreachable", ["omero", "ls", "--host", "127.0.0.1", "--port", closed.rsplit(":", 1)[1],
                                      "--user", "u"], {"OMERO_PASSWORD": "not-a-secret"}, "cannot reach"),
        ("omero push of missing predictions", ["omero", "push", "--pred", str(d / "nope"), "--image", "1",
                                               "--dry-run"], {}, "nope"),
        ("usage error", ["train", "--manifest", M], {}, "required"),
        ("usage error (unknown option)", ["predict", "--model", "m", "--manifest", M, "--out", "o", "--frobnicate"],
         {}, "unrecognized arguments"),
    ]


def test_every_cli_error_is_one_line(bad, data_dir, tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()
    cases = _cases(bad, data_dir / "her2st", closed)

    def one(case):
        name, argv, extra, fragment = case
        if name.startswith("omero server") and not _have_omero():
            return name, None
        t = time.perf_counter()
        r = _run(argv, cwd=tmp_path, env=_env(**extra))
        print(f"{time.perf_counter() - t:6.1f} s  {name}")
        return name, (r, fragment)

    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(one, cases))
    failures = []
    for name, res in results:
        if res is None:
            continue
        r, fragment = res
        err = r.stderr.strip().splitlines()
        errors = [ln for ln in err if ": error:" in ln]
        ok = (r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1 and err[-1] == errors[0]
              and fragment.lower() in errors[0].lower() and errors[0].startswith(("stimage-nb", "usage")))
        if not ok:
            failures.append(f"{name}: exit {r.returncode}, stderr:\n{r.stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)
    assert not any(p.name.startswith("tmp") for p in (bad / "fetched").rglob("*")), "partial download left"
    assert list((bad / "empty").iterdir()) == [] and not (bad / "demo_out").exists()  # nothing written
    assert not (bad / "nope_dir").exists()


def _have_omero() -> bool:
    try:
        import omero.clients  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def test_ctrl_c_during_a_download_is_one_line_and_leaves_nothing(tmp_path, data_dir):
    """SIGINT while a file is half-way through: exit 130, one line, no partial file."""
    import http.server
    import threading

    started = threading.Event()

    class Stall(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802
            body = (data_dir / "her2st/images/C3.jpg").read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            started.set()
            time.sleep(30)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stall)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        p = subprocess.Popen([sys.executable, "-m", "stimage_nb.cli", "fetch-data", "--dest", str(tmp_path),
                              "--sections", "C3", "--base-url", f"http://127.0.0.1:{httpd.server_address[1]}",
                              "--quiet"], cwd=tmp_path, env=_env(), stderr=subprocess.PIPE, text=True)
        assert started.wait(120), "the download never started"
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        httpd.shutdown()
        httpd.server_close()
    lines = err.strip().splitlines()
    assert p.returncode == 130 and "Traceback" not in err, err
    assert lines[-1].startswith("stimage-nb fetch-data: error: interrupted"), err
    left = [x for x in (tmp_path / "her2st").rglob("*") if x.is_file()]
    assert left == [], f"files left after Ctrl-C: {left}"
