"""Which C++ kernels a step uses on one CPU device (kernels/cpu_*.py), and where.

- Attention (``--attention-backend cpu``) reads the KV pages straight from the pool
  (the pure-JAX gather moves them about three times), on the vector unit in float32
  (cpu_paged_attention). With bfloat16 weights its operands are rounded to bfloat16
  (sums stay float32): what a TPU computes for a bfloat16 model, the same in every
  step; and where the CPU has AMX, steps of more tokens than sequences (prompt
  chunks) run it as two matmuls per kv head on the tile unit instead
  (cpu_amx_attention: 8 x 64 queries over 1,088 cached tokens, 3.3 against 15.5 ms
  a layer), with the same numerics.
- Matmuls read each layer's weights in place inside the layer scan: float32 ones in
  steps of up to cpu_linear.MAX_TOKENS tokens (and LM heads of 2-16 rows),
  bfloat16 ones in every step
  and the LM head, on AMX; without AMX, with AVX512-BF16 (AMD Zen 4), bfloat16 ones
  in steps of up to cpu_bf16_linear.MAX_TOKENS tokens and the LM head. Not in MoE models: their dense and sparse layers stack
  apart (the kernel indexes one stack by model layer), so XLA runs their matmuls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import jax.numpy as jnp

from sgljax.engine.weight_forms import PROJECTIONS, LinearKernel
from sgljax.kernels import (cpu_amx_attention, cpu_amx_linear, cpu_bf16_linear, cpu_linear,
                            cpu_paged_attention)


@dataclass(frozen=True)
class SplitAttention:
    """Attention by step shape (static under jit): ``chunk`` for steps of more tokens than
    sequence rows (the prompt-chunk buckets), ``decode`` for the others."""
    chunk: Callable
    decode: Callable

    def __call__(self, q, k_cache, v_cache, layer, page_table, *args, tree_bits=None):
        if tree_bits is not None:  # token trees: only the vector kernel masks by key
            return self.decode(q, k_cache, v_cache, layer, page_table, *args,
                               tree_bits=tree_bits)
        fn = self.chunk if q.shape[0] > page_table.shape[0] else self.decode
        return fn(q, k_cache, v_cache, layer, page_table, *args)


@dataclass(frozen=True)
class StepKernels:
    attention: Callable | None  # None: the attention backend's
    linear: LinearKernel | None  # None: XLA's dots


def choose(top: dict, stacked: dict, cfg, cache_dtype, act_dtype, cpu_alone: bool,
           attention: bool = True) -> StepKernels:
    """The kernels for a model's weights (``top``, ``stacked``) on one CPU device (none
    elsewhere); ``attention``: also the attention kernels (``--attention-backend cpu``)."""
    weights = top["embed"].dtype
    bf16 = weights == jnp.bfloat16 and act_dtype == jnp.float32
    attend = None
    if (cpu_alone and attention and act_dtype == jnp.float32
            and cache_dtype in (jnp.float32, jnp.float16, jnp.bfloat16)
            and cpu_paged_attention.available()):
        attend = partial(cpu_paged_attention.cpu_paged_attention, bf16_products=bf16)
        if (bf16 and cpu_amx_attention.available()
                and cpu_amx_attention.supports((1, 1, cfg.head_dim))):
            attend = SplitAttention(cpu_amx_attention.amx_attention, attend)
    linear = None
    if cpu_alone and not cfg.is_moe:
        if weights == jnp.float32 and cpu_linear.available():
            # The LM head too, for 2-16 rows: XLA's dot took 44-48 ms for 2-5 rows of
            # SmolLM2's (49152, 576) head where the kernel takes 4-7. One row: XLA's GEMV
            # wins; past 16 (speculative rows at concurrency 16) XLA's was as fast in the step.
            linear = LinearKernel(cpu_linear.linear, cpu_linear.MAX_TOKENS, head=True,
                                  head_rows=(2, 16))
        elif (weights == jnp.bfloat16 and cpu_amx_linear.available()
              and all(cpu_amx_linear.supports(stacked[name].shape) for name in PROJECTIONS)):
            head = top["embed"] if cfg.tie_word_embeddings else top["lm_head"]
            linear = LinearKernel(cpu_amx_linear.linear,
                                  head=cpu_amx_linear.supports((1, *head.shape)))
        elif weights == jnp.bfloat16 and cpu_bf16_linear.available():  # AVX512-BF16, no AMX
            linear = LinearKernel(cpu_bf16_linear.linear, cpu_bf16_linear.MAX_TOKENS, head=True)
    return StepKernels(attend, linear)
