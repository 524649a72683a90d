#!/usr/bin/env bash
# SkyPilot in its own venv (.venv-sky): its pins clash with transformers' dependencies.
# `sgljax up` finds it through SGLJAX_SKY_PYTHON=.venv-sky/bin/python.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-sky/bin/python ] || [ ! -f .venv-sky/.installed ] \
    || [ constraints-sky.txt -nt .venv-sky/.installed ]; then
  python3 -m venv .venv-sky
  if ! .venv-sky/bin/pip install -q -c constraints-sky.txt "skypilot==0.14.1" >.venv-sky/setup.log 2>&1; then
    grep -v "^WARNING: Location" .venv-sky/setup.log | tail -20 >&2
    echo "error: installing SkyPilot failed (log: .venv-sky/setup.log)" >&2
    exit 1
  fi
  touch .venv-sky/.installed
fi
