#!/usr/bin/env bash
# Creates .venv and installs the project's dependencies into it.
# Idempotent: a stamp file records what was installed, so a second run costs a second.
#   bash scripts/setup.sh          runtime dependencies
#   bash scripts/setup.sh --test   runtime + test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  echo "[setup] .venv has no pip (its creation was cut short): making it again"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install --disable-pip-version-check -q "$@"; }

# The browser tests drive Debian's Chromium (Playwright's own browser download needs a CDN).
if [ $want_test = 1 ] && ! command -v chromium >/dev/null 2>&1 && [ -z "${WAN_STUDIO_CHROMIUM:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian's chromium for the browser tests"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "[setup] the browser tests need Chromium: sudo apt-get install chromium (or set WAN_STUDIO_CHROMIUM)" >&2
  fi
fi

files="constraints.txt requirements.txt"
[ $want_test = 1 ] && files="$files requirements-test.txt"
stamp=".venv/.wan-studio-$(cat $files | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
# torch first and alone: on a CPU machine a local CPU wheel satisfies the pin; users with a GPU
# install their CUDA build of torch 2.13.0 beforehand (README), which the pin then keeps.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0"
  pip_install "torch==2.13.0"
fi
echo "[setup] installing $(echo $files | tr ' ' ',')"
pip_install -c constraints.txt -r requirements.txt
[ $want_test = 1 ] && pip_install -c constraints.txt -r requirements-test.txt
touch "$stamp"
echo "[setup] done"
