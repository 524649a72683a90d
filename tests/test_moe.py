"""Qwen3-MoE and Qwen2-MoE against transformers on tiny random checkpoints, both MoE
backends, TP=2, convert → Orbax, FLOPs of the grouped path, compile discipline, recipes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgljax.engine.config import ModelConfig
from sgljax.engine.convert import convert_model
from sgljax.engine.engine import Engine
from sgljax.engine.mesh import make_mesh
from sgljax.engine.moe import experts_dense, experts_grouped, route, sparse_mlp
from sgljax.engine.params import abstract_model
from sgljax.engine.sampling_params import SamplingParams
from tiny_models import build_tiny_moe_model, hf_greedy, hf_last_logits

LOGPROB_TOL = 2e-4  # float32 both sides, as tests/test_models.py
SMALL = dict(page_size=4, chunked_prefill_size=16, max_running_requests=4, max_prefill_seqs=4,
             context_length=64, max_total_tokens=512)
MODELS = {
    # layer 1 dense (mlp_only_layers): runs sparse, dense, sparse
    "qwen3_moe_e8k2": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2,
                                         norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen3_moe_e16k4": ("qwen3_moe", dict(num_experts=16, num_experts_per_tok=4,
                                          norm_topk_prob=False, num_hidden_layers=2)),
    "qwen2_moe_shared": ("qwen2_moe", dict(num_experts=8, num_experts_per_tok=2,
                                           norm_topk_prob=False, num_hidden_layers=2)),
}
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def _prompts(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 150000, size=int(rng.integers(3, 30))).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {name: build_tiny_moe_model(arch, root / name, **kw)
            for name, (arch, kw) in MODELS.items()}


@pytest.fixture(scope="module")
def references(moe_models):
    prompts = _prompts(3, seed=1)
    return prompts, {name: hf_greedy(path, prompts, GREEDY.max_tokens)
                     for name, path in moe_models.items()}


def _tokens(engine, prompts):
    return [o["token_ids"] for o in engine.generate(prompts, GREEDY)]


def _last_logprobs(engine, ids):
    seq = engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0, logprobs=True,
                                                 top_logprobs=20))
    while not seq.finished:
        engine.step()
    return seq.output_top_logprobs[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_and_logits_match_transformers(name, moe_models, references):
    prompts, ref = references
    for backend in ("dense", "grouped"):
        eng = Engine(model_path=str(moe_models[name]), moe_backend=backend, **SMALL)
        assert _tokens(eng, prompts) == ref[name], backend
        logits = hf_last_logits(moe_models[name], prompts[0]).astype(np.float64)
        want = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        top = _last_logprobs(eng, prompts[0])
        assert [t for t, _ in top] == list(np.argsort(-want)[:20])
        np.testing.assert_allclose([v for _, v in top], want[[t for t, _ in top]],
                                   atol=LOGPROB_TOL)


def test_tp2_equals_tp1(moe_models, references):
    prompts, ref = references
    for name in ("qwen3_moe_e8k2", "qwen2_moe_shared"):
        eng = Engine(model_path=str(moe_models[name]), tp_size=2, **SMALL)
        spec = eng.runner.model.layers.expert_gate_proj[...].sharding.spec
        assert tuple(spec)[:3] == (None, "ep", "tp")  # experts' rows split, not replicated
        assert dict(eng.mesh.shape) == {"ep": 1, "tp": 2}
        assert _tokens(eng, prompts) == ref[name]


def test_convert_then_serve_on_tp2(moe_models, references, tmp_path):
    prompts, ref = references
    for name in ("qwen3_moe_e8k2", "qwen2_moe_shared"):
        out = tmp_path / name
        manifest = convert_model(moe_models[name], out)
        assert manifest["param_count"] == ModelConfig.from_dir(moe_models[name]).param_count()
        for tp in (1, 2):
            assert _tokens(Engine(model_path=str(out), tp_size=tp, **SMALL), prompts) == ref[name]


def _moe_cfg(experts, top_k, hidden=64, inter=32):
    return ModelConfig.from_hf_dict(dict(
        architectures=["Qwen3MoeForCausalLM"], vocab_size=128, hidden_size=hidden,
        intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=inter,
        norm_topk_prob=True))


def _moe_weights(cfg, seed=0):
    k = iter(jax.random.split(jax.random.PRNGKey(seed), 4))
    E, f, d = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    r = lambda shape: jax.random.normal(next(k), shape) * 0.2  # noqa: E731
    # Expert weights as the decoder passes them: every sparse layer's (here one), and
    # this layer's index into them.
    return {"router": r((E, d)), "expert_gate_proj": r((1, E, f, d)),
            "expert_up_proj": r((1, E, f, d)), "expert_down_proj": r((1, E, d, f)),
            "moe_layer": jnp.int32(0)}


def test_backends_agree_on_random_routing():
    cfg = _moe_cfg(16, 4)
    w = _moe_weights(cfg)
    x = jax.random.normal(jax.random.PRNGKey(1), (37, cfg.hidden_size))
    want = sparse_mlp(cfg, w, x, "dense")
    for ragged in (False, True):  # ragged_dot is TPU's grouped matmul; checked here for numerics
        got = sparse_mlp(cfg, w, x, "grouped", use_ragged_dot=ragged)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    experts, weights = route(cfg, x, w["router"])
    batched = experts_grouped(x, w, experts, weights, use_ragged_dot=False, loop=False)
    np.testing.assert_allclose(batched, want, atol=1e-5, rtol=1e-5)


def _expert_flops(cfg, tokens, backend):
    w = _moe_weights(cfg)
    x = jnp.zeros((tokens, cfg.hidden_size))
    experts, weights = route(cfg, x, w["router"])
    if backend == "dense":
        fn = lambda x, e, g: experts_dense(x, w, e, g)  # noqa: E731
    else:
        # The tiles as one batched matmul: XLA's cost analysis counts a loop's body once,
        # so the loop over the same tiles that serving runs would hide its trip count.
        fn = lambda x, e, g: experts_grouped(x, w, e, g, use_ragged_dot=False,  # noqa: E731
                                             loop=False)
    return jax.jit(fn).lower(x, experts, weights).compile().cost_analysis()["flops"]


def test_grouped_flops_grow_with_top_k_not_experts():
    tokens = 64
    e8, e32 = (_expert_flops(_moe_cfg(e, 2), tokens, "grouped") for e in (8, 32))
    assert 0.8 < e32 / e8 < 1.25, (e8, e32)
    k4 = _expert_flops(_moe_cfg(8, 4), tokens, "grouped")
    assert 1.6 < k4 / e8 < 2.5, (e8, k4)
    # The dense reference grows with the experts.
    assert _expert_flops(_moe_cfg(32, 2), tokens, "dense") > 3 * e32


def test_no_compiles_after_warmup(moe_models, tmp_path):
    eng = Engine(model_path=str(moe_models["qwen3_moe_e8k2"]), compilation_cache_dir=str(tmp_path),
                 **SMALL)
    assert eng.warmup() == len(eng.plan.all_shapes())
    for n in (1, 3, 4):
        eng.generate(_prompts(n, seed=n), SamplingParams(max_tokens=5, temperature=0.7, seed=n))
    assert eng.compiles_since_warmup() == 0


def _config_from_recipe(shape) -> dict:
    """The HF config.json of a recipe's model (Qwen3-MoE: every layer sparse)."""
    return dict(
        architectures=["Qwen3MoeForCausalLM"], vocab_size=shape.vocab, hidden_size=shape.hidden,
        intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, num_experts=shape.experts,
        num_experts_per_tok=shape.experts_per_token, moe_intermediate_size=shape.moe_intermediate,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        tie_word_embeddings=shape.tie_embeddings)


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "qwen3-235b-a22b"])
def test_recipe_weight_bytes_count_every_expert(name):
    from sgljax.cli import recipes as R
    from sgljax.cli.slices import GIB, catalogue, parse_slice

    recipe = R.load_recipe(name)
    cfg = ModelConfig.from_hf_dict(_config_from_recipe(recipe.shape))
    mesh = make_mesh(1, devices=jax.devices()[:1])
    model = abstract_model(cfg, mesh, jnp.bfloat16, cfg.num_kv_heads)  # shapes only
    stored = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert stored == cfg.param_count()
    assert abs(stored - recipe.shape.params) / stored < 0.001, (stored, recipe.shape.params)
    plan = R.plan_serving(recipe, parse_slice(R.fitting_slices(recipe, catalogue())[0]))
    planned = plan.weights_gib_per_chip * plan.tp_size * GIB  # bytes over all chips
    assert planned == pytest.approx(stored * 2, rel=0.001)


def test_folder_recipe_counts_experts(moe_models):
    from sgljax.cli.recipes import recipe_from_folder

    path = moe_models["qwen2_moe_shared"]
    cfg = ModelConfig.from_dir(path)
    assert recipe_from_folder(path).shape.params == cfg.param_count()
    assert cfg.param_count() > ModelConfig.from_hf_dict(
        {**_config_json(path), "num_experts": 1}).param_count()


def _config_json(path):
    import json
    return json.loads((path / "config.json").read_text())


def test_compile_time_does_not_grow_with_depth(tmp_path):
    import time

    times = {}
    for layers in (2, 16):  # a dense first layer, then sparse ones: two scans either way
        path = build_tiny_moe_model("qwen3_moe", tmp_path / f"l{layers}",
                                    num_hidden_layers=layers, mlp_only_layers=[0])
        eng = Engine(model_path=str(path), enable_compilation_cache=False, **SMALL)
        t0 = time.perf_counter()
        eng.runner.warmup_shape(2, 2, 8)
        times[layers] = time.perf_counter() - t0
    print(f"one bucket compiles in {times[2]:.2f} s at 2 layers, {times[16]:.2f} s at 16")
    assert times[16] < 3 * times[2] + 5
