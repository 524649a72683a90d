"""The benchmark's HTTP side: one streamed request at a time, timed with perf_counter.

How tokens and inter-token latencies are counted: an OpenAI stream does not say
how many tokens each chunk carries. Every chunk whose text is non-empty is a
"content chunk" and its arrival time is recorded. ITL is the gap between
consecutive content chunks of a request (what a client actually sees; when a
server packs k tokens into one chunk the gap covers k tokens). Token counts come
from the server's usage (``usage.completion_tokens``; llama.cpp's
``timings.predicted_n`` as a fallback), and TPOT = (E2E - TTFT) / (tokens - 1)
uses them, so TPOT stays per token whatever the chunking.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx

from sgljax.cli.bench_datasets import BenchError, BenchRequest

BACKENDS = ("sgljax", "openai", "openai-chat")


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int  # dataset's count
    output_len: int  # max_tokens asked for
    start: float = 0.0  # perf_counter when the request was sent
    ttft: float | None = None  # seconds to the first content chunk (None without streaming)
    e2e: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # perf_counter of each content chunk
    prompt_tokens: int | None = None  # from the server's usage
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    text: str = ""
    error: str | None = None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


@dataclass
class Backend:
    """Request shape of one server API. ``sgljax`` and ``openai`` both use /v1/completions."""

    name: str
    model: str
    ignore_eos: bool = True
    stream: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.name == "openai-chat" else "/v1/completions"

    def payload(self, req: BenchRequest) -> dict:
        body: dict = {"model": self.model, "max_tokens": req.output_len, "temperature": 0.0,
                      "stream": self.stream}
        if self.name == "openai-chat":
            if not isinstance(req.prompt, str):
                raise BenchError("token-id prompts need a completions backend (sgljax or openai)")
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            # SGLang, vLLM and llama.cpp all read this extra field (not in OpenAI's API).
            body["ignore_eos"] = True
        body.update(self.extra)
        return body

    def content(self, obj: dict) -> str:
        choices = obj.get("choices") or []
        if not choices:
            return ""
        choice = choices[0]
        if self.name == "openai-chat":
            part = choice.get("delta") or choice.get("message") or {}
            return (part.get("content") or "") + (part.get("reasoning_content") or "")
        return choice.get("text") or ""


def _read_usage(obj: dict, result: RequestResult) -> None:
    usage = obj.get("usage")
    if isinstance(usage, dict):
        result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
        result.completion_tokens = usage.get("completion_tokens", result.completion_tokens)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            result.cached_tokens = details["cached_tokens"]
    timings = obj.get("timings")  # llama.cpp's own accounting
    if isinstance(timings, dict):
        if result.completion_tokens is None and "predicted_n" in timings:
            result.completion_tokens = timings["predicted_n"]
        if result.cached_tokens is None and "cache_n" in timings:
            result.cached_tokens = timings["cache_n"]


def _error_text(obj) -> str:
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err or obj)


async def send_request(client: httpx.AsyncClient, backend: Backend, req: BenchRequest) -> RequestResult:
    result = RequestResult(ok=False, prompt_len=req.prompt_len, output_len=req.output_len)
    body = backend.payload(req)
    result.start = time.perf_counter()
    try:
        async with client.stream("POST", backend.path, json=body) as resp:
            if resp.status_code != 200:
                raw = (await resp.aread()).decode(errors="replace")
                try:
                    msg = _error_text(json.loads(raw))
                except json.JSONDecodeError:
                    msg = raw.strip()[:200]
                result.error = f"HTTP {resp.status_code}: {msg}"
                return result
            if backend.stream:
                await _read_stream(resp, backend, result)
            else:
                obj = json.loads(await resp.aread())
                result.text = backend.content(obj)
                _read_usage(obj, result)
                result.e2e = time.perf_counter() - result.start
                result.ok = True
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def _read_stream(resp: httpx.Response, backend: Backend, result: RequestResult) -> None:
    parts = []
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, SSE comments, "event:" lines
        data = line[5:].strip()
        if data == "[DONE]":
            break
        now = time.perf_counter()
        obj = json.loads(data)
        if isinstance(obj, dict) and "error" in obj and not obj.get("choices"):
            result.error = _error_text(obj)
            return
        text = backend.content(obj)
        if text:
            if result.ttft is None:
                result.ttft = now - result.start
            result.chunk_times.append(now)
            parts.append(text)
        _read_usage(obj, result)
    result.e2e = time.perf_counter() - result.start
    result.text = "".join(parts)
    result.ok = True


def make_client(base_url: str, connections: int, api_key: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # One connection per possible in-flight request, so the pool never queues
    # requests (that would show up as TTFT the server is not to blame for).
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    timeout = httpx.Timeout(connect=30.0, read=None, write=60.0, pool=None)
    return httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=timeout)


async def run_requests(client: httpx.AsyncClient, backend: Backend, requests: list[BenchRequest],
                       request_rate: float, max_concurrency: int | None, seed: int,
                       on_done: Callable[[RequestResult], None] | None = None) -> list[RequestResult]:
    """Send ``requests`` with Poisson arrivals at ``request_rate``/s (inf: all at once),
    at most ``max_concurrency`` in flight. Arrivals do not wait for the limit."""
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(req: BenchRequest) -> RequestResult:
        if limit is None:
            res = await send_request(client, backend, req)
        else:
            async with limit:
                res = await send_request(client, backend, req)
        if on_done is not None:
            on_done(res)
        return res

    tasks = []
    for i, req in enumerate(requests):
        tasks.append(asyncio.create_task(one(req)))
        if not math.isinf(request_rate) and i + 1 < len(requests):
            await asyncio.sleep(rng.expovariate(request_rate))
    return list(await asyncio.gather(*tasks))


async def fetch_server_info(client: httpx.AsyncClient, base_url: str) -> tuple[list[str], dict | None]:
    """Served model names (``/v1/models``) and ``/get_model_info`` when the server has it."""
    try:
        resp = await client.get("/v1/models", timeout=15.0)
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach {base_url}: {type(e).__name__}: {e or 'no answer'}") from None
    if resp.status_code in (401, 403):
        raise BenchError(f"{base_url}/v1/models answered {resp.status_code}: check --api-key")
    names = []
    if resp.status_code == 200:
        try:
            names = [m["id"] for m in resp.json().get("data", []) if "id" in m]
        except (ValueError, AttributeError, TypeError):
            names = []
    info = None
    try:
        r = await client.get("/get_model_info", timeout=15.0)
        if r.status_code == 200 and isinstance(r.json(), dict):
            info = r.json()
    except (httpx.HTTPError, ValueError):
        info = None
    return names, info


SPEC_COUNTERS = ("spec_verify_rows", "spec_accepted_tokens", "spec_draft_tokens")
SPEC_SECONDS = ("spec_draft_seconds", "spec_verify_seconds")  # read where the server has them


async def fetch_spec_counters(client: httpx.AsyncClient) -> dict | None:
    """An sgljax server's speculative-decoding counters (``/get_server_info``), or None."""
    try:
        r = await client.get("/get_server_info", timeout=15.0)
        states = r.json().get("internal_states", {}) if r.status_code == 200 else {}
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    if not isinstance(states, dict) or not all(k in states for k in SPEC_COUNTERS):
        return None
    return {k: states[k] for k in SPEC_COUNTERS + SPEC_SECONDS if k in states}


def spec_accept_length(before: dict | None, after: dict | None) -> float | None:
    """Tokens a decode row with drafts emitted on average between two readings."""
    if before is None or after is None:
        return None
    rows = after["spec_verify_rows"] - before["spec_verify_rows"]
    if rows <= 0:
        return None
    return 1 + (after["spec_accepted_tokens"] - before["spec_accepted_tokens"]) / rows


def spec_seconds(before: dict | None, after: dict | None) -> dict[str, float]:
    """Seconds spent drafting and in steps that verified drafts between two readings."""
    if before is None or after is None:
        return {}
    return {k: after[k] - before[k] for k in SPEC_SECONDS if k in before and k in after}
