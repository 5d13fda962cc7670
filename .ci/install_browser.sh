#!/usr/bin/env bash
# Install what the real-browser test (tests/test_browser.py) needs: Debian's chromium and the
# playwright Python package. Playwright's own browser builds are never downloaded (they cannot be
# fetched on offline or firewalled CI machines); the test drives /usr/bin/chromium instead.
#
#   bash .ci/install_browser.sh [PYTHON]      # default: .venv/bin/python
#
# Idempotent: does nothing when chromium and playwright are already there. Needs root or
# passwordless sudo for apt-get; without them it says so and exits non-zero (setup.sh then goes on
# and the browser test skips with that reason).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${1:-$ROOT/.venv/bin/python}
# The Python as an absolute path, resolved against the caller's directory (never through its symlink:
# a venv's python is a link to the base interpreter), so every later `cd` keeps it valid.
case "$PY" in
  /*) ;;
  */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;;
  *) PY=$(command -v "$PY") || { echo "no python named $1 on PATH" >&2; exit 1; } ;;
esac
if [ "${2:-}" = "--print-paths" ]; then  # where it would work (tests run it from other directories)
  printf 'root=%s\npython=%s\n' "$ROOT" "$PY"
  exit 0
fi
cd "$ROOT"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

chromium_bin() {
  for c in /usr/bin/chromium /usr/bin/chromium-browser; do
    if [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}

if ! chromium_bin >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    SUDO=()
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "[browser] chromium is missing and apt-get needs root; install it with: apt-get install chromium" >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null; then
    echo "[browser] no apt-get on this machine; install chromium by hand to run the browser test" >&2
    exit 1
  fi
  echo "[browser] installing Debian's chromium (apt-get)"
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium >/dev/null
  chromium_bin >/dev/null || { echo "[browser] chromium did not install" >&2; exit 1; }
fi

if ! "$PY" -c 'import playwright.sync_api' 2>/dev/null; then
  echo "[browser] installing playwright (Python package only, no browser download)"
  "$PY" -m pip install -q "playwright>=1.40"
fi
echo "[browser] ready: $(chromium_bin) ($("$(chromium_bin)" --version 2>/dev/null || echo 'version unknown'))"
