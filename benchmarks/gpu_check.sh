#!/usr/bin/env bash
# The GPU path end to end, on a machine with an NVIDIA GPU:
#   bash benchmarks/gpu_check.sh            # SGLJAX_CHECK_DEVICE=cpu runs the same steps on a CPU
# 1. sets up .venv with the cuda extra (jax[cuda12]);
# 2. greedy tokens of a few prompts with --device cuda --attention-backend native against the
#    CPU's (float32, matmuls at full precision on both), prompt by prompt;
# 3. serves the default model on the GPU and runs a short `sgljax bench` against it.
# Exits non-zero when a prompt's tokens differ or a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
device=${SGLJAX_CHECK_DEVICE:-cuda}
port=${SGLJAX_CHECK_PORT:-30177}
out=$(mktemp -d /tmp/sgljax-gpu-check.XXXXXX)
if [ "$device" = cuda ]; then
  bash scripts/setup.sh cuda
else
  bash scripts/setup.sh
fi
export JAX_DEFAULT_MATMUL_PRECISION=highest  # no TF32: float32 sums as on the CPU

echo "== greedy tokens: $device vs cpu"
.venv/bin/python benchmarks/greedy_tokens.py --device "$device" --attention-backend native \
  --out "$out/device.json"
JAX_PLATFORMS=cpu .venv/bin/python benchmarks/greedy_tokens.py --device cpu --out "$out/cpu.json"
.venv/bin/python - "$out/device.json" "$out/cpu.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
bad = 0
for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])):
    same = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), None)
    print(f"prompt {i}: {'identical' if same is None else f'first differs at token {same}'}"
          f" ({len(x)} tokens)")
    bad += same is not None
print(f"{a['device']} ({a['backend']}, {a['seconds']} s) vs {b['device']} ({b['backend']}, "
      f"{b['seconds']} s): {len(a['tokens']) - bad}/{len(a['tokens'])} prompts identical")
sys.exit(1 if bad else 0)
PY

echo "== serve on $device and bench"
log=$out/serve.log
.venv/bin/sgljax serve --device "$device" --attention-backend native --port "$port" \
  --max-running-requests 16 >"$log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true' EXIT
for _ in $(seq 900); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 "$pid" 2>/dev/null || { tail -30 "$log"; echo "error: the server exited"; exit 1; }
  sleep 1
done
.venv/bin/sgljax bench --base-url "http://127.0.0.1:$port" --num-prompts 32 \
  --max-concurrency 16 --random-input-len 256 --random-output-len 64
