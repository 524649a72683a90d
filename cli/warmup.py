"""``sgljax warmup``: compile every bucket into the persistent compilation cache."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sgljax.cli.engine_options import engine_options
from sgljax.cli.errors import user_errors
from sgljax.engine.args import EngineArgs


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
            bar.update(task, completed=done, description=f"buckets (tokens, seqs, pages) {shape}")

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


@engine_options()
def warmup(
    engine_args: EngineArgs,
    model: Optional[str] = typer.Argument(None, help="Model path (same as --model-path)."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON line."),
) -> None:
    """Compile every shape bucket the server will use, into the persistent cache."""
    _warmup(engine_args, model, as_json)


@engine_options()
def warmup_asr(
    engine_args: EngineArgs,
    model: Optional[str] = typer.Argument(None, help="A Qwen3-ASR model path."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON line."),
) -> None:
    """Precompile a speech model's audio path too (encoder buckets for --frame-paddings,
    audio prefill forms for --token-paddings), then transcribe audio it makes itself to
    prove nothing is left to compile."""
    _warmup(dataclasses.replace(engine_args, asr_warmup=True), model, as_json)


def _warmup(engine_args: EngineArgs, model: str | None, as_json: bool) -> None:
    with user_errors():
        from sgljax.engine import warm_record

        args = engine_args
        if model and not args.model_path:
            args = dataclasses.replace(args, model_path=model)
        if warm_record.is_warm(args):  # before JAX starts or the model loads
            message = "every planned bucket is already in the compilation cache"
            typer.echo(json.dumps({"buckets": None, "skipped": True}) if as_json else message)
            return
        from sgljax.engine.engine import Engine

        engine = Engine(args)
        if engine.is_follower:  # rank 0 drives the warmup steps; this host runs them too
            engine.follow()
            compiled, loaded = bucket_counts(engine)
            typer.echo(f"rank {args.node_rank}: {loaded} buckets loaded from the cache, "
                       f"{compiled} compiled")
            return
        if not as_json:
            typer.echo(f"buckets: {engine.plan.describe()}")
        figures = warm_engine(engine, quiet=as_json)
        if args.asr_warmup:
            figures["asr"] = engine.asr_warmup_figures
        cache = engine.runner.executable_cache
        if cache is not None and cache.jax_hits == 0:  # then our files hold every bucket
            warm_record.write(args, sorted(cache.files))
        if as_json:
            typer.echo(json.dumps(figures))
        else:
            typer.echo(f"warmed {figures['buckets']} buckets in {figures['seconds']} s "
                       f"({figures['compiled']} compiled, {figures['from_cache']} from the cache)")
            if args.asr_warmup:
                asr = figures["asr"]
                typer.echo(f"audio: encoder buckets {asr['encoder_buckets']}, "
                           f"{asr['audio_shapes']} audio step shapes, "
                           f"{asr['unwarmed']} shapes left unwarmed ({asr['seconds']} s)")
        engine.shutdown()


def register(app: typer.Typer) -> None:
    app.command("warmup")(warmup)
    app.command("warmup-asr")(warmup_asr)
