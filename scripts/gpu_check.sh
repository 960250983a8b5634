#!/usr/bin/env bash
# The one-shot GPU check (scripts/gpu_check.py says what it measures and checks). On one GPU it takes at most
# 8 minutes: each table row's fps, training step time and memory in fp32 and bf16; a 200-iteration Ray Train run
# with checkpoints in a local S3-compatible server and metrics in an MLflow server; the table in docs/performance.md.
#   scripts/gpu_check.sh          # on a GPU machine; creates .venv first (choose the CUDA wheels: README, "GPU check")
#   scripts/gpu_check.sh --cpu    # the reduced CPU mode that the test suite runs
# KNETLAB_PYTHON picks another interpreter than .venv/bin/python. Exit code 0 only if every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${KNETLAB_PYTHON:-.venv/bin/python}
if [ -z "${KNETLAB_PYTHON:-}" ]; then
    bash scripts/bootstrap.sh
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" scripts/gpu_check.py "$@"
