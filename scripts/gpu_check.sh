#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): every CUDA path measured in one short run.
#   bash scripts/gpu_check.sh --fetch-wheels   here: download the wheels the GPU machine lacks into .whl/
#   bash scripts/gpu_check.sh [options]        on the lent GPU machine (carry .whl): installs them, runs every part
#   bash scripts/gpu_check.sh --dry-run        the same on the CPU with tiny shapes (the test suite runs this)
# Options go to benchmarks/gpu_check.py (--parts, --out, --budget). Results: benchmarks/gpu/<date>_<gpu>.{json,md,log},
# also copied to $OUT when that is set (the device tool brings $OUT back).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=benchmarks/gpu_wheels.txt

if [ "${1:-}" = "--fetch-wheels" ]; then
  PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
  mkdir -p .whl
  grep -v '^\s*#' "$WHEELS" | awk 'NF {print $1}' | while read -r req; do
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$req" || { echo "gpu_check: could not download $req" >&2; exit 1; }
  done || exit 1
  du -sh .whl
  exit 0
fi

dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
if [ $dry = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi

if [ $dry = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  echo "[gpu_check] installing the carried wheels: $(ls .whl | tr '\n' ' ')"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/wan-site .whl/*.whl \
    || echo "[gpu_check] installing the wheels failed; the parts that need them will say so" >&2
  export PYTHONPATH=/tmp/wan-site${PYTHONPATH:+:$PYTHONPATH}
fi
missing=$(grep -v '^\s*#' "$WHEELS" | awk 'NF {print $2}' | while read -r mod; do
  $PY -c "import $mod" >/dev/null 2>&1 || printf '%s ' "$mod"; done)
[ -n "$missing" ] && echo "[gpu_check] modules missing (the parts that need them will say so): $missing"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False
listing=$(mktemp)
$PY benchmarks/gpu_check.py "$@" | tee "$listing"
code=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then   # the files the driver names on its last lines
  grep -E '\.(json|md|log)$' "$listing" | while read -r f; do [ -f "$f" ] && cp "$f" "$OUT"/; done
fi
rm -f "$listing"
exit $code
