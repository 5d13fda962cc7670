#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtual environment in .venv with the package and
# everything its tests need. Re-running it when nothing changed takes a second.
#   bash .ci/setup.sh            # core + jupyter + test extras
# Environment: PYTHON (default python3.11), STIMAGE_NB_SKIP_OMERO=1 to skip the OMERO client stack,
# STIMAGE_NB_SKIP_BROWSER=1 to skip chromium.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.stimage_nb-setup"
want=$(cat pyproject.toml .ci/setup.sh .ci/*.sh 2>/dev/null | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
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
echo "[setup] done"
