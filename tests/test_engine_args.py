"""Engine flags are declared once (EngineArgs) and every command takes the same ones.

Nothing here loads a model or starts JAX: ``serve`` is stopped at ``run_server`` and
``warmup`` at its warm-record check, both of which get the parsed EngineArgs.
"""

import dataclasses
import subprocess
import sys
import types

import pytest
import typer
from typer.testing import CliRunner

from sgljax.cli import engine_options as eo
from sgljax.cli import recipes as R
from sgljax.cli.main import app
from sgljax.cli.pipeline import HostEnv, dist_flags, engine_flags
from sgljax.cli.slices import catalogue, local_slice
from sgljax.engine import warm_record
from sgljax.engine.args import EngineArgs
from sgljax.engine.buckets import plan_buckets

COMMANDS = ("serve", "warmup", "generate")  # every command that builds an Engine


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)  # "proxy" there selects Pathways
    monkeypatch.delenv("JAX_BACKEND_TARGET", raising=False)


@pytest.fixture
def parse(monkeypatch):
    """``parse(command, *flags)`` → the EngineArgs that command would run with."""
    seen = []

    def run_server(engine_args, server_args, progress=None):
        seen.append(engine_args)

    fake_app = types.ModuleType("sgljax.server.app")
    fake_app.run_server = run_server
    monkeypatch.setitem(sys.modules, "sgljax.server.app", fake_app)
    monkeypatch.setattr(warm_record, "is_warm", lambda args: seen.append(args) or True)

    def parse(command, *flags):
        seen.clear()
        result = CliRunner().invoke(app, [command, *flags])
        assert result.exit_code == 0, result.output
        assert len(seen) == 1
        return seen[0]

    return parse


SETTINGS = [
    [],
    ["--new-seqs-per-prefill", "3"],
    ["--new-seqs-per-prefill", "3", "--max-prefill-seqs", "16", "--max-running-requests", "24",
     "--chunked-prefill-size", "256", "--page-size", "32", "--context-length", "2048",
     "--kv-cache-dtype", "float16", "--schedule-policy", "lpm", "--disable-radix-cache"],
    ["--precompile-bs-paddings", "1,8,32,64", "--precompile-token-paddings", "64,512",
     "--max-prefill-tokens", "512", "-m", "/models/x", "--disable-compilation-cache"],
]


@pytest.mark.parametrize("flags", SETTINGS, ids=lambda f: " ".join(f) or "defaults")
def test_serve_and_warmup_plan_the_same_buckets(parse, flags):
    served, warmed = parse("serve", *flags), parse("warmup", *flags)
    assert served == warmed
    assert (plan_buckets(served, served.context_length).all_shapes()
            == plan_buckets(warmed, warmed.context_length).all_shapes())


def test_token_paddings_change_the_buckets(parse):
    """Why warmup must take the flag: without it, it compiled another set of shapes."""
    default, some = parse("warmup"), parse("warmup", "--precompile-token-paddings", "64,512")
    assert plan_buckets(default, 4096).all_shapes() != plan_buckets(some, 4096).all_shapes()


def test_warmup_model_argument_is_the_model_path(parse):
    assert parse("warmup", "/models/a").model_path == "/models/a"
    assert parse("warmup", "/models/a", "--model-path", "/models/b").model_path == "/models/b"


def test_flags_reach_engine_args(parse):
    args = parse("serve", "--page-size", "32", "--precompile-bs-paddings", "1,4, 16",
                 "--disable-overlap-schedule", "--disable-compilation-cache",
                 "--max-prefill-tokens", "128", "--random-seed", "7")
    assert (args.page_size, args.precompile_bs_paddings, args.disable_overlap_schedule,
            args.enable_compilation_cache, args.chunked_prefill_size, args.random_seed) == (
        32, [1, 4, 16], True, False, 128, 7)
    assert parse("serve") == EngineArgs()


def test_generate_only_changes_a_default():
    command = typer.main.get_command(app).commands["generate"]
    param = next(p for p in command.params if p.name == "max_running_requests")
    assert param.default == 16 and EngineArgs().max_running_requests == 64


@pytest.mark.parametrize("kwargs, message", [
    ({"schedule_policy": "random"}, "--schedule-policy must be one of fcfs, lpm"),
    ({"dtype": "float16"}, "--dtype must be one of float32, bfloat16"),
    ({"page_size": 0}, "--page-size must be at least 1"),
    ({"new_seqs_per_prefill": 0}, "--new-seqs-per-prefill must be at least 1"),
    ({"mem_fraction_static": 1.0}, "--mem-fraction-static must be in (0, 1)"),
    ({"precompile_bs_paddings": [0, 4]}, "--precompile-bs-paddings must list"),
    ({"node_rank": 2, "nnodes": 2, "dist_init_addr": "h:1"}, "--node-rank must be in 0..1"),
    ({"nnodes": 2}, "--nnodes > 1 needs --dist-init-addr"),
    ({"dist_init_addr": "nohost"}, "--dist-init-addr must be HOST:PORT"),
])
def test_engine_args_checks(kwargs, message):
    with pytest.raises(ValueError) as e:
        EngineArgs(**kwargs)
    assert message in str(e.value)


BAD_VALUES = [
    (["--schedule-policy", "random"], "--schedule-policy must be one of fcfs, lpm"),
    (["--dtype", "float16"], "--dtype must be one of float32, bfloat16"),
    (["--kv-cache-dtype", "int8"], "--kv-cache-dtype must be one of"),
    (["--page-size", "0"], "--page-size must be at least 1"),
    (["--tp-size", "0"], "--tp-size must be at least 1"),
    (["--context-length", "0"], "--context-length must be at least 1"),
    (["--max-running-requests", "-1"], "--max-running-requests must be at least 1"),
    (["--max-prefill-tokens", "0"], "--chunked-prefill-size must be at least 1"),
    (["--max-total-tokens", "0"], "--max-total-tokens must be at least 1"),
    (["--new-seqs-per-prefill", "0"], "--new-seqs-per-prefill must be at least 1"),
    (["--mem-fraction-static", "0"], "--mem-fraction-static must be in (0, 1)"),
    (["--mem-fraction-static", "1.5"], "--mem-fraction-static must be in (0, 1)"),
    (["--precompile-bs-paddings", "1,x"], "--precompile-bs-paddings expects integers"),
    (["--precompile-token-paddings", "0,64"], "--precompile-token-paddings must list"),
    (["--nnodes", "2"], "--nnodes > 1 needs --dist-init-addr"),
    (["--device", "npu"], "--device must be one of"),
    (["--device-discovery-timeout", "-1"], "--device-discovery-timeout must be >= 0"),
]


@pytest.mark.parametrize("flags, message", BAD_VALUES, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else "")
def test_bad_values_are_one_line_before_anything_loads(flags, message, monkeypatch):
    def run_server(*a, **k):
        raise AssertionError("the server started")

    fake_app = types.ModuleType("sgljax.server.app")
    fake_app.run_server = run_server
    monkeypatch.setitem(sys.modules, "sgljax.server.app", fake_app)
    result = CliRunner().invoke(app, ["serve", *flags])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_bad_value_from_the_real_command():
    out = subprocess.run([sys.executable, "-m", "sgljax.cli.main", "serve", "--schedule-policy",
                          "random"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip() == "error: --schedule-policy must be one of fcfs, lpm, not 'random'"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_is_a_flag(command):
    params = {p.name: p for p in typer.main.get_command(app).commands[command].params}
    for f in dataclasses.fields(EngineArgs):
        assert f.name in params, f"{command} lacks the flag for {f.name}"
        assert eo.flags(f.name)[0] in params[f.name].opts + params[f.name].secondary_opts
        assert f.metadata.get("help"), f"{f.name} has no help"


def test_commands_take_the_same_engine_flags():
    commands = typer.main.get_command(app).commands

    def engine_opts(name):
        return {p.name: (tuple(p.opts), p.help) for p in commands[name].params
                if p.name in eo.FIELDS}

    assert engine_opts("serve") == engine_opts("warmup") == engine_opts("generate")


def _plans():
    local = local_slice(devices_per_host=1)
    for name in R.available():
        recipe = R.load_recipe(name)
        for sl in (*catalogue(), local):
            try:
                yield name, sl, R.plan_serving(recipe, sl)
            except R.DoesNotFit:
                continue


def test_pipeline_flags_all_parse(parse):
    plans = list(_plans())
    assert plans
    checked = set()
    for name, sl, plan in plans:
        flags = engine_flags(plan)
        if tuple(flags) in checked:
            continue
        checked.add(tuple(flags))
        host = HostEnv(1, ("10.0.0.1", "10.0.0.2")) if sl.hosts > 1 else HostEnv()
        for command in ("serve", "warmup"):
            args = parse(command, *flags, *dist_flags(host, 8476))
            for f in dataclasses.fields(plan):
                if f.name in eo.FIELDS:
                    value = getattr(args, f.name)
                    assert (tuple(value) if isinstance(value, list) else value) == \
                        getattr(plan, f.name), (name, sl.name, f.name)


def test_to_flags_round_trips(parse):
    args = EngineArgs(page_size=8, disable_radix_cache=True, enable_compilation_cache=False,
                      precompile_token_paddings=[16, 64], schedule_policy="lpm")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
    assert parse("serve", *eo.to_flags(values)) == args
    with pytest.raises(KeyError):
        eo.to_flags({"weights_gib_per_chip": 1.0})
