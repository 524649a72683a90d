"""Recipes, the slice catalogue and the memory arithmetic (no SkyPilot, no network)."""

import json
import shutil

import pytest

from sgljax.cli import recipes as R
from sgljax.cli.slices import GIB, SliceError, catalogue, local_slice, parse_slice

REQUIRED = {"smollm2-135m", "qwen3-0.6b", "qwen3-8b", "qwen3-32b", "qwen3-30b-a3b",
            "qwen3-235b-a22b", "qwen3-asr-1.7b", "llama-3.1-8b"}


def test_all_required_recipes_exist_and_load():
    assert REQUIRED <= set(R.available())
    for name in R.available():
        r = R.load_recipe(name)
        assert r.name == name and "/" in r.hf_repo and r.dtype in R.DTYPE_BYTES


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_params_formula_matches_published_count(name):
    r = R.load_recipe(name)
    formula = r.shape.formula_params(r.qk_norm)
    assert abs(formula - r.shape.params) / r.shape.params < 0.005, (formula, r.shape.params)


def test_moe_active_params():
    assert R.load_recipe("qwen3-30b-a3b").shape.active_params / 1e9 == pytest.approx(3.35, abs=0.01)
    assert R.load_recipe("qwen3-235b-a22b").shape.active_params / 1e9 == pytest.approx(22.19, abs=0.01)
    dense = R.load_recipe("qwen3-8b").shape
    assert dense.active_params == dense.params


@pytest.mark.parametrize("name,chips,hosts,runtime", [
    ("v5litepod-4", 4, 1, "v2-alpha-tpuv5-lite"), ("v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"), ("v5p-8", 4, 1, "v2-alpha-tpuv5"),
    ("v5p-16", 8, 2, "v2-alpha-tpuv5"), ("v5p-128", 64, 16, "v2-alpha-tpuv5"),
    ("v6e-1", 1, 1, "v2-alpha-tpuv6e"), ("v6e-8", 8, 1, "v2-alpha-tpuv6e"),
    ("v6e-16", 16, 4, "v2-alpha-tpuv6e"), ("v6e-256", 256, 64, "v2-alpha-tpuv6e"),
])
def test_slice_topology(name, chips, hosts, runtime):
    sl = parse_slice(name)
    assert (sl.chips, sl.hosts, sl.runtime_version) == (chips, hosts, runtime)
    assert sl.accelerator == f"tpu-{name}"


def test_slice_aliases_and_errors():
    assert parse_slice("v5e-8").name == "v5litepod-8"
    assert parse_slice("TPU-v6e-8").name == "v6e-8"
    with pytest.raises(SliceError, match="sizes"):
        parse_slice("v6e-12")
    with pytest.raises(SliceError, match="generation"):
        parse_slice("v9x-8")
    with pytest.raises(SliceError, match="unknown slice"):
        parse_slice("big")
    assert {sl.hbm_gib_per_chip for sl in catalogue()} == {16, 32, 95}


def test_memory_refusal_shows_the_arithmetic():
    r, sl = R.load_recipe("qwen3-235b-a22b"), parse_slice("v5litepod-8")
    with pytest.raises(R.DoesNotFit) as e:
        R.plan_serving(r, sl)
    assert e.value.kind == "memory"
    per_chip = 235093634560 * 2 / GIB / 8  # bf16 weights over tp 8
    assert per_chip > 16
    msg = str(e.value)
    assert "437.9 GiB" in msg and f"= {per_chip:.1f} GiB per chip" in msg and "> 16 GiB" in msg


def test_kv_room_refusal_when_weights_fit_but_no_request_does():
    with pytest.raises(R.DoesNotFit, match="leaves .* < one 16,384-token request") as e:
        R.plan_serving(R.load_recipe("qwen3-235b-a22b"), parse_slice("v5litepod-32"))
    assert e.value.kind == "memory"


def test_explicit_kv_pool_that_does_not_fit():
    with pytest.raises(R.DoesNotFit, match=r"\+ KV 100,000,000 tokens"):
        R.plan_serving(R.load_recipe("qwen3-8b"), parse_slice("v6e-8"), max_total_tokens=10**8)


def test_auto_kv_pool_fills_the_room_and_fits():
    r, sl = R.load_recipe("qwen3-32b"), parse_slice("v6e-8")
    p = R.plan_serving(r, sl)
    assert p.tp_size == 8 and p.max_total_tokens % p.page_size == 0
    total = p.weights_gib_per_chip + p.kv_gib_per_chip + p.reserve_gib_per_chip
    assert total <= sl.hbm_gib_per_chip
    per_token = 64 * 2 * 1 * 128 * 2 / GIB  # 8 KV heads over 8 chips: one head per chip
    assert sl.hbm_gib_per_chip - total < per_token * p.page_size  # filled to the last page
    assert p.max_total_tokens >= p.context_length


def test_kv_heads_are_replicated_up_to_tp():
    p = R.plan_serving(R.load_recipe("qwen3-235b-a22b"), parse_slice("v6e-16"))
    assert p.tp_size == 16
    # 4 KV heads stored as 16 (one per chip): 94 layers x K,V x 1 head x 128 x 2 bytes
    assert p.kv_gib_per_chip / p.max_total_tokens == pytest.approx(94 * 2 * 128 * 2 / GIB)
    assert p.context_length == 16384  # the recipe's v6e-16 override


def test_overrides_merge_generation_then_slice():
    r = R.load_recipe("llama-3.1-8b")
    assert R.plan_serving(r, parse_slice("v5p-8")).context_length == 131072
    assert R.plan_serving(r, parse_slice("v5litepod-8")).chunked_prefill_size == 1024
    assert R.plan_serving(r, parse_slice("v6e-8")).context_length == 32768


def test_sharding_refusals():
    with pytest.raises(R.DoesNotFit, match="spans 4 hosts") as e:
        R.plan_serving(R.load_recipe("smollm2-135m"), parse_slice("v6e-16"))
    assert e.value.kind == "sharding"
    with pytest.raises(R.DoesNotFit, match="32 attention heads / 8 KV heads do not split over tp=64"):
        R.plan_serving(R.load_recipe("qwen3-8b"), parse_slice("v6e-64"))


def test_every_recipe_fits_somewhere_in_the_catalogue():
    for name in REQUIRED:
        assert R.fitting_slices(R.load_recipe(name), catalogue()), name


@pytest.fixture
def recipe_dir(tmp_path, monkeypatch):
    shutil.copy(R.RECIPES_DIR / "qwen3-8b.yaml", tmp_path / "qwen3-8b.yaml")
    monkeypatch.setattr(R, "RECIPES_DIR", tmp_path)
    return tmp_path


@pytest.mark.parametrize("edit,error", [
    (lambda t: t.replace("name: qwen3-8b", "name: other"), "differs from the file name"),
    (lambda t: t.replace("dtype: bfloat16", "dtype: int3"), "dtype"),
    (lambda t: t.replace("  page_size: 64", "  page_sise: 64"), "unknown serving keys"),
    (lambda t: t.replace("  layers: 36\n", ""), "missing or wrong field"),
    (lambda t: t.replace("max_running_requests: 128", "max_running_requests: 512"),
     "precompile_bs_paddings 128 < max_running_requests 512"),
    (lambda t: t.replace("context_length: 32768", "context_length: 99999"), "context_length 99999"),
])
def test_bad_recipes_are_refused_clearly(recipe_dir, edit, error):
    path = recipe_dir / "qwen3-8b.yaml"
    path.write_text(edit(path.read_text()))
    with pytest.raises(R.RecipeError, match=error):
        R.plan_serving(R.load_recipe("qwen3-8b"), parse_slice("v6e-8"))


def test_unknown_recipe_lists_the_choices():
    with pytest.raises(R.RecipeError, match="qwen3-8b"):
        R.load_recipe("gpt-5")


def test_recipe_from_a_model_folder(tmp_path):
    from tiny_models import tiny_config

    (tmp_path / "config.json").write_text(json.dumps(
        {**tiny_config("qwen3"), "architectures": ["Qwen3ForCausalLM"]}))
    r = R.load_recipe(str(tmp_path))
    assert r.shape.heads == 4 and r.shape.kv_heads == 2 and r.shape.params > 0
    p = R.plan_serving(r, local_slice(devices_per_host=1, hosts=2, memory_gib=8))
    assert p.tp_size == 2 and p.dtype == "float32" and p.context_length == 1024
