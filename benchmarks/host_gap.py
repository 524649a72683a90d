"""Host time between device steps, as a share of the device step (issue 10's host gap).

    python benchmarks/host_gap.py --model-path TINY_HF_DIR --batch 64 --steps 200

Decodes ``--batch`` requests through ``Engine.step`` and splits each step's wall
time into the device step (``ModelRunner.execute``: dispatch, run, copy of the
sampled tokens) and everything else on the host (scheduling, packing, detokenizing,
stop checks). With a tiny model the device step is about a millisecond, so the host
share shows. Nothing is overlapped yet: the gap is the host share itself.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sgljax.engine.engine import Engine
from sgljax.engine.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    engine = Engine(model_path=args.model_path, max_running_requests=args.batch,
                    context_length=1024, disable_radix_cache=True)
    runner = engine.runner
    device_s = []
    execute = runner.execute

    def timed_execute(*a):
        t0 = time.perf_counter()
        out = execute(*a)
        device_s.append(time.perf_counter() - t0)
        return out

    runner.execute = timed_execute
    rng = np.random.default_rng(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=args.steps + 8, temperature=0, ignore_eos=True)
    for attempt in ("warm", "measure"):
        seqs = [engine.add_request(rng.integers(10, vocab, 16).tolist(), params)
                for _ in range(args.batch)]
        while not all(s.output_ids for s in seqs):
            engine.step()
        device_s.clear()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        wall = time.perf_counter() - t0
        for s in seqs:
            engine.abort(s.rid)
    device = sum(device_s)
    print(f"batch {args.batch}: {wall / args.steps * 1000:.2f} ms/step, device step "
          f"{device / args.steps * 1000:.2f} ms, host {(wall - device) / args.steps * 1000:.2f} ms "
          f"= {(wall - device) / device * 100:.0f}% of the device step")


if __name__ == "__main__":
    main()
