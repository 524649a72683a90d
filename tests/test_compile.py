"""Compile discipline: warmup covers every shape, restarts hit the cache, depth is free."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sgljax.engine.engine import Engine
from sgljax.engine.sampling_params import SamplingParams
from tiny_models import build_tiny_model

SMALL = dict(page_size=4, chunked_prefill_size=32, max_running_requests=4, max_prefill_seqs=4,
             context_length=64, max_total_tokens=512)


def test_no_compiles_after_warmup(tiny_models, tmp_path):
    eng = Engine(model_path=str(tiny_models["qwen3"]), compilation_cache_dir=str(tmp_path), **SMALL)
    assert eng.warmup() == len(eng.plan.all_shapes())
    rng = np.random.default_rng(0)
    variants = [
        SamplingParams(max_tokens=5, temperature=0),
        SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=1, logprobs=True, top_logprobs=3),
        SamplingParams(max_tokens=7, temperature=1.0, top_k=5, presence_penalty=0.5,
                       repetition_penalty=1.2, logit_bias={5: 3.0}, min_tokens=2),
    ]
    for round_ in range(3):  # batches of 1..4 requests, prompts of 1..60 tokens
        n = 1 + round_
        prompts = [rng.integers(1, 150000, size=int(rng.integers(1, 60))).tolist() for _ in range(n)]
        prompts.append(prompts[0])  # the same prompt twice, as n>1 does
        eng.generate(prompts, [variants[i % 3] for i in range(len(prompts))])
    assert eng.compiles_since_warmup() == 0


def _warmup_cli(model, cache, *extra):
    cmd = [sys.executable, "-m", "sgljax.cli.main", "warmup", str(model), "--json",
           "--compilation-cache-dir", str(cache), "--page-size", "4", "--chunked-prefill-size", "32",
           "--max-running-requests", "2", "--context-length", "32", "--max-total-tokens", "256",
           *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_warmup_hits_the_cache(tiny_models, tmp_path):
    first = _warmup_cli(tiny_models["llama"], tmp_path)
    assert first["compiled"] >= first["buckets"] > 0
    # Same settings, model and code: the warm record says every bucket is cached, and the
    # warmup returns without loading the model.
    assert _warmup_cli(tiny_models["llama"], tmp_path) == {"buckets": None, "skipped": True}
    # With a bucket's file gone the record no longer holds: the warmup loads the model, and
    # every bucket comes from a cache (the missing one from JAX's persistent cache).
    records = list((tmp_path / "sgljax-warm").glob("*.json"))
    assert len(records) == 1
    listed = json.loads(records[0].read_text())["executables"]
    assert len(listed) == first["buckets"]
    Path(listed[0]).unlink()
    second = _warmup_cli(tiny_models["llama"], tmp_path)
    assert second["compiled"] == 0
    assert second["from_cache"] >= second["buckets"]
    # Other settings plan other buckets: no record applies.
    other = _warmup_cli(tiny_models["llama"], tmp_path, "--max-running-requests", "3")
    assert not other.get("skipped") and other["buckets"] > 0


def test_compile_time_does_not_grow_with_depth(tmp_path):
    times = {}
    for layers in (2, 24):
        path = build_tiny_model("qwen3", tmp_path / f"l{layers}", num_hidden_layers=layers)
        eng = Engine(model_path=str(path), enable_compilation_cache=False, **SMALL)
        t0 = time.perf_counter()
        eng.runner.warmup_shape(2, 2, 8)
        times[layers] = time.perf_counter() - t0
    print(f"one bucket compiles in {times[2]:.2f} s at 2 layers, {times[24]:.2f} s at 24 layers")
    assert times[24] < 3 * times[2] + 5  # a scan: depth must not multiply compile time
