"""How the decoder's weights are laid out, and how a step's matmuls consume them.

engine/model.py says what the model computes; this module says in which form its
weights reach the matmuls:

- stacked, a leading (L,) axis on each layer weight (``lax.scan`` over layers), or
  one dict per layer (``unstack_layers``: unrolled, for batch-1 decodes on CPU);
- q/k/v and gate/up as one weight each (``fuse_projections``), where a matmul
  kernel runs them;
- multiplied by XLA's dots (``dense``) or by a C++ kernel that reads the layer's
  slice of the stacked weight in place (``LinearKernel``).

Why each form exists, with the measurements: benchmarks/README.md, "Why the
forward pass looks like this".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Projections that read the same input, and the name of their rows stacked as one weight.
FUSIBLE = {("q_proj", "k_proj", "v_proj"): "qkv_proj", ("gate_proj", "up_proj"): "gate_up_proj"}

Weights = dict[str, jax.Array]


@dataclass(frozen=True)
class LinearKernel:
    """A kernel for ``w[layer] @ x`` over stacked (L, N, K) weights, and where it runs."""
    fn: Callable  # (w (L, N, K), layer () int32, x (K, M)) -> (N, M) float32
    max_tokens: int | None = None  # steps of more tokens use XLA's dots (None: no bound)
    head: bool = False  # also the LM head (as a one-layer stack)
    # The LM heads it takes, by rows: (fewest, most; None: no bound). XLA CPU's float32 dot
    # is a fast GEMV for one row but ~10x slower than the kernel for 2-5 (engine/cpu_kernels.py).
    head_rows: tuple[int, int | None] = (1, None)

    def takes_head(self, rows: int) -> bool:
        low, high = self.head_rows
        return self.head and rows >= low and (high is None or rows <= high)

    def takes(self, tokens: int) -> bool:
        return self.max_tokens is None or tokens <= self.max_tokens


def dense(w: jax.Array, x: jax.Array) -> jax.Array:
    """``w @ x`` in x's dtype.

    Weights stored in another dtype (bfloat16 weights on CPU, where activations stay
    float32) meet x in the weights' dtype, products summed in x's: the numerics of
    llama.cpp's BF16 models, and of the AMX kernel, so either path gives the same."""
    if w.dtype == x.dtype:
        return w @ x
    return w.astype(x.dtype) @ x.astype(w.dtype).astype(x.dtype)


def fuse_projections(stacked: Weights) -> Weights:
    """Stacked layer weights with q/k/v and gate/up each as one (L, sum of N, K) weight.

    One matmul kernel call per group reads the input once and keeps the kernel's
    tiles busy longer than one call per projection."""
    out = {name: w for name, w in stacked.items()
           if not any(name in group for group in FUSIBLE)}
    for group, fused in FUSIBLE.items():
        out[fused] = jnp.concatenate([stacked[name] for name in group], axis=1)
    return out


def unstack_layers(stacked: Weights) -> list[Weights]:
    """Stacked layer weights → one dict of arrays per layer.

    XLA CPU copies each layer's slice out of a stacked weight inside a scan, but
    reads separate arrays in place: the unrolled form skips that copy."""
    num_layers = next(iter(stacked.values())).shape[0]
    return [{name: w[i] for name, w in stacked.items()} for i in range(num_layers)]


@dataclass(frozen=True, eq=False)
class Matmuls:
    """A step's ``w[layer] @ x`` for each projection ``name`` of a layer's weights ``w``."""
    names: frozenset[str]  # the projections (fused or not) the step's weights hold
    kernel: Callable | None = None  # LinearKernel.fn, on ``whole``; None: ``dense`` on w
    whole: Weights | None = None  # the stacked projections, closed over whole

    def __call__(self, w: Weights, name: str, layer: jax.Array, x: jax.Array) -> jax.Array:
        if self.kernel is not None:
            return self.kernel(self.whole[name], layer, x)
        return dense(w[name], x)

    def group(self, w: Weights, layer: jax.Array, x: jax.Array, group: tuple[str, ...],
              rows: tuple[int, ...]) -> list[jax.Array]:
        """Each projection in ``group`` (of ``rows`` output rows each) on x: one matmul
        of their fused weight where there is one (``fuse_projections``)."""
        fused = FUSIBLE[group]
        if fused not in self.names:
            return [self(w, name, layer, x) for name in group]
        y = self(w, fused, layer, x)
        starts = [sum(rows[:i]) for i in range(len(rows))]
        return [y[a:a + r] for a, r in zip(starts, rows)]


def step_matmuls(layers: Weights | list[Weights], kernel: LinearKernel | None,
                 tokens: int) -> tuple[Weights | list[Weights], Matmuls]:
    """(the layer weights to scan or unroll over, the step's matmuls).

    Where ``kernel`` takes the step and the weights are stacked, the projections stay
    whole, closed over, and the kernel reads the layer's slice in place: the scan
    then slices only norms and biases, and copies no projection weights."""
    if kernel and kernel.takes(tokens) and isinstance(layers, dict):
        whole = {name: w for name, w in layers.items() if name.endswith("_proj")}
        rest = {name: w for name, w in layers.items() if name not in whole}
        return rest, Matmuls(frozenset(whole), kernel.fn, whole)
    return layers, Matmuls(frozenset(layers if isinstance(layers, dict) else layers[0]))
