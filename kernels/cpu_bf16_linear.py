"""bfloat16 decode-step matmuls on CPUs with AVX512-BF16 and no AMX (XLA FFI, C++).

``linear(w, layer, x)`` is ``w[layer] @ bf16(x)`` in float32 for stacked bfloat16
weights ``w`` (L, N, K) and float32 feature-major activations ``x`` (K, M), with the
numerics of the AMX kernel (kernels/cpu_amx_linear.py) and of XLA's path
(engine/weight_forms.py:dense): activations rounded to bfloat16, products summed
in float32. On such CPUs (AMD Zen 4) XLA's bfloat16 dots run several times slower
than float32 ones; this kernel reads the weights' half the bytes at memory speed.
Built on first use (kernels/cpu_build.py); callers check ``available()``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgljax.kernels import cpu_build

TARGET = "sgljax_cpu_bf16_linear"
MAX_TOKENS = 128  # decode steps; prompt chunks use XLA's dots


def available() -> bool:
    return cpu_build.load("cpu_bf16_linear.cc", ((TARGET, "SgljaxBf16Linear"),),
                          "SgljaxBf16LinearSupported")


def linear(w: jax.Array, layer: jax.Array, x: jax.Array) -> jax.Array:
    """w (L, N, K) bfloat16, layer () int32, x (K, M) float32 → (N, M) float32."""
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((w.shape[1], x.shape[1]), jnp.float32))(
        w, jnp.asarray(layer, jnp.int32).reshape(1), x.astype(jnp.float32))
