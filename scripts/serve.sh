#!/usr/bin/env bash
# Set up (if needed), then prepare, warm up and serve the default model
# (SmolLM2-135M-Instruct) on http://127.0.0.1:30000 with an OpenAI-compatible API.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/sgljax up local "$@"
