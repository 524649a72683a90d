"""One layer's ragged attention over the paged cache, per path: the pure-JAX one, the
vector kernel (cpu_paged_attention) and the AMX kernel (cpu_amx_attention), SmolLM2's heads.

    python benchmarks/attention_kernels.py --seqs 64 --query 1 --kv-len 540 --kv-cache-dtype float32
    python benchmarks/attention_kernels.py --seqs 8 --query 64 --kv-len 1088 --kv-cache-dtype float16

Every sequence holds --kv-len tokens and asks --query of them (the last ones) to attend,
flattened into one ragged step of seqs x query tokens: --query 1 is a decode step and
more is a prefill chunk (--mixed N turns the first N sequences into decode tokens).
Pages are shuffled over a 30-layer pool, as a serving engine's are, and each call reads
another layer. Each path prints its time and its effective read speed: the K and V bytes
the step's queries see (each sequence's keys up to its last query, once) over that time.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from sgljax.kernels import cpu_amx_attention, cpu_paged_attention
from sgljax.kernels.paged_attention import ragged_paged_attention

LAYERS = 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--query", type=int, default=64)
    ap.add_argument("--mixed", type=int, default=0, help="of the sequences, decode this many")
    ap.add_argument("--kv-len", type=int, default=1088)
    ap.add_argument("--kv-cache-dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per path; the best is shown")
    ap.add_argument("--no-pure", action="store_true", help="skip the pure-JAX paths")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    s, ps = args.seqs, args.page_size
    q_lens = [1 if i < args.mixed else args.query for i in range(s)]
    pages_per_seq = -(-args.kv_len // ps)
    num_pages = 1 + s * pages_per_seq
    shape = (LAYERS, num_pages, args.kv_heads, ps, args.head_dim)
    k = jnp.asarray(rng.standard_normal(shape), args.kv_cache_dtype)
    v = jnp.asarray(rng.standard_normal(shape), args.kv_cache_dtype)
    table = jnp.asarray(rng.permutation(np.arange(1, num_pages)).reshape(s, pages_per_seq), jnp.int32)
    tokens = sum(q_lens)
    q = jnp.asarray(rng.standard_normal((tokens, args.heads, args.head_dim)), jnp.float32)
    cu_q_lens = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    kv_lens = jnp.full((s,), args.kv_len, jnp.int32)
    num_seqs = jnp.int32(s)
    kv_bytes = 2 * s * args.kv_len * args.kv_heads * args.head_dim * k.dtype.itemsize

    paths = {"pure JAX (float32)": ragged_paged_attention,
             "pure JAX (bf16 products)": partial(ragged_paged_attention, bf16_products=True)}
    if args.no_pure:
        paths = {}
    if cpu_paged_attention.available():
        paths["vector kernel (float32)"] = cpu_paged_attention.cpu_paged_attention
        paths["vector kernel (bf16 products)"] = partial(cpu_paged_attention.cpu_paged_attention,
                                                         bf16_products=True)
    if cpu_amx_attention.available() and cpu_amx_attention.supports(q.shape):
        paths["AMX kernel (bf16 products)"] = cpu_amx_attention.amx_attention
    print(f"{s} seqs ({args.mixed} decoding) x {args.query} queries over {args.kv_len} cached "
          f"tokens, {args.kv_cache_dtype} cache, {args.heads}/{args.kv_heads} heads of "
          f"{args.head_dim}, pages of {ps}: {kv_bytes / 1e6:.1f} MB of K+V")
    for name, fn in paths.items():
        step = jax.jit(lambda q, k, v, layer, fn=fn: fn(q, k, v, layer, table, cu_q_lens, kv_lens,
                                                        num_seqs))
        jax.block_until_ready(step(q, k, v, jnp.int32(0)))
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            for i in range(args.iters):
                jax.block_until_ready(step(q, k, v, jnp.int32(i % LAYERS)))
            best = min(best, (time.perf_counter() - start) / args.iters)
        ms = best * 1e3
        print(f"  {name:30s} {ms:8.3f} ms a layer  ({ms * LAYERS:7.1f} ms for 30 layers)  "
              f"{kv_bytes / best / 1e9:6.1f} GB/s")


if __name__ == "__main__":
    main()
