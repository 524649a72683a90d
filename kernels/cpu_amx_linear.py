"""bfloat16 matmuls on Intel AMX (XLA CPU): a C++ kernel called through the XLA FFI.

``linear(w, layer, x)`` is ``w[layer] @ bf16(x)`` in float32 for stacked bfloat16
weights ``w`` (L, N, K) and float32 feature-major activations ``x`` (K, M): the
activations are rounded to bfloat16 at the matmul, as llama.cpp does with BF16
weights, and the products are summed in float32. XLA CPU's own bfloat16 dots inside
the layer scan run slower than float32 ones; on the tile unit a prefill step's
matmuls run several times faster, and decode steps read half the bytes.
It needs a CPU with AMX-BF16 and is built on first use (kernels/cpu_build.py);
callers check ``available()`` and ``supports(w.shape)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgljax.kernels import cpu_build

TARGET = "sgljax_cpu_amx_linear"


def available() -> bool:
    return cpu_build.load("cpu_amx_linear.cc", ((TARGET, "SgljaxAmxLinear"),),
                          "SgljaxAmxLinearSupported")


def supports(shape: tuple[int, ...]) -> bool:
    """Stacked (L, N, K) weights the kernel takes: rows in units of 32, K in tiles of 32."""
    return len(shape) == 3 and shape[1] % 32 == 0 and shape[2] % 32 == 0


def linear(w: jax.Array, layer: jax.Array, x: jax.Array) -> jax.Array:
    """w (L, N, K) bfloat16, layer () int32, x (K, M) float32 → (N, M) float32."""
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((w.shape[1], x.shape[1]), jnp.float32))(
        w, jnp.asarray(layer, jnp.int32).reshape(1), x.astype(jnp.float32))


def linear_reference(w: jax.Array, layer: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.dot(w[layer].astype(jnp.float32), x.astype(jnp.bfloat16).astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
