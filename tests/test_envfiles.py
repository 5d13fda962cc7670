"""Lint environment.yml and binder/: conda-forge cannot be reached here to solve them, so CI checks
what can be checked without it: valid YAML, conda-forge only, Python pinned, every dependency of
pyproject.toml present with a version range inside pyproject's, and a Binder postBuild that
installs the package itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
from packaging.requirements import Requirement  # noqa: E402
from packaging.specifiers import SpecifierSet  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOP = ROOT / "environment.yml"
BINDER = ROOT / "binder"

# PyPI name -> conda-forge names that provide it (the first is the canonical one)
CONDA_NAMES = {
    "torch": ("pytorch", "pytorch-cpu", "pytorch-gpu"),
    "dask": ("dask-core", "dask"),
    "matplotlib": ("matplotlib-base", "matplotlib"),
    "zeroc-ice": ("zeroc-ice",),
    "openslide-bin": ("openslide",),
    "igraph": ("python-igraph",),  # PyPI's wheel of the C library; conda-forge packages the library itself
}
# what each environment file must provide: core dependencies + these extras
REQUIRED_EXTRAS = {TOP: ("omero", "jupyter"), BINDER / "environment.yml": ("jupyter",)}
# PyPI packages that are not on conda-forge and may (must) come from the pip: section
PIP_ONLY = {"ezomero"}


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(extras) -> dict[str, Requirement]:
    proj = _pyproject()["project"]
    reqs = [Requirement(r) for r in proj["dependencies"]]
    for e in extras:
        reqs += [Requirement(r) for r in proj["optional-dependencies"][e]]
    return {_norm(r.name): r for r in reqs}


def _conda_spec(dep: str) -> tuple[str, SpecifierSet]:
    """``name[ op version[,...]]`` (conda MatchSpec subset) -> (name, PEP 440 specifier)."""
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(.*?)\s*", dep)
    assert m, f"unparsable conda spec {dep!r}"
    name, rest = m.group(1), m.group(2).replace(" ", "")
    parts = []
    for p in filter(None, rest.split(",")):
        if p.startswith((">=", "<=", "!=", "==", "~=", ">", "<")):
            parts.append(p)
        else:  # conda's "=3.11" and bare "3.11" both mean 3.11.*
            v = p.lstrip("=")
            parts.append(f"=={v}" if v.endswith("*") else f"=={v}.*")
    return name, SpecifierSet(",".join(parts))


def _probe_versions(*specs: SpecifierSet) -> list[Version]:
    out = {Version("0.0.1"), Version("9999")}
    for s in specs:
        for sp in s:
            v = Version(sp.version.rstrip(".*"))
            rel = list(v.release) + [0] * (3 - len(v.release))
            a, b, c = rel[:3]
            cands = [(a, b, c), (a, b, c + 1), (a, b + 1, 0), (a + 1, 0, 0)]
            if c:
                cands.append((a, b, c - 1))
            if b:
                cands.append((a, b - 1, 99))
            if a:
                cands.append((a - 1, 99, 99))
            out.update(Version(".".join(map(str, t))) for t in cands)
            out.add(v)
    return sorted(out)


def _within(inner: SpecifierSet, outer: SpecifierSet) -> list[Version]:
    """Versions (from a probe set) the env allows but pyproject forbids."""
    return [v for v in _probe_versions(inner, outer) if inner.contains(v) and not outer.contains(v)]


def _load(path: Path) -> dict:
    env = yaml.safe_load(path.read_text())
    assert isinstance(env, dict) and "dependencies" in env, f"{path}: not a conda environment file"
    return env


def _split(env: dict):
    conda, pip = [], []
    for d in env["dependencies"]:
        if isinstance(d, dict):
            assert set(d) == {"pip"}, f"unexpected dependency block {d}"
            pip += d["pip"]
        else:
            conda.append(str(d))
    return conda, pip


ENV_FILES = [TOP, BINDER / "environment.yml"]


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_env_file_is_conda_forge_only_with_python_pinned(path):
    env = _load(path)
    assert env.get("channels", [])[0] == "conda-forge", f"{path}: conda-forge must be the (first) channel"
    assert set(env["channels"]) <= {"conda-forge", "nodefaults"}, f"{path}: other channels {env['channels']}"
    conda, pip = _split(env)
    chan = [d for d in conda if "::" in d or "/" in d.split()[0]]
    assert not chan, f"{path}: channel-qualified specs {chan}"
    py = [d for d in conda if _conda_spec(d)[0] == "python"]
    assert len(py) == 1, f"{path}: python must be listed once"
    spec = _conda_spec(py[0])[1]
    pins = [s for s in spec if s.operator == "=="]
    assert pins and re.fullmatch(r"3\.\d+(\.\*|\.\d+)?", pins[0].version), f"{path}: python not pinned ({py[0]})"
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert requires.contains(pins[0].version.rstrip(".*") + ".0"), f"{path}: {py[0]} outside requires-python {requires}"
    for p in pip:
        assert not re.match(r"(git\+|https?://|-e\b|--)", p.strip()), f"{path}: pip entry {p!r} is not a PyPI requirement"


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_env_file_is_in_step_with_pyproject(path):
    conda, pip = _split(_load(path))
    have: dict[str, tuple[str, SpecifierSet, str]] = {}
    for d in conda:
        name, spec = _conda_spec(d)
        have[_norm(name)] = (name, spec, "conda")
    for d in pip:
        r = Requirement(d)
        have[_norm(r.name)] = (r.name, r.specifier, "pip")
    required = _requirements(REQUIRED_EXTRAS[path])
    optional = _requirements(["test"])
    problems = []
    for key, req in {**optional, **required}.items():
        names = [_norm(n) for n in CONDA_NAMES.get(key, (key,))]
        found = next((have[n] for n in names if n in have), None)
        if found is None:
            if key in required:
                problems.append(f"{req} missing (conda-forge name: {names[0]})")
            continue
        name, spec, where = found
        if where == "pip" and key not in PIP_ONLY:
            problems.append(f"{name} comes from pip but is on conda-forge; list it as a conda dependency")
        if where == "conda" and key in PIP_ONLY:
            problems.append(f"{name} is not on conda-forge; move it to the pip: section")
        if req.specifier and not spec:
            problems.append(f"{name}: no version range; pyproject requires {req.specifier}")
            continue
        bad = _within(spec, req.specifier)
        if bad:
            problems.append(f"{name}{spec} allows {bad[0]}, which pyproject's {req.name}{req.specifier} forbids")
    assert not problems, f"{path.relative_to(ROOT)} is out of step with pyproject.toml:\n  " + "\n  ".join(problems)


def test_top_level_env_is_gpu_capable_and_binder_is_cpu():
    top = {_conda_spec(d)[0] for d in _split(_load(TOP))[0]}
    binder = {_conda_spec(d)[0] for d in _split(_load(BINDER / "environment.yml"))[0]}
    assert "pytorch" in top and "pytorch-cpu" not in top  # conda-forge picks the CUDA build where a GPU is
    assert {"omero-py", "zeroc-ice"} <= top
    assert "pytorch-cpu" in binder and "omero-py" not in binder  # mybinder.org: ~2 GB RAM, OMERO ports blocked


def test_lint_catches_drift():
    """The checks above can fail: a range wider than pyproject's and a missing package are caught."""
    assert _within(SpecifierSet(">=2.0"), SpecifierSet(">=2.1"))
    assert not _within(SpecifierSet(">=2.1"), SpecifierSet(">=2.1"))
    assert not _within(SpecifierSet("==3.11.*"), SpecifierSet(">=3.10"))
    assert _within(SpecifierSet(">=1.0"), SpecifierSet(">=1.0,<2"))
    assert _conda_spec("python=3.11") == ("python", SpecifierSet("==3.11.*"))
    assert _conda_spec("zeroc-ice=3.6.5")[1].contains("3.6.5")


def test_binder_postbuild_installs_the_package_and_fails_fast():
    pb = BINDER / "postBuild"
    text = pb.read_text()
    assert text.startswith("#!"), "postBuild needs a shebang"
    assert os.access(pb, os.X_OK), "postBuild must be executable (git update-index --chmod=+x)"
    assert re.search(r"^set -e", text, re.M), "postBuild must stop at the first error (set -e)"
    assert re.search(r"pip install (--\S+ )*--no-deps (--\S+ )*\.(\s|$)", text), "postBuild must pip install --no-deps ."
    subprocess.run(["bash", "-n", str(pb)], check=True)
    assert not (BINDER / "requirements.txt").exists(), "environment.yml wins; a requirements.txt would be ignored"
    # the data the tutorial needs are fetched by a command the package really has
    from stimage_nb.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert "fetch-data" in sub.choices
    from stimage_nb.datasets import fetch_her2st  # noqa: F401


def test_git_records_postbuild_as_executable():
    out = subprocess.run(["git", "ls-files", "-s", "binder/postBuild"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout:
        pytest.skip("not a git checkout, or binder/postBuild not committed yet")
    assert out.stdout.split()[0] == "100755", "commit binder/postBuild with mode 100755"


def test_setup_installs_browser_tooling_without_playwright_downloads():
    sh = (ROOT / ".ci" / "install_browser.sh").read_text()
    assert "apt-get update" in sh and "install" in sh and "chromium" in sh
    assert "playwright install" not in sh and "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1" in sh
    subprocess.run(["bash", "-n", str(ROOT / ".ci" / "install_browser.sh")], check=True)
    assert sys.executable  # the lint itself ran under the test interpreter
