"""``sgljax up / down / status / logs / host-run``: put a model on a TPU slice with SkyPilot.

``up SLICE MODEL`` plans the serving settings (refusing with the memory arithmetic
when the model cannot fit), renders the SkyPilot task, validates it with SkyPilot,
and launches it. ``up local [MODEL]`` runs the same per-host pipeline here.
``host-run`` is what the task's ``run`` executes on every host.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import typer

from sgljax.cli.errors import user_errors
from sgljax.cli.pipeline import (DEFAULT_DIST_PORT, DEFAULT_PORT, HostEnv, PipelineError, Storage,
                                 build_steps, describe, run_steps)
from sgljax.cli.recipes import DEFAULT_MODEL, DoesNotFit, fitting_slices, load_recipe, plan_serving
from sgljax.cli.slices import catalogue, local_slice, parse_slice
from sgljax.engine.cache_paths import cache_root

BUCKET = re.compile(r"gs://[a-z0-9][-_.a-z0-9]*(/.*)?")


def _plan(recipe, sl, **overrides):
    """plan_serving, with the slices that would fit added to a refusal."""
    try:
        return plan_serving(recipe, sl, **overrides)
    except DoesNotFit as e:
        if sl.is_local:
            raise
        fits = fitting_slices(recipe, catalogue())
        hint = f"; it fits {', '.join(fits)}" if fits else ""
        raise DoesNotFit(e.kind, f"{e}{hint}") from None


def _up_local(model: str, port: int, tp_size: Optional[int], source: Optional[str],
              dry_run: bool, warmup: bool) -> None:
    recipe = load_recipe(model)
    sl = local_slice(devices_per_host=tp_size or 1)
    plan = _plan(recipe, sl, tp_size=tp_size or 1)
    src = source or recipe.local_source or recipe.hf_repo
    root = cache_root()
    storage = Storage("local", src, root / "hf" / recipe.name,
                      root / "checkpoints" / f"{recipe.name}-{plan.dtype}")
    steps = build_steps(recipe, plan, HostEnv(), storage, port=port, bind_host="127.0.0.1",
                        warmup=warmup)
    typer.echo(f"{recipe.name} here: {plan.memory_line()}", err=True)
    if dry_run:
        typer.echo(describe(steps))
        return
    try:
        run_steps(steps)
    except PipelineError as e:
        raise ValueError(str(e)) from None


def up(
    slice_name: str = typer.Argument(..., metavar="SLICE",
                                     help="TPU slice (v6e-8, v5litepod-16, v5p-16, ...) or `local`."),
    model: Optional[str] = typer.Argument(None, help="Recipe name (see recipes/), e.g. qwen3-32b."),
    cluster: Optional[str] = typer.Option(None, "--cluster", "-c", help="Cluster name."),
    spot: bool = typer.Option(False, "--spot", help="Use spot (preemptible) TPUs."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the task (or local steps) only."),
    port: int = typer.Option(DEFAULT_PORT, "--port"),
    env: list[str] = typer.Option([], "--env", help="KEY=VALUE for the task (repeatable)."),
    bucket: Optional[str] = typer.Option(None, "--bucket",
                                         help="gs:// bucket (mounted on every host) for the converted checkpoint."),
    source: Optional[str] = typer.Option(None, "--source", help="Weights: HF repo id or local folder."),
    infra: str = typer.Option("gcp", "--infra", help="SkyPilot infra, e.g. gcp/us-east5."),
    detach: bool = typer.Option(False, "--detach", help="Return after launching; no log tail."),
    tp_size: Optional[int] = typer.Option(None, "--tp-size", help="Override the recipe's tp size."),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup"),
) -> None:
    """Serve MODEL on a TPU SLICE with SkyPilot (or on this machine: `up local [MODEL]`)."""
    from sgljax.cli import sky_client, sky_task

    with user_errors():
        if slice_name.strip().lower() == "local":
            _up_local(model or DEFAULT_MODEL, port, tp_size, source, dry_run, warmup)
            return
        if model is None:
            raise ValueError("which model? `sgljax up SLICE MODEL`, e.g. `sgljax up v6e-8 qwen3-8b`")
        if bucket and not BUCKET.fullmatch(bucket):
            raise ValueError(f"--bucket {bucket!r}: expected gs://BUCKET[/PATH]")
        if Path(model).expanduser().is_dir():
            raise ValueError(f"{model} is a folder on this machine; serve it with `sgljax up local "
                             f"{model}`, or put it in a bucket and pass --bucket/--source")
        recipe, sl = load_recipe(model), parse_slice(slice_name)
        plan = _plan(recipe, sl, tp_size=tp_size)
        storage, disk = sky_task.plan_storage(recipe, plan.dtype, bucket=bucket, source=source)
        envs = sky_task.parse_envs(env)
        if "HF_TOKEN" not in envs and os.environ.get("HF_TOKEN"):
            envs["HF_TOKEN"] = os.environ["HF_TOKEN"]  # gated repos (Llama) need it on the hosts
        # host-run plans again from recipe + slice; these carry what `up` changed.
        if tp_size is not None:
            envs["SGLJAX_TP_SIZE"] = str(tp_size)
        if not warmup:
            envs["SGLJAX_WARMUP"] = "false"
        name = cluster or sky_task.default_cluster_name(recipe, sl)
        task = sky_task.render_task(recipe, sl, plan, storage, port=port, spot=spot, infra=infra,
                                    envs=envs, bucket=bucket, name=name)
        typer.echo(f"{sl.describe()}\n{recipe.name}: {plan.memory_line()}\n{disk}", err=True)
        if dry_run:
            try:
                result = sky_client.validate([task])[0]
            except sky_client.SkyUnavailable as e:
                typer.echo(f"(not validated: {e})", err=True)
            else:
                if not result["ok"]:
                    raise ValueError(f"SkyPilot rejects the task: {result['error']}")
                typer.echo("(validated by SkyPilot's sky.Task)", err=True)
            # stdout stays valid YAML (`> task.yaml; sky launch task.yaml` works): the
            # per-host commands follow as comments.
            typer.echo(sky_task.to_yaml(sky_task.masked(task)))
            for rank in sorted({0, sl.hosts - 1}):
                host = HostEnv(rank, tuple(f"HOST{i}_IP" for i in range(sl.hosts)))
                steps = build_steps(recipe, plan, host, storage, port=port, warmup=warmup,
                                    python="python")
                typer.echo(f"# ---- host rank {rank} of {sl.hosts} runs (python = "
                           "~/sgljax-venv/bin/python):")
                typer.echo("\n".join(f"#   {line}" for line in describe(steps).splitlines()))
            return
        try:
            sky_client.backend()
            sky_client.check_cloud_access(infra)
            result = sky_client.validate([task])[0]
        except sky_client.SkyUnavailable as e:
            raise ValueError(str(e)) from None
        if not result["ok"]:
            raise ValueError(f"SkyPilot rejects the task: {result['error']}")
        code = _sky("launch", config=task, cluster=name, port=port, detach=detach)
        raise typer.Exit(code)


def _sky(op: str, infra: str = "gcp", **request) -> int:
    from sgljax.cli import sky_client

    try:
        sky_client.backend()
        sky_client.check_cloud_access(infra)
        return sky_client.call(op, **request)
    except sky_client.SkyUnavailable as e:
        raise ValueError(str(e)) from None


def down(cluster: Optional[str] = typer.Argument(None, help="Cluster (default: the only sgljax-* one).")) -> None:
    """Tear down a cluster started by `sgljax up`."""
    with user_errors():
        raise typer.Exit(_sky("down", cluster=cluster))


def status() -> None:
    """List SkyPilot clusters."""
    with user_errors():
        raise typer.Exit(_sky("status"))


def logs(cluster: Optional[str] = typer.Argument(None, help="Cluster (default: the only sgljax-* one)."),
         follow: bool = typer.Option(True, "--follow/--no-follow")) -> None:
    """Stream the server's log from a cluster."""
    with user_errors():
        raise typer.Exit(_sky("logs", cluster=cluster, follow=follow))


def host_run(
    model: str = typer.Option(..., "--model", envvar="SGLJAX_MODEL"),
    slice_name: str = typer.Option("local", "--slice", envvar="SGLJAX_SLICE"),
    port: int = typer.Option(DEFAULT_PORT, "--port", envvar="SGLJAX_PORT"),
    storage_mode: str = typer.Option("local", "--storage", envvar="SGLJAX_STORAGE"),
    source: Optional[str] = typer.Option(None, "--source", envvar="SGLJAX_SOURCE"),
    download_dir: Optional[str] = typer.Option(None, "--download-dir", envvar="SGLJAX_DOWNLOAD_DIR"),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", envvar="SGLJAX_CHECKPOINT"),
    must_exist: bool = typer.Option(False, "--checkpoint-must-exist/--convert-if-missing",
                                    envvar="SGLJAX_CHECKPOINT_MUST_EXIST"),
    dist_port: int = typer.Option(DEFAULT_DIST_PORT, "--dist-port", envvar="SGLJAX_DIST_PORT"),
    local_devices: int = typer.Option(1, "--local-devices", envvar="SGLJAX_LOCAL_DEVICES",
                                      help="Devices per host for --slice local."),
    tp_size: Optional[int] = typer.Option(None, "--tp-size", envvar="SGLJAX_TP_SIZE"),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup", envvar="SGLJAX_WARMUP"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print this host's commands only."),
) -> None:
    """Run convert → warmup → serve on this host of a slice (SkyPilot's `run` calls this)."""
    with user_errors():
        try:
            host = HostEnv.from_environ()
        except PipelineError as e:
            raise ValueError(str(e)) from None
        recipe = load_recipe(model)
        if slice_name.strip().lower() == "local":
            sl = local_slice(devices_per_host=local_devices, hosts=host.num_nodes)
        else:
            sl = parse_slice(slice_name)
        if sl.hosts != host.num_nodes:
            raise ValueError(f"{sl.name} has {sl.hosts} hosts but SkyPilot reports "
                             f"{host.num_nodes} (SKYPILOT_NUM_NODES)")
        plan = _plan(recipe, sl, tp_size=tp_size)
        if storage_mode not in ("local", "bucket", "hf"):
            raise ValueError(f"--storage {storage_mode!r}: expected local, bucket or hf")
        if sl.is_local and host.num_nodes > 1 and storage_mode == "local":
            storage_mode = "bucket"  # processes on one machine share its disk: convert once
        root = cache_root()
        dl = Path(download_dir or root / "hf" / recipe.name).expanduser()
        ckpt = None if storage_mode == "hf" else Path(
            checkpoint or root / "checkpoints" / f"{recipe.name}-{plan.dtype}").expanduser()
        src = source or (recipe.local_source if sl.is_local else None) or recipe.hf_repo
        storage = Storage(storage_mode, src, dl, ckpt, must_exist and storage_mode == "bucket")
        bind = "127.0.0.1" if sl.is_local else "0.0.0.0"
        steps = build_steps(recipe, plan, host, storage, port=port, bind_host=bind,
                            dist_port=dist_port, warmup=warmup)
        typer.echo(f"[sgljax] host {host.rank}/{host.num_nodes} of {sl.name}: {recipe.name}, "
                   f"{plan.memory_line()}", err=True)
        if dry_run:
            typer.echo(describe(steps))
            return
        try:
            run_steps(steps)
        except PipelineError as e:
            raise ValueError(str(e)) from None


def register(app: typer.Typer) -> None:
    app.command("up")(up)
    app.command("down")(down)
    app.command("status")(status)
    app.command("logs")(logs)
    app.command("host-run")(host_run)
