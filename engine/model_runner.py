"""Runs a scheduled batch on the device: pack arrays (engine/step_packing.py), call the
jitted step, unpack.

The step is one pure function of (weights, K cache, V cache, StepCarry, StepBatch,
SamplingBatch, LogitAdjust, GrammarMask); the caches are donated so XLA updates them
in place. A step is ragged: its decode tokens and prompt chunks lie one
after another in one flat batch, padded to a (tokens, sequences) bucket from the
``BucketPlan``; the attention backend (engine/attention_backend.py) takes it as it is.

``launch`` only dispatches: JAX runs the step asynchronously and ``fetch``
waits for its sampled tokens. The step keeps its sampled tokens (and, speculating, the
drafts it kept and the head's next proposal) on the device as well
(``StepCarry``), so the next step can be packed and launched before the host
has them (``StepBatch.prev_rows``; engine/spec_overlap.py): that is what lets
the engine prepare step N+1 while step N runs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sgljax.engine.attention_backend import AttentionKernels, attention_kernels, resolve_backend
from sgljax.engine.batch import (GrammarMask, LogitAdjust, SamplingBatch, ScheduledBatch,
                                 StepBatch, StepCarry)
from sgljax.engine.buckets import BucketPlan
from sgljax.engine.executable_cache import ExecutableCache
from sgljax.engine.grammar import mask_words
from sgljax.engine.kv_cache import KVCacheSpec
from sgljax.engine.mesh import global_array
from sgljax.engine import cpu_kernels
from sgljax.engine.eagle_draft import EagleDrafter
from sgljax.engine.eagle_head import EagleHead
from sgljax.engine.model import Decoder, forward
from sgljax.engine.weight_forms import fuse_projections, unstack_layers
from sgljax.engine.sampling import sample
from sgljax.engine.speculative import keep_path_kv, verify
from sgljax.engine.spec_overlap import carry_in
from sgljax.engine.step_packing import StepPacker
from sgljax.engine.step_wire import flatten_step

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """Sampled tokens per sequence row (ignore rows whose prefill is unfinished). With
    speculative decoding each field has a position axis after the row's, and row ``i``
    emits its first ``accepted[i] + 1`` positions (``emitted``)."""
    tokens: np.ndarray  # (S,) or (S, k + 1)
    logprobs: np.ndarray  # (S,) or (S, k + 1)
    top_ids: np.ndarray  # (S, 20) or (S, k + 1, 20)
    top_logprobs: np.ndarray  # (S, 20) or (S, k + 1, 20)
    accepted: np.ndarray | None = None  # (S,) draft tokens kept
    drafts: np.ndarray | None = None  # EAGLE: (S, k) each row's drafts for its next step
    draft_parents: np.ndarray | None = None  # EAGLE: (S, k) their tree (engine/speculative.py)
    draft_seconds: float = 0.0  # EAGLE: how long the host waited for them after the step

    def emitted(self, row: int) -> list[tuple[int, float, np.ndarray, np.ndarray]]:
        """(token, logprob, top ids, top logprobs) of each token row ``row`` emits."""
        if self.accepted is None:
            return [(int(self.tokens[row]), float(self.logprobs[row]), self.top_ids[row],
                     self.top_logprobs[row])]
        return [(int(self.tokens[row, j]), float(self.logprobs[row, j]),
                 self.top_ids[row, j], self.top_logprobs[row, j])
                for j in range(int(self.accepted[row]) + 1)]


@dataclass
class Launched:
    """A dispatched step, still running or done: its outputs on the device."""
    outputs: tuple  # tokens, logprobs, top ids, top logprobs (, accepted drafts)
    shape: tuple = ()  # the step's (tokens, sequences) bucket


def _step(cfg, kv_heads, act_dtype, kernels, linear_kernel, moe_backend, capture, page_size, weights, k_cache, v_cache, carry, batch, sbatch, adjust, grammar):
    # Sequences whose input token the previous step sampled take it from the device: it
    # is their first token in this step (a decode row's only one).
    fed = carry.tokens[jnp.maximum(batch.prev_rows, 0)]
    first = batch.cu_q_lens[:-1]
    padded = batch.prev_rows < 0
    tokens = batch.tokens.at[jnp.where(padded, batch.tokens.shape[0], first)].set(
        fed, mode="drop")
    batch = dataclasses.replace(batch, tokens=tokens)
    if carry.proposal is not None:  # EAGLE: verify rows packed before the step before landed
        batch, sbatch = carry_in(batch, sbatch, carry, page_size)
    top, stacked, per_layer, layer_ids = weights
    # One sequence decoding: unrolled over per-layer arrays where the runner keeps them.
    layers = per_layer if per_layer and batch.tokens.shape == (1,) else stacked
    logits, k_cache, v_cache, *features = forward(
        cfg, kv_heads, top, layers, batch, k_cache, v_cache, layer_ids, kernels.attention,
        linear_kernel, act_dtype, moe_backend, kernels.write_kv, capture)
    if batch.drafts is None:
        out = sample(logits, sbatch, adjust, grammar)
        last = out[0]
    else:  # speculative decoding: every row's last token and drafts, verified
        *out, path = verify(logits, batch.drafts, batch.num_drafts, batch.draft_parents,
                            sbatch, adjust, grammar)
        tokens, accepted = out[0], out[4]
        last = jnp.take_along_axis(tokens, accepted[:, None], axis=1)[:, 0]
        if batch.tree_bits is not None:  # a tree's kept nodes move to their positions
            k_cache, v_cache = keep_path_kv(k_cache, v_cache, batch, path, accepted)
        if features:  # EAGLE's head reads the kept path, and the step as carry_in fixed it
            features += [path, batch]
            carry = dataclasses.replace(
                carry, accepted=jax.lax.dynamic_update_slice(carry.accepted, accepted, (0,)))
    carry = dataclasses.replace(carry, tokens=jax.lax.dynamic_update_slice(carry.tokens, last, (0,)))
    return (*out, *features), carry, k_cache, v_cache  # features: EAGLE's head reads them


class ModelRunner:
    def __init__(self, model: Decoder, mesh, kv_spec: KVCacheSpec, plan: BucketPlan,
                 act_dtype=None, executable_cache: ExecutableCache | None = None,
                 moe_backend: str = "grouped", attention_backend: str = "auto",
                 num_draft_tokens: int = 0, head: EagleHead | None = None,
                 draft_steps: int = 0, draft_topk: int = 1):
        self.mesh = mesh
        # EAGLE's token trees: verify rows branch (StepBatch.tree_bits in every step).
        self.trees = head is not None and draft_topk > 1
        # Speculative decoding: every step verifies up to this many drafts a decode row.
        self.num_draft_tokens = num_draft_tokens
        self.kv_spec = kv_spec
        self.plan = plan
        self.page_size = kv_spec.page_size
        self.vocab_size = model.cfg.vocab_size
        self.model = model
        top, stacked = model.weights()
        self.k_cache, self.v_cache = kv_spec.allocate(mesh)
        # On one CPU device, steps use C++ kernels where they run (engine/cpu_kernels.py).
        platform = mesh.devices.flat[0].platform
        cpu_alone = mesh.devices.size == 1 and platform == "cpu"
        act_dtype = act_dtype or model.dtype
        self.attention_backend = resolve_backend(attention_backend, platform, cpu_alone)
        cpu = cpu_kernels.choose(top, stacked, model.cfg, self.k_cache.dtype, act_dtype,
                                 cpu_alone, attention=self.attention_backend == "cpu")
        bf16_products = top["embed"].dtype == jnp.bfloat16 and act_dtype == jnp.float32
        self.kernels = attention_kernels(
            "native" if self.attention_backend == "cpu" else self.attention_backend, mesh,
            bf16_products)
        if cpu.attention is not None:
            self.kernels = AttentionKernels("cpu", cpu.attention, self.kernels.write_kv)
        self.linear_kernel = cpu.linear
        if self.linear_kernel:  # one kernel call for q/k/v and one for gate/up
            stacked = jax.jit(fuse_projections)(stacked)
        # Without the matmul kernel, a single decoding sequence on CPU runs its layers
        # unrolled over a second, per-layer copy of the weights: 17% faster at batch 1
        # (engine/model.py's forward says why), slower from batch 2 up. Not for MoE
        # models, whose dense and sparse layers stack apart.
        per_layer = (jax.jit(unstack_layers)(stacked)
                     if mesh.devices.flat[0].platform == "cpu" and not self.linear_kernel
                     and not model.cfg.is_moe else [])
        layer_ids = global_array(np.arange(model.cfg.num_layers, dtype=np.int32),
                                 NamedSharding(mesh, P()))
        self.state = (top, stacked, per_layer, layer_ids)
        replicated = NamedSharding(mesh, P())
        kv_sharding = self.k_cache.sharding
        # What each step leaves for the next on the device (its rows' last tokens, kept
        # drafts and the head's proposals), one slot per sequence row of the widest bucket.
        rows = lambda *shape: global_array(np.zeros((plan.max_seqs, *shape), np.int32),  # noqa: E731
                                           replicated)
        self.carry = (StepCarry(rows()) if head is None else
                      StepCarry(rows(), rows(), rows(2, num_draft_tokens)))
        self._last_rows: dict[str, int] = {}
        capture = head.cfg.capture if head is not None else None
        outputs = 4 + bool(num_draft_tokens) + 3 * (head is not None)  # + features, path, batch
        self._step = jax.jit(partial(_step, model.cfg, model.kv_heads, act_dtype,
                                     self.kernels, self.linear_kernel, moe_backend, capture,
                                     self.page_size),
                             donate_argnums=(1, 2, 3),
                             out_shardings=((replicated,) * outputs,
                                            replicated, kv_sharding, kv_sharding))
        # EAGLE: the draft head, run after every step (engine/eagle_draft.py).
        # The matmul kernel takes the head's weights where they are in the target's dtype.
        head_linear = (self.linear_kernel if head is not None
                       and head.top["fc"].dtype == top["embed"].dtype else None)
        self.eagle = (EagleDrafter(head, model.cfg, kv_spec, mesh, self.kernels, head_linear,
                                   act_dtype, draft_steps or num_draft_tokens,
                                   self._load_or_compile, draft_topk, num_draft_tokens)
                      if head is not None else None)
        self.packer = StepPacker(plan, self.page_size, self.vocab_size, model.cfg.hidden_size,
                                 num_draft_tokens, self.trees, head is not None)
        self.broadcast = None  # multi-host rank 0: broadcast(kind, arrays) reaches the followers
        self._zero_adjust: dict[int, LogitAdjust] = {}
        self._open_grammar: dict[int, GrammarMask] = {}
        self._executables: dict[tuple, object] = {}
        self.warmed_up = False
        # -- executable cache: this rank's compiled buckets on disk (None: compile every time)
        self.executable_cache = executable_cache
        self.loaded_after_warmup = 0  # new shapes loaded from the cache: no XLA compile counts them

    def pack(self, sched: ScheduledBatch):
        """The step's arrays (engine/step_packing.py)."""
        return self.packer.pack(sched, self._last_rows)

    def _inactive_adjust(self, S: int) -> LogitAdjust:
        if S not in self._zero_adjust:
            V = self.vocab_size
            self._zero_adjust[S] = self._replicated(LogitAdjust(
                np.asarray(False), np.zeros((S, V), np.float32), np.zeros((S, V), bool),
                np.ones((S,), np.float32)))
        return self._zero_adjust[S]

    def _replicated(self, tree):
        # Same placement whether zeros or real: the step's cache key must not change.
        sharding = NamedSharding(self.mesh, P())
        return jax.tree.map(lambda x: global_array(np.asarray(x), sharding), tree)

    def _inactive_grammar(self, S: int) -> GrammarMask:
        if S not in self._open_grammar:
            self._open_grammar[S] = self._replicated(GrammarMask(
                np.asarray(False), np.full((S, mask_words(self.vocab_size)), -1, np.int32)))
        return self._open_grammar[S]

    # -- running -------------------------------------------------------------
    def launch(self, sched: ScheduledBatch) -> Launched:
        """Pack and dispatch a scheduled batch; returns at once, the step runs on."""
        packed = self.pack(sched)
        outputs = self.dispatch(*packed)
        self._last_rows = {seq.rid: i for i, seq in enumerate(sched.seqs)}
        return Launched(outputs, packed[0].shape)

    @staticmethod
    def fetch(launched: Launched) -> StepOutput:
        """Wait for a launched step and copy its sampled tokens (and EAGLE's drafts, which
        the device computes after them) to the host."""
        outputs = [to_host(x) for x in launched.outputs[:5]]
        if len(launched.outputs) <= 5:
            return StepOutput(*outputs)
        waited = time.perf_counter()
        proposal = to_host(launched.outputs[5])  # (S, 2, k): tokens, parents
        return StepOutput(*outputs, proposal[:, 0], proposal[:, 1],
                          time.perf_counter() - waited)

    def execute(self, batch: StepBatch, sbatch: SamplingBatch, adjust: LogitAdjust | None,
                grammar: GrammarMask | None = None) -> StepOutput:
        """Run one packed step to the end (followers, benchmarks)."""
        return self.fetch(Launched(self.dispatch(batch, sbatch, adjust, grammar)))

    def dispatch(self, batch: StepBatch, sbatch: SamplingBatch, adjust: LogitAdjust | None,
                 grammar: GrammarMask | None = None):
        """Start one packed step. On multi-host rank 0, first send it to the other ranks."""
        if self.broadcast is not None:
            self.broadcast("step", flatten_step(batch, sbatch, adjust, grammar))
        adj = self._device_adjust(batch, adjust)
        gram = self._device_grammar(batch, grammar)
        exe = self._executable(batch, sbatch, adj, gram)
        out, self.carry, self.k_cache, self.v_cache = exe(
            self.state, self.k_cache, self.v_cache, self.carry, batch, sbatch, adj, gram)
        if self.eagle is None:
            return out
        *out, features, path, fixed = out
        drafts, proposals = self.eagle.dispatch(self.state[0], features, fixed, out[0], out[4],
                                                path, self.carry.proposal)
        self.carry = dataclasses.replace(self.carry, proposal=proposals)
        return (*out, drafts)

    def _device_adjust(self, batch: StepBatch, adjust: LogitAdjust | None) -> LogitAdjust:
        S = batch.page_table.shape[0]
        return self._inactive_adjust(S) if adjust is None else self._replicated(adjust)

    def _device_grammar(self, batch: StepBatch, grammar: GrammarMask | None) -> GrammarMask:
        S = batch.page_table.shape[0]
        return self._inactive_grammar(S) if grammar is None else self._replicated(grammar)

    def _executable(self, batch: StepBatch, sbatch: SamplingBatch, adj: LogitAdjust,
                    gram: GrammarMask):
        """The compiled step for this batch's bucket, compiled ahead of time on first sight.

        Keeping the executables ourselves means warmup only compiles (or loads from the
        persistent cache), never runs, and serving never traces.
        """
        key = (batch.shape, batch.page_table.shape[1], batch.embeds is not None)
        exe = self._executables.get(key)
        if exe is None:
            if self.warmed_up:  # a bucket the plan missed (counted by Engine.compiles_since_warmup)
                log.warning("compiling a new step shape after warmup: %s", key)
            with jax.set_mesh(self.mesh):
                lowered = self._step.lower(self.state, self.k_cache, self.v_cache,
                                           self.carry, batch, sbatch, adj, gram)
                exe = self._load_or_compile(lowered)
            self._executables[key] = exe
        return exe

    def _load_or_compile(self, lowered):
        cache = self.executable_cache
        if cache is None:
            return lowered.compile()
        hits = cache.hits
        exe = cache.load_or_compile(lowered)
        if self.warmed_up and cache.hits > hits:  # a new shape, loaded: no XLA event counts it
            self.loaded_after_warmup += 1
        return exe

    def warmup_shape(self, T: int, S: int, P: int, embeds: bool = False) -> float:
        """Compile (or load from the persistent cache) one bucket; returns seconds.
        ``embeds``: its form with an embedding override (audio prompts)."""
        t0 = time.perf_counter()
        z = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
        K = self.num_draft_tokens
        batch = StepBatch(z(T), z(T), z(T), z(S, P), z(S + 1), z(S), np.asarray(0, np.int32),
                          z(S, K + 1) if K else z(S), np.full(S, -1, np.int32))
        if K:
            batch.drafts, batch.num_drafts, batch.draft_parents = z(S, K), z(S), z(S, K)
            batch.draft_room = z(S)
        if self.trees:
            batch.tree_bits = z(T)
        if self.eagle is not None:
            batch.chunk_next = z(S)
        if embeds:
            batch.embeds = np.zeros((T, self.model.cfg.hidden_size), np.float32)
            batch.embed_mask = np.zeros((T,), bool)
        sbatch = SamplingBatch(np.zeros(S, np.float32), z(S), np.ones(S, np.float32),
                               np.zeros(S, np.float32), np.zeros(S, np.uint32), z(S),
                               np.asarray(True), np.asarray(False))
        self.compile_only(batch, sbatch)
        return time.perf_counter() - t0

    def compile_only(self, batch: StepBatch, sbatch: SamplingBatch) -> None:
        if self.broadcast is not None:  # multi-host: every rank compiles the same bucket
            self.broadcast("compile", flatten_step(batch, sbatch, None, None))
        self._executable(batch, sbatch, self._device_adjust(batch, None),
                         self._device_grammar(batch, None))
        if self.eagle is not None:
            self.eagle.warm(self.state[0], batch, self.carry.proposal)


def to_host(x: jax.Array) -> np.ndarray:
    """A replicated step output as numpy (this host's copy; works on every rank)."""
    return np.asarray(x.addressable_data(0))
