"""The engine: tokenize → schedule → run → detokenize, one step at a time.

``Engine.generate`` is the whole data path in one loop; the HTTP server
drives the same ``add_request`` / ``step`` calls from its own thread, and asks
``stats`` / ``describe`` for everything else it reports. The scheduler owns the
sequences' state; the engine carries tokens between it, the model runner and
the detokenizers.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import jax.numpy as jnp

from sgljax.engine.args import EngineArgs
from sgljax.engine.buckets import new_seqs_per_prefill, plan_buckets
from sgljax.engine.compile_cache import enable_persistent_cache, watch_compilations
from sgljax.engine.kv_cache import KVCacheSpec, PagePool
from sgljax.engine.loader import load_model
from sgljax.engine.model_files import resolve_model_path
from sgljax.engine.mesh import make_mesh
from sgljax.engine.executable_cache import ExecutableCache
from sgljax.engine.generation_defaults import read_generation_defaults
from sgljax.engine.distributed import Follower, Leader, channel_address, init_distributed
from sgljax.engine.batch import ScheduledBatch
from sgljax.engine.model_runner import Launched, ModelRunner, needs_logit_adjust, unflatten_step
from sgljax.engine.outputs import Completion, EngineStats, RequestOutput
from sgljax.engine.pathways import init_backend
from sgljax.engine.prefix_cache import NoPrefixCache, RadixPrefixCache
from sgljax.engine.request import Sequence
from sgljax.engine.sampling_params import RequestLimits, SamplingParams
from sgljax.engine.step_clock import StepClock
from sgljax.engine.scheduler import Scheduler, SchedulerConfig
from sgljax.engine.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


@dataclass
class InFlight:
    """A launched step whose tokens the host has not seen yet."""
    sched: ScheduledBatch
    launched: Launched


class Engine:
    def __init__(self, args: EngineArgs | None = None, **kwargs):
        self.args = args = args or EngineArgs(**kwargs)
        # Before anything touches devices; in Pathways mode the proxy keeps its own
        # compilation cache (pathwaysutils turns JAX's off).
        pathways = init_backend(args.device, args.pathways_proxy_addr,
                                args.device_discovery_timeout)
        cache_dir = (enable_persistent_cache(args.compilation_cache_dir)
                     if args.enable_compilation_cache and not pathways else None)
        self.compile_stats = watch_compilations()
        self.healthy = True
        if args.nnodes > 1:  # EngineArgs made sure dist_init_addr is there
            init_distributed(args.dist_init_addr, args.nnodes, args.node_rank)
        self.mesh = make_mesh(args.tp_size, ep_size=args.ep_size)
        loaded = load_model(resolve_model_path(args.model_path), self.mesh, args.dtype)
        self.model_config = cfg = loaded.config
        self.model_path = loaded.path
        self.tokenizer = Tokenizer(loaded.path)
        # What the HTTP routes sample with when a request leaves a field out.
        self.generation_defaults = read_generation_defaults(loaded.path)
        self.context_length = min(args.context_length or cfg.max_position_embeddings,
                                  cfg.max_position_embeddings)
        self.limits = RequestLimits(self.context_length, cfg.vocab_size)
        self.eos_ids = frozenset(cfg.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())
        ps = args.page_size
        max_pages_per_seq = -(-self.context_length // ps)
        on_cpu = self.mesh.devices.flat[0].platform == "cpu"
        # On XLA CPU, 16-bit elementwise work is many times slower than float32: activations
        # stay float32 there whatever the weights (engine/model.py's forward says how they meet).
        act_dtype = jnp.float32 if on_cpu else loaded.model.dtype
        kv_dtype = (act_dtype if args.kv_cache_dtype == "auto"
                    else jnp.dtype(args.kv_cache_dtype))
        kv_spec = KVCacheSpec(cfg.num_layers, 0, ps, loaded.model.kv_heads, cfg.head_dim,
                              kv_dtype)
        kv_spec.num_pages = args.resolve_num_pages(kv_spec.bytes_per_page(), max_pages_per_seq)
        self.pool = PagePool(kv_spec.num_pages)
        self.prefix_cache = (NoPrefixCache() if args.disable_radix_cache
                             else RadixPrefixCache(self.pool, ps))
        new_per_prefill = new_seqs_per_prefill(args, on_cpu)
        self.plan = plan_buckets(args, self.context_length, on_cpu)
        self.scheduler = Scheduler(SchedulerConfig(
            page_size=ps, max_running_requests=args.max_running_requests,
            chunked_prefill_size=args.chunked_prefill_size, context_length=self.context_length,
            schedule_policy=args.schedule_policy,
            new_seqs_per_prefill=new_per_prefill), self.pool, self.prefix_cache, self.plan)
        self.runner = ModelRunner(loaded.model, self.mesh, kv_spec, self.plan, act_dtype, executable_cache=(
            ExecutableCache(cache_dir, self.mesh) if cache_dir is not None else None),
            moe_backend=args.moe_backend)
        self._leader = self._follower = None
        if args.nnodes > 1:
            addr = channel_address(args.dist_init_addr)
            if args.node_rank == 0:
                self._leader = Leader(addr, args.nnodes, on_lost=self._mark_unhealthy)
                self.runner.broadcast = self._leader.send
            else:
                self._follower = Follower(addr, args.node_rank, leader=args.dist_init_addr)
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._in_flight: InFlight | None = None  # the launched step not yet landed
        self.clock = StepClock()  # how long steps run: the server waits to choose the next
        self._rng = random.Random(args.random_seed)
        log.info("KV pool: %d pages of %d tokens; buckets: %s", kv_spec.num_pages, ps,
                 self.plan.describe())

    # -- multi-host --------------------------------------------------------------
    @property
    def is_follower(self) -> bool:
        return self._follower is not None

    def _mark_unhealthy(self, rank: int) -> None:
        self.healthy = False

    def follow(self) -> None:
        """A follower's whole life: run every step rank 0 sends, until it says stop."""
        while True:
            kind, arrays = self._follower.recv()
            if kind == "shutdown":
                return
            if kind == "warm":
                self._mark_warm()
            elif kind == "compile":
                self.runner.compile_only(*unflatten_step(arrays)[:2])
            else:
                self.runner.execute(*unflatten_step(arrays))

    def shutdown(self) -> None:
        """Release the followers (rank 0); a no-op on one host."""
        if self._leader is not None:
            self._leader.send("shutdown")

    # -- requests ------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    rid: str | None = None) -> Sequence:
        """Tokenize (text prompts), validate and queue a request; RequestError if it
        cannot be served as asked (the same checks as the HTTP routes')."""
        params = SamplingParams(**vars(params)) if params else SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        params.validate(self.limits, ids)
        if params.seed is None:
            params.seed = self._rng.getrandbits(32)
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.eos_ids)
        seq = Sequence(prompt_ids=ids, params=params, stop_ids=stop_ids)
        if rid is not None:
            seq.rid = rid
        self._detok[seq.rid] = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens,
                                                      params.stop)
        self.scheduler.add(seq)
        return seq

    def abort(self, rid: str) -> None:
        if self.scheduler.abort(rid) is not None:
            self._detok.pop(rid, None)

    def abort_all(self) -> list[str]:
        """Abort every request (running or waiting), freeing its pages; returns their ids."""
        rids = self.scheduler.abort_all()
        for rid in rids:
            self._detok.pop(rid, None)
        return rids

    def flush_cache(self) -> bool:
        """Empty the prefix cache; False (and nothing done) while requests are in flight."""
        if self.has_work():
            return False
        self.prefix_cache.flush()
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    # -- one step --------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch the next step, then land the one before it.

        The overlap schedule: the host schedules and packs step N+1 while the device
        runs step N (step N+1's decode rows take their input tokens from step N on the
        device), then lands step N (copies its tokens, detokenizes, checks stops) while
        the device runs step N+1. A sequence that step N ends (EOS, a stop string) is
        already in step N+1: that one extra token is dropped. Penalties need every token
        on the host, so while a running request has them each step lands at once.
        """
        results = []
        prepare_started = time.monotonic()
        if self._in_flight is None:
            self.clock.queue.clear()  # nothing in flight (a failed step may have left one)
        if self._in_flight is not None and not self._may_overlap():
            results += self._land(self._pop_in_flight())
        sched = self.scheduler.schedule()
        previous = self._pop_in_flight()
        if sched is not None:
            self._in_flight = self._launch(sched)
            self.clock.launched(self._in_flight.launched.shape, prepare_started)
        if previous is not None:
            results += self._land(previous)
        if self._in_flight is not None and not self._may_overlap():
            results += self._land(self._pop_in_flight())
        return results

    def _may_overlap(self) -> bool:
        return not self.args.disable_overlap_schedule and not any(
            needs_logit_adjust(s.params) for s in self.scheduler.running)

    def _pop_in_flight(self) -> InFlight:
        in_flight, self._in_flight = self._in_flight, None
        return in_flight

    def _launch(self, sched: ScheduledBatch) -> InFlight:
        launched = self.runner.launch(sched)
        self.scheduler.launched(sched)
        return InFlight(sched, launched)

    def _land(self, in_flight: InFlight) -> list[RequestOutput]:
        out = self.runner.fetch(in_flight.launched)
        self.clock.landed()
        results = []
        for i, seq in self.scheduler.landed(in_flight.sched):
            tok = int(out.tokens[i])
            detok = self._detok[seq.rid]
            text = detok.add(tok)  # detokenize; the detokenizer also finds stop strings
            logprob, top = None, []
            if seq.params.logprobs:
                logprob, k = float(out.logprobs[i]), seq.params.top_logprobs
                top = [(int(a), float(b)) for a, b in zip(out.top_ids[i, :k],
                                                          out.top_logprobs[i, :k])]
            self.scheduler.append_token(seq, tok, logprob, top, detok.stopped_by)
            if seq.finished:
                text += detok.flush()
                del self._detok[seq.rid]
            results.append(RequestOutput(
                seq.rid, text, [tok], seq.finished, seq.finish_reason, seq.matched_stop,
                [logprob] if logprob is not None else [], [top] if logprob is not None else [],
                len(seq.prompt_ids), len(seq.output_ids), seq.num_cached_prompt))
        return results

    # -- the offline API -----------------------------------------------------------
    def generate(self, prompts: list[str | list[int]] | str,
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[dict]:
        """Run prompts to completion; returns [{"text", "token_ids", "finish_reason",
        "logprobs", "top_logprobs"}] (the last two filled when the params ask for them)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        plist = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        done = {s.rid: Completion() for s in seqs}
        while any(not s.finished for s in seqs) or self._in_flight is not None:
            for o in self.step():
                if o.rid in done:
                    done[o.rid].add(o)
        return [{"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                 "logprobs": c.logprobs, "top_logprobs": c.top_logprobs}
                for c in (done[s.rid] for s in seqs)]

    def warmup(self, progress=None) -> int:
        """Compile (or load from the persistent cache) every bucket shape; returns how many.

        ``progress(done, total, shape)`` is called after each one.
        """
        shapes = self.plan.all_shapes()
        for n, (_, S, Q, P) in enumerate(shapes):
            self.runner.warmup_shape(S, Q, P)
            if progress:
                progress(n + 1, len(shapes), (S, Q, P))
        self._mark_warm()
        if self._leader is not None:
            self._leader.send("warm")
        return len(shapes)

    def _mark_warm(self) -> None:
        """From now on every compile is one the bucket plan missed."""
        self.runner.warmed_up = True
        self._compiles_at_warmup = self.compile_stats.compiles

    def compiles_since_warmup(self) -> int:
        """Executables built since ``warmup`` finished (0 when serving is healthy)."""
        if not self.runner.warmed_up:
            return 0
        return (self.compile_stats.compiles - self._compiles_at_warmup
                + self.runner.loaded_after_warmup)

    # -- what the server reports ---------------------------------------------------
    def stats(self) -> EngineStats:
        """The engine's state now (call from the thread that steps it)."""
        running = self.scheduler.running
        return EngineStats(
            num_running=len(running), num_waiting=len(self.scheduler.waiting),
            kv_pages_used=self.pool.num_used, kv_pages_total=self.pool.capacity,
            kv_pages_held_by_requests=len({p for s in running for p in s.pages}),
            prefix_cache_pages=self.prefix_cache.num_pages,
            cache_hit_rate=self.prefix_cache.hit_rate(),
            compiles_after_warmup=self.compiles_since_warmup(), healthy=self.healthy)

    def describe(self) -> dict:
        """What does not change while serving: the model, its limits and defaults, buckets."""
        cfg = self.model_config
        return {"model_path": str(self.model_path), "architecture": cfg.architecture,
                "context_length": self.context_length, "vocab_size": cfg.vocab_size,
                "num_layers": cfg.num_layers, "dtype": self.args.dtype,
                "default_sampling_params": dict(self.generation_defaults),
                "buckets": self.plan.describe()}
