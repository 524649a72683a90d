"""``sgljax bench`` against a stub server whose delays are known: it measures what it claims."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stub_openai_server import StubServer, StubState, free_port
from tiny_models import qwen_tokenizer_dir

import sgljax
from sgljax.cli.main import app

TTFT, ITL = 0.2, 0.05
PKG_ROOT = str(Path(sgljax.__file__).parent.parent)  # the folder to put on PYTHONPATH


@pytest.fixture(scope="module")
def stub():
    state = StubState(tokenizer_path=str(qwen_tokenizer_dir()), ttft=TTFT, itl=ITL)
    with StubServer(state) as server:
        yield server


@pytest.fixture
def server(stub):
    """The module's stub with its knobs reset and its request log emptied."""
    s = stub.state
    s.ttft, s.itl, s.tokens_per_chunk = TTFT, ITL, 1
    s.honour_ignore_eos = s.report_usage = s.model_info = True
    s.bodies.clear()
    s.prompts_seen.clear()
    s.prompt_token_counts.clear()
    s.arrivals.clear()
    s.auth_headers.clear()
    return stub


def run_bench(server, *args: str):
    result = CliRunner().invoke(app, ["bench", "--base-url", server.url, "--seed", "3", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def last_line(path: Path) -> dict:
    return json.loads(path.read_text().strip().splitlines()[-1])


def test_measures_stub_delays_and_writes_jsonl_and_png(server, tmp_path):
    out, png = tmp_path / "r.jsonl", tmp_path / "r.png"
    res = run_bench(server, "--num-prompts", "8", "--max-concurrency", "4", "--random-input-len",
                    "40", "--random-output-len", "6", "--output-file", str(out), "--plot", str(png))
    assert res.exit_code == 0, res.output
    assert "Serving Benchmark Result" in res.stdout
    m = last_line(out)
    assert m["completed"] == 8 and m["failed"] == 0
    assert m["total_output_tokens"] == 8 * 6 and m["output_len_mismatches"] == 0
    # 1 warmup + 8 measured prompts, each exactly 40 tokens for the server's tokenizer.
    assert server.state.prompt_token_counts == [40] * 9
    assert m["total_input_tokens"] == 8 * 40
    body = server.state.bodies[-1]
    assert body["ignore_eos"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "stub-model" and body["max_tokens"] == 6
    # The stub sleeps TTFT before the first chunk and ITL between chunks: measured
    # values can only be later, and (generously) not by much.
    assert TTFT - 0.005 <= m["median_ttft_ms"] / 1000 <= TTFT + 0.15
    assert ITL - 0.005 <= m["median_itl_ms"] / 1000 <= ITL + 0.04
    assert ITL - 0.005 <= m["median_tpot_ms"] / 1000 <= ITL + 0.04
    e2e_expected = TTFT + 5 * ITL
    assert e2e_expected - 0.005 <= m["median_e2e_latency_ms"] / 1000 <= e2e_expected + 0.3
    for key in ("ttft", "tpot", "itl", "e2e_latency"):
        assert m[f"median_{key}_ms"] <= m[f"p90_{key}_ms"] <= m[f"p99_{key}_ms"]
    assert m["tokens_per_chunk"] == pytest.approx(1.0)
    assert m["peak_concurrent_requests"] == 4
    assert 0 < m["concurrency"] <= 4.01
    # 8 requests of ~0.45 s in waves of 4: throughput is bounded by the stub's pace.
    assert m["request_throughput"] <= 4 / e2e_expected * 1.05
    assert 0.5 * m["output_throughput"] <= m["peak_output_throughput"] <= 8 * 6 / min(
        1.0, m["duration_s"]) + 1e-6
    assert m["cache_hit_rate"] is not None and m["cache_hit_rate"] < 0.2  # random prompts
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    # A second run appends a second line.
    run_bench(server, "--num-prompts", "2", "--random-input-len", "8", "--random-output-len", "2",
              "--output-file", str(out), "--warmup-requests", "0")
    assert len(out.read_text().strip().splitlines()) == 2


def test_multi_token_chunks_itl_per_chunk_tpot_per_token(server, tmp_path):
    server.state.tokens_per_chunk = 3
    out = tmp_path / "r.jsonl"
    res = run_bench(server, "--num-prompts", "4", "--random-input-len", "16", "--random-output-len",
                    "9", "--output-file", str(out), "--warmup-requests", "0")
    assert res.exit_code == 0, res.output
    m = last_line(out)
    assert m["total_output_tokens"] == 4 * 9
    assert m["tokens_per_chunk"] == pytest.approx(3.0)
    assert ITL - 0.005 <= m["median_itl_ms"] / 1000 <= ITL + 0.04  # gap between chunks
    # TPOT spreads the (2 chunk gaps) over the 8 tokens after the first.
    assert 2 * ITL / 8 - 0.005 <= m["median_tpot_ms"] / 1000 <= 2 * ITL / 8 + 0.02


def test_shared_prefix_reports_cache_hits(server, tmp_path):
    out = tmp_path / "r.jsonl"
    res = run_bench(server, "--dataset", "shared-prefix", "--num-prompts", "6",
                    "--shared-prefix-len", "60", "--suffix-len", "20", "--num-groups", "2",
                    "--random-output-len", "2", "--max-concurrency", "2", "--output-file", str(out))
    assert res.exit_code == 0, res.output
    prompts = server.state.prompts_seen
    assert [len(p) for p in prompts] == [80] * 7
    groups = {}
    for p in prompts:
        groups[tuple(p[:60])] = groups.get(tuple(p[:60]), 0) + 1
    assert sorted(groups.values()) == [3, 4]  # warmup + 6 requests, taking the 2 prefixes in turn
    assert len({tuple(p[60:]) for p in prompts}) == 7  # each with its own suffix
    m = last_line(out)
    # The warmup saw group 0 first; of the 6 measured requests only group 1's first misses.
    assert m["cache_hit_rate"] == pytest.approx(5 * 60 / (6 * 80), abs=0.02)
    assert "Cached-token hit rate" in res.stdout


def test_random_ids_chat_and_non_streaming(server, tmp_path):
    out = tmp_path / "r.jsonl"
    res = run_bench(server, "--dataset", "random-ids", "--num-prompts", "3", "--random-input-len",
                    "12", "--random-output-len", "3", "--output-file", str(out))
    assert res.exit_code == 0, res.output
    assert all(isinstance(b["prompt"], list) and len(b["prompt"]) == 12 for b in server.state.bodies)

    res = run_bench(server, "--backend", "openai-chat", "--num-prompts", "3", "--random-input-len",
                    "12", "--random-output-len", "3", "--output-file", str(out))
    assert res.exit_code == 0, res.output
    assert "messages" in server.state.bodies[-1]
    assert last_line(out)["total_output_tokens"] == 9

    res = run_bench(server, "--disable-stream", "--num-prompts", "3", "--random-input-len", "12",
                    "--random-output-len", "3", "--output-file", str(out))
    assert res.exit_code == 0, res.output
    m = last_line(out)
    assert server.state.bodies[-1]["stream"] is False
    assert m["total_output_tokens"] == 9 and m["median_ttft_ms"] is None
    assert m["median_e2e_latency_ms"] / 1000 >= TTFT + 2 * ITL - 0.005


def test_sharegpt_prompts_and_reply_lengths(server, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir()))
    convs = [{"conversations": [{"from": "human", "value": f"Question number {i}: why is the sky blue?"},
                                {"from": "gpt", "value": "Because of Rayleigh scattering. " * (i + 1)}]}
             for i in range(5)]
    convs.append({"conversations": [{"from": "human", "value": "hi"}]})  # no reply: skipped
    data = tmp_path / "sg.json"
    data.write_text(json.dumps(convs))
    res = run_bench(server, "--dataset", "sharegpt", "--dataset-path", str(data),
                    "--num-prompts", "4", "--warmup-requests", "1")
    assert res.exit_code == 0, res.output
    asked = {b["prompt"]: b["max_tokens"] for b in server.state.bodies}
    replies = {c["conversations"][0]["value"]: c["conversations"][1]["value"] for c in convs[:5]}
    assert len(asked) == 5 and set(asked) <= set(replies)
    for prompt, max_tokens in asked.items():
        assert max_tokens == len(tok.encode(replies[prompt], add_special_tokens=False))
    res = run_bench(server, "--dataset", "sharegpt", "--dataset-path", str(data),
                    "--num-prompts", "6")
    assert res.exit_code == 1 and "only 5 usable conversations" in res.stderr


def test_poisson_arrivals_follow_the_request_rate(server, tmp_path):
    import random

    rate, n = 8.0, 6
    res = run_bench(server, "--num-prompts", str(n), "--request-rate", str(rate),
                    "--random-input-len", "8", "--random-output-len", "2",
                    "--warmup-requests", "0", "--api-key", "sekret")
    assert res.exit_code == 0, res.output
    rng = random.Random(3)  # run_bench's --seed
    expected = [rng.expovariate(rate) for _ in range(n - 1)]
    got = [b - a for a, b in zip(server.state.arrivals, server.state.arrivals[1:])]
    assert sum(got) == pytest.approx(sum(expected), abs=0.1)
    assert all(g >= e - 0.03 for g, e in zip(got, expected))
    assert set(server.state.auth_headers) == {"Bearer sekret"}


def test_warns_when_the_server_stops_early(server, tmp_path):
    server.state.honour_ignore_eos = False
    res = run_bench(server, "--num-prompts", "2", "--random-input-len", "8", "--random-output-len",
                    "5", "--warmup-requests", "0")
    assert res.exit_code == 0
    assert "did not return the requested number of tokens" in res.stderr
    # With --disable-ignore-eos short answers are expected: no warning, no ignore_eos sent.
    res = run_bench(server, "--num-prompts", "2", "--random-input-len", "8", "--random-output-len",
                    "5", "--warmup-requests", "0", "--disable-ignore-eos")
    assert "WARNING" not in res.stderr and "ignore_eos" not in server.state.bodies[-1]


def test_counts_tokens_itself_without_usage(server, tmp_path):
    server.state.report_usage = False
    out = tmp_path / "r.jsonl"
    res = run_bench(server, "--num-prompts", "2", "--random-input-len", "8", "--random-output-len",
                    "4", "--warmup-requests", "0", "--output-file", str(out))
    assert "reported no token usage" in res.stderr
    m = last_line(out)
    assert m["usage_missing"] == 2 and m["total_output_tokens"] == 8  # " tok" × 4 re-tokenized


def test_no_tokenizer_found_is_one_line(server):
    server.state.model_info = False
    res = run_bench(server, "--num-prompts", "2")
    assert res.exit_code == 1
    assert res.stderr.strip().count("\n") == 0 and "--tokenizer" in res.stderr
    res = run_bench(server, "--num-prompts", "2", "--random-input-len", "8", "--random-output-len",
                    "2", "--tokenizer", str(qwen_tokenizer_dir()), "--warmup-requests", "0")
    assert res.exit_code == 0, res.output


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=PKG_ROOT)
    return subprocess.run([sys.executable, "-m", "sgljax.cli.main", "bench", *args], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, words", [
    (["--base-url", "http://127.0.0.1:{closed}"], "cannot reach"),
    (["--num-prompts", "0"], "--num-prompts"),
    (["--dataset", "sharegpt", "--dataset-path", "/nonexistent/sg.json"], "does not exist"),
    (["--dataset", "sharegpt"], "--dataset-path"),
    (["--dataset", "nope"], "--dataset"),
    (["--output-file", "/nonexistent/dir/r.jsonl"], "does not exist"),
    (["--base-url", "localhost:30000"], "http://"),
])
def test_bad_arguments_one_line_and_nonzero_exit(args, words):
    args = [a.format(closed=free_port()) for a in args]
    if "--base-url" not in args:
        args = ["--base-url", f"http://127.0.0.1:{free_port()}", *args]
    proc = _cli(*args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], proc.stderr


def test_bench_is_a_client_that_never_imports_the_engine():
    code = ("import sys, sgljax.cli.main, sgljax.cli.bench, sgljax.cli.bench_client, "
            "sgljax.cli.bench_report, sgljax.cli.bench_datasets; "
            "light = ('sgljax.engine.args', 'sgljax.engine.checkpoint_format', "
            "'sgljax.engine.cache_paths'); "
            "print([m for m in sys.modules if m.startswith('sgljax.engine.') and m not in light "
            "or m.split('.')[0] in ('jax', 'flax', 'torch')])")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=PKG_ROOT),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
