#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/setup-sky.sh
export SGLJAX_SKY_PYTHON="$PWD/.venv-sky/bin/python"
exec .venv/bin/python -m pytest -q "$@"
