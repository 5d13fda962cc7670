"""The demo's quick mode, end to end on the bundled her2st data (train, predict, evaluate, report)."""

from __future__ import annotations

import json
import re
import time

import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # ~1 min on a 2-core CPU (a tiny ensemble really trains)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    from stimage_nb.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    t = time.perf_counter()
    report = run_demo(out, quick=True, device="cpu", progress=False)
    return out, report, time.perf_counter() - t


def test_quick_demo_writes_the_report(quick_demo):
    out, report, _ = quick_demo
    assert report == out / "report.md"
    text = report.read_text()
    for heading in ("# stimage_nb demo report", "## Setup", "## Gene expression on held-out sections",
                    "## Best-predicted genes", "## Calibration of the predictive distribution", "## Cell types",
                    "## Files"):
        assert heading in text, heading
    assert "Quick mode" in text
    # both held-out sections in the metrics table, model and baseline side by side
    rows = [ln for ln in text.splitlines() if re.match(r"\| (C6|B4) \| \d+ \| 24 \|", ln)]
    assert [r.split("|")[1].strip() for r in rows] == ["C6", "B4"]
    assert "same patient, unseen section" in text and "another patient" in text
    # the uncertainty-ranking table has a row per held-out section, every ratio a number
    unc = text.split("### Does the uncertainty say which predictions to trust?")[1].split("\n## ")[0]
    urows = [ln.split("|")[1:-1] for ln in unc.splitlines() if re.match(r"\| (C6|B4) \|", ln)]
    assert [r[0].strip() for r in urows] == ["C6", "B4"] and all(float(v) >= 0 for r in urows for v in r[1:])
    # every linked figure exists and is a real PNG
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) >= 3 + 2 * 2 + 2  # 3 evaluation figures, 2 genes x 2 sections, 2 cell-type maps
    for link in links:
        p = out / link
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000, link


def test_quick_demo_metrics_and_predictions(quick_demo):
    import anndata as ad

    out, _, _ = quick_demo
    m = json.loads((out / "eval-quick" / "metrics.json").read_text())
    assert set(m["sections"]) == {"C6", "B4"}
    c6, b4 = m["sections"]["C6"], m["sections"]["B4"]
    assert c6["train_sections"] == ["C4"] and not c6["held_out_patient"] and b4["held_out_patient"]
    for e in (c6, b4):
        assert e["n_genes"] == 24
        assert "genes" in e["baseline"] and e["comparison"]["log1p_counts"]["baseline_mean_pearson"] is not None
        assert 0 <= e["model"]["calibration"]["coverage_90"] <= 1
        assert e["model"]["celltypes"]["n_spots"] > 100
    p = ad.read_h5ad(out / "pred-quick" / "C6.h5ad")
    assert p.n_vars == 24 and p.uns["stimage_nb"]["backbone"] == "test_resnet"
    # the robustness check: C6 as a 2x coarser scan, same spots, scored with model and baseline
    s = json.loads((out / "shifted-quick" / "eval" / "metrics.json").read_text())["sections"]["C6__scan_2x"]
    assert s["n_spots"] == c6["n_spots"]
    man = pd.read_csv(out / "shifted-quick" / "manifest.csv").set_index("section")
    assert man.loc["C6__scan_2x", "um_per_px"] == pytest.approx(2 * man.loc["C6", "um_per_px"])
    assert s["baseline"]["genes"]["log1p_counts"]["pearson"]["mean"] is not None
    text = (out / "report.md").read_text()
    assert "## Robustness to other scanners and stains (simulated)" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| scan_2x |"))
    assert re.match(r"\| scan_2x \| -?0\.\d{3} \| -?0\.\d{3} \| [+-]0\.\d{3} \| [01]\.\d\d \| [01]\.\d\d \|$", row), row


def test_quick_demo_rerun_resumes(quick_demo):
    from stimage_nb.demo import run_demo

    out, report, first = quick_demo
    before = {p: p.stat().st_mtime_ns for p in (out / "pred-quick").glob("*.h5ad")}
    weights = sorted((out / "run-quick").glob("member_*.safetensors"))
    wt = [w.stat().st_mtime_ns for w in weights]
    t = time.perf_counter()
    assert run_demo(out, quick=True, device="cpu", progress=False) == report
    again = time.perf_counter() - t
    # neither retrained nor re-predicted
    assert [w.stat().st_mtime_ns for w in weights] == wt
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert json.loads((out / "demo-quick.json").read_text())["timings"]["training"] < 10
    assert again < first
