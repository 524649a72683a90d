"""Which C++ kernels a step uses on one CPU device (kernels/cpu_*.py), and where.

- Attention reads the KV pages straight from the pool (the pure-JAX gather moves
  them about three times). Decode steps run it on the vector unit in float32
  (cpu_paged_attention): they are bound by reading the cache. With bfloat16
  weights, prefill chunks (several query tokens a sequence) run it as two matmuls
  per kv head on the AMX tile unit in bfloat16 with float32 sums (cpu_amx_attention:
  8 x 64 queries over 1,088 cached tokens, 3.3 against 15.5 ms a layer), and
  without that kernel the pure-JAX path rounds its operands alike, so the
  numerics do not depend on which one runs.
- Matmuls read each layer's weights in place inside the layer scan: float32 ones in
  decode steps of up to cpu_linear.MAX_TOKENS tokens, bfloat16 ones in every step
  and the LM head, on AMX. Not in MoE models: their dense and sparse layers stack
  apart (the kernel indexes one stack by model layer), so XLA runs their matmuls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import jax.numpy as jnp

from sgljax.engine.weight_forms import PROJECTIONS, LinearKernel
from sgljax.kernels import cpu_amx_attention, cpu_amx_linear, cpu_linear, cpu_paged_attention
from sgljax.kernels.paged_attention import paged_attention


@dataclass(frozen=True)
class SplitAttention:
    """Attention by step shape (static under jit): ``chunk`` for steps of several query
    tokens a sequence, ``decode`` for one."""
    chunk: Callable
    decode: Callable

    def __call__(self, q, *args):
        return (self.chunk if q.shape[1] > 1 else self.decode)(q, *args)


@dataclass(frozen=True)
class StepKernels:
    attention: Callable | None  # None: kernels/paged_attention.py as it is
    linear: LinearKernel | None  # None: XLA's dots


def choose(top: dict, stacked: dict, cfg, cache_dtype, act_dtype, cpu_alone: bool) -> StepKernels:
    """The kernels for a model's weights (``top``, ``stacked``), on one CPU device or not."""
    weights = top["embed"].dtype
    decode = chunk = paged_attention
    if weights == jnp.bfloat16 and act_dtype == jnp.float32:  # bf16 products in chunks
        chunk = partial(paged_attention, bf16_products=True)
    linear = None
    if cpu_alone:
        if (cache_dtype in (jnp.float32, jnp.float16, jnp.bfloat16) and act_dtype == jnp.float32
                and cpu_paged_attention.available()):
            decode = cpu_paged_attention.cpu_paged_attention
            if chunk is paged_attention:
                chunk = decode
            elif cpu_amx_attention.available() and cpu_amx_attention.supports(
                    (1, 1, 1, cfg.head_dim)):
                chunk = cpu_amx_attention.amx_attention
    if cpu_alone and not cfg.is_moe:
        if weights == jnp.float32 and cpu_linear.available():
            linear = LinearKernel(cpu_linear.linear, cpu_linear.MAX_TOKENS, decode_only=True)
        elif (weights == jnp.bfloat16 and cpu_amx_linear.available()
              and all(cpu_amx_linear.supports(stacked[name].shape) for name in PROJECTIONS)):
            head = top["embed"] if cfg.tie_word_embeddings else top["lm_head"]
            linear = LinearKernel(cpu_amx_linear.linear,
                                  head=cpu_amx_linear.supports((1, *head.shape)))
    if chunk is decode:
        attention = None if decode is paged_attention else decode
    else:
        attention = SplitAttention(chunk, decode)
    return StepKernels(attention, linear)
