"""``stimage-nb interpret`` end to end on a real held-out section, and its refusals (exit 2, one line)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stimage_nb.cli import main


def test_interpret_writes_attributions_faithfulness_and_exports(tmp_path, frozen_run, her2st_manifest, capsys):
    from stimage_nb.interpretation import read_attributions

    out = tmp_path / "interp"
    rc = main(["interpret", "--model", str(frozen_run), "--manifest", str(her2st_manifest), "--sections", "C6",
               "--genes", "ISG15", "--spots", "C6:19x13,14x21", "--max-evals", "120", "--zarr-level", "3",
               "--figures", "1", "--quiet", "--out", str(out)])
    assert rc == 0
    d = out / "C6"
    attr = read_attributions(d)
    assert list(attr.spots.index) == ["19x13", "14x21"] and attr.genes == ("ISG15",)
    f = json.loads((out / "faithfulness.json").read_text())
    sec = f["sections"]["C6"]
    assert {"deletion", "insertion"} <= set(sec["overall"]) and "randomised_heads" in sec
    for name in ("C6.nuclei.geojson", "summary_correlation.csv", "summary_celltypes.csv", "summary_ISG15.png",
                 "faithfulness_scores.csv", "faithfulness_ISG15.png", "spot_19x13_ISG15.png"):
        assert (d / name).is_file(), name
    assert (d / "C6.attributions.ome.zarr" / "labels" / "nuclei").is_dir()
    text = capsys.readouterr().out
    assert "C6: 2 spots" in text and "deletion gap vs random" in text
    # the same command again is idempotent: same attributions
    rc = main(["interpret", "--model", str(frozen_run), "--manifest", str(her2st_manifest), "--sections", "C6",
               "--genes", "ISG15", "--spots", "19x13,14x21", "--max-evals", "120", "--exports", "none",
               "--no-faithfulness", "--figures", "0", "--quiet", "--out", str(out)])
    assert rc == 0
    assert np.allclose(read_attributions(d).values["value"], attr.values["value"])


@pytest.mark.parametrize("args, message", [
    (["--genes", "NOTAGENE", "--top-k", "1"], "not predicted by this model"),
    (["--genes", "ISG15", "--spots", "99x99"], "are not spots of sections"),
    (["--genes", "ISG15", "--top-k", "1", "--explainer", "gradient"], "differentiable"),
])
def test_bad_requests_exit_2_with_one_line(tmp_path, frozen_run, her2st_manifest, capsys, args, message):
    rc = main(["interpret", "--model", str(frozen_run), "--manifest", str(her2st_manifest), "--sections", "C6",
               "--quiet", "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()  # a refused request leaves no output folder behind
