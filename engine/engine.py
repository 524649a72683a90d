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
from collections import deque
from dataclasses import dataclass

import jax.numpy as jnp

from sgljax.engine.args import EngineArgs
from sgljax.engine.asr_frontend import AudioFrontend
from sgljax.engine.asr_engine import SpeechAPI
from sgljax.engine.buckets import new_seqs_per_prefill, plan_buckets
from sgljax.engine.compile_cache import enable_persistent_cache, watch_compilations
from sgljax.engine.config import ModelConfigError
from sgljax.engine.kv_cache import KVCacheSpec, PagePool
from sgljax.engine.loader import load_model
from sgljax.engine.model_files import resolve_model_path
from sgljax.engine.mesh import make_mesh
from sgljax.engine.executable_cache import ExecutableCache
from sgljax.engine.grammar import GrammarCompiler
from sgljax.engine.generation_defaults import read_generation_defaults
from sgljax.engine.distributed import Follower, Leader, channel_address, init_distributed
from sgljax.engine.batch import ScheduledBatch
from sgljax.engine.model_runner import Launched, ModelRunner
from sgljax.engine.step_wire import unflatten_step
from sgljax.engine.ngram import NgramDrafter
from sgljax.engine.eagle_draft import head_kv_spec
from sgljax.engine.eagle_head import load_head
from sgljax.engine.outputs import Completion, EngineStats, RequestOutput, SpecStats
from sgljax.engine.pathways import init_backend
from sgljax.engine.prefix_cache import NoPrefixCache, RadixPrefixCache
from sgljax.engine.request import Sequence
from sgljax.engine.sampling_params import RequestError, RequestLimits, SamplingParams
from sgljax.engine.step_clock import StepClock
from sgljax.engine.scheduler import Scheduler, SchedulerConfig
from sgljax.engine.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


STEP_LOG = 256  # steps the engine remembers (step_log)


@dataclass(frozen=True)
class StepRecord:
    """One launched step: its rows (request ids, tokens each), how many of them were
    decodes, which running requests were decoding when it was chosen, and its bucket."""
    rids: tuple[str, ...]
    chunk_lens: tuple[int, ...]
    num_decodes: int
    decoding: tuple[str, ...]
    shape: tuple


@dataclass
class InFlight:
    """A launched step whose tokens the host has not seen yet."""
    sched: ScheduledBatch
    launched: Launched
    launched_at: float = 0.0  # time.perf_counter() at launch


class Engine(SpeechAPI):
    """Requests in, tokens out: schedules, runs and lands steps (speech models' extra API:
    engine/asr_engine.py)."""

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
        # Qwen3-ASR checkpoints: the audio encoder beside the decoder (None: text only).
        self.audio = AudioFrontend.maybe(loaded.path, self.mesh)
        if self.audio is not None and args.nnodes > 1:  # the encoder runs on one host's devices
            raise ModelConfigError("audio models are served on one host only (--nnodes 1)")
        if self.audio is None and (args.asr_warmup or args.precompile_frame_paddings
                                   or args.asr_token_paddings):
            raise ModelConfigError(f"{loaded.path} is not a speech model: --asr-warmup and "
                                   "the audio paddings apply to Qwen3-ASR checkpoints")
        # What the HTTP routes sample with when a request leaves a field out.
        self.generation_defaults = read_generation_defaults(loaded.path)
        self.context_length = min(args.context_length or cfg.max_position_embeddings,
                                  cfg.max_position_embeddings)
        self.limits = RequestLimits(self.context_length, cfg.vocab_size)
        self.eos_ids = frozenset(cfg.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())
        # Constrained decoding (response_format, tool_choice): grammars over this vocabulary.
        self.grammars = GrammarCompiler(self.tokenizer.hf, cfg.vocab_size, sorted(self.eos_ids))
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
        # EAGLE / EAGLE3: the draft head, whose K/V pages sit beside the target's.
        head = (load_head(args.speculative_draft_model_path, args.speculative_algorithm, cfg,
                          act_dtype) if args.eagle else None)
        page_bytes = kv_spec.bytes_per_page() + (
            head_kv_spec(head.cfg, kv_spec).bytes_per_page() if head else 0)
        kv_spec.num_pages = args.resolve_num_pages(page_bytes, max_pages_per_seq)
        self.pool = PagePool(kv_spec.num_pages)
        self.prefix_cache = (NoPrefixCache() if args.disable_radix_cache
                             else RadixPrefixCache(self.pool, ps))
        new_per_prefill = new_seqs_per_prefill(args, on_cpu)
        self.plan = plan_buckets(args, self.context_length)
        self.scheduler = Scheduler(SchedulerConfig(
            page_size=ps, max_running_requests=args.max_running_requests,
            chunked_prefill_size=args.chunked_prefill_size, context_length=self.context_length,
            schedule_policy=args.schedule_policy, new_seqs_per_prefill=new_per_prefill,
            max_prefill_seqs=args.max_prefill_seqs,
            head_drafts=args.num_draft_tokens if head is not None else 0,
            draft_lookahead=args.draft_lookahead),
            self.pool, self.prefix_cache, self.plan,
            drafter=NgramDrafter(args.num_draft_tokens,
                                 args.speculative_ngram_min_match_window_size,
                                 args.speculative_ngram_max_match_window_size)
            if args.speculative_algorithm == "NGRAM" else None)
        self.runner = ModelRunner(loaded.model, self.mesh, kv_spec, self.plan, act_dtype, executable_cache=(
            ExecutableCache(cache_dir, self.mesh) if cache_dir is not None else None),
            moe_backend=args.moe_backend, attention_backend=args.attention_backend,
            num_draft_tokens=args.num_draft_tokens, head=head,
            draft_steps=args.speculative_num_steps, draft_topk=args.speculative_eagle_topk)
        self.spec = SpecStats()
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
        # The last steps launched, oldest first (``step_log``): what each held.
        self._step_log: deque[StepRecord] = deque(maxlen=STEP_LOG)
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
                    rid: str | None = None, audio: list | None = None) -> Sequence:
        """Tokenize (text prompts), validate and queue a request; RequestError if it
        cannot be served as asked (the same checks as the HTTP routes').

        ``audio`` (ASR models): mono 16 kHz float32 clips (or ``prepare_audio``'s), one per
        ``<|audio_pad|>`` run of the prompt, in order; a single placeholder per clip is
        expanded to the clip's encoder outputs (``transcription_prompt`` writes such
        prompts)."""
        params = SamplingParams(**vars(params)) if params else SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        audio_fields = {}
        if audio is not None and len(audio):
            if self.audio is None:
                raise RequestError("this model does not take audio", "audio")
            ids, audio_fields = self.audio.prepare(ids, audio)
        elif self.audio is not None and self.audio.cfg.audio_token_id in ids:
            raise RequestError("the prompt has <|audio_pad|> tokens but no audio", "audio")
        params.validate(self.limits, ids)
        if params.seed is None:
            params.seed = self._rng.getrandbits(32)
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.eos_ids)
        grammar = (self.grammars.matcher(params.constraint)
                   if params.constraint is not None else None)
        seq = Sequence(prompt_ids=ids, params=params, stop_ids=stop_ids, grammar=grammar,
                       **audio_fields)
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
        already in step N+1: that one extra token is dropped. EAGLE's verify rows in step
        N+1 take their drafts and start from step N on the device too
        (engine/spec_overlap.py). Penalties, grammars and NGRAM's drafts need every token
        on the host, so while a running request has them (or NGRAM is on) each step lands
        at once.
        """
        results = []
        prepare_started = time.monotonic()
        if self.audio is not None:  # new audio requests' clips, encoded in one batch
            self.audio.encode_pending(self.scheduler.waiting)
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
        # NGRAM looks its drafts up in the tokens the step in flight emits (spec_overlap.py).
        ngram = self.args.speculative_algorithm == "NGRAM"
        return not (self.args.disable_overlap_schedule or ngram) and not any(
            s.params.adjusts_logits or s.grammar is not None for s in self.scheduler.running)

    def _pop_in_flight(self) -> InFlight:
        in_flight, self._in_flight = self._in_flight, None
        return in_flight

    def _launch(self, sched: ScheduledBatch) -> InFlight:
        launched = self.runner.launch(sched)
        self._step_log.append(StepRecord(
            tuple(s.rid for s in sched.seqs), tuple(sched.chunk_lens), sched.num_decodes,
            tuple(s.rid for s in self.scheduler.running
                  if not s.is_prefilling and not s.length_done), launched.shape))
        self.scheduler.launched(sched)
        return InFlight(sched, launched, time.perf_counter())

    def step_log(self) -> list[StepRecord]:
        """The last ``STEP_LOG`` steps launched, oldest first."""
        return list(self._step_log)

    def _land(self, in_flight: InFlight) -> list[RequestOutput]:
        out = self.runner.fetch(in_flight.launched)
        self.clock.landed()
        sched, results = in_flight.sched, []
        if any(sched.drafts):
            self.spec.landed(sched, out, time.perf_counter() - in_flight.launched_at)
        self.spec.head_seconds += out.draft_seconds
        for i, seq in self.scheduler.landed(sched):
            detok = self._detok[seq.rid]
            text, toks, logprobs, tops = "", [], [], []
            # One token, or (speculative decoding) the drafts the target kept and one more.
            for j, (tok, logprob, top_ids, top_lps) in enumerate(out.emitted(i)):
                text += detok.add(tok)  # detokenize; the detokenizer also finds stop strings
                if seq.params.logprobs:
                    k = seq.params.top_logprobs
                    logprobs.append(logprob)
                    tops.append([(int(a), float(b)) for a, b in zip(top_ids[:k], top_lps[:k])])
                self.scheduler.append_token(seq, tok, logprobs[-1] if logprobs else None,
                                            tops[-1] if tops else None, detok.stopped_by,
                                            kept_draft=j > 0)
                toks.append(tok)
                if seq.finished:
                    break
            if seq.finished:
                text += detok.flush()
                del self._detok[seq.rid]
            elif out.drafts is not None:  # EAGLE: the head's guesses for the next step
                self.scheduler.proposed(seq, out.drafts[i].tolist(),
                                        out.draft_parents[i].tolist())
            results.append(RequestOutput(
                seq.rid, text, toks, seq.finished, seq.finish_reason, seq.matched_stop,
                logprobs, tops, len(seq.prompt_ids), len(seq.output_ids), seq.num_cached_prompt))
        return results

    # -- the offline API -----------------------------------------------------------
    def generate(self, prompts: list[str | list[int]] | str,
                 params: SamplingParams | list[SamplingParams] | None = None,
                 audio: list[list | None] | None = None) -> list[dict]:
        """Run prompts to completion; returns [{"text", "token_ids", "finish_reason",
        "logprobs", "top_logprobs"}] (the last two filled when the params ask for them).
        ``audio``: per prompt, its clips or None (``add_request``)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        plist = params if isinstance(params, list) else [params] * len(prompts)
        clips = audio if audio is not None else [None] * len(prompts)
        seqs = [self.add_request(p, sp, audio=a) for p, sp, a in zip(prompts, plist, clips)]
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

        ``progress(done, total, shape)`` is called after each one. ASR models also compile
        each bucket's form with audio embeddings and every audio encoder bucket.
        """
        shapes = [(T, S, P, False) for T, S, P in self.plan.all_shapes()]
        if self.audio is not None:
            shapes += [(T, S, P, True) for T, S, P in self.plan.all_shapes()]
        for n, (T, S, P, embeds) in enumerate(shapes):
            self.runner.warmup_shape(T, S, P, embeds)
            if progress:
                progress(n + 1, len(shapes), (T, S, P))
        encoder = self._warm_encoder(self.args.precompile_frame_paddings)
        if self.args.asr_warmup:
            self.asr_warmup_figures = self.warmup_asr(self.args.precompile_frame_paddings,
                                                      self.args.asr_token_paddings)
        self._mark_warm()
        if self._leader is not None:
            self._leader.send("warm")
        return len(shapes) + len(encoder)

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
            compiles_after_warmup=self.compiles_since_warmup(), healthy=self.healthy,
            spec_verify_rows=self.spec.verify_rows, spec_draft_tokens=self.spec.draft_tokens,
            spec_accepted_tokens=self.spec.accepted_tokens,
            spec_draft_seconds=self.scheduler.draft_seconds + self.spec.head_seconds,
            spec_verify_seconds=self.spec.verify_seconds,
            **({} if self.audio is None else dict(
                audio_clips_encoded=self.audio.clips_encoded,
                audio_encoder_calls=self.audio.runner.calls,
                unwarmed_audio_shapes=self.audio.runner.unwarmed_shapes)))

    def describe(self) -> dict:
        """What does not change while serving: the model, its limits and defaults, buckets."""
        cfg = self.model_config
        return {"model_path": str(self.model_path), "architecture": cfg.architecture,
                "context_length": self.context_length, "vocab_size": cfg.vocab_size,
                "num_layers": cfg.num_layers, "dtype": self.args.dtype,
                "default_sampling_params": dict(self.generation_defaults),
                "buckets": self.plan.describe(),
                # speech models: the prompt token each audio clip's encoder outputs fill
                "audio_token_id": self.audio.cfg.audio_token_id if self.audio else None}
