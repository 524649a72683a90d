"""`sgljax up` and friends without a cloud: rendered tasks (checked by SkyPilot when it is
reachable), per-host command lines, the pipeline runner, and the fast no-credentials exit."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sgljax.cli import recipes as R
from sgljax.cli import sky_client, sky_task
from sgljax.cli.pipeline import HostEnv, PipelineError, Step, run_steps
from sgljax.cli.slices import catalogue

PY = sys.executable
BUCKET = "gs://sgljax-test/ckpt"


def sky_reachable() -> bool:
    try:
        sky_client.backend()
        return True
    except sky_client.SkyUnavailable:
        return False


needs_sky = pytest.mark.skipif(not sky_reachable(), reason="SkyPilot not installed here "
                               "(set SGLJAX_SKY_PYTHON to an interpreter with skypilot==0.14.1)")


def cli(*args, env=None, timeout=120):
    full = {**os.environ, **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.run([PY, "-m", "sgljax.cli.main", *args], env=full, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.perf_counter() - t0


def render_matrix():
    """Every recipe on every catalogue slice: a task, or the refusal."""
    out = {}
    for name in R.available():
        recipe = R.load_recipe(name)
        for sl in catalogue():
            try:
                plan = R.plan_serving(recipe, sl)
            except R.DoesNotFit as e:
                out[name, sl.name] = e
                continue
            storage, _ = sky_task.plan_storage(recipe, plan.dtype, bucket=BUCKET)
            out[name, sl.name] = sky_task.render_task(recipe, sl, plan, storage, bucket=BUCKET)
    return out


@pytest.fixture(scope="module")
def matrix():
    return render_matrix()


def test_matrix_renders_or_refuses_with_a_reason(matrix):
    slices = {sl.name: sl for sl in catalogue()}
    assert len(matrix) == len(R.available()) * len(slices)
    for (name, sl_name), result in matrix.items():
        sl = slices[sl_name]
        if isinstance(result, R.DoesNotFit):
            assert result.kind in ("memory", "sharding"), (name, sl_name, result)
            if result.kind == "memory":
                assert "GiB" in str(result) and "per chip" in str(result)
            continue
        res = result["resources"]
        assert res["accelerators"] == f"tpu-{sl_name}"
        assert res["accelerator_args"]["runtime_version"] == sl.runtime_version
        assert res["ports"] == [30000] and result["num_nodes"] == 1
        envs = result["envs"]
        assert (envs["SGLJAX_MODEL"], envs["SGLJAX_SLICE"]) == (name, sl_name)
        assert envs["SGLJAX_HOSTS"] == str(sl.hosts) and envs["SGLJAX_STORAGE"] == "bucket"
        assert result["file_mounts"]["/sgljax-ckpt"]["source"] == BUCKET
    # Spot checks that the matrix is not trivially all-refused or all-accepted.
    assert isinstance(matrix["qwen3-235b-a22b", "v5litepod-8"], R.DoesNotFit)
    assert matrix["qwen3-235b-a22b", "v5litepod-8"].kind == "memory"
    assert matrix["qwen3-235b-a22b", "v6e-16"]["envs"]["SGLJAX_HOSTS"] == "4"
    assert matrix["qwen3-32b", "v6e-8"]["envs"]["SGLJAX_HOSTS"] == "1"
    assert matrix["smollm2-135m", "v5p-16"].kind == "sharding"


@needs_sky
def test_skypilot_accepts_every_rendered_task(matrix):
    tasks = {k: v for k, v in matrix.items() if isinstance(v, dict)}
    t0 = time.perf_counter()
    results = sky_client.validate(list(tasks.values()))
    print(f"\nSkyPilot validated {len(tasks)} tasks in {time.perf_counter() - t0:.1f} s")
    for (name, sl_name), result in zip(tasks, results):
        assert result["ok"], (name, sl_name, result)
        assert result["accelerators"] == {f"tpu-{sl_name}": 1}
        assert result["num_nodes"] == 1 and result["ports"] == ["30000"]
        assert result["envs"]["SGLJAX_MODEL"] == name


@needs_sky
def test_skypilot_rejects_a_broken_task(matrix):
    task = dict(matrix["qwen3-8b", "v6e-8"], resources={"acceleratorz": "tpu-v6e-8"})
    result = sky_client.validate([task])[0]
    assert not result["ok"] and "accelerators" in result["error"]


def test_disk_arithmetic_picks_storage():
    r32, r235 = R.load_recipe("qwen3-32b"), R.load_recipe("qwen3-235b-a22b")
    assert sky_task.plan_storage(R.load_recipe("qwen3-8b"), "bfloat16")[0].mode == "local"
    storage, account = sky_task.plan_storage(r32, "bfloat16")  # 61 + 61 + 25 > 100 GiB
    assert storage.mode == "hf" and "147 GiB of 100 GiB" in account
    with pytest.raises(R.DoesNotFit, match="--bucket") as e:
        sky_task.plan_storage(r235, "bfloat16")
    assert e.value.kind == "disk"
    storage, _ = sky_task.plan_storage(r235, "bfloat16", bucket=BUCKET)
    assert storage.mode == "bucket" and storage.must_exist


def test_dry_run_prints_a_valid_task():
    proc, seconds = cli("up", "v6e-8", "qwen3-32b", "--dry-run", "--env", "HF_TOKEN=hf_secret")
    assert proc.returncode == 0, proc.stderr
    task = yaml.safe_load(proc.stdout)  # the host commands that follow are comments
    assert task["resources"]["accelerators"] == "tpu-v6e-8"
    assert task["resources"]["accelerator_args"]["runtime_version"] == "v2-alpha-tpuv6e"
    assert task["secrets"] == {"HF_TOKEN": "<set>"} and "hf_secret" not in proc.stdout
    assert "exec ~/sgljax-venv/bin/sgljax host-run" in task["run"]
    assert "weights 7.6 GiB" in proc.stderr and "tp 8" in proc.stderr
    assert "--tp-size 8" in proc.stdout and "--nnodes" not in proc.stdout  # one host
    if sky_reachable():
        assert "validated by SkyPilot" in proc.stderr
        task["secrets"]["HF_TOKEN"] = ""
        assert sky_client.validate([task])[0]["ok"]
    print(f"\ndry run: {seconds:.2f} s")


def test_up_refuses_with_memory_arithmetic_and_suggestions():
    proc, _ = cli("up", "v5litepod-8", "qwen3-235b-a22b", "--dry-run")
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: qwen3-235b-a22b on v5litepod-8") and "54.7 GiB per chip" in line
    assert "it fits" in line and "v6e-16" in line and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,error", [
    (["up", "v6e-8"], "which model"),
    (["up", "v6e-8", "qwen3-8b", "--bucket", "s3://x"], "gs://"),
    (["up", "v6e-8", "qwen3-8b", "--env", "NOEQUALS"], "KEY=VALUE"),
    (["up", "v7x-8", "qwen3-8b"], "generation"),
    (["up", "v6e-8", "/"], "is a folder on this machine"),
    (["up", "v6e-8", "qwen3-8b", "--tp-size", "3"], "do not split over tp=3"),
])
def test_bad_up_arguments_are_one_line_errors(args, error):
    proc, _ = cli(*args, "--dry-run")
    assert proc.returncode == 1 and error in proc.stderr and "Traceback" not in proc.stderr


def test_no_credentials_fails_fast_with_one_line(tmp_path):
    env = {"HOME": str(tmp_path), "SKYPILOT_API_SERVER_ENDPOINT": "", "GOOGLE_APPLICATION_CREDENTIALS": ""}
    proc, seconds = cli("up", "v6e-8", "qwen3-32b", env=env)
    print(f"\nno-credentials failure: {seconds:.2f} s (SkyPilot {'found' if sky_reachable() else 'absent'})")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    if sky_reachable():
        assert "sky check" in last
    else:
        assert "SkyPilot is not installed" in last
    assert seconds < 60


def test_cloud_access_check(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("SKYPILOT_API_SERVER_ENDPOINT", "GOOGLE_APPLICATION_CREDENTIALS",
                "SGLJAX_SKIP_CLOUD_CHECK", "SKYPILOT_GLOBAL_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text("#!/bin/sh\n")
    (bin_dir / "gcloud").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(sky_client.SkyUnavailable, match="application-default login"):
        sky_client.check_cloud_access("gcp")
    adc = tmp_path / ".config/gcloud/application_default_credentials.json"
    adc.parent.mkdir(parents=True)
    adc.write_text("{}")
    sky_client.check_cloud_access("gcp")  # ADC + gcloud: let SkyPilot take it from here
    adc.unlink()
    (tmp_path / ".sky").mkdir()
    (tmp_path / ".sky/config.yaml").write_text("api_server:\n  endpoint: http://sky.example:46580\n")
    sky_client.check_cloud_access("gcp")  # a remote API server holds the credentials


def test_sky_interpreter_found_from_the_sky_command(tmp_path, monkeypatch):
    fake = tmp_path / "sky"
    fake.write_text(f"#!{PY}\nprint('sky')\n")
    fake.chmod(0o755)
    monkeypatch.delenv("SGLJAX_SKY_PYTHON", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert sky_client.external_python() == PY


def host_env(rank, **extra):
    return {"SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.1\n",
            "SKYPILOT_NUM_NODES": "2", **extra}


def test_host_run_two_ranks_build_the_multi_host_command_lines(tmp_path):
    ckpt = tmp_path / "ckpt"
    base = {"SGLJAX_MODEL": "qwen3-0.6b", "SGLJAX_SLICE": "v5p-16", "SGLJAX_STORAGE": "bucket",
            "SGLJAX_CHECKPOINT": str(ckpt), "SGLJAX_DOWNLOAD_DIR": str(tmp_path / "hf"),
            "SGLJAX_PORT": "30000"}
    full = {**os.environ, **base}
    procs = [subprocess.Popen([PY, "-m", "sgljax.cli.main", "host-run", "--dry-run"],
                              env={**full, **host_env(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    engine = ["--tp-size", "8", "--dtype", "bfloat16", "--page-size", "64",
              "--chunked-prefill-size", "2048", "--max-running-requests", "128",
              "--context-length", "32768", "--max-total-tokens", "4194304",
              "--precompile-bs-paddings", "1,2,4,8,16,32,64,128",
              "--precompile-token-paddings", "256,512,1024,2048"]
    for rank, (out, err) in enumerate(outs):
        lines = out.splitlines()
        serve = lines[-1].split()
        assert serve == ["exec", PY, "-m", "sgljax.cli.main", "serve", "--model-path", str(ckpt),
                         "--host", "0.0.0.0", "--port", "30000", *engine,
                         "--reasoning-parser", "qwen3", "--tool-call-parser", "qwen25",
                         "--nnodes", "2",
                         "--node-rank", str(rank), "--dist-init-addr", "127.0.0.1:8476"]
        warmup = lines[lines.index("# warmup") + 1].split()
        assert warmup[3] == "warmup" and warmup[-6:] == [
            "--nnodes", "2", "--node-rank", str(rank), "--dist-init-addr", "127.0.0.1:8477"]
        assert f"host {rank}/2 of v5p-16" in err
    rank0, rank1 = outs[0][0], outs[1][0]
    assert "# fetch" in rank0 and f"convert {tmp_path / 'hf'} {ckpt} --dtype bfloat16 --tp-size 8" in rank0
    assert "# convert" not in rank1 and f"wait {ckpt}/sgljax-ready.json" in rank1


def test_host_run_local_slice_from_a_model_folder(tmp_path):
    from tiny_models import tiny_config

    model = tmp_path / "tiny-qwen3"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**tiny_config("qwen3"),
                                                   "architectures": ["Qwen3ForCausalLM"]}))
    env = {"SGLJAX_MODEL": str(model), "SGLJAX_SLICE": "local", "SGLJAX_CHECKPOINT": str(tmp_path / "c")}
    procs = [cli("host-run", "--dry-run", "--port", "31234", env={**env, **host_env(r)})[0]
             for r in (0, 1)]
    assert [p.returncode for p in procs] == [0, 0], procs[1].stderr
    # Both processes share this machine's disk: rank 0 converts, rank 1 waits for it.
    assert f"convert {model} {tmp_path / 'c'} --dtype float32 --tp-size 2" in procs[0].stdout
    assert "# convert" not in procs[1].stdout and "# wait" in procs[1].stdout
    proc = procs[1]
    assert proc.stdout.splitlines()[-1].endswith(
        "--host 127.0.0.1 --port 31234 --tp-size 2 --dtype float32 --page-size 16 "
        "--chunked-prefill-size 512 --max-running-requests 16 --context-length 1024 "
        "--max-total-tokens 16384 --precompile-bs-paddings 1,2,4,8,16 "
        "--precompile-token-paddings 32,64,128,256,512 --nnodes 2 --node-rank 1 "
        "--dist-init-addr 127.0.0.1:8476")


@pytest.mark.parametrize("env,error", [
    ({"SKYPILOT_NODE_RANK": "2"}, "outside 0..1"),
    ({"SKYPILOT_NUM_NODES": "3"}, "lists 2 IPs"),
    ({"SGLJAX_SLICE": "v6e-16"}, "v6e-16 has 4 hosts but SkyPilot reports 2"),
])
def test_host_run_bad_environment(env, error):
    proc, _ = cli("host-run", "--dry-run", env={"SGLJAX_MODEL": "qwen3-0.6b", "SGLJAX_SLICE": "v5p-16",
                                                **host_env(0), **env})
    assert proc.returncode == 1 and error in proc.stderr and "Traceback" not in proc.stderr


def test_up_local_dry_run_uses_the_default_model():
    proc, _ = cli("up", "local", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line for line in lines if line.startswith("# ")] == [
        "# convert", "# mark", "# warmup", "# serve"]
    assert " convert smollm2-135m " in proc.stdout
    assert "--host 127.0.0.1 --port 30000 --tp-size 1 --dtype float32" in lines[-1]


def test_up_local_failing_step_is_one_line(tmp_path):
    # convert of a missing folder fails (today `convert` is not a command yet: exit 2).
    proc, _ = cli("up", "local", "--source", str(tmp_path / "missing"),
                  env={"SGLJAX_CACHE_DIR": str(tmp_path)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: convert failed (exit ")
    assert "warmup:" not in proc.stderr  # the pipeline stopped at the failing step


def test_host_env_defaults_to_one_local_node():
    assert HostEnv.from_environ({}) == HostEnv(0, ("127.0.0.1",))
    assert HostEnv.from_environ({"SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6", "SKYPILOT_NODE_RANK": "1"}
                                ).coordinator(8476) == "10.0.0.5:8476"


def step(label, code, **kw):
    return Step(label, (PY, "-c", code), **kw)


def test_run_steps_reuses_a_finished_conversion(tmp_path):
    marker = tmp_path / "ck" / "sgljax-ready.json"
    info = {"model": "m", "source": "s", "dtype": "float32"}
    log = tmp_path / "log"
    steps = [step("convert", f"open({str(log)!r}, 'a').write('convert ')"),
             Step("mark", kind="mark", path=marker, info=info),
             step("warmup", f"open({str(log)!r}, 'a').write('warmup ')")]
    run_steps(steps, log=lambda m: None)
    run_steps(steps, log=lambda m: None)
    assert log.read_text() == "convert warmup warmup "
    marker.write_text(json.dumps({**info, "dtype": "bfloat16"}))
    with pytest.raises(PipelineError, match="holds a conversion of"):
        run_steps(steps, log=lambda m: None)


def test_run_steps_converts_again_over_an_older_format(tmp_path):
    """A conversion in an older checkpoint layout is replaced, not served or refused."""
    from sgljax.engine.checkpoint_format import FORMAT_VERSION, MANIFEST_FILE

    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    (ckpt / MANIFEST_FILE).write_text(json.dumps({"format": FORMAT_VERSION - 1}))
    info = {"model": "m", "source": "s", "dtype": "float32", "format": FORMAT_VERSION}
    marker = ckpt / "sgljax-ready.json"
    marker.write_text(json.dumps({**info, "format": FORMAT_VERSION - 1}))
    log = tmp_path / "log"
    steps = [step("convert", f"open({str(log)!r}, 'a').write('convert ')"),
             Step("mark", kind="mark", path=marker, info=info)]
    run_steps(steps, log=lambda m: None)
    assert log.read_text() == "convert "
    assert not (ckpt / MANIFEST_FILE).exists()  # the old folder went before converting
    assert json.loads(marker.read_text()) == info


def test_run_steps_trusts_a_finished_convert_output_without_marker(tmp_path):
    ckpt = tmp_path / "ck"
    ckpt.mkdir()  # what `sgljax convert` leaves once it renames OUTPUT.partial
    info = {"model": "m", "source": "s", "dtype": "float32"}
    marker = ckpt / "sgljax-ready.json"
    steps = [step("convert", "raise SystemExit(9)"), Step("mark", kind="mark", path=marker, info=info)]
    run_steps(steps, log=lambda m: None)  # convert skipped, marker written for the followers
    assert json.loads(marker.read_text()) == info
    marker.unlink()
    run_steps([Step("require", kind="require", path=marker, info=info)], log=lambda m: None)
    with pytest.raises(PipelineError, match="gave up"):  # followers need the marker itself
        run_steps([Step("wait", kind="wait", path=marker, info=info)], wait_timeout_s=0,
                  poll_s=0, log=lambda m: None)


def test_run_steps_failures_are_named(tmp_path):
    with pytest.raises(PipelineError, match="convert failed \\(exit 3\\)"):
        run_steps([step("convert", "raise SystemExit(3)")], log=lambda m: None)
    info = {"model": "m", "source": "s", "dtype": "float32"}
    with pytest.raises(PipelineError, match="gave up after 0 s"):
        run_steps([Step("wait", kind="wait", path=tmp_path / "x", info=info)],
                  wait_timeout_s=0, poll_s=0, log=lambda m: None)
    with pytest.raises(PipelineError, match="convert it elsewhere"):
        run_steps([Step("require", kind="require", path=tmp_path / "none" / "x", info=info)],
                  log=lambda m: None)


def test_run_steps_execs_the_last_step(tmp_path):
    script = ("from sgljax.cli.pipeline import Step, run_steps; import sys; "
              "run_steps([Step('serve', (sys.executable, '-c', 'print(\"serving\")'), kind='exec')]); "
              "print('not reached')")
    proc = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "serving"


def test_templates_exist_for_every_generation():
    gens = {sl.generation for sl in catalogue()}
    for gen in gens:
        assert (sky_task.TEMPLATES / f"{gen}.yaml").is_file()
    common = yaml.safe_load((sky_task.TEMPLATES / "common.yaml").read_text())
    assert "host-run" in common["run"] and "jax[tpu]" in common["setup"]


def test_installs_this_source_tree_as_the_workdir():
    spec, workdir = sky_task.install_spec()
    assert spec == "." and workdir == Path(sky_task.__file__).resolve().parent.parent


@pytest.fixture
def fake_sky(tmp_path):
    """An interpreter standing in for SkyPilot's: records each bridge request."""
    record = tmp_path / "requests.jsonl"
    fake = tmp_path / "fake-sky-python"
    fake.write_text(f"""#!{PY}
import json, sys
op, req = sys.argv[2], json.load(sys.stdin)
open({str(record)!r}, "a").write(json.dumps({{"op": op, **req}}) + "\\n")
if op == "validate":
    print(json.dumps([{{"ok": True}} for _ in req["configs"]]))
sys.exit(7 if op == "status" else 0)
""")
    fake.chmod(0o755)
    env = {"SGLJAX_SKY_PYTHON": str(fake), "SGLJAX_SKIP_CLOUD_CHECK": "1"}
    return env, lambda: [json.loads(line) for line in record.read_text().splitlines()]


def test_up_launches_through_skypilot(fake_sky):
    env, requests = fake_sky
    proc, _ = cli("up", "v6e-16", "qwen3-8b", "--spot", "--detach", "--cluster", "mine",
                  "--port", "8080", "--no-warmup", env=env)
    assert proc.returncode == 0, proc.stderr
    validate, launch = requests()
    assert validate["op"] == "validate" and validate["configs"][0] == launch["config"]
    assert (launch["op"], launch["cluster"], launch["port"], launch["detach"]) == (
        "launch", "mine", 8080, True)
    task = launch["config"]
    assert task["resources"]["use_spot"] is True and task["resources"]["ports"] == [8080]
    assert task["envs"]["SGLJAX_PORT"] == "8080" and task["envs"]["SGLJAX_HOSTS"] == "4"
    # The hosts see what `up` was told: host-run with the task's envs plans the same way.
    host = {**task["envs"], "SKYPILOT_NODE_RANK": "3", "SKYPILOT_NUM_NODES": "4",
            "SKYPILOT_NODE_IPS": "10.0.0.1\n10.0.0.2\n10.0.0.3\n10.0.0.4"}
    proc, _ = cli("host-run", "--dry-run", env=host)
    assert proc.returncode == 0, proc.stderr
    assert "# warmup" not in proc.stdout and "--port 8080 --tp-size 16" in proc.stdout
    assert proc.stdout.rstrip().endswith("--nnodes 4 --node-rank 3 --dist-init-addr 10.0.0.1:8476")


def test_down_status_logs_go_to_skypilot(fake_sky):
    env, requests = fake_sky
    assert cli("down", env=env)[0].returncode == 0
    assert cli("logs", "mine", "--no-follow", env=env)[0].returncode == 0
    assert cli("status", env=env)[0].returncode == 7  # SkyPilot's exit code comes through
    assert requests() == [{"op": "down", "cluster": None},
                          {"op": "logs", "cluster": "mine", "follow": False},
                          {"op": "status"}]
