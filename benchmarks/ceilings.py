"""What this machine allows at all: the float32 matmul peak, the memory read speed, and
the bounds they put on issue 10's targets.

    python benchmarks/ceilings.py --requests 128 --prompt-len 512 --output-len 64 --peer-tok-s 50.3

Measures the float32 matmul rate (XLA's dot at prefill shapes, numpy's BLAS at 2,048³:
the best of them is the "peak") and the read speed of one and two threads. Then, for a
workload of ``--requests`` prompts of ``--prompt-len`` tokens each generating
``--output-len``, counts the float32 FLOPs the default model needs (every projection,
the LM head where a token is sampled, causal attention) and prints the shortest time
they could take at the peak, i.e. the most output tokens/s any float32 server could
reach here; ``--peer-tok-s`` turns that into the largest possible ratio to a peer.
Also the K/V bytes a decode step at ``--decode-batch`` reads at the workload's mean
context, and the time that takes at the two-thread read speed.
"""

from __future__ import annotations

import argparse
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from sgljax.engine.config import ModelConfig
from sgljax.engine.model_files import resolve_model_path


def _best_ms(fn, iters: int = 10) -> float:
    fn()
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def matmul_gflops() -> dict[str, float]:
    out = {}
    for m, k, n in [(512, 576, 1536), (512, 1536, 576)]:
        a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
        dot = jax.jit(lambda a, b: a @ b)
        ms = _best_ms(lambda: dot(a, b).block_until_ready())
        out[f"XLA dot {m}x{k}x{n}"] = 2 * m * k * n / ms / 1e6
    a = np.ones((2048, 2048), np.float32)
    out["numpy 2048^3"] = 2 * 2048**3 / _best_ms(lambda: a @ a) / 1e6
    return out


def read_gbs(threads: int) -> float:
    data = np.ones(256 * 2**20 // 4 * threads, np.float32)
    parts = np.array_split(data, threads)

    def run():
        workers = [threading.Thread(target=p.sum) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    return data.nbytes / _best_ms(run, 5) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--peer-tok-s", type=float, default=None)
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--kv-bytes", type=int, default=2, help="per K/V element (2: f16 cache)")
    args = ap.parse_args()

    cfg = ModelConfig.from_dir(resolve_model_path(args.model_path))
    hd, nh, kvh, d, f = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size, cfg.intermediate_size
    per_token = cfg.num_layers * (d * nh * hd * 2 + d * kvh * hd * 2 + 3 * d * f)  # weights
    head = cfg.vocab_size * d
    n, p, o = args.requests, args.prompt_len, args.output_len
    # 2 FLOPs a multiply-add; one token sampled per prefill and per decode step.
    dense = 2 * per_token * n * (p + o - 1) + 2 * head * n * o
    attn_prefill = 4 * hd * nh * cfg.num_layers * p * (p + 1) // 2
    attn_decode = 4 * hd * nh * cfg.num_layers * sum(range(p + 1, p + o))
    total = dense + n * (attn_prefill + attn_decode)

    rates = matmul_gflops()
    for name, g in rates.items():
        print(f"float32 matmul, {name}: {g:6.0f} GFLOP/s")
    peak = max(rates.values())
    one, two = read_gbs(1), read_gbs(2)
    print(f"memory read: {one:.1f} GB/s (1 thread), {two:.1f} GB/s (2 threads)")
    secs = total / peak / 1e9
    print(f"\n{n} requests x {p} in / {o} out, float32: {total / 1e12:.2f} TFLOP "
          f"({dense / total:.0%} projections and LM head)")
    print(f"  at the peak {peak:.0f} GFLOP/s: >= {secs:.1f} s, <= {n * o / secs:.1f} output tok/s")
    if args.peer_tok_s:
        print(f"  against a peer's {args.peer_tok_s} tok/s: at most {n * o / secs / args.peer_tok_s:.2f}x")
    ctx = p + o / 2
    kv = 2 * cfg.num_layers * args.decode_batch * ctx * kvh * hd * args.kv_bytes
    print(f"decode step at batch {args.decode_batch}, mean context {ctx:.0f}: K/V {kv / 1e6:.0f} MB, "
          f">= {kv / two / 1e6:.1f} ms at {two:.1f} GB/s")


if __name__ == "__main__":
    main()
