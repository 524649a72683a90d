"""Device idle time between consecutive steps (issue 10's host gap), overlap on and off.

    python benchmarks/host_gap.py --batch 64 --steps 300            # a tiny model it builds
    python benchmarks/host_gap.py --model-path DIR --batch 16

The device step alone is timed first: ``ModelRunner.execute`` on one packed decode
batch of the same shape, run back to back (dispatch, run, copy of the sampled tokens).
Then ``--batch`` requests decode through ``Engine.step`` (schedule, pack, launch,
land, detokenize, stop checks), with the overlap schedule off and on. The gap is
the engine's wall time per step minus the device step: with the overlap off it is
all the host work; with it on, only what the device step does not hide.

Without ``--model-path`` it builds a tiny random Qwen3 (2 layers, hidden 64, a
4,096-token vocabulary over the Qwen3 tokenizer) whose decode step is about a
millisecond, so the host share shows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sgljax.engine.engine import Engine
from sgljax.engine.sampling_params import SamplingParams


def tiny_model(out: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import build_tiny_model

    return build_tiny_model("qwen3", out, vocab_size=4096, num_hidden_layers=2,
                            intermediate_size=128, eos_token_id=1, bos_token_id=0)


def device_step_ms(engine: Engine, seqs, iters: int) -> float:
    """The engine's current decode batch, packed once and executed back to back."""
    runner = engine.runner
    sched = engine.scheduler._schedule_decode()
    batch, sbatch, adjust, grammar = runner.pack(sched)
    batch.prev_rows[:] = -1  # the tokens are on the host already; no effect on the time
    runner.execute(batch, sbatch, adjust, grammar)
    t0 = time.perf_counter()
    for _ in range(iters):
        runner.execute(batch, sbatch, adjust, grammar)
    return (time.perf_counter() - t0) / iters * 1000


def engine_step_ms(engine: Engine, batch: int, steps: int, rng) -> tuple[float, float]:
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=steps * 2 + 16, temperature=0, ignore_eos=True)
    seqs = [engine.add_request(rng.integers(10, vocab, 16).tolist(), params)
            for _ in range(batch)]
    while not all(len(s.output_ids) > 2 for s in seqs):
        engine.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = (time.perf_counter() - t0) / steps * 1000
    if engine._in_flight is not None:  # land the step ahead so the batch is quiet
        engine._land(engine._pop_in_flight())
    device = device_step_ms(engine, seqs, steps)
    for s in seqs:
        engine.abort(s.rid)
    while engine.has_work():
        engine.step()
    return wall, device


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    model_path = args.model_path or str(tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    engine = Engine(model_path=model_path, max_running_requests=args.batch,
                    context_length=2048, disable_radix_cache=True)
    rng = np.random.default_rng(0)
    engine_step_ms(engine, args.batch, 20, rng)  # compile (or load) the buckets
    for overlap in (False, True):
        engine.args.disable_overlap_schedule = not overlap
        wall, device = engine_step_ms(engine, args.batch, args.steps, rng)
        gap = max(0.0, wall - device)
        print(f"batch {args.batch}, overlap {'on ' if overlap else 'off'}: "
              f"{wall:.3f} ms/step, device step {device:.3f} ms, gap {gap:.3f} ms "
              f"= {gap / device * 100:.1f}% of the device step")


if __name__ == "__main__":
    main()
