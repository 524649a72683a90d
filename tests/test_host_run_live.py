"""The per-host entry point, run as two local processes with a simulated SkyPilot
environment (two ranks, both IPs 127.0.0.1): rank 0 converts the tiny model, both bring
up one two-host engine, and rank 0 answers an OpenAI request."""

import os
import subprocess
import sys
import tempfile
import time

import httpx
from openai import OpenAI

from server_harness import free_port


def test_two_ranks_serve_from_a_converted_checkpoint(tiny_models, tmp_path):
    port, dist_port = free_port(), free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "SGLJAX_MODEL": str(tiny_models["qwen3"]), "SGLJAX_SLICE": "local",
           "SGLJAX_LOCAL_DEVICES": "2", "SGLJAX_CHECKPOINT": str(tmp_path / "ckpt"),
           "SGLJAX_PORT": str(port), "SGLJAX_DIST_PORT": str(dist_port), "SGLJAX_WARMUP": "0",
           "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.1\n", "SKYPILOT_NUM_NODES": "2"}
    logs = [tempfile.NamedTemporaryFile("w+", suffix=f"-rank{r}.log") for r in (0, 1)]
    procs = [subprocess.Popen([sys.executable, "-m", "sgljax.cli.main", "host-run"],
                              env={**env, "SKYPILOT_NODE_RANK": str(r)}, stdout=logs[r],
                              stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        deadline = time.monotonic() + 420
        while True:
            for r, p in enumerate(procs):
                if p.poll() is not None:
                    logs[r].seek(0)
                    raise AssertionError(f"rank {r} exited {p.returncode}:\n{logs[r].read()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "rank 0 never became healthy"
            time.sleep(1)
        assert (tmp_path / "ckpt" / "sgljax-commit").exists()  # served from the conversion
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        out = client.completions.create(model=client.models.list().data[0].id,
                                        prompt="Hello there", max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "length"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
