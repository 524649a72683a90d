"""``sgljax warmup``: compile every bucket into the persistent compilation cache."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sgljax.cli import engine_options as eo
from sgljax.cli.errors import user_errors

D = eo.ENGINE_DEFAULTS


@contextlib.contextmanager
def warmup_progress(quiet: bool = False):
    """A rich progress bar fed by ``Engine.warmup``'s ``progress(done, total, shape)``."""
    columns = (TextColumn("warmup"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, disable=quiet, transient=False) as bar:
        task = None

        def step(done, total, shape):
            nonlocal task
            if task is None:
                task = bar.add_task("", total=total)
            bar.update(task, completed=done, description=f"buckets (S, Q, P) {shape}")

        yield step


def warm_engine(engine, quiet: bool = False) -> dict:
    """Warm ``engine`` with a progress bar; returns the figures that prove it."""
    before, t0 = bucket_counts(engine), time.perf_counter()
    with warmup_progress(quiet) as step:
        n = engine.warmup(step)
    after = bucket_counts(engine)
    return {"buckets": n, "seconds": round(time.perf_counter() - t0, 2),
            "compiled": after[0] - before[0], "from_cache": after[1] - before[1]}


def bucket_counts(engine) -> tuple[int, int]:
    """(compiled, loaded from a cache) executables so far on this rank."""
    cache = engine.runner.executable_cache
    if cache is not None:  # this rank's executable files, or JAX's cache behind them
        return cache.compiled, cache.hits + cache.jax_hits
    stats = engine.compile_stats
    return stats.compiles - stats.cache_hits, stats.cache_hits


def warmup(
    model: Optional[str] = typer.Argument(None, help="Model path (same as --model-path)."),
    model_path: eo.ModelPath = None,
    dtype: eo.Dtype = D.dtype,
    kv_cache_dtype: eo.KvCacheDtype = D.kv_cache_dtype,
    tp_size: eo.TpSize = D.tp_size,
    page_size: eo.PageSize = D.page_size,
    max_running_requests: eo.MaxRunning = D.max_running_requests,
    chunked_prefill_size: eo.ChunkedPrefill = D.chunked_prefill_size,
    context_length: eo.ContextLength = D.context_length,
    max_total_tokens: eo.MaxTotalTokens = None,
    mem_fraction_static: eo.MemFraction = D.mem_fraction_static,
    precompile_bs_paddings: eo.BsPaddings = None,
    precompile_token_paddings: eo.TokenPaddings = None,
    compilation_cache_dir: eo.CacheDir = None,
    nnodes: eo.NNodes = 1,
    node_rank: eo.NodeRank = 0,
    dist_init_addr: eo.DistInitAddr = None,
    device: eo.Device = "auto",
    controller: eo.Controller = "multi",
    pathways_proxy_addr: eo.PathwaysProxyAddr = None,
    device_discovery_timeout: eo.DiscoveryTimeout = 60.0,
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON line."),
) -> None:
    """Compile every shape bucket the server will use, into the persistent cache."""
    with user_errors():
        from sgljax.engine.engine import Engine

        model_path = model_path or model
        args = eo.engine_args(locals())
        engine = Engine(args)
        if engine.is_follower:  # rank 0 drives the warmup steps; this host runs them too
            engine.follow()
            compiled, loaded = bucket_counts(engine)
            typer.echo(f"rank {node_rank}: {loaded} buckets loaded from the cache, "
                       f"{compiled} compiled")
            return
        if not as_json:
            typer.echo(f"buckets: {engine.plan.describe()}")
        figures = warm_engine(engine, quiet=as_json)
        if as_json:
            typer.echo(json.dumps(figures))
        else:
            typer.echo(f"warmed {figures['buckets']} buckets in {figures['seconds']} s "
                       f"({figures['compiled']} compiled, {figures['from_cache']} from the cache)")
        engine.shutdown()


def register(app: typer.Typer) -> None:
    app.command("warmup")(warmup)
