#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/setup-sky.sh
export SGLJAX_SKY_PYTHON="$PWD/.venv-sky/bin/python"
# No checkout folder on sys.path (here or in the servers tests start with `python -m`): our
# top-level kernels/ would shadow the PyPI `kernels` that transformers imports.
export PYTHONSAFEPATH=1
exec .venv/bin/python -m pytest -q "$@"
