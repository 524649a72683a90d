"""The sparse MoE block of Qwen3-MoE and Qwen2-MoE, as transformers defines it.

router linear → softmax (float32) → top-k → optional renormalisation of the k weights
(``norm_topk_prob``) → the weighted sum of the chosen experts' SwiGLU MLPs; Qwen2-MoE
adds an always-on shared expert scaled by sigmoid(shared_expert_gate · x).

Two backends compute the experts (``moe_backend``), both with static shapes under jit
and neither ever dropping a token (no capacity factor):

- ``dense``: every expert on every token, weighted by the routing (zero for the
  experts a token did not pick). Work grows with tokens × experts: the reference.
- ``grouped``: the tokens × top_k assignments sorted by expert and multiplied as
  grouped matmuls, so work grows with tokens × top_k. On TPU that is
  ``jax.lax.ragged_dot``. XLA:CPU expands ragged_dot over every group (its cost
  analysis counts tokens × top_k × experts), so elsewhere the sorted rows are padded
  per expert to tiles of ``tile_rows`` rows, each tile multiplied by its one expert's
  weights (a loop over the tiles): at most tokens × top_k + experts × (tile - 1) rows
  of work, under 2 × tokens × top_k.

Activations here are token-major (tokens, hidden). Expert weights come whole, every
sparse layer's stacked: (L_moe, E, out, in), with ``w["moe_layer"]`` this layer's
index into them, so the grouped loop reads one expert's matrix where it lies; a
scan's per-layer slice of them would be copied every step on XLA:CPU (at batch 1
that copy made the step 3x slower).

Expert parallelism (a mesh ``ep`` axis over 1, engine/mesh.py): the expert axis E of
the expert weights is split over ``ep`` (``EXPERT_SPECS``), their FFN dim over ``tp``.
The tokens of a step are on every ep shard already (the layers around the MoE block
are replicated over ep), so dispatch needs no all-to-all: inside a ``shard_map`` each
shard takes the assignments routed to its own experts (ids outside its range count
as absent: zero in the dense mix, a trailing group the grouped path never computes),
runs its backend on them, and one ``psum`` over (ep, tp) adds the shards' partial
outputs. Static shapes are sized for the case where every assignment lands on one
shard, so no capacity limit exists and no token is dropped; the grouped loop runs only
the tiles the routing filled, so a shard's work follows its own assignments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.lax import RaggedDotDimensionNumbers, ragged_dot_general
from jax.sharding import PartitionSpec as P

from sgljax.engine.config import ModelConfig
from sgljax.engine.mesh import EP, TP, ep_size_of

MOE_BACKENDS = ("dense", "grouped")
EXPERT_TENSORS = ("expert_gate_proj", "expert_up_proj", "expert_down_proj")
# (L_moe, E, out, in): experts over ep; gate/up rows and down columns over tp, as dense MLPs.
EXPERT_SPECS = {"expert_gate_proj": (None, EP, TP, None),
                "expert_up_proj": (None, EP, TP, None),
                "expert_down_proj": (None, EP, None, TP)}


def _experts(w: dict, name: str, expert=None) -> jax.Array:
    """This layer's weights ``name`` of every expert (E, out, in), or of ``expert``."""
    if expert is None:
        return w[name][w["moe_layer"]]
    return w[name][w["moe_layer"], expert]


def _meet(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x and w in x's dtype, x rounded through w's first: ``weight_forms.dense``'s numerics
    (bfloat16 weights meet float32 activations in bfloat16, products summed in float32)."""
    if w.dtype == x.dtype:
        return x, w
    return x.astype(w.dtype).astype(x.dtype), w.astype(x.dtype)


def _linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (N, in) @ w (out, in).T."""
    x, w = _meet(x, w)
    return x @ w.T


def route(cfg: ModelConfig, x: jax.Array, router: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(top-k expert ids (N, k) int32, their weights (N, k) in x's dtype)."""
    logits = _linear(x, router)  # (N, E), in the model's dtype as in HF
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, cfg.experts_per_token)
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return experts.astype(jnp.int32), weights.astype(x.dtype)


def _swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    return jax.nn.silu(gate) * up


def experts_dense(x: jax.Array, w: dict, experts: jax.Array, weights: jax.Array) -> jax.Array:
    """Every expert on every token; the routing weights (zero off the top k) mix them."""
    num_experts = w["expert_gate_proj"].shape[1]
    mix = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=x.dtype) * weights[..., None],
                  axis=1)  # (N, E)
    xg, gate_w = _meet(x, _experts(w, "expert_gate_proj"))
    xu, up_w = _meet(x, _experts(w, "expert_up_proj"))
    act = _swiglu(jnp.einsum("nd,efd->enf", xg, gate_w), jnp.einsum("nd,efd->enf", xu, up_w))
    act, down_w = _meet(act, _experts(w, "expert_down_proj"))
    out = jnp.einsum("enf,edf->end", act, down_w)
    return jnp.einsum("end,ne->nd", out, mix)


def tile_rows(assignments: int, num_experts: int) -> int:
    """Rows per tile of the CPU grouped path: about assignments / experts (a power of two),
    so the padding (< experts × tile rows) stays below the assignments themselves while
    few tiles (each reading one expert's weights) cover them."""
    per_expert = max(1, assignments // num_experts)
    return 1 << (per_expert.bit_length() - 1)


def _ragged(rows: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """rows (A, in) sorted by expert, w (E, out, in) → (A, out): row i times its group's w."""
    rows, w = _meet(rows, w)
    dims = RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])),
                                     lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
    return ragged_dot_general(rows, w, group_sizes, dims)


def experts_grouped(x: jax.Array, w: dict, experts: jax.Array, weights: jax.Array,
                    use_ragged_dot: bool, loop: bool = True, shards: int = 1) -> jax.Array:
    """Each token's k experts only: assignments sorted by expert, grouped matmuls.

    ``experts`` may hold ids outside 0..E-1 (E: the experts ``w`` holds): assignments to
    experts of other ep shards, which add nothing here. ``shards``: how many ep shards
    split the model's experts (sizes the tiles for the assignments one shard expects)."""
    n, k = experts.shape
    num_experts = w["expert_gate_proj"].shape[1]
    flat = experts.reshape(n * k)
    here = (flat >= 0) & (flat < num_experts)
    group = jnp.where(here, flat, num_experts)  # absent ones: one last group, never computed
    order = jnp.argsort(group, stable=True)  # assignment ids, grouped by expert
    token = order // k
    counts = jnp.bincount(group, length=num_experts + 1)[:num_experts]
    rows = x[token]  # (A, D)
    if use_ragged_dot:  # rows past sum(counts) come out zero (and are masked below)
        act = _swiglu(_ragged(rows, _experts(w, "expert_gate_proj"), counts),
                      _ragged(rows, _experts(w, "expert_up_proj"), counts))
        out = _ragged(act, _experts(w, "expert_down_proj"), counts)
    else:
        out = _grouped_tiles(rows, w, group[order], counts, here[order], loop, shards)
    # Back to assignment order, then each token's k outputs weighted and summed.
    unsorted = jnp.zeros_like(out).at[order].set(out).reshape(n, k, -1)
    unsorted = jnp.where(here.reshape(n, k, 1), unsorted, 0)
    return jnp.einsum("nkd,nk->nd", unsorted, weights)


def _tile_mlp(tile: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """One expert's SwiGLU on a feature-major tile (in, rows) → (out, rows): weights on
    the left, as the dense layers run (engine/layers.py)."""
    (tg, gate), (tu, up) = _meet(tile, gate), _meet(tile, up)
    act, down = _meet(_swiglu(gate @ tg, up @ tu), down)
    return down @ act


def _grouped_tiles(rows: jax.Array, w: dict, sorted_expert: jax.Array, counts: jax.Array,
                   here: jax.Array, loop: bool = True, shards: int = 1) -> jax.Array:
    """The experts' MLPs on ``rows`` (sorted by expert; ``here`` false for the trailing
    rows of other shards' experts, which get zeros), by tiles of one expert each.

    ``loop``: a loop over the tiles the routing filled (a dynamic trip count: on an ep
    shard, the tiles of its own assignments only), each reading its expert's weights
    where they lie. Without it, one batched matmul over every tile's gathered weights:
    the same tiles and products, which XLA's cost analysis can count (it counts a
    loop's body once), but 5-15x slower on XLA:CPU (64 experts of 256 → 128, 112 tiles
    of 4 rows: 45 against 3 ms), which runs batched dots of small matrices poorly."""
    assignments, num_experts = rows.shape[0], counts.shape[0]
    tile = tile_rows(assignments // shards, num_experts)
    num_tiles = (assignments + num_experts * (tile - 1)) // tile  # the most any routing needs
    tiles_per_expert = (counts + tile - 1) // tile
    tile_end = jnp.cumsum(tiles_per_expert)
    group_start = jnp.cumsum(counts) - counts
    local = jnp.minimum(sorted_expert, num_experts - 1)
    rank = jnp.arange(assignments) - group_start[local]
    # Rows of other shards' experts point past the end: dropped on the way in, zero out.
    padded_row = jnp.where(here, (tile_end - tiles_per_expert)[local] * tile + rank,
                           num_tiles * tile)
    padded = jnp.zeros((num_tiles * tile, rows.shape[1]), rows.dtype).at[padded_row].set(
        rows, mode="drop")
    # Tiles past the last expert's hold zeros: any expert gives silu(0) * 0 = 0 there.
    tile_expert = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(num_tiles), side="right"),
                              num_experts - 1)
    tiles = padded.reshape(num_tiles, tile, -1).transpose(0, 2, 1)  # (tiles, in, rows)
    weights = lambda e: [_experts(w, n, e) for n in EXPERT_TENSORS]  # noqa: E731
    if loop:
        tile_mlp = lambda i: _tile_mlp(tiles[i], *weights(tile_expert[i]))  # noqa: E731
        # The carry's zeros take a tile's type: inside a shard_map that says it varies
        # over ep and tp, as the products written into it do (a loop keeps one type).
        # Only its shape is used, so XLA computes no tile for it.
        zeros = jnp.zeros_like(tile_mlp(0))
        out = jax.lax.fori_loop(  # tile_end[-1]: the tiles in use; the rest stay zero
            0, tile_end[-1],
            lambda i, out: out.at[i].set(tile_mlp(i)),
            jnp.broadcast_to(zeros, (num_tiles, *zeros.shape)))
    else:
        out = jax.vmap(_tile_mlp)(tiles, *weights(tile_expert))
    return out.transpose(0, 2, 1).reshape(num_tiles * tile, -1).at[padded_row].get(
        mode="fill", fill_value=0)


def shared_expert(x: jax.Array, w: dict) -> jax.Array:
    """Qwen2-MoE's shared expert, scaled by its sigmoid gate."""
    act = _swiglu(_linear(x, w["shared_gate_proj"]), _linear(x, w["shared_up_proj"]))
    return jax.nn.sigmoid(_linear(x, w["shared_expert_gate"])) * _linear(act, w["shared_down_proj"])


def _routed(x: jax.Array, w: dict, experts: jax.Array, weights: jax.Array, backend: str,
            use_ragged_dot: bool, shards: int = 1) -> jax.Array:
    """The routed experts' weighted sum on x, by ``backend``."""
    if backend == "dense":
        return experts_dense(x, w, experts, weights)
    if backend == "grouped":
        return experts_grouped(x, w, experts, weights, use_ragged_dot, shards=shards)
    raise ValueError(f"moe_backend must be one of {', '.join(MOE_BACKENDS)}, not {backend!r}")


def _expert_parallel(mesh, x: jax.Array, w: dict, experts: jax.Array, weights: jax.Array,
                     backend: str, use_ragged_dot: bool) -> jax.Array:
    """``_routed`` with the experts split over ``ep`` (see the module doc)."""
    shards = ep_size_of(mesh)

    def local(x, experts, weights, layer, expert_w):
        mine = expert_w["expert_gate_proj"].shape[1]  # this shard's experts: a contiguous run
        first = jax.lax.axis_index(EP) * mine
        out = _routed(x, {**expert_w, "moe_layer": layer}, experts - first, weights, backend,
                      use_ragged_dot, shards)
        # Over ep: each shard's experts; over tp: each device's slice of the FFN dim.
        return jax.lax.psum(out, (EP, TP))

    expert_w = {name: w[name] for name in EXPERT_TENSORS}
    return jax.shard_map(local, mesh=mesh, out_specs=P(),
                         in_specs=(P(), P(), P(), P(),
                                   {name: P(*EXPERT_SPECS[name]) for name in EXPERT_TENSORS}),
                         )(x, experts, weights, w["moe_layer"], expert_w)


def sparse_mlp(cfg: ModelConfig, w: dict, x: jax.Array, backend: str,
               use_ragged_dot: bool | None = None) -> jax.Array:
    """The MoE block on token-major x (N, D) → (N, D).

    ``use_ragged_dot`` (grouped backend): None picks it on TPU only (see the module doc).
    Under a mesh whose ``ep`` axis is over 1 (``jax.set_mesh``), the experts run expert
    parallel."""
    if backend not in MOE_BACKENDS:
        raise ValueError(f"moe_backend must be one of {', '.join(MOE_BACKENDS)}, not {backend!r}")
    if use_ragged_dot is None:
        use_ragged_dot = jax.default_backend() == "tpu"
    experts, weights = route(cfg, x, w["router"])
    mesh = jax.sharding.get_abstract_mesh()
    if ep_size_of(mesh) > 1:
        out = _expert_parallel(mesh, x, w, experts, weights, backend, use_ragged_dot)
    else:
        out = _routed(x, w, experts, weights, backend, use_ragged_dot)
    if cfg.shared_expert_intermediate_size:
        out = out + shared_expert(x, w)
    return out
