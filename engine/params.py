"""The engine's parameters on a mesh: their shapes, dtypes and shardings, before any weight.

Shared by the loader (which fills them from weights), the converter (which writes
them to a checkpoint) and the checkpoint restore (which reads them back).
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sgljax.engine.config import ModelConfig, ModelConfigError
from sgljax.engine.mesh import ep_size_of
from sgljax.engine.model import Decoder


def kv_heads_for(cfg: ModelConfig, tp: int) -> int:
    """KV heads the engine stores: the model's, or replicated up to ``tp``."""
    if cfg.num_heads % tp:
        raise ModelConfigError(f"{cfg.num_heads} attention heads do not split over tp={tp}")
    if cfg.num_kv_heads >= tp:
        if cfg.num_kv_heads % tp:
            raise ModelConfigError(f"{cfg.num_kv_heads} KV heads do not split over tp={tp}")
        return cfg.num_kv_heads
    if tp % cfg.num_kv_heads:
        raise ModelConfigError(f"tp={tp} is not a multiple of {cfg.num_kv_heads} KV heads")
    return tp


def check_expert_parallel(cfg: ModelConfig, ep: int) -> None:
    """ep > 1 needs a mixture-of-experts model whose experts split evenly over it."""
    if ep == 1:
        return
    if not cfg.is_moe:
        raise ModelConfigError(f"--ep-size {ep} splits the experts of MoE layers; "
                               f"{cfg.architecture} has none (use --ep-size 1)")
    if cfg.num_experts % ep:
        raise ModelConfigError(f"--ep-size {ep} does not divide the model's "
                               f"{cfg.num_experts} experts")


def abstract_model(cfg: ModelConfig, mesh, dtype, kv_heads: int):
    """A Decoder whose parameters are ShapeDtypeStructs carrying their NamedShardings
    (every path that puts weights on a mesh starts here, so the ep check lives here)."""
    check_expert_parallel(cfg, ep_size_of(mesh))
    with jax.set_mesh(mesh):
        return nnx.eval_shape(lambda: Decoder(cfg, kv_heads=kv_heads, dtype=dtype))


def param_name(key: tuple) -> str:
    """("layers", "q_proj") → "layers.q_proj", the names ``engine_tensors`` yields."""
    return ".".join(str(k) for k in key)


def param_shardings(flat_state: dict, mesh) -> dict[str, NamedSharding]:
    """Engine parameter name → its sharding on ``mesh`` (non-parameter variables left out)."""
    out = {}
    for key, var in flat_state.items():
        if isinstance(var, nnx.Param):
            out[param_name(key)] = NamedSharding(mesh, var.get_value().sharding.spec)
    return out


def divisible_sharding(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """``sharding``, or replicated where an axis does not split evenly over the mesh."""
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    for dim, axis in zip(shape, spec):
        if axis is not None and dim % sharding.mesh.shape[axis]:
            return NamedSharding(sharding.mesh, PartitionSpec())
    return sharding
