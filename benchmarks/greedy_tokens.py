"""Greedy tokens of fixed prompts on one device and attention backend, as JSON: what
benchmarks/gpu_check.sh compares between a GPU and the CPU.

    python benchmarks/greedy_tokens.py --device cuda --attention-backend native --out gpu.json

Prompts of several lengths run together (ragged steps mixing decodes and prompt
chunks), 32 tokens each, float32.
"""

from __future__ import annotations

import argparse
import json
import time

from sgljax.engine.engine import Engine
from sgljax.engine.sampling_params import SamplingParams

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "List three prime numbers and explain why each is prime.",
           "Translate 'good morning' into Spanish, French and German. " * 6]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    eng = Engine(model_path=args.model_path, device=args.device,
                 attention_backend=args.attention_backend, chunked_prefill_size=64,
                 max_running_requests=8, context_length=1024, max_total_tokens=16384)
    chats = [eng.tokenizer.apply_chat_template([{"role": "user", "content": p}])
             for p in PROMPTS]
    outs = eng.generate(chats, SamplingParams(max_tokens=args.max_tokens, temperature=0,
                                              ignore_eos=True))
    result = {"device": str(eng.mesh.devices.flat[0]), "backend": eng.runner.kernels.backend,
              "seconds": round(time.perf_counter() - t0, 1),
              "tokens": [o["token_ids"] for o in outs], "texts": [o["text"] for o in outs]}
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(json.dumps({k: result[k] for k in ("device", "backend", "seconds")}))


if __name__ == "__main__":
    main()
