"""Two processes on 127.0.0.1, 2 CPU devices each, run one engine over a 4-device mesh."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sgljax.engine.engine import Engine
from sgljax.engine.sampling_params import SamplingParams

WORKER = str(Path(__file__).parent / "multihost_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts():
    rng = np.random.default_rng(11)
    return [rng.integers(100, 150000, size=n).tolist() for n in (4, 19, 30)]


def _start(model, rank, port, steps, *extra, env_extra=None):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               **(env_extra or {}))
    return subprocess.Popen([sys.executable, WORKER, str(model), str(rank), str(port),
                             json.dumps(_prompts()), str(steps), *map(str, extra)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill(*procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_two_hosts_match_single_process_tp4(tiny_models):
    model = tiny_models["qwen3"]
    expected = [o["token_ids"] for o in Engine(
        model_path=str(model), tp_size=4, page_size=4, chunked_prefill_size=16,
        max_running_requests=4, context_length=128, max_total_tokens=1024).generate(
        _prompts(), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))]
    port = _free_port()
    leader, follower = _start(model, 0, port, 8), _start(model, 1, port, 8)
    try:
        out, err = leader.communicate(timeout=300)
        assert leader.returncode == 0, err[-2000:]
        tokens = json.loads(next(l for l in out.splitlines() if l.startswith("TOKENS "))[7:])
        assert tokens == expected
        assert follower.wait(timeout=60) == 0
    finally:
        _kill(leader, follower)


def test_two_hosts_expert_parallel_match_ep1(tmp_path):
    """ep=2 × tp=2 over two processes of 2 devices: the ep axis spans the hosts (tp is the
    mesh's inner axis), so each host holds half the experts; tokens as one device's."""
    from tiny_models import build_tiny_moe_model

    model = build_tiny_moe_model("qwen2_moe", tmp_path / "moe", num_hidden_layers=2)
    expected = [o["token_ids"] for o in Engine(
        model_path=str(model), page_size=4, chunked_prefill_size=16, max_running_requests=4,
        context_length=128, max_total_tokens=1024).generate(
        _prompts(), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))]
    port = _free_port()
    layout = {"MULTIHOST_EP": "2", "MULTIHOST_TP": "2"}
    leader, follower = (_start(model, r, port, 8, env_extra=layout) for r in (0, 1))
    try:
        out, err = leader.communicate(timeout=300)
        assert leader.returncode == 0, err[-2000:]
        tokens = json.loads(next(l for l in out.splitlines() if l.startswith("TOKENS "))[7:])
        mesh = json.loads(next(l for l in out.splitlines() if l.startswith("MESH "))[5:])
        assert mesh == [[0, 0], [1, 1]]  # rows: ep shards, one per host
        assert tokens == expected
        assert follower.wait(timeout=60) == 0
    finally:
        _kill(leader, follower)


@pytest.mark.parametrize("victim", [1, 0])
def test_losing_a_host_ends_the_other_within_30s(tiny_models, victim):
    port = _free_port()
    # Many steps: the run is still going when one host is killed.
    procs = [_start(tiny_models["qwen3"], r, port, 100) for r in (0, 1)]
    try:
        leader = procs[0]
        for line in leader.stdout:  # wait until both are up and serving steps
            if line.startswith("READY"):
                break
        time.sleep(1.0)
        procs[victim].kill()
        survivor = procs[1 - victim]
        t0 = time.monotonic()
        rc = survivor.wait(timeout=60)
        waited = time.monotonic() - t0
        err = survivor.stderr.read()
        assert rc != 0
        assert waited < 30
        # Rank 0 also hosts JAX's coordination service, whose client aborts the follower
        # milliseconds after losing it: the follower must still exit with our line first.
        named = f"error: lost rank {victim}" + (f" (the leader at 127.0.0.1:{port}"
                                                 if victim == 0 else "")
        assert named in err, err[-2000:]
        assert rc == 1, err[-2000:]  # our exit, not JAX's abort (SIGABRT)
    finally:
        _kill(*procs)
