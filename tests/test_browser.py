"""One real-browser test: JupyterLab on 127.0.0.1, driven by playwright-python with Debian's chromium.

It opens notebook 01 (smoke setting), runs all cells, waits for the overlay viewer, switches the
uncertainty mode and the gene, checks that the pixels of the rendered canvas changed each time
(the anywidget's JavaScript really draws from the kernel's data), zooms in (tiles of a finer pyramid
level come from the kernel) and saves a screenshot.

The screenshot goes to the test's temporary folder, and to ``docs/img/overlay_viewer.png`` when that
file is missing or ``STIMAGE_NB_UPDATE_SCREENSHOTS=1`` (so a test run does not rewrite a committed
file every time).

Skips with the reason when chromium, playwright-python or JupyterLab is missing
(``bash .ci/install_browser.sh`` installs the first two).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from _jupyterlab import (
    CANVAS_DIFF,
    CANVAS_SNAPSHOT,
    CANVAS_STATS,
    chromium_page,
    jupyterlab,
    run_all_cells,
    server_log,
    why_no_browser,
)

ROOT = Path(__file__).resolve().parents[1]
NB01 = ROOT / "notebooks" / "01_train_and_predict.ipynb"
SCREENSHOT = ROOT / "docs" / "img" / "overlay_viewer.png"

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _notebook_copy(dest: Path, out_dir: Path) -> Path:
    """Notebook 01 with its parameters cell set to the smoke run writing into ``out_dir``."""
    nb = json.loads(NB01.read_text())
    first = nb["cells"][0]
    assert "parameters" in first["metadata"].get("tags", [])
    src = "".join(first["source"]) if isinstance(first["source"], list) else first["source"]
    src += f'\nMODE = "smoke"\nOUT = {str(out_dir)!r}\n'
    first["source"] = src
    path = dest / NB01.name
    path.write_text(json.dumps(nb))
    return path


def _wait(pred, timeout: float, what: str, interval: float = 0.25):
    t0 = time.time()
    while True:
        v = pred()
        if v:
            return v
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def test_viewer_in_jupyterlab(tmp_path):
    reason = why_no_browser()
    if reason:
        pytest.skip(reason)
    root = tmp_path / "lab"
    root.mkdir()
    out_dir = tmp_path / "out"
    _notebook_copy(root, out_dir)
    console: list[str] = []

    with jupyterlab(root) as (base, token), chromium_page() as page:
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        try:
            page.goto(f"{base}/lab/tree/{NB01.name}?token={token}")
            run_all_cells(page)

            canvas = page.wait_for_selector(".stimage-viewer-canvas", timeout=300_000)
            canvas.scroll_into_view_if_needed()
            # the overview of the slide and the spots are drawn
            stats = _wait(lambda: (s := canvas.evaluate(CANVAS_STATS))["nonbg"] > 0.2 and s, 30, "the slide overview")
            assert stats["w"] > 300 and stats["h"] > 300
            page.wait_for_timeout(1500)  # let the first tiles land

            def changed_after(action, what):
                canvas.evaluate(CANVAS_SNAPSHOT)
                action()
                return _wait(lambda: (d := canvas.evaluate(CANVAS_DIFF)) > 0.002 and d, 20, f"the canvas to change ({what})")

            # 1. uncertainty mode: mean -> epistemic
            d_mode = changed_after(lambda: page.click(".stimage-mode button:text-is('epistemic')"), "mode")
            # 2. gene: another predicted gene, typed into the search box
            search = page.locator(".stimage-search input")
            current = search.input_value()
            options = page.eval_on_selector_all(".stimage-search datalist option", "els => els.map(e => e.value)")
            assert len(options) >= 2, f"gene search offers {options}"
            other = next(g for g in options if g != current)

            def pick_gene():
                search.fill(other)
                search.press("Enter")

            d_gene = changed_after(pick_gene, f"gene {current} -> {other}")
            # 3. zoom in: finer pyramid tiles requested from the kernel and drawn
            def zoom():
                for _ in range(3):
                    page.click(".stimage-viewer-btn[title='zoom in']")
                    page.wait_for_timeout(150)

            d_zoom = changed_after(zoom, "zoom")
            page.wait_for_timeout(1500)
            # 4. click the spot nearest the centre of the view: the kernel sends back its values
            import anndata as ad

            pred = ad.read_h5ad(out_dir / "pred-smoke" / "C6.h5ad")
            v = json.loads(canvas.get_attribute("data-view"))
            xy = pred.obsm["spatial"]
            i = int(((xy[:, 0] - v["cx"]) ** 2 + (xy[:, 1] - v["cy"]) ** 2).argmin())
            sx = (xy[i, 0] - v["cx"]) * v["zoom"] + v["width"] / 2
            sy = (xy[i, 1] - v["cy"]) * v["zoom"] + v["height"] / 2
            canvas.click(position={"x": float(sx), "y": float(sy)})
            spot = str(pred.obs_names[i])
            _wait(lambda: f"spot {spot}" in page.locator(".stimage-spot-info").inner_text(), 20,
                  f"the values of spot {spot} after clicking it")
            info_text = page.locator(".stimage-spot-info").inner_text()
            page.wait_for_timeout(800)
            viewer = page.locator(".stimage-overlay-viewer").first
            shot = tmp_path / "overlay_viewer.png"
            viewer.screenshot(path=str(shot))
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            print("\n".join(console[-40:]))
            print(server_log(root))
            raise

    errors = [c for c in console if c.startswith("pageerror") or ("error" in c.lower() and "stimage" in c.lower())]
    assert not errors, errors
    assert d_mode > 0.002 and d_gene > 0.002 and d_zoom > 0.002
    assert shot.stat().st_size > 20_000
    assert other in info_text and "epistemic" in info_text  # the clicked spot's values for the chosen gene
    if not SCREENSHOT.exists() or os.environ.get("STIMAGE_NB_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
