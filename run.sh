#!/usr/bin/env bash
# Installs everything, starts a background worker and the dashboard on http://127.0.0.1:8501, and
# queues the offline demo (Fashion-MNIST, four packaged models) so every page fills as it prepares.
# Ctrl-C stops the dashboard and the worker together.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export ENSEMBLE_WORKSPACE="${ENSEMBLE_WORKSPACE:-$PWD/workspace}"
.venv/bin/python -m core worker &
worker=$!
trap 'kill -TERM $worker 2>/dev/null; wait $worker 2>/dev/null' EXIT
.venv/bin/python -m core demo --queue
.venv/bin/python -m streamlit run app.py "$@"
