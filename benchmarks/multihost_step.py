"""Cost of multi-host lockstep on one machine: the per-step broadcast, and decode tok/s of
one process (4 devices) against two processes (2 devices each) on the same model.

    python benchmarks/multihost_step.py --model-path DIR [--batch 8] [--steps 64]

Rank 0 times every ``Leader.send`` of a step (packing + TCP to the follower).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_engine(args, nnodes: int, rank: int, port: int) -> None:
    from sgljax.engine.engine import Engine
    from sgljax.engine.sampling_params import SamplingParams

    kw = dict(model_path=args.model_path, tp_size=4, max_running_requests=args.batch,
              context_length=512, disable_radix_cache=True)
    if nnodes > 1:
        kw.update(nnodes=2, node_rank=rank, dist_init_addr=f"127.0.0.1:{port}")
    engine = Engine(**kw)
    if engine.is_follower:
        engine.follow()
        return
    sends = []
    if engine._leader is not None:
        send = engine._leader.send

        def timed(kind, arrays=None):
            t0 = time.perf_counter()
            send(kind, arrays)
            sends.append(time.perf_counter() - t0)

        engine.runner.broadcast = timed
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=args.steps, temperature=0, ignore_eos=True)
    prompts = [rng.integers(10, 1000, 32).tolist() for _ in range(args.batch)]
    engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    sends.clear()
    t0 = time.perf_counter()
    out = engine.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o["token_ids"]) for o in out)
    result = {"nnodes": nnodes, "tok_per_s": round(tokens / elapsed, 1)}
    if sends:
        result["broadcast_ms_median"] = round(float(np.median(sends)) * 1000, 3)
        result["broadcast_ms_p99"] = round(float(np.percentile(sends, 99)) * 1000, 3)
    print("RESULT " + json.dumps(result), flush=True)
    engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--role", default=None)
    args = ap.parse_args()
    if args.role:
        nnodes, rank, port = map(int, args.role.split(","))
        return run_engine(args, nnodes, rank, port)
    base = [sys.executable, __file__, "--model-path", args.model_path, "--batch",
            str(args.batch), "--steps", str(args.steps), "--role"]
    one = subprocess.run(base + ["1,0,0"], capture_output=True, text=True,
                         env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    port = free_port()
    env2 = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    follower = subprocess.Popen(base + [f"2,1,{port}"], env=env2, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    two = subprocess.run(base + [f"2,0,{port}"], capture_output=True, text=True, env=env2)
    follower.wait(timeout=120)
    for proc in (one, two):
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        print(line[0][7:] if line else proc.stderr[-2000:])


if __name__ == "__main__":
    main()
