#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtual environment in .venv with the package and
# everything its tests need. Re-running it when nothing changed takes a second.
#   bash .ci/setup.sh                 # core + jupyter + test extras (+ OMERO client, chromium)
#   bash .ci/setup.sh --print-paths   # where it would install (no changes)
# Environment: PYTHON (default python3.11), STIMAGE_NB_SKIP_OMERO=1 to skip the OMERO client stack,
# STIMAGE_NB_SKIP_BROWSER=1 to skip chromium. Every path is resolved from this file, so it runs from any
# working directory. It records what it started from in .venv/stimage_nb-setup.json (whether it created
# the venv, whether the wheel cache and STIMAGE_NB_CACHE were empty, pip's cache, how zeroc-ice came):
# tests/test_fresh_machine.py reads it on CI to prove that a machine without caches works.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV="$ROOT/.venv"
WHEELS=${STIMAGE_NB_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/stimage_nb/wheels}
CACHE=${STIMAGE_NB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stimage_nb}
if [ "${1:-}" = "--print-paths" ]; then
  printf 'root=%s\nvenv=%s\nwheels=%s\ncache=%s\n' "$ROOT" "$VENV" "$WHEELS" "$CACHE"
  exit 0
fi
# what this run starts from (recorded below)
n_files() { if [ -d "$1" ]; then find "$1" -mindepth 1 -not -name '.*.lock' | wc -l | tr -d ' '; else echo 0; fi; }
wheels_at_start=$(n_files "$WHEELS")
cache_at_start=$(n_files "$CACHE")
venv_created=false
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  venv_created=true
fi
export STIMAGE_NB_OMERO_STATUS="$VENV/.stimage_nb-omero-status"
record() {  # record INSTALLED: what this set-up started from and did
  local omero="skipped"
  [ -f "$STIMAGE_NB_OMERO_STATUS" ] && omero=$(cat "$STIMAGE_NB_OMERO_STATUS")
  "$VENV/bin/python" - "$VENV/stimage_nb-setup.json" "$1" "$venv_created" "$wheels_at_start" "$cache_at_start" \
      "$WHEELS" "$CACHE" "$omero" <<'PYEOF'
import json, os, sys, tempfile
path, installed, created, wheels_n, cache_n, wheels, cache, omero = sys.argv[1:]
rec = {"run": os.environ.get("STIMAGE_NB_SETUP_RUN", ""), "installed": installed == "true",
       "venv_created": created == "true", "wheels": wheels, "wheels_files_at_start": int(wheels_n),
       "stimage_nb_cache": cache, "stimage_nb_cache_files_at_start": int(cache_n),
       "pip_cache": "off" if os.environ.get("PIP_NO_CACHE_DIR", "").lower() in ("1", "true", "yes", "off") else "on",
       "xdg_cache_home": os.environ.get("XDG_CACHE_HOME", ""), "zeroc_ice": omero}
fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
with os.fdopen(fd, "w") as f:
    json.dump(rec, f, indent=1)
os.replace(tmp, path)
PYEOF
}
stamp="$VENV/.stimage_nb-setup"
want=$(cat pyproject.toml .ci/setup.sh .ci/*.sh 2>/dev/null | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  record false
  exit 0
fi
rm -f "$STIMAGE_NB_OMERO_STATUS"
echo "[setup] installing into $VENV (first run takes a few minutes)"
"$VENV/bin/python" -m pip install -q --upgrade pip wheel "setuptools<81"
# torch/torchvision: the pinned pair installs from the local wheel cache on these machines;
# elsewhere pip fetches them from PyPI.
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" \
  || "$VENV/bin/python" -m pip install -q torch torchvision
"$VENV/bin/python" -m pip install -q -e ".[test,jupyter]"
if [ -z "${STIMAGE_NB_SKIP_OMERO:-}" ] && [ -f .ci/install_omero.sh ]; then
  bash "$ROOT/.ci/install_omero.sh" "$VENV/bin/python"
fi
if [ -z "${STIMAGE_NB_SKIP_BROWSER:-}" ] && [ -f .ci/install_browser.sh ]; then
  bash "$ROOT/.ci/install_browser.sh" "$VENV/bin/python" || echo "[setup] browser test tooling not installed; browser tests will skip"
fi
echo "$want" > "$stamp"
record true
echo "[setup] done"
