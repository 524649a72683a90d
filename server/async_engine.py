"""One thread owns the Engine; HTTP handlers talk to it through an inbox and queues.

The Engine is not thread-safe and every ``step`` blocks on the device, so it
lives in a single background thread. Handlers (on the asyncio loop) put
commands (add, abort, flush) into an inbox and wake the thread; the thread
drains the inbox between steps and hands each step's outputs back to the
loop with one ``call_soon_threadsafe`` per step, where they land on the
per-request asyncio queues. The engine's ``RequestOutput``s are copies, so handlers
never read a Sequence the engine is changing; what the server reports about the
engine comes from ``Engine.stats``, published after every step.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass

from sgljax.engine.engine import Engine
from sgljax.engine.outputs import EngineStats, RequestOutput
from sgljax.engine.sampling_params import SamplingParams
from sgljax.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """More requests are queued than --max-queued-requests allows."""


class EngineStopped(RuntimeError):
    """The engine thread is not running (shutting down, or it died)."""


@dataclass
class SeqRequest:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    audio: list | None = None  # speech models: the prompt's clips (mono 16 kHz float32)


class RequestHandle:
    """One HTTP request's sequences; their outputs arrive on one asyncio queue."""

    def __init__(self, owner: "AsyncEngine", rids: list[str]):
        self.owner = owner
        self.rids = rids
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.unfinished = set(rids)
        self.cancelled = False  # the client went away before the end

    @property
    def done(self) -> bool:
        return not self.unfinished

    async def next_batch(self) -> list[RequestOutput]:
        """Wait for at least one output; return all that are ready (coalescing a backlog)."""
        batch = [await self.queue.get()]
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        for d in batch:
            if d.finished:
                self.unfinished.discard(d.rid)
        return batch

    def abort(self) -> None:
        """Stop every unfinished sequence and free its KV pages (client went away)."""
        if self.unfinished:
            self.owner.abort(list(self.unfinished))
            self.unfinished.clear()

    def cancel(self) -> None:
        """Abort, and wake a handler waiting on the queue with a final 'abort' output."""
        rids = list(self.unfinished)
        self.cancelled = True
        self.abort()
        for rid in rids:
            self.queue.put_nowait(RequestOutput(rid, "", [], True, "abort"))


class AsyncEngine:
    def __init__(self, engine: Engine, metrics: ServerMetrics | None = None,
                 max_queued_requests: int | None = None):
        self.engine = engine
        self.metrics = metrics
        self.max_queued_requests = max_queued_requests
        self.stats = EngineStats()  # engine.stats() as of the last step (read by routes)
        self._inbox: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._pending_adds = 0  # sequences in the inbox, not yet in the scheduler
        self._handles: dict[str, RequestHandle] = {}
        self._arrival: dict[str, float] = {}
        self._last_token: dict[str, float] = {}
        self._stopping = False
        self._draining = False  # shutting down: no new requests
        self._thread = threading.Thread(target=self._run, name="sgljax-engine", daemon=True)

    # -- the loop side ---------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def healthy(self) -> bool:
        """False once a host of a multi-host engine is lost (set from the channel's thread)."""
        return self.engine.healthy

    def drain(self) -> None:
        """Refuse new requests from now on (in-flight ones go on)."""
        self._draining = True

    def abort_all(self, reason: str = "the server is shutting down", status: int = 503) -> None:
        """End every request in flight; their handlers get an error output."""
        self._inbox.append(("abort_all", reason, status))
        self._wake.set()

    def is_active(self, rid: str) -> bool:
        return rid in self._handles

    def num_queued(self) -> int:
        with self._lock:
            return self.stats.num_waiting + self._pending_adds

    def submit(self, seqs: list[SeqRequest], arrival: float | None = None) -> RequestHandle:
        """Queue sequences for the engine (call on the event loop)."""
        if not self.alive or self._draining:
            raise EngineStopped("the server is shutting down")
        limit = self.max_queued_requests
        if limit is not None and self.num_queued() + len(seqs) > limit:
            raise Overloaded(f"the server is overloaded: {self.num_queued()} requests are "
                             f"waiting (limit {limit}); retry later")
        handle = RequestHandle(self, [s.rid for s in seqs])
        for s in seqs:
            self._handles[s.rid] = handle
        with self._lock:
            self._pending_adds += len(seqs)
        self._inbox.append(("add", seqs, arrival or time.monotonic()))
        self._wake.set()
        return handle

    def abort(self, rids: list[str]) -> None:
        for rid in rids:
            self._handles.pop(rid, None)
        self._inbox.append(("abort", rids))
        self._wake.set()

    async def flush_cache(self) -> bool:
        """Empty the prefix cache; False (and nothing done) while requests are in flight."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.append(("flush", fut))
        self._wake.set()
        return await asyncio.wrap_future(fut)

    # -- the engine thread -------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # a bug in this loop: never leave handlers waiting forever
            log.exception("the engine thread died")
            self._stopping = True
            dead = [RequestOutput.failed(rid, "the engine thread died", 500)
                    for rid in list(self._handles)]
            self._deliver(dead)

    def _loop(self) -> None:
        while True:
            # Choose the next step only when the one running is nearly done, so requests
            # that arrive meanwhile join it (engine/step_clock.py).
            delay = self.engine.clock.launch_delay()
            if delay > 0 and not self._stopping:
                time.sleep(delay)
            self._wake.clear()  # before draining, so a command sent after the drain wakes us
            self._drain_inbox()
            if self._stopping:
                self._abort_all("the server is shutting down", 503)
                self._drain_inbox()
                return
            if not self.engine.has_work():
                self._publish_stats()
                self._wake.wait()
                continue
            try:
                outputs = self.engine.step()
            except Exception:
                log.exception("engine step failed; failing the requests in flight")
                self._abort_all("internal error while running the model", 500)
                continue
            self._observe(outputs)
            self._deliver(outputs)
            self._publish_stats()

    def _drain_inbox(self) -> None:
        while self._inbox:
            cmd = self._inbox.popleft()
            if cmd[0] == "add":
                self._add(cmd[1], cmd[2])
            elif cmd[0] == "abort":
                for rid in cmd[1]:
                    if self.metrics and rid in self._arrival:  # still in the engine
                        self.metrics.request_finished("abort")
                    self.engine.abort(rid)
                    self._forget(rid)
            elif cmd[0] == "abort_all":
                self._abort_all(cmd[1], cmd[2])
            elif cmd[0] == "flush":
                flushed = (not any(c[0] == "add" for c in self._inbox)
                           and self.engine.flush_cache())
                self._publish_stats()
                cmd[1].set_result(flushed)

    def _add(self, seqs: list[SeqRequest], arrival: float) -> None:
        errors = []
        for s in seqs:
            if s.rid not in self._handles:
                continue  # aborted before it reached the engine
            try:
                self.engine.add_request(s.prompt_ids, s.params, rid=s.rid, audio=s.audio)
            except Exception as e:  # noqa: BLE001 - reported to the client, not raised here
                status = 400 if isinstance(e, ValueError) else 500
                errors.append(RequestOutput(s.rid, "", [], True, "error", error=str(e),
                                            error_status=status))
                continue
            self._arrival[s.rid] = arrival
            if self.metrics:
                self.metrics.prompt_tokens.inc(len(s.prompt_ids))
        # Hand the count from "pending" to the published "waiting" in one move, or a
        # reader in between sees the queue empty (and admits past --max-queued-requests).
        with self._lock:
            self._publish_stats()
            self._pending_adds -= len(seqs)
        self._deliver(errors)

    def _observe(self, outputs: list[RequestOutput]) -> None:
        """Token counts and latencies for /metrics."""
        now = time.monotonic()
        for o in outputs:
            if self.metrics:
                self.metrics.generation_tokens.inc(len(o.token_ids))
                last = self._last_token.get(o.rid)
                if last is None:
                    self.metrics.ttft.observe(now - self._arrival.get(o.rid, now))
                else:
                    self.metrics.itl.observe(now - last)
                if o.finished:
                    self.metrics.e2e.observe(now - self._arrival.get(o.rid, now))
                    self.metrics.request_finished(o.finish_reason or "stop")
            self._last_token[o.rid] = now

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for d in outputs:
            handle = self._handles.get(d.rid)
            if d.finished:
                self._forget(d.rid)
            if handle is not None:
                by_loop.setdefault(handle.loop, []).append((handle, d))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:
                pass  # the loop is closed: nobody is listening any more

    def _forget(self, rid: str) -> None:
        self._handles.pop(rid, None)
        self._arrival.pop(rid, None)
        self._last_token.pop(rid, None)

    def _abort_all(self, reason: str, status: int) -> None:
        rids = list(self._handles)
        # Every sequence, also those nobody listens to any more, frees its pages.
        self.engine.abort_all()
        self._deliver([RequestOutput.failed(rid, reason, status) for rid in rids])
        self._publish_stats()

    def _publish_stats(self) -> None:
        self.stats = self.engine.stats()


def _put_all(items: list[tuple[RequestHandle, RequestOutput]]) -> None:
    for handle, delta in items:
        handle.queue.put_nowait(delta)
