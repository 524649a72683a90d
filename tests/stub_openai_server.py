"""A fake OpenAI-compatible server with known timings, to check what ``sgljax bench`` measures.

Each streamed answer waits ``ttft`` seconds, then sends ``max_tokens`` tokens in
chunks of ``tokens_per_chunk``, ``itl`` seconds apart, then a usage chunk. It
counts prompt tokens with a real tokenizer and reports as cached the longest
token prefix shared with any earlier prompt.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


@dataclass
class StubState:
    tokenizer_path: str
    ttft: float = 0.2
    itl: float = 0.05
    tokens_per_chunk: int = 1
    honour_ignore_eos: bool = True  # False: stop after 3 tokens whatever is asked
    report_usage: bool = True
    model_info: bool = True
    bodies: list = field(default_factory=list)
    prompts_seen: list = field(default_factory=list)
    prompt_token_counts: list = field(default_factory=list)
    arrivals: list = field(default_factory=list)  # perf_counter when each request came in
    auth_headers: list = field(default_factory=list)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def make_app(state: StubState) -> FastAPI:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(state.tokenizer_path)
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}

    @app.get("/get_model_info")
    async def model_info():
        if not state.model_info:
            return JSONResponse({"error": "not found"}, status_code=404)
        return {"model_path": state.tokenizer_path}

    async def answer(request: Request, chat: bool):
        state.arrivals.append(time.perf_counter())
        state.auth_headers.append(request.headers.get("authorization"))
        body = await request.json()
        state.bodies.append(body)
        if chat:
            ids = tok.encode(body["messages"][0]["content"], add_special_tokens=False)
        elif isinstance(body["prompt"], list):
            ids = list(body["prompt"])
        else:
            ids = tok.encode(body["prompt"], add_special_tokens=False)
        cached = max((_common_prefix(ids, p) for p in state.prompts_seen), default=0)
        state.prompts_seen.append(ids)
        state.prompt_token_counts.append(len(ids))
        n = body["max_tokens"]
        if not (state.honour_ignore_eos and body.get("ignore_eos")):
            n = min(n, 3)
        usage = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n,
                 "prompt_tokens_details": {"cached_tokens": cached}}

        def chunk(text: str) -> dict:
            choice = ({"index": 0, "delta": {"content": text}} if chat
                      else {"index": 0, "text": text})
            return {"id": "x", "object": "chunk", "model": "stub-model", "choices": [choice]}

        if not body.get("stream"):
            await asyncio.sleep(state.ttft + state.itl * max(0, n - 1))
            out = {"id": "x", "model": "stub-model",
                   "choices": [{"index": 0, "message": {"content": " tok" * n}} if chat
                               else {"index": 0, "text": " tok" * n}]}
            if state.report_usage:
                out["usage"] = usage
            return out

        async def stream():
            await asyncio.sleep(state.ttft)
            sent = 0
            while sent < n:
                k = min(state.tokens_per_chunk, n - sent)
                if sent:
                    await asyncio.sleep(state.itl)
                yield f"data: {json.dumps(chunk(' tok' * k))}\n\n"
                sent += k
            if state.report_usage:
                yield f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, chat=True)

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StubServer:
    """Runs the stub in a background thread; ``url`` is its base URL."""

    def __init__(self, state: StubState):
        self.state = state
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(make_app(state), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "StubServer":
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("stub server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
