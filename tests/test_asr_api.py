"""Qwen3-ASR over HTTP (tiny random checkpoint): /v1/audio/transcriptions with the official
openai SDK and audio chat messages give the engine's greedy tokens (which equal
transformers', tests/test_asr_engine.py); audio batches with text; bad audio is a 400;
after --asr-warmup nothing compiles."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import soundfile

from server_harness import ServerProcess
from tiny_asr import build_tiny_asr, synth_audio

ARGS = ("--context-length", "320", "--max-total-tokens", "16384", "--page-size", "16",
        "--max-running-requests", "16", "--chunked-prefill-size", "128", "--asr-warmup",
        "--frame-paddings", "100,300", "--served-model-name", "asr")
SECONDS = [0.5, 1.2, 2.5, 0.8]


def _wav(samples: np.ndarray, rate: int = 16000, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_asr(tmp_path_factory.mktemp("asr-api") / "tiny")


@pytest.fixture(scope="module")
def server(model):
    srv = ServerProcess(model, *ARGS)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=180)


@pytest.fixture(scope="module")
def expected(model):
    """Each clip's greedy answer from the engine, with the server's token budget."""
    from sgljax.engine.engine import Engine
    from sgljax.engine.sampling_params import SamplingParams

    eng = Engine(model_path=str(model), context_length=320, max_total_tokens=16384,
                 page_size=16, max_running_requests=16, chunked_prefill_size=128)
    prompt = eng.transcription_prompt(1)
    outs = []
    for i, s in enumerate(SECONDS):
        clip = synth_audio(s, seed=i)
        budget = 320 - (len(prompt) - 1 + eng.prepare_audio([clip])[0].features.num_tokens)
        out = eng.generate([prompt], SamplingParams(max_tokens=budget, temperature=0),
                           audio=[[clip]])[0]
        outs.append(out)
    return outs


def _metrics(server) -> dict:
    text = httpx.get(server.url + "/metrics").text
    return {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("sgljax:") and "{" in line}


def test_transcriptions_route_with_the_openai_sdk(client, expected):
    from sgljax.engine.asr_prompt import parse_transcription

    for i, s in enumerate(SECONDS[:2]):
        wav = _wav(synth_audio(s, seed=i))
        r = client.audio.transcriptions.create(model="asr", file=("clip.wav", wav),
                                               response_format="verbose_json")
        assert r.segments[0].tokens == expected[i]["token_ids"]
        want = parse_transcription(expected[i]["text"])
        assert r.text == want.text and r.duration == pytest.approx(s, abs=1e-3)
        j = client.audio.transcriptions.create(model="asr", file=("clip.wav", wav))
        assert j.text == want.text and j.usage.type == "duration"
        assert j.usage.seconds == pytest.approx(s, abs=1e-3)
    text = client.audio.transcriptions.create(model="asr", response_format="text",
                                              file=("c.flac", _wav(synth_audio(0.5), fmt="FLAC")))
    assert isinstance(text, str)
    srt = client.audio.transcriptions.create(model="asr", response_format="srt",
                                             file=("c.wav", _wav(synth_audio(0.5))))
    assert srt.startswith("1\n00:00:00,000 --> 00:00:00,500\n")


def test_streamed_transcription_equals_whole(client):
    wav = _wav(synth_audio(1.2, seed=1))
    whole = client.audio.transcriptions.create(model="asr", file=("c.wav", wav)).text
    deltas, done = [], None
    for event in client.audio.transcriptions.create(model="asr", file=("c.wav", wav),
                                                    stream=True):
        if event.type == "transcript.text.delta":
            deltas.append(event.delta)
        elif event.type == "transcript.text.done":
            done = event.text
    from sgljax.engine.asr_prompt import collapse_repeats

    assert done == whole and collapse_repeats("".join(deltas).strip()) == whole


def test_chat_audio_parts_give_the_transcription_tokens(server, expected):
    clip = _wav(synth_audio(SECONDS[0], seed=0))
    b64 = base64.b64encode(clip).decode()
    for part in ({"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}},
                 {"type": "audio_url", "audio_url": {"url": f"data:audio/wav;base64,{b64}"}}):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=180, json={
            "messages": [{"role": "user", "content": [part]}], "temperature": 0,
            "logprobs": True})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["message"]["content"] == expected[0]["text"]


def test_concurrent_audio_and_text_batch_and_match_one_at_a_time(server, client, expected):
    before = _metrics(server)
    wavs = [_wav(synth_audio(s, seed=i)) for i, s in enumerate(SECONDS)] * 2  # 8 requests

    def audio(wav):
        return client.audio.transcriptions.create(model="asr", file=("c.wav", wav),
                                                  response_format="verbose_json")

    def text(i):
        return httpx.post(server.url + "/v1/completions", timeout=180, json={
            "prompt": f"Hello {i}", "max_tokens": 8, "temperature": 0}).status_code

    with ThreadPoolExecutor(12) as pool:
        audio_futures = [pool.submit(audio, w) for w in wavs]
        text_futures = [pool.submit(text, i) for i in range(4)]
        results = [f.result() for f in audio_futures]
        assert [f.result() for f in text_futures] == [200] * 4
    for i, r in enumerate(results):
        assert r.segments[0].tokens == expected[i % len(SECONDS)]["token_ids"], i
    after = _metrics(server)
    clips = after["sgljax:audio_clips_encoded"] - before["sgljax:audio_clips_encoded"]
    calls = after["sgljax:audio_encoder_calls"] - before["sgljax:audio_encoder_calls"]
    assert clips == 8 and calls < clips  # encoded in batches
    assert after["sgljax:compiles_after_warmup"] == 0  # --asr-warmup covered every shape
    assert after["sgljax:unwarmed_audio_shapes"] == 0


def _silent_wav_with_rate(rate: int) -> bytes:
    wav = bytearray(_wav(np.zeros(1600, np.float32)))
    wav[24:28] = rate.to_bytes(4, "little")
    return bytes(wav)


@pytest.mark.parametrize("files,data,param", [
    ({"file": ("a.wav", b"")}, {}, "file"),
    ({"file": ("a.wav", b"not audio at all")}, {}, "file"),
    ({"file": ("a.wav", _silent_wav_with_rate(0))}, {}, "file"),
    ({"file": ("a.wav", _wav(np.zeros(1600, np.float32)))}, {"response_format": "xml"},
     "response_format"),
    ({"file": ("a.wav", _wav(np.zeros(1600, np.float32)))}, {"language": "klingon"}, "language"),
    ({"file": ("a.wav", _wav(np.zeros(1600, np.float32)))}, {"bogus": "1"}, "bogus"),
    ({}, {"model": "asr"}, "file"),
])
def test_bad_uploads_are_400s(server, files, data, param):
    r = httpx.post(server.url + "/v1/audio/transcriptions", files=files or None,
                   data={"model": "asr", **data}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize("part,param", [
    ({"type": "input_audio", "input_audio": {"data": "%%% not base64", "format": "wav"}},
     "messages[0].content[0]"),
    ({"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}},
     "messages[0].content[0]"),
    ({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFFjunk").decode()}},
     "messages[0].content[0]"),
])
def test_bad_chat_audio_is_a_400(server, part, param):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": [part]}]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_too_many_audios_is_a_400(server):
    b64 = base64.b64encode(_wav(np.zeros(1600, np.float32))).decode()
    parts = [{"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}] * 9
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 400 and "at most 8" in r.json()["error"]["message"]


def test_long_audio_is_cut_at_quiet_points():
    from sgljax.server.audio_input import split_long_audio

    rng = np.random.default_rng(0)
    x = rng.standard_normal(16000 * 70).astype(np.float32)
    x[16000 * 27:16000 * 27 + 1600] = 0  # a pause 27 s in
    pieces = split_long_audio(x)
    assert pieces[0] == (0, 16000 * 27 + 800) and pieces[-1][1] == len(x)
    assert all(b - a <= 30 * 16000 for a, b in pieces)
    assert all(p[1] == q[0] for p, q in zip(pieces, pieces[1:]))


def test_text_models_have_no_transcriptions_route(tiny_models):
    from server_harness import TINY_SERVER_ARGS

    srv = ServerProcess(tiny_models["qwen3"], *TINY_SERVER_ARGS)
    try:
        r = httpx.post(srv.url + "/v1/audio/transcriptions", timeout=30,
                       files={"file": ("a.wav", _wav(np.zeros(1600, np.float32)))})
        assert r.status_code == 404 and "does not transcribe" in r.json()["error"]["message"]
        b64 = base64.b64encode(_wav(np.zeros(1600, np.float32))).decode()
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=30, json={"messages": [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {
                "data": b64, "format": "wav"}}]}]})
        assert r.status_code == 400, r.text
    finally:
        srv.stop()


def test_warmup_asr_command(model, tiny_models, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "SGLJAX_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "sgljax.cli.main", "warmup-asr", str(model), "--json",
           "--frame-paddings", "100,250", "--token-paddings", "64", "--context-length", "320",
           "--max-total-tokens", "16384", "--page-size", "16", "--chunked-prefill-size", "128"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["asr"]["unwarmed"] == 0 and figures["asr"]["encoder_buckets"], figures
    text = subprocess.run([sys.executable, "-m", "sgljax.cli.main", "warmup-asr",
                           str(tiny_models["qwen3"])], capture_output=True, text=True,
                          timeout=300, env=env)
    assert text.returncode == 1 and "not a speech model" in text.stderr
    assert len(text.stderr.strip().splitlines()) == 1, text.stderr
