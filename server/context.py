"""What every route needs (the engine bridge, a tokenizer, limits, names), and how a
route waits for or streams its sequences."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse

from sgljax.engine.args import EngineArgs
from sgljax.server.args import ServerArgs
from sgljax.server.async_engine import (
    AsyncEngine, EngineStopped, Overloaded, RequestHandle, SeqRequest)
from sgljax.server.errors import APIError, bad_request
from sgljax.server.metrics import ServerMetrics
from sgljax.server.openai_adapters import Limits, Prepared
from sgljax.server.responses import ChoiceState, TokenStrings
from sgljax.engine.tokenizer import Tokenizer

DISCONNECT_POLL_S = 0.5
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServerContext:
    bridge: AsyncEngine
    tokenizer: Tokenizer  # the engine's
    limits: Limits
    info: dict  # Engine.describe(): the model, its limits and defaults, the buckets
    model_name: str
    served_names: set[str]
    metrics: ServerMetrics
    engine_args: EngineArgs
    server_args: ServerArgs
    # Speech models: Engine.transcription_prompt (pure: a tokenizer and a template); None
    # for text-only models.
    transcription_prompt: Callable[..., list[int]] | None = None
    started: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.token_strings = TokenStrings(self.tokenizer)

    def submit(self, prefix: str, user_rid: str | None, prep: Prepared,
               arrival: float) -> tuple[str, RequestHandle, dict[str, ChoiceState]]:
        """Send every (prompt, choice) sequence to the engine; 503 when overloaded."""
        rid = user_rid or f"{prefix}-{uuid.uuid4().hex}"
        seqs, states = [], {}
        for i, params in enumerate(prep.params):
            seq_rid = rid if len(prep.params) == 1 else f"{rid}-{i}"
            clips = prep.audio[i // prep.n] if prep.audio else None
            seqs.append(SeqRequest(seq_rid, prep.prompts[i // prep.n], params, clips))
            states[seq_rid] = ChoiceState(index=i, prompt_index=i // prep.n)
        if user_rid and any(self.bridge.is_active(s.rid) for s in seqs):
            raise bad_request(f"request id {user_rid!r} is already in use", "rid")
        try:
            handle = self.bridge.submit(seqs, arrival)
        except Overloaded as e:
            raise APIError(503, str(e), code="server_overloaded") from None
        except EngineStopped as e:
            raise APIError(503, str(e), code="server_unavailable") from None
        return rid, handle, states


async def watch_disconnect(request: Request, handle: RequestHandle) -> None:
    """Cancel the request's sequences as soon as its client goes away (non-streaming)."""
    while not handle.done:
        await asyncio.sleep(DISCONNECT_POLL_S)
        if await request.is_disconnected():
            handle.cancel()
            return


async def collect(request: Request, handle: RequestHandle,
                  states: dict[str, ChoiceState]) -> bool:
    """Wait for every sequence to finish; False if the client went away first."""
    watcher = asyncio.create_task(watch_disconnect(request, handle))
    try:
        while not handle.done:
            for d in await handle.next_batch():
                if d.error:
                    raise APIError(d.error_status, d.error)
                states[d.rid].add(d)
    finally:
        watcher.cancel()
        handle.abort()
    return not handle.cancelled


class EngineEventStream(StreamingResponse):
    """Server-sent events from a request's sequences; ending in any way aborts them.

    The event generator aborts in its own ``finally`` too, but a client that
    hangs up before the generator first runs would never reach it.
    """

    def __init__(self, events: AsyncIterator[str], handle: RequestHandle):
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self.handle = handle

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.abort()
