"""Decode tokens/s of the two MoE backends (dense, grouped) on a tiny random Qwen3-MoE,
at one or more expert-parallel sizes (``--ep``).

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/moe_decode.py --batch 1 32
    XLA_FLAGS=--xla_force_host_platform_device_count=4 PYTHONSAFEPATH=1 \
        .venv/bin/python benchmarks/moe_decode.py --batch 1 32 --ep 1 2 4 --backends grouped

Builds the model with transformers (64 experts, top-8, hidden 256, 4 layers by
default) into a temporary folder, then for each backend and batch size: one
untimed round (compiles), then a timed one. The rate counts the tokens decoded
after every request had its first token, over the time that took (prefill left
out), with max_tokens fixed and ignore_eos.

Forced CPU devices share the host's cores, so ep > 1 there shows what splitting the
experts costs (shard_map, psum, attention on every shard), not what it gains on chips
with their own memory. On one device (ep 1) the engine may pick its C++ CPU kernels
(engine/cpu_kernels.py), which it never uses on a mesh of several.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import build_tiny_moe_model  # noqa: E402

from sgljax.engine.engine import Engine  # noqa: E402
from sgljax.engine.sampling_params import SamplingParams  # noqa: E402


def decode_rate(engine: Engine, batch: int, input_len: int, output_len: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    seqs = [engine.add_request(rng.integers(10, vocab, input_len).tolist(), params)
            for _ in range(batch)]
    started, tokens_then = None, 0
    while engine.has_work():
        engine.step()
        if started is None and all(s.output_ids for s in seqs):
            started, tokens_then = time.perf_counter(), sum(len(s.output_ids) for s in seqs)
    return (sum(len(s.output_ids) for s in seqs) - tokens_then) / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--moe-intermediate", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192,
                    help="small, so the LM head does not hide the MoE layers")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--backends", nargs="+", default=["dense", "grouped"])
    ap.add_argument("--ep", type=int, nargs="+", default=[1],
                    help="expert-parallel sizes (ep > 1 needs that many devices, e.g. "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=4 on CPU)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size of every run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_moe_model(
            "qwen3_moe", Path(tmp) / "moe", num_experts=args.experts,
            num_experts_per_tok=args.top_k, hidden_size=args.hidden,
            moe_intermediate_size=args.moe_intermediate, num_hidden_layers=args.layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=args.vocab)
        print(f"qwen3_moe: {args.experts} experts, top-{args.top_k}, hidden {args.hidden}, "
              f"moe_intermediate {args.moe_intermediate}, {args.layers} layers, vocab {args.vocab}; "
              f"{args.input_len}-token prompts, {args.output_len} tokens each")
        for backend in args.backends:
            for ep in args.ep:
                engine = Engine(model_path=str(path), moe_backend=backend, ep_size=ep,
                                tp_size=args.tp,
                                max_running_requests=max(args.batch), context_length=256,
                                disable_radix_cache=True, max_total_tokens=max(args.batch) * 256)
                for bs in args.batch:
                    decode_rate(engine, bs, args.input_len, args.output_len, seed=0)  # compiles
                    rate = decode_rate(engine, bs, args.input_len, args.output_len, seed=1)
                    print(f"{backend:8s} ep {ep} tp {args.tp} batch {bs:3d}: {rate:8.1f} tok/s "
                          f"decode ({bs / rate * 1000:.2f} ms/step)", flush=True)


if __name__ == "__main__":
    main()
