"""Decode throughput of the engine's Python API (no HTTP), at given batch sizes.

    python benchmarks/engine_decode.py --batch 1 16 --output-len 64

Prints the first request's time (compiles included, no warmup), then for each
batch size the steady decode tokens/s: tokens generated after every request
had its first token, divided by the time that took.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sgljax.engine.engine import Engine
from sgljax.engine.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    t0 = time.perf_counter()
    engine = Engine(model_path=args.model_path, dtype=args.dtype,
                    max_running_requests=max(args.batch), context_length=1024,
                    disable_radix_cache=True)
    print(f"engine ready in {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    engine.generate([rng.integers(10, vocab, args.input_len).tolist()],
                    SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    print(f"first request (compiles included): {time.perf_counter() - t0:.1f} s")
    for bs in args.batch:
        for attempt in ("compile", "measure"):
            seqs = [engine.add_request(rng.integers(10, vocab, args.input_len).tolist(), params)
                    for _ in range(bs)]
            started, tokens_then = None, 0
            while engine.has_work():
                engine.step()
                if started is None and all(s.output_ids for s in seqs):
                    started, tokens_then = time.perf_counter(), sum(len(s.output_ids) for s in seqs)
            elapsed = time.perf_counter() - started
            decoded = sum(len(s.output_ids) for s in seqs) - tokens_then
            if attempt == "measure":
                print(f"batch {bs:3d}: {decoded / elapsed:7.1f} tok/s decode "
                      f"({elapsed / (decoded / bs) * 1000:.1f} ms/step)")


if __name__ == "__main__":
    main()
