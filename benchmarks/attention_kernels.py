"""One layer's attention over the paged cache, per path: the pure-JAX one, the vector
kernel (cpu_paged_attention) and the AMX kernel (cpu_amx_attention), SmolLM2's heads.

    python benchmarks/attention_kernels.py --seqs 8 --query 64 --kv-len 1088 --kv-cache-dtype float16

Every sequence holds --kv-len tokens and asks --query of them (the last ones) to attend,
so --query 1 is a decode step and more is a prefill chunk. Pages are shuffled over a
30-layer pool, as a serving engine's are, and each call reads another layer.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from sgljax.kernels import cpu_amx_attention, cpu_paged_attention
from sgljax.kernels.paged_attention import paged_attention

LAYERS = 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--query", type=int, default=64)
    ap.add_argument("--kv-len", type=int, default=1088)
    ap.add_argument("--kv-cache-dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    s, qn, ps = args.seqs, args.query, args.page_size
    pages_per_seq = -(-args.kv_len // ps)
    num_pages = 1 + s * pages_per_seq
    shape = (LAYERS, num_pages, args.kv_heads, ps, args.head_dim)
    k = jnp.asarray(rng.standard_normal(shape), args.kv_cache_dtype)
    v = jnp.asarray(rng.standard_normal(shape), args.kv_cache_dtype)
    table = jnp.asarray(rng.permutation(np.arange(1, num_pages)).reshape(s, pages_per_seq), jnp.int32)
    q = jnp.asarray(rng.standard_normal((s, qn, args.heads, args.head_dim)), jnp.float32)
    kv_lens = jnp.full((s,), args.kv_len, jnp.int32)
    positions = jnp.asarray(np.tile(np.arange(args.kv_len - qn, args.kv_len), (s, 1)), jnp.int32)

    paths = {"pure JAX (float32)": paged_attention,
             "pure JAX (bf16 products)": partial(paged_attention, bf16_products=True)}
    if cpu_paged_attention.available():
        paths["vector kernel (float32)"] = cpu_paged_attention.cpu_paged_attention
    if cpu_amx_attention.available() and cpu_amx_attention.supports(q.shape):
        paths["AMX kernel (bf16 products)"] = cpu_amx_attention.amx_attention
    print(f"{s} seqs x {qn} queries over {args.kv_len} cached tokens, {args.kv_cache_dtype} cache, "
          f"{args.heads}/{args.kv_heads} heads of {args.head_dim}, pages of {ps}")
    for name, fn in paths.items():
        step = jax.jit(lambda q, k, v, layer, fn=fn: fn(q, k, v, layer, table, positions, kv_lens))
        jax.block_until_ready(step(q, k, v, jnp.int32(0)))
        start = time.perf_counter()
        for i in range(args.iters):
            jax.block_until_ready(step(q, k, v, jnp.int32(i % LAYERS)))
        ms = (time.perf_counter() - start) / args.iters * 1e3
        print(f"  {name:28s} {ms:8.3f} ms a layer  ({ms * LAYERS:7.1f} ms for 30 layers)")


if __name__ == "__main__":
    main()
