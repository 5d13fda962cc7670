"""``stimage-nb omero ls|pull|push|rm`` end to end against the server double."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stimage_nb import _keys as K
from stimage_nb.cli import main


@pytest.fixture
def cli_server(server, session_on, monkeypatch, tmp_path, omero_stack):
    """The CLI's connection goes to the double (everything after it is the real code)."""
    from stimage_nb.omero import cli as omcli

    monkeypatch.setenv("STIMAGE_NB_CACHE", str(tmp_path / "cache"))
    seen = []

    def fake_connect(a):
        seen.append(a)
        return session_on(server)

    monkeypatch.setattr(omcli, "_connect", fake_connect)
    server.cli_args = seen
    return server


def _json_lines(text):
    return [json.loads(ln) for ln in text.splitlines() if ln.startswith("{")]


def test_cli_ls_pull_section_then_train_manifest(cli_server, capsys, he_crop, c3_pred, tmp_path, her2st_manifest):
    from stimage_nb.io.readers import read_manifest
    from stimage_nb.omero import model as M

    crop, offset = he_crop
    pid = cli_server.add_project("HER2")
    did = cli_server.add_dataset("patient C", pid)
    iid = cli_server.add_image(crop, name="C3.jpg", um_per_px=0.69, dataset_id=did)
    xy = np.asarray(c3_pred.obsm[K.SPATIAL]) - offset
    ok = (xy > 0).all(axis=1) & (xy[:, 0] < 1400) & (xy[:, 1] < 1100)
    gw = cli_server.gateway()
    ctx = gw.SERVICE_OPTS.copy()
    gw.getUpdateService().saveAndReturnIds(
        [M.roi(iid, [M.ellipse(x, y, 50 / 0.69)], name=n) for n, (x, y) in zip(c3_pred.obs_names[ok], xy[ok])], ctx)
    assert main(["omero", "ls"]) == 0
    assert "HER2" in capsys.readouterr().out
    assert main(["omero", "ls", "--dataset", str(did), "--host", "h"]) == 0
    out = capsys.readouterr().out
    assert "C3.jpg" in out and "0.69" in out and cli_server.cli_args[-1].host == "h"
    out_dir = tmp_path / "pulled"
    assert main(["omero", "pull", str(iid), "--section", "--out", str(out_dir), "--quiet"]) == 0
    line = _json_lines(capsys.readouterr().out)[0]
    assert line["observations"] == int(ok.sum()) and line["genes"] == 0
    # the files are a manifest that the ordinary readers (and so `stimage-nb train`) take
    secs = read_manifest(line["manifest"])
    assert [s.name for s in secs] == ["C3"] and secs[0].image.width == 1400
    assert sorted(secs[0].adata.obs_names) == sorted(c3_pred.obs_names[ok])    # "{x}x{y}" ids survive
    assert np.allclose(secs[0].adata.obs[K.DIAMETER_UM], 100.0)
    assert main(["omero", "ls", "--image", str(iid)]) == 0
    assert "1400x1100 px" in capsys.readouterr().out


def test_cli_push_dry_run_push_and_rm(cli_server, capsys, c3_on_server, c3_pred, tmp_path, monkeypatch):
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    c3_pred.write_h5ad(pred_dir / "C3.h5ad")
    monkeypatch.delenv("OMERO_HOST", raising=False)
    # without a server: an offline plan, nothing connects
    assert main(["omero", "push", "--pred", str(pred_dir), "--image", f"C3={c3_on_server}", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dry_run"] and plan["n_rois"] == 180 and plan["max_table_columns"] <= 500
    assert cli_server.cli_args == [] and not cli_server.rois
    assert main(["omero", "push", "--pred", str(pred_dir), "--image", f"C3={c3_on_server}", "--batch-size", "100",
                 "--colour-by", str(c3_pred.var_names[0]), "--quiet", "--host", "fake"]) == 0
    assert "rois_written=180" in capsys.readouterr().out and len(cli_server.rois) == 180
    assert main(["omero", "push", "--pred", str(pred_dir / "C3.h5ad"), "--image", str(c3_on_server),
                 "--colour-by", str(c3_pred.var_names[0]), "--quiet", "--host", "fake"]) == 0
    assert "mode=up-to-date" in capsys.readouterr().out
    assert main(["omero", "rm", "--image", str(c3_on_server), "--run", "test-run", "--host", "fake"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"]["Roi"] == 180 and not cli_server.rois
    assert main(["omero", "push", "--pred", str(pred_dir), "--image", "123", "--host", "fake"]) == 2
    assert "OMERO image 123" in capsys.readouterr().err


def test_cli_errors_are_one_line(cli_server, capsys, monkeypatch, c3_pred, tmp_path):
    assert main(["omero", "pull", "424242", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "stimage-nb" in err and "424242" in err and "Traceback" not in err
    p = tmp_path / "C3.h5ad"
    c3_pred.write_h5ad(p)
    (tmp_path / "C4.h5ad").write_bytes(p.read_bytes())
    assert main(["omero", "push", "--pred", str(tmp_path), "--image", "1", "--host", "x"]) == 2
    assert "--image SECTION=ID" in capsys.readouterr().err
