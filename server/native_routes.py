"""SGLang's native routes: /generate, model and server info, cache flush, health, metrics."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from sgljax.server.async_engine import RequestHandle
from sgljax.server.context import EngineEventStream, ServerContext, collect
from sgljax.server.errors import APIError, error_body, read_model
from sgljax.server.metrics import CONTENT_TYPE
from sgljax.server.openai_adapters import prepare_generate
from sgljax.server.protocol import GenerateRequest
from sgljax.server.responses import SSE_DONE, ChoiceState, sse

router = APIRouter()


def _ctx(request: Request) -> ServerContext:
    return request.app.state.ctx


# -- /generate ------------------------------------------------------------------------------
@router.post("/generate")
async def generate(request: Request):
    arrival = time.monotonic()
    ctx = _ctx(request)
    req = await read_model(request, GenerateRequest, ctx.server_args.max_request_bytes,
                           ctx.server_args.request_timeout)
    prep = await run_in_threadpool(prepare_generate, ctx.tokenizer, req, ctx.limits)
    rid, handle, states = ctx.submit("gen", req.rid, prep, arrival)
    single = len(states) == 1 and not isinstance(req.text, list) and not (
        req.input_ids and isinstance(req.input_ids[0], list))
    if req.stream:
        return EngineEventStream(_generate_events(handle, states, arrival, req), handle)
    if not await collect(request, handle, states):
        return Response(status_code=499)
    outs = [_native_output(r, st, arrival, req) for r, st in states.items()]
    return JSONResponse(outs[0] if single else outs)


def _native_output(rid: str, st: ChoiceState, arrival: float, req: GenerateRequest) -> dict:
    if st.finish_reason is None:
        finish = None
    elif st.finish_reason == "length":
        finish = {"type": "length", "length": st.completion_tokens}
    else:
        finish = {"type": st.finish_reason, "matched": st.matched_stop}
    meta = {"id": rid, "finish_reason": finish, "prompt_tokens": st.prompt_tokens,
            "completion_tokens": st.completion_tokens, "cached_tokens": st.cached_tokens,
            "e2e_latency": time.monotonic() - arrival}
    if req.return_logprob:
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(st.logprobs,
                                                                         st.token_ids)]
        if req.top_logprobs_num:
            meta["output_top_logprobs"] = [[[lp, t, None] for t, lp in row[:req.top_logprobs_num]]
                                           for row in st.top_logprobs]
    return {"index": st.index, "text": st.text, "output_ids": list(st.token_ids),
            "meta_info": meta}


async def _generate_events(handle: RequestHandle, states: dict[str, ChoiceState],
                           arrival: float, req: GenerateRequest) -> AsyncIterator[str]:
    """SGLang streams the text so far (cumulative) in every event."""
    try:
        while not handle.done:
            for d in await handle.next_batch():
                if d.error:
                    yield sse(error_body(d.error, code=str(d.error_status)))
                    yield SSE_DONE
                    return
                states[d.rid].add(d)
                yield sse(_native_output(d.rid, states[d.rid], arrival, req))
        yield SSE_DONE
    finally:
        handle.abort()


# -- information and control ------------------------------------------------------------------
@router.get("/health")
async def health(request: Request):
    bridge = _ctx(request).bridge
    if not bridge.alive:
        raise APIError(503, "the engine is not running", code="server_unavailable")
    if not bridge.healthy:
        raise APIError(503, "a host of this multi-host engine was lost", code="server_unavailable")
    return Response(status_code=200)


@router.get("/get_model_info")
async def model_info(request: Request):
    ctx = _ctx(request)
    info = ctx.info
    return {"model_path": info["model_path"], "tokenizer_path": info["model_path"],
            "served_model_name": ctx.model_name, "is_generation": True,
            **{k: info[k] for k in ("architecture", "context_length", "vocab_size",
                                    "num_layers", "dtype")},
            # what a request that leaves these fields out samples with (generation_config.json)
            "default_sampling_params": info["default_sampling_params"]}


@router.get("/get_server_info")
async def server_info(request: Request):
    ctx = _ctx(request)
    stats = ctx.bridge.stats
    server = dataclasses.asdict(ctx.server_args)
    server["api_key"] = "***" if server["api_key"] else None
    return {**dataclasses.asdict(ctx.engine_args), **server,
            "served_model_name": ctx.model_name,
            "context_length": ctx.info["context_length"], "buckets": ctx.info["buckets"],
            "internal_states": {**dataclasses.asdict(stats), "kv_usage": stats.kv_usage,
                                "num_queued": ctx.bridge.num_queued()}}


@router.post("/flush_cache")
async def flush_cache(request: Request):
    if not await _ctx(request).bridge.flush_cache():
        raise APIError(400, "cannot flush the cache while requests are running; retry when "
                            "the server is idle", code="server_busy")
    return {"success": True, "message": "Cache flushed."}


@router.get("/metrics")
async def metrics(request: Request):
    return Response(_ctx(request).metrics.render(), media_type=CONTENT_TYPE)
