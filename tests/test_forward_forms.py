"""The decoder's forms compute the same step: scanned over stacked weights, unrolled
over per-layer weights (the runner uses it for batch-1 decodes without a matmul
kernel), and scanned over weights with q/k/v and gate/up fused (with a matmul kernel)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgljax.engine.batch import StepBatch
from sgljax.engine.config import ModelConfig
from sgljax.engine.mesh import make_mesh
from sgljax.engine.model import Decoder, forward
from sgljax.engine.weight_forms import fuse_projections, unstack_layers
from tiny_models import tiny_config

PAGE = 4


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_unrolled_and_fused_equal_scanned(arch):
    cfg = ModelConfig.from_hf_dict({**tiny_config(arch, vocab_size=512), "architectures": [
        {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "llama": "LlamaForCausalLM"}[arch]]})
    with jax.set_mesh(make_mesh(1)):
        model = Decoder(cfg, rngs=nnx.Rngs(3))
    top, stacked = model.weights()
    pages, kvh, hd = 12, cfg.num_kv_heads, cfg.head_dim
    rng = np.random.default_rng(0)
    cache = lambda: jnp.asarray(  # noqa: E731
        rng.standard_normal((cfg.num_layers, pages, kvh, PAGE, hd)).astype(np.float32))
    k_cache, v_cache = cache(), cache()
    # One ragged step of two sequences: a 5-token chunk after 3 cached tokens and a
    # 1-token decode at 9, then two padding tokens.
    tokens = np.array([7, 8, 9, 10, 11, 12, 0, 0], np.int32)
    positions = np.array([3, 4, 5, 6, 7, 9, 0, 0], np.int32)
    table = np.array([[1, 2, 0], [3, 4, 5]], np.int32)
    seq = np.array([0, 0, 0, 0, 0, 1, 0, 0])
    slots = table[seq, positions // PAGE] * PAGE + positions % PAGE
    slots[6:] = 0
    batch = StepBatch(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(slots),
                      jnp.asarray(table), jnp.asarray([0, 5, 6], jnp.int32),
                      jnp.asarray([8, 10], jnp.int32), jnp.int32(2),
                      jnp.asarray([4, 5], jnp.int32), jnp.asarray([-1, -1], jnp.int32))
    run = jax.jit(lambda layers, k, v: forward(cfg, kvh, top, layers, batch, k, v))
    scanned = run(stacked, k_cache, v_cache)
    unrolled = run(unstack_layers(stacked), k_cache, v_cache)
    fused_weights = fuse_projections(stacked)
    assert "qkv_proj" in fused_weights and "q_proj" not in fused_weights
    fused = run(fused_weights, k_cache, v_cache)
    for other in (unrolled, fused):
        for a, b in zip(scanned, other):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # And the step did something: the written cache differs from the one passed in.
    assert not np.allclose(np.asarray(scanned[1]), np.asarray(k_cache))
