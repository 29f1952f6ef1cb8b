#!/usr/bin/env bash
# Sets everything up (first run only) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONDONTWRITEBYTECODE=1
# Two workers, one thread each (tests/conftest.py sets OMP_NUM_THREADS=1 for them and every process
# they start): the machines this runs on have two cores.
exec .venv/bin/python -m pytest tests -n 2 -q -p no:cacheprovider --durations=25 "$@"
