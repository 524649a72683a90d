"""`sgljax up local` as a new user runs it: the default model, converted, warmed, served."""

import os
import signal
import subprocess
import sys
import time

import httpx

from server_harness import free_port


def test_up_local_serves_smollm2_and_answers_paris():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sgljax.cli.main", "up", "local", "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 900
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
                    "model": "default", "max_tokens": 24, "temperature": 0,
                    "messages": [{"role": "user", "content": "What is the capital of France?"}]})
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "up local never served"
            time.sleep(1)
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
        info = httpx.get(f"http://127.0.0.1:{port}/get_server_info", timeout=10).json()
        assert info["internal_states"]["compiles_after_warmup"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
