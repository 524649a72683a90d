"""/v1/chat/completions, /v1/completions and /v1/models."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from sgljax.server.async_engine import RequestHandle
from sgljax.server.context import EngineEventStream, ServerContext, collect
from sgljax.server.errors import error_body, read_model
from sgljax.server.openai_adapters import (
    Prepared, check_model_name, prepare_chat, prepare_completion)
from sgljax.server.protocol import ChatCompletionRequest, CompletionRequest
from sgljax.server.chat_output import ChatOutputParser
from sgljax.server.responses import (
    SSE_DONE, ChoiceState, chat_chunk, chat_logprobs, chat_response, completion_chunk,
    completion_logprobs, completion_response, sse, usage, usage_chunk)

router = APIRouter()
CLIENT_GONE = 499  # nginx's "client closed request": nobody reads this answer


def _ctx(request: Request) -> ServerContext:
    return request.app.state.ctx


def _error_event(status: int, message: str) -> str:
    kind = "service_unavailable_error" if status == 503 else (
        "internal_server_error" if status >= 500 else "invalid_request_error")
    return sse(error_body(message, kind, code=str(status)))


@router.get("/v1/models")
async def list_models(request: Request):
    ctx = _ctx(request)
    return {"object": "list", "data": [_model_card(ctx)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    ctx = _ctx(request)
    check_model_name(model_id, ctx.served_names)
    return _model_card(ctx)


def _model_card(ctx: ServerContext) -> dict:
    return {"id": ctx.model_name, "object": "model", "created": ctx.started,
            "owned_by": "sgljax", "root": ctx.model_name,
            "max_model_len": ctx.info["context_length"]}


# -- chat ------------------------------------------------------------------------------
@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    arrival = time.monotonic()
    ctx = _ctx(request)
    req = await read_model(request, ChatCompletionRequest, ctx.server_args.max_request_bytes,
                           ctx.server_args.request_timeout)
    check_model_name(req.model, ctx.served_names)
    prep = await run_in_threadpool(prepare_chat, ctx.tokenizer, req, ctx.limits,
                                   ctx.server_args.tool_call_parser)
    rid, handle, states = ctx.submit("chatcmpl", req.rid, prep, arrival)
    created, k = int(time.time()), req.top_logprobs or 0
    reasoning = ctx.server_args.reasoning_parser is not None and req.separate_reasoning

    def new_parser() -> ChatOutputParser:
        return ChatOutputParser(reasoning, prep.thinking_opened, prep.tool_format)

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        parsers = {r: new_parser() for r in states}
        return EngineEventStream(_chat_events(ctx, rid, created, handle, states, prep,
                                              req.logprobs, k, include_usage, parsers), handle)
    if not await collect(request, handle, states):
        return Response(status_code=CLIENT_GONE)
    return JSONResponse(chat_response(rid, created, ctx.model_name, list(states.values()),
                                      [len(p) for p in prep.prompts], ctx.token_strings,
                                      req.logprobs, k, new_parser))


async def _chat_events(ctx: ServerContext, rid: str, created: int, handle: RequestHandle,
                       states: dict[str, ChoiceState], prep: Prepared, logprobs: bool, k: int,
                       include_usage: bool,
                       parsers: dict[str, ChatOutputParser]) -> AsyncIterator[str]:
    """``parsers``: per choice, what becomes content, reasoning_content and tool_calls."""
    model = ctx.model_name

    try:
        for st in states.values():
            yield sse(chat_chunk(rid, created, model, st.index,
                                 {"role": "assistant", "content": ""},
                                 with_usage_field=include_usage))
        while not handle.done:
            for d in await handle.next_batch():
                if d.error:
                    yield _error_event(d.error_status, d.error)
                    yield SSE_DONE
                    return
                st = states[d.rid]
                st.add(d)
                lp = (chat_logprobs(ctx.token_strings, d.token_ids, d.logprobs,
                                    d.top_logprobs, k) if logprobs and d.token_ids else None)
                delta = parsers[d.rid].feed(d.text, d.finished)
                if delta or lp:
                    yield sse(chat_chunk(rid, created, model, st.index,
                                         delta or {"content": ""}, logprobs=lp,
                                         with_usage_field=include_usage))
                if d.finished:
                    reason = parsers[d.rid].finish_reason(d.finish_reason)
                    yield sse(chat_chunk(rid, created, model, st.index, {}, reason,
                                         matched_stop=d.matched_stop,
                                         with_usage_field=include_usage))
        if include_usage:
            body = usage(list(states.values()), [len(p) for p in prep.prompts])
            yield sse(usage_chunk(rid, created, model, "chat.completion.chunk", body))
        yield SSE_DONE
    finally:
        handle.abort()  # the client left mid-stream (or an error): free the KV pages now


# -- completions ---------------------------------------------------------------------------
@router.post("/v1/completions")
async def completions(request: Request):
    arrival = time.monotonic()
    ctx = _ctx(request)
    req = await read_model(request, CompletionRequest, ctx.server_args.max_request_bytes,
                           ctx.server_args.request_timeout)
    check_model_name(req.model, ctx.served_names)
    prep = await run_in_threadpool(prepare_completion, ctx.tokenizer, req, ctx.limits)
    rid, handle, states = ctx.submit("cmpl", req.rid, prep, arrival)
    created = int(time.time())
    echo = prep.prompt_texts if req.echo else None
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return EngineEventStream(_completion_events(ctx, rid, created, handle, states, prep,
                                                    req.logprobs, echo, include_usage), handle)
    if not await collect(request, handle, states):
        return Response(status_code=CLIENT_GONE)
    return JSONResponse(completion_response(rid, created, ctx.model_name, list(states.values()),
                                            [len(p) for p in prep.prompts], ctx.token_strings,
                                            req.logprobs, echo))


async def _completion_events(ctx: ServerContext, rid: str, created: int, handle: RequestHandle,
                             states: dict[str, ChoiceState], prep: Prepared,
                             logprobs: int | None, echo: list[str] | None,
                             include_usage: bool) -> AsyncIterator[str]:
    model = ctx.model_name
    offsets = {}  # text_offset of each choice's next token
    try:
        for r, st in states.items():
            prefix = echo[st.prompt_index] if echo else ""
            offsets[r] = len(prefix)
            if prefix:
                yield sse(completion_chunk(rid, created, model, st.index, prefix,
                                           with_usage_field=include_usage))
        while not handle.done:
            for d in await handle.next_batch():
                if d.error:
                    yield _error_event(d.error_status, d.error)
                    yield SSE_DONE
                    return
                st = states[d.rid]
                st.add(d)
                lp = None
                if logprobs is not None and d.token_ids:
                    lp = completion_logprobs(ctx.token_strings, d.token_ids, d.logprobs,
                                             d.top_logprobs, logprobs, offsets[d.rid])
                    offsets[d.rid] += sum(len(t) for t in lp["tokens"])
                if d.text or lp or d.finished:
                    yield sse(completion_chunk(rid, created, model, st.index, d.text,
                                               d.finish_reason if d.finished else None, lp,
                                               d.matched_stop, include_usage))
        if include_usage:
            body = usage(list(states.values()), [len(p) for p in prep.prompts])
            yield sse(usage_chunk(rid, created, model, "text_completion", body))
        yield SSE_DONE
    finally:
        handle.abort()

