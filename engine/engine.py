"""The engine: tokenize → schedule → run → detokenize, one step at a time.

``Engine.generate`` is the whole data path in one loop; the HTTP server
drives the same ``add_request`` / ``step`` calls from its own thread.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

import jax.numpy as jnp

from sgljax.engine.args import EngineArgs
from sgljax.engine.buckets import BucketPlan
from sgljax.engine.compile_cache import enable_persistent_cache, watch_compilations
from sgljax.engine.kv_cache import KVCacheSpec, PagePool
from sgljax.engine.loader import load_model
from sgljax.engine.mesh import make_mesh
from sgljax.engine.executable_cache import ExecutableCache
from sgljax.engine.distributed import Follower, Leader, channel_address, init_distributed
from sgljax.engine.model_runner import Launched, ModelRunner, needs_logit_adjust, unflatten_step
from sgljax.engine.pathways import init_backend
from sgljax.engine.prefix_cache import NoPrefixCache, RadixPrefixCache
from sgljax.engine.request import Sequence
from sgljax.engine.sampling import SamplingParams
from sgljax.engine.step_clock import StepClock
from sgljax.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from sgljax.engine.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot serve (too long, bad parameters)."""


@dataclass
class InFlight:
    """A launched step whose tokens the host has not seen yet."""
    sched: ScheduledBatch
    samples: list[bool]  # per row: does this step sample the sequence's next token?
    launched: Launched


@dataclass
class RequestOutput:
    rid: str
    delta_text: str
    delta_token_ids: list[int]
    finished: bool
    seq: Sequence
    text: str = ""
    finish_reason: str | None = None
    delta_logprobs: list[float] = field(default_factory=list)
    delta_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return self.seq.output_ids


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
        if args.nnodes > 1:
            if not args.dist_init_addr:
                raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT")
            init_distributed(args.dist_init_addr, args.nnodes, args.node_rank)
        self.mesh = make_mesh(args.tp_size)
        loaded = load_model(args.model_path, self.mesh, args.dtype)
        self.model_config = cfg = loaded.config
        self.model_path = loaded.path
        self.tokenizer = Tokenizer(loaded.path)
        self.context_length = min(args.context_length or cfg.max_position_embeddings,
                                  cfg.max_position_embeddings)
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
        # A prefill step holds its new prompts and at most one part-way through its chunks.
        new_per_prefill = args.new_seqs_per_prefill or (1 if on_cpu else args.max_prefill_seqs)
        self.plan = BucketPlan.plan(
            max_running=args.max_running_requests,
            max_prefill_seqs=min(args.max_prefill_seqs, new_per_prefill + 1),
            chunked_prefill_size=args.chunked_prefill_size, max_pages_per_seq=max_pages_per_seq,
            page_size=ps, bs_paddings=args.precompile_bs_paddings,
            token_paddings=args.precompile_token_paddings)
        self.scheduler = Scheduler(SchedulerConfig(
            page_size=ps, max_running_requests=args.max_running_requests,
            chunked_prefill_size=args.chunked_prefill_size, context_length=self.context_length,
            schedule_policy=args.schedule_policy,
            new_seqs_per_prefill=new_per_prefill), self.pool, self.prefix_cache, self.plan)
        self.runner = ModelRunner(loaded.model, self.mesh, kv_spec, self.plan, act_dtype, executable_cache=(
            ExecutableCache(cache_dir, self.mesh) if cache_dir is not None else None))
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
                self.runner.warmed_up = True
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
        params = SamplingParams(**vars(params)) if params else SamplingParams()
        params.validate(self.model_config.vocab_size)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        if any(not 0 <= t < self.model_config.vocab_size for t in ids):
            raise RequestError("the prompt has token ids outside the vocabulary")
        if len(ids) >= self.context_length:
            raise RequestError(f"the prompt has {len(ids)} tokens; the context length is "
                               f"{self.context_length}")
        params.max_tokens = min(params.max_tokens, self.context_length - len(ids))
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
        samples = []
        for seq, n in zip(sched.seqs, sched.chunk_lens):
            seq.num_computed += n  # the K/V are being written: later steps may read them
            sampled = seq.num_computed == seq.num_tokens
            if sampled:
                seq.num_pending += 1
            else:  # a prompt chunk: nothing sampled yet
                self.prefix_cache.insert(seq.all_ids[:seq.num_computed], seq.pages)
            samples.append(sampled)
        return InFlight(sched, samples, launched)

    def _land(self, in_flight: InFlight) -> list[RequestOutput]:
        out = self.runner.fetch(in_flight.launched)
        self.clock.landed()
        results = []
        now = time.monotonic()
        for i, (seq, sampled) in enumerate(zip(in_flight.sched.seqs, in_flight.samples)):
            if not sampled:
                continue
            seq.num_pending -= 1
            if not seq.finished:  # else aborted, or ended by the step before: drop the token
                results.append(self._append_token(seq, out, i, now))
        return results

    def _append_token(self, seq: Sequence, out, i: int, now: float) -> RequestOutput:
        tok = int(out.tokens[i])
        seq.output_ids.append(tok)
        seq.first_token_time = seq.first_token_time or now
        top = []
        if seq.params.logprobs:
            seq.output_logprobs.append(float(out.logprobs[i]))
            k = seq.params.top_logprobs
            top = [(int(a), float(b)) for a, b in zip(out.top_ids[i, :k], out.top_logprobs[i, :k])]
            seq.output_top_logprobs.append(top)
        detok = self._detok[seq.rid]
        delta = detok.add(tok)
        if tok in seq.stop_ids:  # min_tokens already kept them from being sampled
            self.scheduler.finish(seq, "stop", tok)
        elif detok.stopped_by is not None:
            self.scheduler.finish(seq, "stop", detok.stopped_by)
        elif (len(seq.output_ids) >= seq.params.max_tokens
              or len(seq.prompt_ids) + len(seq.output_ids) >= self.context_length):
            self.scheduler.finish(seq, "length")
        if seq.finished:
            delta += detok.flush()
            self._detok.pop(seq.rid, None)
        return RequestOutput(seq.rid, delta, [tok], seq.finished, seq, detok.text,
                             seq.finish_reason,
                             seq.output_logprobs[-1:] if seq.params.logprobs else [],
                             [top] if seq.params.logprobs else [])

    # -- the offline API -----------------------------------------------------------
    def generate(self, prompts: list[str | list[int]] | str,
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[dict]:
        """Run prompts to completion; returns [{"text", "token_ids", "finish_reason",
        "logprobs", "top_logprobs"}] (the last two filled when the params ask for them)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        plist = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        texts = {s.rid: "" for s in seqs}
        while any(not s.finished for s in seqs) or self._in_flight is not None:
            for o in self.step():
                if o.rid in texts:
                    texts[o.rid] += o.delta_text
        return [{"text": texts[s.rid], "token_ids": list(s.output_ids),
                 "finish_reason": s.finish_reason, "logprobs": list(s.output_logprobs),
                 "top_logprobs": list(s.output_top_logprobs)}
                for s in seqs]

    def warmup(self, progress=None) -> int:
        """Compile (or load from the persistent cache) every bucket shape; returns how many.

        ``progress(done, total, shape)`` is called after each one.
        """
        shapes = self.plan.all_shapes()
        for n, (_, S, Q, P) in enumerate(shapes):
            self.runner.warmup_shape(S, Q, P)
            if progress:
                progress(n + 1, len(shapes), (S, Q, P))
        self.runner.warmed_up = True
        self.compile_stats.warm = True
        if self._leader is not None:
            self._leader.send("warm")
        self._compiles_at_warmup = self.compile_stats.compiles
        return len(shapes)

    def compiles_since_warmup(self) -> int:
        """Executables built since ``warmup`` finished (0 when serving is healthy)."""
        if not self.runner.warmed_up:
            return 0
        return (self.compile_stats.compiles - self._compiles_at_warmup
                + self.runner.loaded_after_warmup)
