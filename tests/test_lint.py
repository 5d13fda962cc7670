"""The code passes the project's lint rules (pyproject.toml [tool.ruff]: pyflakes, bugbear, import order)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.is_file():
        return [str(exe)]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.skip("ruff is not installed (pip install -e .[test])")


def test_ruff_is_clean():
    r = subprocess.run(_ruff() + ["check", "--no-cache", "stimage_nb", "benchmarks", "tests"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
