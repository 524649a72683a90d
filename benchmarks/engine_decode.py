"""Decode throughput of the engine's Python API (no HTTP), at given batch sizes, and
its efficiency against the bare forward (bare_forward.py) of the same batch.

    python benchmarks/engine_decode.py --batch 16 64 --input-len 256 --output-len 128

Prints the first request's time (compiles included, no warmup), then for each
batch size the steady decode tokens/s: tokens generated after every request
had its first token, divided by the time that took; then the bare forward's
tokens/s at that batch, timed right after, and the ratio (issue 10's engine
efficiency: scheduling, paged attention and sampling against no attention at all).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bare_forward import bare_forward_ms
from sgljax.engine.engine import Engine
from sgljax.engine.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare forward")
    args = ap.parse_args()
    t0 = time.perf_counter()
    engine = Engine(model_path=args.model_path, dtype=args.dtype,
                    kv_cache_dtype=args.kv_cache_dtype,
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
                rate = decoded / elapsed
                line = (f"batch {bs:3d}: {rate:7.1f} tok/s decode "
                        f"({elapsed / (decoded / bs) * 1000:.1f} ms/step)")
                if not args.no_bare:
                    bare = bs / bare_forward_ms(engine.runner.model, bs) * 1000
                    line += f"; bare forward {bare:7.1f} tok/s; efficiency {rate / bare:.0%}"
                print(line)


if __name__ == "__main__":
    main()
