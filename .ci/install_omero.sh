#!/usr/bin/env bash
# Install the OMERO client stack (zeroc-ice 3.6.5, omero-py, ezomero, omero-rois, omero-marshal) into a Python.
#
#   bash .ci/install_omero.sh [PYTHON]        # default: .venv/bin/python
#
# omero-py needs zeroc-ice>=3.6.5,<3.7. On PyPI that is only an sdist, which does not compile on
# CPython >= 3.11 without two one-line patches (see ../shared/docs/field-notes.md):
#   src/Slice.cpp : drop `#include <eval.h>` (the header was removed in 3.11)
#   src/Util.cpp  : `PyThreadState_GET()->frame` -> `PyEval_GetFrame()` (the field became private)
# The patched wheel is built once (about 7.5 min on 2 cores) and cached in
# $STIMAGE_NB_WHEELS (default ~/.cache/stimage_nb/wheels); later runs install it in seconds.
# Idempotent: returns at once when the stack already imports at the wanted versions.
# Needs a C++ compiler and the OpenSSL and bzip2 headers (Debian: g++ libssl-dev libbz2-dev).
# conda users can skip all this: conda-forge ships zeroc-ice 3.6.5 prebuilt (environment.yml).
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
ICE_VERSION=3.6.5
PKGS=("omero-py>=5.19,<6" "ezomero>=3.0" "omero-rois>=0.3" "omero-marshal>=0.9")
WHEELS=${STIMAGE_NB_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/stimage_nb/wheels}

if ! "$PY" -c 'import sys' 2>/dev/null; then
  echo "[omero] no usable python at $PY" >&2; exit 1
fi

have_stack() {
  "$PY" - "$ICE_VERSION" <<'EOF' 2>/dev/null
import sys
import Ice, omero, omero.clients, omero.gateway, ezomero, omero_rois, omero_marshal  # noqa: F401
sys.exit(0 if Ice.stringVersion() == sys.argv[1] else 1)
EOF
}

status() {  # how zeroc-ice came, for the set-up's record (STIMAGE_NB_OMERO_STATUS, set by .ci/setup.sh)
  if [ -n "${STIMAGE_NB_OMERO_STATUS:-}" ]; then echo "$1" > "$STIMAGE_NB_OMERO_STATUS"; fi
}

if have_stack; then
  echo "[omero] client stack already installed in $PY"
  status "already installed"
  exit 0
fi

tag=$("$PY" -c 'import sys, sysconfig; v="%d%d" % sys.version_info[:2]; print(f"cp{v}-cp{v}-" + sysconfig.get_platform().replace("-", "_").replace(".", "_"))')
mkdir -p "$WHEELS"
wheel=$(ls "$WHEELS"/zeroc_ice-"$ICE_VERSION"-"$tag".whl 2>/dev/null | head -n1 || true)

if [ -z "$wheel" ]; then
  # One builder at a time per cache (parallel set-ups wait for the first build instead of repeating it).
  exec 9>"$WHEELS/.zeroc-ice.lock"
  if command -v flock >/dev/null; then flock 9; fi
  wheel=$(ls "$WHEELS"/zeroc_ice-"$ICE_VERSION"-"$tag".whl 2>/dev/null | head -n1 || true)
fi

how="cached wheel"
if [ -z "$wheel" ]; then
  how="built from source"
  echo "[omero] building zeroc-ice $ICE_VERSION for $tag (once; about 8 min on 2 cores)"
  for tool in g++ make; do
    command -v "$tool" >/dev/null || { echo "[omero] $tool is missing (Debian: apt-get install g++ make libssl-dev libbz2-dev)" >&2; exit 1; }
  done
  work=$(mktemp -d "${TMPDIR:-/tmp}/zeroc-ice-build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  "$PY" -m pip install -q wheel setuptools
  "$PY" -m pip download -q --no-deps --no-binary :all: --dest "$work" "zeroc-ice==$ICE_VERSION"
  tar -xzf "$work"/zeroc-ice-"$ICE_VERSION".tar.gz -C "$work"
  src="$work/zeroc-ice-$ICE_VERSION"
  # The two patches; each must change exactly what it names, or the build would fail obscurely later.
  sed -i '/#include <eval.h>/d' "$src/src/Slice.cpp"
  sed -i 's/PyFrameObject \*f = PyThreadState_GET()->frame;/PyFrameObject *f = PyEval_GetFrame();/' "$src/src/Util.cpp"
  if grep -q '#include <eval.h>' "$src/src/Slice.cpp" || grep -q 'PyThreadState_GET()->frame' "$src/src/Util.cpp" \
     || ! grep -q 'PyFrameObject \*f = PyEval_GetFrame();' "$src/src/Util.cpp"; then
    echo "[omero] patching zeroc-ice $ICE_VERSION failed (unexpected sources in $src)" >&2; exit 1
  fi
  jobs=$(nproc 2>/dev/null || echo 2)
  (cd "$src" && MAKEFLAGS="-j$jobs" nice -n 10 "$PY" -m pip wheel -q --no-deps --no-build-isolation --wheel-dir "$work/dist" .)
  built=$(ls "$work"/dist/zeroc_ice-*.whl | head -n1)
  # Atomic publish into the cache: copy under a temporary name, then rename.
  cp "$built" "$WHEELS/.$(basename "$built").tmp-$$"
  mv "$WHEELS/.$(basename "$built").tmp-$$" "$WHEELS/$(basename "$built")"
  wheel="$WHEELS/$(basename "$built")"
  echo "[omero] cached $(basename "$built") in $WHEELS"
fi

echo "[omero] installing $(basename "$wheel") and ${PKGS[*]}"
"$PY" -m pip install -q "$wheel"
"$PY" -m pip install -q "${PKGS[@]}"
if ! have_stack; then
  echo "[omero] the OMERO client stack does not import after installation" >&2
  "$PY" -c 'import Ice, omero.gateway, ezomero, omero_rois' >&2 || true
  exit 1
fi
status "$how"
echo "[omero] OMERO client stack ready in $PY"
