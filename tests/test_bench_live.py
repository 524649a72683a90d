"""``sgljax bench`` against a real ``sgljax serve`` on the tiny Qwen3 model.

Skipped until the ``serve`` command exists (sgljax.cli.serve).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("sgljax.cli.serve")

import sgljax  # noqa: E402
from stub_openai_server import free_port  # noqa: E402

PKG_ROOT = str(Path(sgljax.__file__).parent.parent)
ENV = dict(os.environ, PYTHONPATH=PKG_ROOT)


@pytest.fixture(scope="module")
def live_server(tiny_models, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sgljax.cli.main", "serve", "--model-path",
             str(tiny_models["qwen3"]), "--port", str(port), "--skip-server-warmup"],
            env=ENV, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sgljax serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"sgljax serve did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench(url: str, out: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "sgljax.cli.main", "bench", "--base-url", url,
                           "--output-file", str(out), *args],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr, proc.stderr
    return json.loads(out.read_text().strip().splitlines()[-1])


def test_bench_against_sgljax_serve(live_server, tiny_models, tmp_path):
    out = tmp_path / "r.jsonl"
    # No --tokenizer: it must be found through the server (/get_model_info or /v1/models).
    m = bench(live_server, out, "--num-prompts", "4", "--max-concurrency", "2",
              "--random-input-len", "16", "--random-output-len", "8")
    assert Path(m["tokenizer"]).resolve() == Path(tiny_models["qwen3"]).resolve()
    assert m["completed"] == 4 and m["failed"] == 0
    assert m["total_output_tokens"] == 4 * 8 and m["output_len_mismatches"] == 0
    assert m["total_input_tokens"] >= 4 * 16
    assert 0 < m["median_ttft_ms"] <= m["median_e2e_latency_ms"]
    for key in ("ttft", "tpot", "itl", "e2e_latency"):
        assert m[f"median_{key}_ms"] <= m[f"p90_{key}_ms"] <= m[f"p99_{key}_ms"]


def test_bench_shared_prefix_and_chat_against_sgljax_serve(live_server, tmp_path):
    out = tmp_path / "r.jsonl"
    m = bench(live_server, out, "--dataset", "shared-prefix", "--num-prompts", "4",
              "--shared-prefix-len", "48", "--suffix-len", "8", "--random-output-len", "4",
              "--max-concurrency", "2")
    assert m["completed"] == 4 and m["total_output_tokens"] == 16
    # When the server reports cached tokens, the shared 48-token prefix must show up.
    assert m["cache_hit_rate"] is None or m["cache_hit_rate"] > 0
    m = bench(live_server, out, "--backend", "openai-chat", "--num-prompts", "2",
              "--random-input-len", "8", "--random-output-len", "4", "--warmup-requests", "0")
    assert m["completed"] == 2 and m["total_output_tokens"] == 8
