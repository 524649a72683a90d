"""Decode-step matmuls on XLA CPU: a C++ kernel called through the XLA FFI.

``linear(w, layer, x)`` is ``w[layer] @ x`` for stacked weights ``w`` (L, N, K)
and feature-major activations ``x`` (K, M). Inside the layer scan XLA CPU copies
each layer's slice out of ``w`` before its dot; ``cpu_linear.cc`` reads the
slice in place, and at a decode step's few columns it runs its dots closer to
memory speed than XLA's. It needs AVX-512 and is built on first use
(kernels/cpu_build.py); callers check ``available()`` and use ``w[layer] @ x``
when it is not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgljax.kernels import cpu_build

TARGET = "sgljax_cpu_linear"
MAX_TOKENS = 128  # decode steps; at 512 tokens (prefill) XLA's own dots are faster


def available() -> bool:
    return cpu_build.load("cpu_linear.cc", ((TARGET, "SgljaxLinear"),), "SgljaxLinearSupported")


def linear(w: jax.Array, layer: jax.Array, x: jax.Array) -> jax.Array:
    """w (L, N, K) float32, layer () int32, x (K, M) float32 → (N, M) float32."""
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((w.shape[1], x.shape[1]), jnp.float32))(
        w, jnp.asarray(layer, jnp.int32).reshape(1), x.astype(jnp.float32))


def linear_reference(w: jax.Array, layer: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.dot(w[layer], x, preferred_element_type=jnp.float32)
