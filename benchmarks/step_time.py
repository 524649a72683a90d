"""Time one device step of the engine at a given shape, no scheduler, no HTTP.

    python benchmarks/step_time.py --seqs 16 --query 1 --kv-len 384     # a decode step
    python benchmarks/step_time.py --seqs 1 --query 512 --kv-len 512    # a prefill chunk
    python benchmarks/step_time.py --seqs 16 --query 1 --kv-len 384 --chunk 256  # both

Packs a batch of ``--seqs`` sequences with ``--query`` new tokens each, ending at
``--kv-len`` cached tokens, on randomly placed pages of the default model's KV pool,
and times ``ModelRunner.execute`` (pack excluded, sampling and the host copy of
the sampled tokens included). ``--chunk N`` adds a fresh prompt's chunk of N tokens
to the same ragged step. Compare with ``bare_forward.py`` at the same batch.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sgljax.engine.batch import SamplingBatch, StepBatch
from sgljax.engine.engine import Engine


def ragged_batch(rng, lengths: list[tuple[int, int]], pages_free: int, ps: int, T: int, S: int,
                 P: int) -> StepBatch:
    """(query tokens, cached tokens after the step) per sequence, on shuffled pages."""
    need = [-(-kv // ps) for _, kv in lengths]
    pool = rng.permutation(np.arange(1, pages_free))[:sum(need)].astype(np.int32)
    tokens, positions, slots = (np.zeros(T, np.int32) for _ in range(3))
    table, kv_lens = np.zeros((S, P), np.int32), np.zeros(S, np.int32)
    cu, last = np.full(S + 1, sum(q for q, _ in lengths), np.int32), np.zeros(S, np.int32)
    at = used = 0
    for i, ((q, kv), n) in enumerate(zip(lengths, need)):
        pages = pool[used:used + n]
        used += n
        pos = np.arange(kv - q, kv, dtype=np.int32)
        tokens[at:at + q] = rng.integers(10, 1000, q)
        positions[at:at + q] = pos
        slots[at:at + q] = pages[pos // ps] * ps + pos % ps
        table[i, :n], kv_lens[i], cu[i] = pages, kv, at
        at += q
        last[i] = at - 1
    return StepBatch(tokens, positions, slots, table, cu, kv_lens,
                     np.asarray(len(lengths), np.int32), last, np.full(S, -1, np.int32))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--query", type=int, default=1)
    ap.add_argument("--kv-len", type=int, default=384)
    ap.add_argument("--chunk", type=int, default=0, help="plus a fresh prompt chunk this long")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--attention-backend", default="auto")
    args = ap.parse_args()
    S, Q, kv_len = args.seqs, args.query, args.kv_len
    lengths = [(Q, kv_len)] * S + ([(args.chunk, args.chunk)] if args.chunk else [])
    engine = Engine(model_path=args.model_path, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
                    max_running_requests=max(len(lengths), 8), attention_backend=args.attention_backend,
                    chunked_prefill_size=max(512, sum(q for q, _ in lengths)),
                    context_length=max(1024, kv_len, args.chunk), disable_radix_cache=True,
                    max_total_tokens=max(S * (kv_len + 32) + args.chunk, 1024) + 64)
    runner, ps = engine.runner, engine.runner.page_size
    P = max(-(-kv // ps) for _, kv in lengths)
    rng = np.random.default_rng(0)
    Tb, Sb, Pb = runner.plan.shape_for(sum(q for q, _ in lengths), len(lengths), P)
    batch = ragged_batch(rng, lengths, engine.pool.capacity, ps, Tb, Sb, Pb)
    zeros = np.zeros(Sb, np.int32)
    sbatch = SamplingBatch(np.zeros(Sb, np.float32), zeros, np.ones(Sb, np.float32),
                           np.zeros(Sb, np.float32), np.zeros(Sb, np.uint32), zeros,
                           np.asarray(True), np.asarray(False))
    runner.execute(batch, sbatch, None)  # compile (or load) and warm
    t0 = time.perf_counter()
    for _ in range(args.iters):
        runner.execute(batch, sbatch, None)
    dt = (time.perf_counter() - t0) / args.iters
    tokens = sum(q for q, _ in lengths)
    print(f"{S} seqs x {Q} tokens at {kv_len} cached"
          f"{f' + a {args.chunk}-token chunk' if args.chunk else ''}, bucket {(Tb, Sb, Pb)}, "
          f"{runner.kernels.backend} attention: {dt * 1000:.1f} ms/step, {tokens / dt:.0f} tok/s")


if __name__ == "__main__":
    main()
