#!/usr/bin/env bash
# Sets everything up (first run only) and starts Wan Studio. Extra arguments go to wgp.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/python wgp.py "$@"
