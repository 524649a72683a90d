"""Expert parallelism (--ep-size): the experts split over a mesh axis give the tokens of
one device, on tiny random Qwen3-MoE and Qwen2-MoE (shared expert) checkpoints, both MoE
backends, ep=2, ep=4 and ep=2 × tp=2 over forced CPU devices; convert → Orbax → serve
on ep meshes; no compiles after warmup; two processes; the flag's checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sgljax.engine.args import EngineArgs
from sgljax.engine.config import ModelConfigError
from sgljax.engine.convert import convert_model
from sgljax.engine.engine import Engine
from sgljax.engine.mesh import MeshError, make_mesh
from sgljax.engine.moe import EXPERT_SPECS, EXPERT_TENSORS, sparse_mlp
from sgljax.engine.sampling_params import SamplingParams
from test_moe import _moe_cfg, _moe_weights
from tiny_models import build_tiny_moe_model

SMALL = dict(page_size=4, chunked_prefill_size=16, max_running_requests=4, max_prefill_seqs=4,
             context_length=64, max_total_tokens=512)
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
MODELS = {  # 8 experts: ep=4 leaves each shard two
    "qwen3_moe": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                    mlp_only_layers=[1])),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                                    num_hidden_layers=2)),
}
LAYOUTS = [(2, 1), (4, 1), (2, 2)]  # (ep, tp)


def _prompts(n=3, seed=5):
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 150000, size=int(rng.integers(3, 30))).tolist() for _ in range(n)]


def _tokens(engine, prompts):
    return [o["token_ids"] for o in engine.generate(prompts, GREEDY)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep")
    return {name: build_tiny_moe_model(arch, root / name, **kw)
            for name, (arch, kw) in MODELS.items()}


@pytest.fixture(scope="module")
def ep1_tokens(models):
    return {name: _tokens(Engine(model_path=str(path), **SMALL), _prompts())
            for name, path in models.items()}


# -- the MoE block alone ---------------------------------------------------------------

def _place(w, mesh):
    return {n: jax.device_put(v, NamedSharding(mesh, P(*EXPERT_SPECS[n]) if n in EXPERT_SPECS
                                               else P())) for n, v in w.items()}


@pytest.mark.parametrize("skewed", [False, True])
def test_moe_block_over_ep_equals_one_device(skewed):
    """Random routing, and routing where every token picks the same shard's experts: a
    capacity of tokens / ep per shard would drop most of them there."""
    cfg = _moe_cfg(16, 4)
    w = _moe_weights(cfg)
    if skewed:  # experts 0-3 (all on ep shard 0) win every token's top 4
        w["router"] = w["router"].at[:4].add(50.0 * jnp.sign(w["router"][:4]))
    x = jax.random.normal(jax.random.PRNGKey(1), (37, cfg.hidden_size))
    if skewed:
        x = jnp.abs(x)
        w["router"] = w["router"].at[:4].set(jnp.abs(w["router"][:4]) + 1.0)
    want = sparse_mlp(cfg, w, x, "dense")
    for ep, tp in LAYOUTS:
        mesh = make_mesh(tp, ep_size=ep)
        placed = _place(w, mesh)
        for backend, ragged in (("dense", False), ("grouped", False), ("grouped", True)):
            with jax.set_mesh(mesh):
                got = jax.jit(lambda w, x: sparse_mlp(cfg, w, x, backend,
                                                      use_ragged_dot=ragged))(placed, x)
            np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5,
                                       err_msg=f"ep={ep} tp={tp} {backend} ragged={ragged}")
    if skewed:  # the case is what it says: every assignment on shard 0's experts
        from sgljax.engine.moe import route
        assert int(route(cfg, x, w["router"])[0].max()) < 4


# -- the engine ----------------------------------------------------------------------------

def _expert_shard_shape(engine):
    return engine.runner.model.layers.expert_gate_proj[...].addressable_shards[0].data.shape


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("backend", ["dense", "grouped"])
def test_ep_layouts_equal_ep1(name, backend, models, ep1_tokens):
    cfg_e = MODELS[name][1]["num_experts"]
    for ep, tp in LAYOUTS:
        eng = Engine(model_path=str(models[name]), ep_size=ep, tp_size=tp, moe_backend=backend,
                     **SMALL)
        spec = tuple(eng.runner.model.layers.expert_down_proj[...].sharding.spec)
        assert spec[:4] == (None, "ep", None, "tp"), spec
        shape = _expert_shard_shape(eng)
        assert shape[1] == cfg_e // ep and shape[2] == 32 // tp, shape  # each device: its experts
        assert dict(eng.mesh.shape) == {"ep": ep, "tp": tp}
        assert _tokens(eng, _prompts()) == ep1_tokens[name], (ep, tp, backend)


def test_convert_then_serve_on_ep_meshes(models, ep1_tokens, tmp_path):
    for name in MODELS:
        out = tmp_path / name
        convert_model(models[name], out)
        for ep, tp in ((2, 1), (2, 2)):
            eng = Engine(model_path=str(out), ep_size=ep, tp_size=tp, **SMALL)
            for tensor in EXPERT_TENSORS:  # restored straight onto their ep sharding
                arr = getattr(eng.runner.model.layers, tensor)[...]
                assert tuple(arr.sharding.spec)[:2] == (None, "ep"), tensor
                assert arr.addressable_shards[0].data.shape[1] == 8 // ep
            assert _tokens(eng, _prompts()) == ep1_tokens[name], (name, ep, tp)
    # Written in tp=2 chunks, restored onto a mesh of another shape (ep=4, tp=1).
    out = tmp_path / "tp2"
    convert_model(models["qwen3_moe"], out, tp_size=2)
    eng = Engine(model_path=str(out), ep_size=4, **SMALL)
    assert eng.runner.model.layers.expert_up_proj[...].addressable_shards[0].data.shape[1] == 2
    assert _tokens(eng, _prompts()) == ep1_tokens["qwen3_moe"]


def test_no_compiles_after_warmup_with_ep(models, tmp_path):
    eng = Engine(model_path=str(models["qwen2_moe"]), ep_size=2, tp_size=2,
                 compilation_cache_dir=str(tmp_path), **SMALL)
    assert eng.warmup() == len(eng.plan.all_shapes())
    for n in (1, 3, 4):
        eng.generate(_prompts(n, seed=n), SamplingParams(max_tokens=5, temperature=0.7, seed=n))
    assert eng.compiles_since_warmup() == 0


# -- checks ------------------------------------------------------------------------------

def test_ep_size_checks(models, tiny_models):
    with pytest.raises(ValueError, match="--ep-size must be at least 1"):
        EngineArgs(ep_size=0)
    with pytest.raises(MeshError, match=r"--ep-size 4 and --tp-size 2 need 8 devices \(ep x tp\); "
                                        "4 visible"):
        make_mesh(2, ep_size=4)
    with pytest.raises(ModelConfigError, match="--ep-size 3 does not divide the model's 8"):
        Engine(model_path=str(models["qwen3_moe"]), ep_size=3, **SMALL)
    with pytest.raises(ModelConfigError, match="--ep-size 2 splits the experts of MoE layers; "
                                               "Qwen3ForCausalLM has none"):
        Engine(model_path=str(tiny_models["qwen3"]), ep_size=2, **SMALL)


@pytest.mark.parametrize("flags, message", [
    (["--ep-size", "4", "--tp-size", "2"], "--ep-size 4 and --tp-size 2 need 8 devices"),
    (["--ep-size", "2", "--model-path", "DENSE"], "--ep-size 2 splits the experts of MoE layers"),
    (["--ep-size", "0"], "--ep-size must be at least 1"),
])
def test_cli_bad_ep_is_one_line(flags, message, tiny_models):
    from test_cli import _sgljax

    flags = [str(tiny_models["qwen3"]) if f == "DENSE" else f for f in flags]
    out = _sgljax("generate", *flags, "--max-total-tokens", "512", "hi")
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], out.stderr
