"""`sgljax serve --nnodes 2`: two processes on 127.0.0.1 (2 CPU devices each) serve HTTP from
rank 0 with the same greedy outputs as one process at TP=4; rank 0 losing its follower
turns /health unhealthy and exits non-zero."""

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

from sgljax.engine.engine import Engine
from sgljax.engine.sampling_params import SamplingParams
from server_harness import free_port

ENGINE = dict(page_size=4, chunked_prefill_size=16, max_running_requests=4, context_length=128,
              max_total_tokens=1024)
FLAGS = ["--page-size", "4", "--chunked-prefill-size", "16", "--max-running-requests", "4",
         "--context-length", "128", "--max-total-tokens", "1024", "--tp-size", "4"]


def _prompts():
    rng = np.random.default_rng(5)
    return [rng.integers(100, 150000, size=n).tolist() for n in (6, 21)]


def _start(model, rank, port, dist_port, log):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [sys.executable, "-m", "sgljax.cli.main", "serve", "--model-path", str(model),
           "--port", str(port), "--nnodes", "2", "--node-rank", str(rank),
           "--dist-init-addr", f"127.0.0.1:{dist_port}", "--skip-server-warmup", *FLAGS]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_health(url, procs, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a host exited during startup"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("rank 0 never became healthy")


@contextlib.contextmanager
def _two_hosts(model):
    """A 2-process server, healthy; yields (url, port, processes, logs); kills what is left."""
    port, dist_port = free_port(), free_port()
    logs = [tempfile.NamedTemporaryFile("w+", suffix=f"-rank{r}.log") for r in (0, 1)]
    procs = [_start(model, r, port, dist_port, logs[r]) for r in (0, 1)]
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_health(url, procs)
        yield url, port, procs, logs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _log(log) -> str:
    log.seek(0)
    return log.read()


def test_two_host_server(tiny_models):
    model = tiny_models["llama"]
    expected = [o["token_ids"] for o in Engine(model_path=str(model), tp_size=4, **ENGINE).generate(
        _prompts(), SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))]
    with _two_hosts(model) as (url, port, procs, logs):
        # the follower answers /health on --port + its rank
        assert httpx.get(f"http://127.0.0.1:{port + 1}/health", timeout=5).status_code == 200
        for ids, want in zip(_prompts(), expected):
            r = httpx.post(url + "/generate", timeout=120, json={
                "input_ids": ids, "sampling_params": {"max_new_tokens": 10, "temperature": 0,
                                                      "ignore_eos": True}})
            assert r.status_code == 200, r.text
            assert r.json()["output_ids"] == want
        procs[1].kill()  # lose the follower: rank 0 must notice and exit, not hang
        t0 = time.monotonic()
        rc = procs[0].wait(timeout=60)
        assert rc != 0 and time.monotonic() - t0 < 30
        assert "lost rank 1" in _log(logs[0])


def test_sigterm_to_rank_0_ends_every_rank(tiny_models):
    """A graceful stop of a multi-host server: rank 0 drains, releases the follower, and
    both processes exit (rank 0 with status 0) instead of the follower waiting forever."""
    with _two_hosts(tiny_models["llama"]) as (url, _, procs, logs):
        r = httpx.post(url + "/generate", timeout=120, json={
            "input_ids": _prompts()[0], "sampling_params": {"max_new_tokens": 4}})
        assert r.status_code == 200, r.text
        procs[0].send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        codes = [p.wait(timeout=90) for p in procs]
        assert codes[0] == 0, _log(logs[0])[-3000:]
        assert codes[1] == 0, _log(logs[1])[-3000:]
        assert time.monotonic() - t0 < 60
