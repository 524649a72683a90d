"""Time one device step of the engine at a given shape, no scheduler, no HTTP.

    python benchmarks/step_time.py --seqs 16 --query 1 --kv-len 384     # a decode step
    python benchmarks/step_time.py --seqs 1 --query 512 --kv-len 512    # a prefill chunk

Packs a batch of ``--seqs`` sequences with ``--query`` new tokens each, ending at
``--kv-len`` cached tokens, on randomly placed pages of the default model's KV pool,
and times ``ModelRunner.execute`` (pack excluded, sampling and the host copy of
the sampled tokens included). Compare with ``bare_forward.py`` at the same batch.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sgljax.engine.batch import SamplingBatch, StepBatch
from sgljax.engine.engine import Engine


def _pad(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, np.int32)
    out[tuple(slice(0, k) for k in a.shape)] = a
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--query", type=int, default=1)
    ap.add_argument("--kv-len", type=int, default=384)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    ap.add_argument("--kv-cache-dtype", default="auto")
    args = ap.parse_args()
    S, Q, kv_len = args.seqs, args.query, args.kv_len
    engine = Engine(model_path=args.model_path, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
                    max_running_requests=max(S, 8),
                    context_length=max(1024, kv_len), disable_radix_cache=True,
                    max_total_tokens=max(S * (kv_len + 32), 1024) + 64)
    runner, ps = engine.runner, engine.runner.page_size
    P = -(-kv_len // ps)
    rng = np.random.default_rng(0)
    pages = rng.permutation(np.arange(1, engine.pool.capacity))[:S * P].reshape(S, P)
    pages = pages.astype(np.int32)
    pos = np.tile(np.arange(kv_len - Q, kv_len, dtype=np.int32), (S, 1))
    slots = np.take_along_axis(pages, pos // ps, 1) * ps + pos % ps
    Sb, Qb, Pb = runner.plan.shape_for(Q > 1, S, Q, P)
    batch = StepBatch(_pad(rng.integers(10, 1000, (S, Q)).astype(np.int32), (Sb, Qb)),
                      _pad(pos, (Sb, Qb)), _pad(slots, (Sb, Qb)), _pad(pages, (Sb, Pb)),
                      _pad(np.full(S, kv_len, np.int32), (Sb,)),
                      _pad(np.full(S, Q - 1, np.int32), (Sb,)), np.full(Sb, -1, np.int32))
    zeros = np.zeros(Sb, np.int32)
    sbatch = SamplingBatch(np.zeros(Sb, np.float32), zeros, np.ones(Sb, np.float32),
                           np.zeros(Sb, np.float32), np.zeros(Sb, np.uint32), zeros,
                           np.asarray(True), np.asarray(False))
    runner.execute(batch, sbatch, None)  # compile (or load) and warm
    t0 = time.perf_counter()
    for _ in range(args.iters):
        runner.execute(batch, sbatch, None)
    dt = (time.perf_counter() - t0) / args.iters
    print(f"{S} seqs x {Q} tokens at {kv_len} cached, bucket {(Sb, Qb, Pb)}: "
          f"{dt * 1000:.1f} ms/step, {S * Q / dt:.0f} tok/s")


if __name__ == "__main__":
    main()
