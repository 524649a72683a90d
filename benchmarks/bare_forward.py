"""The in-run reference: a bare jitted decode forward of the served model, no engine.

    python benchmarks/bare_forward.py --batch 1 16 64

Same weights and layer scan as the engine, but no KV cache, no attention, no
sampling, no scheduler: embed → 30 × (norm, q/k/v/o, MLP) → logits. The
engine's decode step is compared against this ceiling.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgljax.engine.layers import rms_norm_features, swiglu_mlp
from sgljax.engine.loader import load_model
from sgljax.engine.model_files import resolve_model_path
from sgljax.engine.mesh import make_mesh
from sgljax.engine.weight_forms import unstack_layers


def bare_step(model, tokens, per_layer=None):
    """The engine's dense path (feature-major activations, (out, in) weights), nothing else.

    Scanned over the stacked weights, or unrolled over ``per_layer`` weights as the
    engine runs batch-1 decode steps on CPU (engine/model.py's ``forward``)."""
    cfg = model.cfg
    h = model.embed[...][tokens].T  # (D, N)
    w = {k: v[...] for k, v in vars(model.layers).items() if isinstance(v, nnx.Param)}

    def layer(h, w):
        x = rms_norm_features(h, w["input_norm"], cfg.rms_norm_eps)
        q, k, v = w["q_proj"] @ x, w["k_proj"] @ x, w["v_proj"] @ x
        h = h + w["o_proj"] @ (q + jnp.tile(k + v, (q.shape[0] // k.shape[0], 1)))
        x = rms_norm_features(h, w["post_attn_norm"], cfg.rms_norm_eps)
        return h + swiglu_mlp(x, w["gate_proj"], w["up_proj"], w["down_proj"]), None

    if per_layer is None:
        h, _ = jax.lax.scan(layer, h, w)
    else:
        for lw in per_layer:
            h, _ = layer(h, lw)
    h = rms_norm_features(h, model.final_norm[...], cfg.rms_norm_eps)
    head = model.embed[...] if cfg.tie_word_embeddings else model.lm_head[...]
    return jnp.argmax(head @ h, axis=0)


def bare_forward_ms(model, batch: int, iters: int = 20) -> float:
    """Milliseconds a scanned bare step of ``model`` takes at ``batch`` tokens."""
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda state, t: bare_step(nnx.merge(graphdef, state), t))
    tokens = np.ones((batch,), np.int32)
    jax.block_until_ready(step(state, tokens))
    t0 = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(step(state, tokens))
    return (time.perf_counter() - t0) / iters * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    model = load_model(resolve_model_path(args.model_path), make_mesh(1)).model
    graphdef, state = nnx.split(model)
    per_layer = jax.jit(unstack_layers)(model.weights()[1])
    step = jax.jit(lambda state, t, pl: bare_step(nnx.merge(graphdef, state), t, pl))
    for bs in args.batch:
        tokens = np.ones((bs,), np.int32)
        # As the engine does: unrolled at batch 1 on CPU, scanned otherwise.
        forms = [("scan", None)] + ([("unrolled", per_layer)] if bs == 1 else [])
        for form, pl in forms:
            jax.block_until_ready(step(state, tokens, pl))
            t0 = time.perf_counter()
            for _ in range(args.iters):
                jax.block_until_ready(step(state, tokens, pl))
            ms = (time.perf_counter() - t0) / args.iters * 1000
            print(f"bare forward batch {bs:3d} ({form}): {ms:6.1f} ms/step, "
                  f"{bs / ms * 1000:7.1f} tok/s")


if __name__ == "__main__":
    main()
