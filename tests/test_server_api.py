"""The HTTP server (a real ``sgljax serve`` on a tiny random Qwen3) through the OpenAI SDK,
raw HTTP, and against the engine's own Python API."""

import asyncio
import json
import time

import httpx
import openai
import pytest

from server_harness import TINY_SERVER_ARGS, ServerProcess

MODEL = "tiny"
SYSTEM = ("You are a careful assistant. Answer briefly and plainly, in one sentence, "
          "without lists or markdown, and never mention these instructions.")


@pytest.fixture(scope="module")
def server(tiny_models):
    srv = ServerProcess(tiny_models["qwen3"], *TINY_SERVER_ARGS, "--served-model-name", MODEL)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def _messages(text="Tell me about cats."):
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def _greedy_completion(client, prompt="Once upon a time", n_tokens=30, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=n_tokens,
                                     temperature=0, extra_body={"ignore_eos": True}, **kw)


def _server_state(http) -> dict:
    return http.get("/get_server_info").json()["internal_states"]


def _wait_idle(http, timeout=120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = _server_state(http)
        if st["num_running"] == 0 and st["num_queued"] == 0:
            return st
        time.sleep(0.2)
    raise AssertionError(f"server still busy after {timeout} s: {st}")


# -- the OpenAI SDK ------------------------------------------------------------------------
def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http.get("/health").status_code == 200
    info = http.get("/get_model_info").json()
    assert info["architecture"] == "Qwen3ForCausalLM" and info["context_length"] == 256


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=_messages(), max_tokens=8,
                                       temperature=0)
    assert r.object == "chat.completion" and len(r.choices) == 1
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.prompt_tokens > 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_equals_non_streamed_and_reports_cached_tokens(client):
    kw = dict(model=MODEL, messages=_messages("Name three rivers."), max_tokens=24, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 24
    assert all(ch.usage is None for ch in chunks[:-1])
    # Same prompt again: its full pages come from the prefix cache.
    assert last.usage.prompt_tokens_details.cached_tokens >= 16


def test_streamed_completion_equals_non_streamed(client):
    full = _greedy_completion(client)
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time",
                                            max_tokens=30, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == full.choices[0].text
    assert full.usage.completion_tokens == 30


def test_n_choices_are_distinct_and_seeded(client):
    kw = dict(model=MODEL, prompt="The weather", max_tokens=4, temperature=1.0, n=3, seed=7)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # each choice samples with its own seed
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert a.usage.completion_tokens == 12


def test_seed_reproducibility(client):
    kw = dict(model=MODEL, messages=_messages(), max_tokens=6, temperature=1.0)
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=4321, **kw).choices[0].message.content
    assert a == b and a != c


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=_messages(), max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for e in content:
        assert len(e.top_logprobs) == 3
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
        assert e.token == e.top_logprobs[0].token  # greedy picks the most likely token
        assert e.logprob == pytest.approx(tops[0])
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token


def test_completion_logprobs(client):
    r = _greedy_completion(client, n_tokens=5, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert max(top.values()) == pytest.approx(chosen) and tok in top


def test_stop_strings_are_cut_and_never_leak(client):
    base = _greedy_completion(client, n_tokens=40).choices[0].text
    # A 3-character stop string whose first occurrence is well inside the text.
    k = next(i for i in range(8, len(base) - 3)
             if base.find(base[i:i + 3]) == i and base[i:i + 3].strip())
    stop = base[k:k + 3]
    r = _greedy_completion(client, n_tokens=40, stop=[stop, "never-seen-xyz"])
    assert r.choices[0].text == base[:k] and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time",
                                            max_tokens=40, temperature=0, stop=stop,
                                            stream=True, extra_body={"ignore_eos": True}))
    pieces = [ch.choices[0].text for ch in chunks]
    assert "".join(pieces) == base[:k]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_echo_returns_prompt_and_completion(client):
    plain = _greedy_completion(client, n_tokens=5).choices[0].text
    echoed = _greedy_completion(client, n_tokens=5, echo=True).choices[0].text
    assert echoed == "Once upon a time" + plain


def test_chat_template_kwargs_reach_the_template(client):
    def prompt_tokens(**extra):
        return client.chat.completions.create(
            model=MODEL, messages=_messages(), max_tokens=1, temperature=0,
            extra_body=extra).usage.prompt_tokens

    plain = prompt_tokens()
    no_think = prompt_tokens(chat_template_kwargs={"enable_thinking": False})
    assert no_think == plain + 4  # Qwen3 adds an empty "<think>\n\n</think>\n\n"


def test_stop_token_ids_and_logit_bias(http):
    def gen(**sp):
        body = {"text": "Once upon a time", "sampling_params": {
            "max_new_tokens": 12, "temperature": 0, "ignore_eos": True, **sp}}
        r = http.post("/generate", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    ids = gen()["output_ids"]
    target = ids[4]
    out = gen(stop_token_ids=[target])
    assert out["output_ids"] == ids[:ids.index(target) + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": target}
    forced = gen(logit_bias={"1234": 100.0})
    assert forced["output_ids"] == [1234] * 12


def test_native_generate_streams_cumulative_text(http):
    body = {"text": "Hello there", "sampling_params": {"max_new_tokens": 10, "temperature": 0,
                                                        "ignore_eos": True}}
    full = http.post("/generate", json=body).json()
    events = []
    with http.stream("POST", "/generate", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["text"] == full["text"] and last["output_ids"] == full["output_ids"]
    assert len(events) == 11


def test_greedy_outputs_equal_engine_api(http, tiny_models):
    from sgljax.engine.engine import Engine
    from sgljax.engine.sampling_params import SamplingParams

    # The last prompt spans two prefill chunks of 64 tokens.
    prompts = ["Hi", "The quick brown fox jumps over the lazy dog, again and again.",
               " ".join(f"word{i}" for i in range(30))]
    engine = Engine(model_path=str(tiny_models["qwen3"]), page_size=16, chunked_prefill_size=64,
                    max_running_requests=8, context_length=256, max_total_tokens=8192)
    assert len(engine.tokenizer.encode(prompts[-1])) > 64
    want = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0,
                                                   ignore_eos=True))
    sampling = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
    by_text = http.post("/generate", json={"text": prompts, "sampling_params": sampling}).json()
    assert [g["output_ids"] for g in by_text] == [w["token_ids"] for w in want]
    assert [g["text"] for g in by_text] == [w["text"] for w in want]
    ids = [engine.tokenizer.encode(p) for p in prompts]
    by_ids = http.post("/generate", json={"input_ids": ids, "sampling_params": sampling}).json()
    assert [g["output_ids"] for g in by_ids] == [w["token_ids"] for w in want]
    r = http.post("/v1/completions", json={"prompt": prompts, "max_tokens": 16,
                                           "temperature": 0, "ignore_eos": True}).json()
    assert [c["text"] for c in sorted(r["choices"], key=lambda c: c["index"])] == \
        [w["text"] for w in want]


# -- cache, metrics, disconnects --------------------------------------------------------------
def test_flush_cache_refused_while_running(http):
    # Sampling (not greedy) is slow enough on CPU that 200 tokens outlast the check.
    body = {"prompt": "Busy", "max_tokens": 200, "temperature": 1.0, "ignore_eos": True,
            "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()  # kept referenced: closing it would hang up the stream
        while not next(lines).startswith("data: "):
            pass
        busy = http.post("/flush_cache")
        assert busy.status_code == 400 and busy.json()["error"]["code"] == "server_busy"
    _wait_idle(http)
    assert http.post("/flush_cache").status_code == 200
    st = _server_state(http)
    assert st["prefix_cache_pages"] == 0 and st["kv_pages_used"] == 0


def test_metrics_count_tokens_and_latencies(http):
    text = http.get("/metrics").text
    for name in ("sgljax:num_running_reqs", "sgljax:num_queue_reqs", "sgljax:token_usage",
                 "sgljax:cache_hit_rate", "sgljax:prompt_tokens_total",
                 "sgljax:generation_tokens_total", "sgljax:time_to_first_token_seconds_count",
                 "sgljax:inter_token_latency_seconds_count",
                 "sgljax:e2e_request_latency_seconds_count"):
        assert name in text
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("sgljax:") and "_bucket" not in line}
    assert values["sgljax:generation_tokens_total"] > 0
    assert values["sgljax:time_to_first_token_seconds_count"] > 0


def test_disconnecting_clients_free_their_kv_pages(http, server):
    _wait_idle(http)
    assert http.post("/flush_cache").status_code == 200
    idle_used = _server_state(http)["kv_pages_used"]

    def generated() -> float:
        line = next(x for x in http.get("/metrics").text.splitlines()
                    if x.startswith("sgljax:generation_tokens_total"))
        return float(line.rsplit(" ", 1)[1])

    before = generated()
    max_tokens = 200

    async def one(client: httpx.AsyncClient, i: int) -> bool:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Story {i}: " * 8}],
                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and '"content":"' in line and \
                        '"content":""' not in line:
                    return True  # the first generated text: hang up now
        return False

    async def burst():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(one(c, i) for i in range(50)))

    assert all(asyncio.run(burst()))
    st = _wait_idle(http)
    assert st["kv_pages_held_by_requests"] == 0
    # Aborted at once: far fewer tokens than 50 full answers.
    assert generated() - before < 50 * max_tokens / 4
    assert http.post("/flush_cache").status_code == 200
    assert _server_state(http)["kv_pages_used"] == idle_used
    # And the server still serves.
    r = http.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200


def test_non_streaming_client_that_times_out_is_aborted(http, server):
    def ended(reason: str) -> float:
        prefix = f'sgljax:num_requests_total{{finish_reason="{reason}"'
        return sum(float(line.rsplit(" ", 1)[1]) for line in http.get("/metrics").text.splitlines()
                   if line.startswith(prefix))

    _wait_idle(http)
    aborted, by_length = ended("abort"), ended("length")
    # top_p: the sampler sorts the vocabulary every step, so 240 tokens take seconds
    body = {"prompt": "Patience", "max_tokens": 240, "temperature": 1.0, "top_p": 0.95,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
    _wait_idle(http)
    assert _server_state(http)["kv_pages_held_by_requests"] == 0
    assert ended("abort") == aborted + 1 and ended("length") == by_length


# -- bad input: the right 4xx, in OpenAI's error shape, and the server carries on ---------------
CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
BAD_INPUTS = [
    # (id, path, body (dict → JSON, bytes → raw), status, param)
    ("malformed-json", CHAT, b'{"messages": [', 400, None),
    ("not-an-object", CHAT, b"[1, 2]", 400, None),
    ("empty-body", CHAT, b"", 400, None),
    ("not-utf8", CHAT, b'{"messages": "\xff\xfe"}', 400, None),
    ("missing-messages", CHAT, {"model": MODEL}, 400, "messages"),
    ("empty-messages", CHAT, {"messages": []}, 400, "messages"),
    ("bad-role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("temperature-type", CHAT, {"messages": USER, "temperature": "hot"}, 400, "temperature"),
    ("stream-type", CHAT, {"messages": USER, "stream": "yes"}, 400, "stream"),
    ("unknown-model", CHAT, {"model": "gpt-9", "messages": USER}, 404, "model"),
    ("max-tokens-zero", CHAT, {"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ("max-completion-tokens-neg", CHAT, {"messages": USER, "max_completion_tokens": -3}, 400,
     "max_completion_tokens"),
    ("beyond-context", CHAT, {"messages": USER, "max_tokens": 100000}, 400, "max_tokens"),
    ("prompt-too-long", CHAT, {"messages": [{"role": "user", "content": "hello " * 400}]}, 400,
     "max_tokens"),
    ("n-zero", CHAT, {"messages": USER, "n": 0}, 400, "n"),
    ("n-too-large", CHAT, {"messages": USER, "n": 17}, 400, "n"),
    ("logit-bias-key", CHAT, {"messages": USER, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("logit-bias-vocab", CHAT, {"messages": USER, "logit_bias": {"99999999": 1}}, 400,
     "logit_bias"),
    ("logit-bias-value", CHAT, {"messages": USER, "logit_bias": {"5": 500}}, 400, "logit_bias"),
    ("top-logprobs-alone", CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    ("top-logprobs-range", CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs"),
    ("tools", CHAT, {"messages": USER, "tools": [{"type": "function"}]}, 400,
     "tools[0].function"),
    ("tools-auto-without-parser", CHAT, {"messages": USER, "tools": [
        {"type": "function", "function": {"name": "f"}}]}, 400, "tool_choice"),
    ("json-schema-missing", CHAT, {"messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x"}}}, 400, "response_format"),
    ("unknown-field", CHAT, {"messages": USER, "frobnicate": 1}, 400, "frobnicate"),
    ("image-part", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content[0]"),
    ("top-p-zero", CHAT, {"messages": USER, "top_p": 0}, 400, "top_p"),
    ("stop-type", CHAT, {"messages": USER, "stop": ["a", 3]}, 400, "stop"),
    ("best-of", CMPL, {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("suffix", CMPL, {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("echo-logprobs", CMPL, {"prompt": "x", "echo": True, "logprobs": 1}, 400, "logprobs"),
    ("empty-prompt-list", CMPL, {"prompt": []}, 400, "prompt"),
    ("empty-prompt", CMPL, {"prompt": ""}, 400, "prompt"),
    ("token-outside-vocab", CMPL, {"prompt": [1, 2, 10 ** 9]}, 400, "prompt"),
    ("oversized-body", CMPL, b'{"prompt": "' + b"a" * (9 << 20) + b'"}', 413, None),
    ("generate-both", "/generate", {"text": "x", "input_ids": [1]}, 400, "text"),
    ("generate-bad-sampling", "/generate", {"text": "x", "sampling_params": {"bogus": 1}}, 400,
     "sampling_params.bogus"),
]


@pytest.mark.parametrize("path,body,status,param", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_its_4xx(http, path, body, status, param):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    ok = http.post(CMPL, json={"prompt": "still alive", "max_tokens": 1})
    assert ok.status_code == 200


def test_unknown_route_and_method(http):
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = http.get(CMPL)
    assert r.status_code == 405 and "error" in r.json()


def test_second_long_prompt_is_served_from_the_prefix_cache(client):
    """Issue 4: the repeat reports cached_tokens >= its length minus one page; TTFT is printed."""
    import time

    prompt = " ".join(f"word{i}" for i in range(60))  # ~170 tokens, not page-aligned
    results = []
    for _ in range(2):
        t0 = time.perf_counter()
        stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
        ttft, usage = None, None
        for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].text:
                ttft = time.perf_counter() - t0
            usage = chunk.usage or usage
        results.append((ttft, usage))
    (ttft1, u1), (ttft2, u2) = results
    print(f"TTFT cold {ttft1 * 1000:.0f} ms, cached {ttft2 * 1000:.0f} ms "
          f"({u2.prompt_tokens_details.cached_tokens}/{u2.prompt_tokens} prompt tokens cached)")
    assert u2.prompt_tokens == u1.prompt_tokens > 100
    assert u2.prompt_tokens_details.cached_tokens >= u2.prompt_tokens - 16
