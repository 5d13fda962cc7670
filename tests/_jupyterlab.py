"""A real JupyterLab on 127.0.0.1 driven by playwright-python with Debian's chromium.

Used by tests/test_browser.py. Playwright's own browser downloads are never used (they cannot be
fetched on offline CI machines): the system chromium is launched through ``executable_path``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-dev-shm-usage"]


def find_chromium() -> str | None:
    env = os.environ.get("STIMAGE_NB_CHROMIUM")
    for c in ((env,) if env else ()) + CHROMIUM_CANDIDATES:
        if c and os.access(c, os.X_OK):
            return c
    return shutil.which("chromium")


def why_no_browser() -> str | None:
    """``None`` when the browser test can run, else the reason it cannot."""
    if find_chromium() is None:
        return ("chromium is not installed (bash .ci/install_browser.sh installs Debian's chromium; "
                "or set STIMAGE_NB_CHROMIUM to a chromium binary)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright-python is not installed (pip install playwright; its browser download is not needed)"
    try:
        import ipykernel  # noqa: F401
        import jupyterlab  # noqa: F401
    except ImportError as e:
        return f"JupyterLab is not installed ({e}); pip install 'stimage_nb[jupyter]'"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def jupyterlab(root: Path, *, timeout: float = 90.0, env: dict | None = None):
    """Run ``jupyter lab`` serving ``root``; yields ``(base_url, token)``.

    Config, data and runtime dirs are private to the run, so user settings never leak in.
    """
    port, token = _free_port(), secrets.token_hex(16)
    home = root.parent / (root.name + "-jupyter-home")
    for d in ("config", "runtime", "workspaces", "settings"):
        (home / d).mkdir(parents=True, exist_ok=True)
    e = dict(os.environ)
    e.update({"JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
              "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
              "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"), "PYTHONUNBUFFERED": "1"})
    e.update(env or {})
    # no news pop-up, no update check: nothing may reach the network
    (home / "settings" / "@jupyterlab").mkdir(parents=True, exist_ok=True)
    (home / "settings" / "@jupyterlab" / "apputils-extension").mkdir(exist_ok=True)
    (home / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        '{"fetchNews": "false", "checkForUpdates": false}')
    # start the notebook's kernel without asking ("Select Kernel" dialog)
    (home / "settings" / "@jupyterlab" / "notebook-extension").mkdir(exist_ok=True)
    (home / "settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
        '{"autoStartDefaultKernel": true}')
    log = open(home / "server.log", "wb")
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--ServerApp.allow_remote_access=False", "--ServerApp.terminals_enabled=False",
           "--LabApp.extension_manager=readonly"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=e, cwd=str(root))
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {proc.returncode}:\n{(home / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() - t0 > timeout:
                raise TimeoutError(f"jupyter lab did not start in {timeout:.0f} s:\n"
                                   f"{(home / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def accept_dialogs(page, wait_ms: int = 0) -> int:
    """Accept any JupyterLab dialog on screen (e.g. "Select Kernel"); returns how many."""
    n = 0
    if wait_ms:
        try:
            page.wait_for_selector(".jp-Dialog .jp-mod-accept", timeout=wait_ms)
        except Exception:  # noqa: BLE001 - no dialog came
            return 0
    while page.locator(".jp-Dialog .jp-mod-accept").count():
        page.locator(".jp-Dialog .jp-mod-accept").first.click()
        page.wait_for_timeout(300)
        n += 1
    return n


def run_all_cells(page, timeout_s: float = 60) -> None:
    """Run every cell of the open notebook (menu Run > Run All Cells), answering kernel dialogs."""
    import time as _t

    page.wait_for_selector(".jp-Notebook", timeout=timeout_s * 1000)
    accept_dialogs(page, wait_ms=3000)
    page.click(".lm-MenuBar-itemLabel:text-is('Run')")
    page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
    t0 = _t.time()
    while _t.time() - t0 < 5:  # a kernel dialog may come only now
        if accept_dialogs(page):
            break
        page.wait_for_timeout(250)


def server_log(root: Path) -> str:
    p = root.parent / (root.name + "-jupyter-home") / "server.log"
    return p.read_text(errors="replace")[-5000:] if p.exists() else ""


@contextlib.contextmanager
def chromium_page(viewport=(1400, 1000)):
    """A playwright page in headless Debian chromium."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS, headless=True)
        try:
            ctx = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
            page = ctx.new_page()
            yield page
        finally:
            browser.close()


# JS helpers evaluated in the page -------------------------------------------------------------
CANVAS_STATS = """(el) => {
  const c = el; const ctx = c.getContext('2d');
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  let nonbg = 0, h = 0;
  for (let i = 0; i < d.length; i += 4) {
    const r = d[i], g = d[i+1], b = d[i+2];
    if (!(r === 242 && g === 242 && b === 242)) nonbg++;
    h = (h * 31 + r * 7 + g * 3 + b) >>> 0;
  }
  return {w: c.width, h: c.height, nonbg: nonbg / (d.length / 4), hash: h};
}"""

CANVAS_SNAPSHOT = """(el) => { window.__stimage_snap = el.getContext('2d').getImageData(0, 0, el.width, el.height).data; return true; }"""

CANVAS_DIFF = """(el) => {
  const a = window.__stimage_snap; const b = el.getContext('2d').getImageData(0, 0, el.width, el.height).data;
  if (!a || a.length !== b.length) return 1.0;
  let n = 0;
  for (let i = 0; i < a.length; i += 4) {
    if (Math.abs(a[i]-b[i]) + Math.abs(a[i+1]-b[i+1]) + Math.abs(a[i+2]-b[i+2]) > 30) n++;
  }
  return n / (a.length / 4);
}"""
