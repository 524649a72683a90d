"""Which attention kernels a step runs (``--attention-backend``), and over which mesh.

Every backend takes the ragged contract of kernels/paged_attention.py:

- ``native``: kernels/paged_attention.py, pure JAX; every platform runs it.
- ``pallas``: kernels/pallas_attention.py, the TPU kernels (ragged paged attention and
  the KV-cache write). Anywhere but a TPU they run in Pallas interpret mode: slow
  but exact, so a whole server can be tested with them on a CPU.
- ``cpu``: the C++ kernels of kernels/cpu_*.py through the XLA FFI, on one CPU device.

``auto`` (the names are declared with the flag, engine/args.py) picks pallas on a TPU,
cpu on one CPU device where the C++ kernels build,
native elsewhere (a GPU: ``--device cuda --attention-backend native``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import jax
from jax.sharding import PartitionSpec as P

from sgljax.engine.mesh import TP
from sgljax.kernels import cpu_paged_attention
from sgljax.kernels.paged_attention import ragged_paged_attention, write_kv


@dataclass(frozen=True)
class AttentionKernels:
    backend: str  # native | pallas | cpu
    attention: Callable  # the ragged contract
    write_kv: Callable  # write_kv's contract


def resolve_backend(name: str, platform: str, cpu_alone: bool) -> str:
    """The backend ``name`` (``auto`` included) means on this platform; ValueError where
    it cannot run."""
    if name == "auto":
        if platform == "tpu":
            return "pallas"
        return "cpu" if cpu_alone and cpu_paged_attention.available() else "native"
    if name == "cpu":
        if not cpu_alone:
            raise ValueError(f"--attention-backend cpu runs on one CPU device, not on "
                             f"{platform} devices or a mesh of several")
        if not cpu_paged_attention.available():
            raise ValueError("--attention-backend cpu: the C++ kernels did not build here "
                             "(is a C++ compiler installed?)")
    if name == "pallas" and platform not in ("tpu", "cpu"):
        raise ValueError(f"--attention-backend pallas runs on a TPU (or, interpreted, on a "
                         f"CPU), not on {platform}: use native")
    if name == "pallas" and platform == "cpu" and not cpu_alone:
        # Interpret mode simulates TPU memory in host callbacks, which crashed XLA under a
        # mesh of CPU devices.
        raise ValueError("--attention-backend pallas is interpreted on one CPU device only: "
                         "drop --tp-size / --ep-size, or use native")
    return name


def attention_kernels(backend: str, mesh, bf16_products: bool) -> AttentionKernels:
    """The step's attention and KV write for a resolved backend (not ``cpu``, whose kernels
    engine/cpu_kernels.py chooses by dtype). ``bf16_products``: round attention's
    operands to bfloat16 as a TPU computes a bfloat16 model (float32 activations only)."""
    if backend == "pallas":
        from sgljax.kernels import pallas_attention  # Pallas imports only where it is used
        attention = partial(pallas_attention.ragged_paged_attention_pallas)
        writer = pallas_attention.pallas_write_kv
        if mesh.shape.get(TP, 1) > 1:  # a kernel is no partitionable op: one call per shard
            attention, writer = over_kv_heads(attention, mesh), over_kv_heads(writer, mesh, 2)
        return AttentionKernels(backend, attention, writer)
    attention = (partial(ragged_paged_attention, bf16_products=True) if bf16_products
                 else ragged_paged_attention)
    return AttentionKernels(backend, attention, write_kv)


def over_kv_heads(fn: Callable, mesh, outputs: int = 1) -> Callable:
    """``fn`` run per tensor-parallel shard: heads and caches split over ``tp``.

    Attention's q (T, H, D) and the write's new k/v (T, KV, D) split on their head axis,
    the caches (L, pages, KV, page_size, D) on theirs; everything else is replicated."""
    heads, cache = P(None, TP, None), P(None, None, TP, None, None)
    if outputs == 1:  # attention: q, k_cache, v_cache, layer, page_table, cu_q_lens, kv_lens,
        # n (and tree_bits, replicated)
        def attention(*args, tree_bits=None):
            extra = () if tree_bits is None else (tree_bits,)
            per_shard = lambda *a: fn(*a[:8], tree_bits=a[8] if extra else None)  # noqa: E731
            specs = (heads, cache, cache, P(), P(), P(), P(), P()) + (P(),) * len(extra)
            return jax.shard_map(per_shard, mesh=mesh, in_specs=specs, out_specs=heads,
                                 check_vma=False)(*args, *extra)
        return attention
    # write: k_cache, v_cache, layer, slots, k_new, v_new
    return jax.shard_map(fn, mesh=mesh, in_specs=(cache, cache, P(), P(), heads, heads),
                         out_specs=(cache, cache), check_vma=False)
