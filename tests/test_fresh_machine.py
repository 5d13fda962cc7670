"""The README's two commands on a machine that has never seen the project.

- ``.ci/run`` with ``CI=true`` points every cache the set-up could use at a new, empty folder and turns
  pip's cache off; :func:`test_ci_set_up_started_from_nothing` then fails unless *this* run's set-up
  created the venv, found the zeroc-ice wheel cache and ``STIMAGE_NB_CACHE`` empty, built zeroc-ice from
  source, and the tests run in that venv with that empty cache. A green CI therefore means a fresh
  machine works (a set-up that needed a cache would have failed before the tests), and the check cannot
  silently pass on a machine that had the caches.
- Every script resolves its own paths and the Python it is given, whatever the caller's working
  directory (the bug this guards against: ``install_omero.sh .venv/bin/python`` compiled after a ``cd``
  with the relative path, ``nice: '.venv/bin/python': No such file or directory``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / ".ci"


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="proves the fresh-machine path on CI only "
                    "(CI=true bash .ci/run, from a clean clone)")
def test_ci_set_up_started_from_nothing():
    rec_path = ROOT / ".venv" / "stimage_nb-setup.json"
    assert rec_path.is_file(), "the set-up wrote no record (.venv/stimage_nb-setup.json)"
    rec = json.loads(rec_path.read_text())
    assert rec["run"] and rec["run"] == os.environ.get("STIMAGE_NB_SETUP_RUN"), \
        f"the record is not from this CI run's set-up: {rec}"
    assert rec["installed"] and rec["venv_created"], f"the set-up reused an existing .venv: {rec}"
    assert rec["pip_cache"] == "off", rec
    assert rec["wheels_files_at_start"] == 0 and rec["stimage_nb_cache_files_at_start"] == 0, rec
    if not os.environ.get("STIMAGE_NB_SKIP_OMERO"):
        assert rec["zeroc_ice"] == "built from source", rec
        assert list(Path(rec["wheels"]).glob("zeroc_ice-3.6.5-*.whl")), "the wheel built in this run is missing"
    assert Path(sys.prefix).resolve() == (ROOT / ".venv").resolve(), "the tests do not run in the set-up's venv"
    assert os.environ.get("STIMAGE_NB_CACHE") == rec["stimage_nb_cache"], "the tests do not use the empty cache"


def _print_paths(args, cwd) -> dict:
    r = subprocess.run(["bash", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return dict(line.split("=", 1) for line in r.stdout.strip().splitlines())


@pytest.mark.parametrize("script", ["run", "setup.sh"])
def test_scripts_find_the_repository_from_anywhere(script, tmp_path):
    got = _print_paths([str(SCRIPTS / script), "--print-paths"], cwd=tmp_path)
    assert Path(got["root"]) == ROOT and Path(got["venv"]) == ROOT / ".venv"


@pytest.mark.parametrize("script", ["install_omero.sh", "install_browser.sh"])
def test_installers_make_the_python_absolute(script, tmp_path):
    """A Python given relative to the caller's directory stays valid after the script's own `cd`."""
    link = tmp_path / "env"
    link.symlink_to(Path(sys.executable).parent.parent)  # a venv reached through a relative path
    rel = "env/bin/" + Path(sys.executable).name
    got = _print_paths([str(SCRIPTS / script), rel, "--print-paths"], cwd=tmp_path)
    assert Path(got["root"]) == ROOT
    assert got["python"] == str(tmp_path / rel), got  # absolute, and not resolved through the venv's link
    bare = _print_paths([str(SCRIPTS / script), "python3", "--print-paths"], cwd=tmp_path)
    assert bare["python"].startswith("/")


def test_install_omero_runs_from_another_directory(tmp_path):
    """The real script (not a dry mode) with a relative Python, from a directory that is not the repository."""
    pytest.importorskip("Ice", reason="the OMERO client stack is not installed")
    link = tmp_path / "env"
    link.symlink_to(Path(sys.executable).parent.parent)
    status = tmp_path / "status"
    r = subprocess.run(["bash", str(SCRIPTS / "install_omero.sh"), "env/bin/" + Path(sys.executable).name],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "STIMAGE_NB_OMERO_STATUS": str(status)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"already installed in {tmp_path}/env/bin/" in r.stdout
    assert status.read_text().strip() == "already installed"
