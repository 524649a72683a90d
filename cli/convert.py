"""``sgljax convert``: turn a model into a converted folder that later starts restore quickly."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from sgljax.cli.errors import user_errors

PHASES = {"hashing": "hashing source", "tokenizer": "tokenizer, config", "converting": "converting"}


def convert(
    source: str = typer.Argument(..., help="HF model folder (safetensors), .gguf file, or "
                                           "'default' / 'smollm2-135m' (the built-in model)."),
    output: Path = typer.Argument(..., help="Folder to create (written as OUTPUT.partial, "
                                            "renamed when complete)."),
    dtype: str = typer.Option("float32", "--dtype", help="bfloat16 | float32"),
    tp_size: int = typer.Option(1, "--tp-size", help="Check the model splits over this TP and "
                                                     "write its shards in that split (a "
                                                     "multi-host restore reads only its hosts' "
                                                     "shards: use a multiple of the hosts)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing converted OUTPUT."),
) -> None:
    """Convert SOURCE once into an Orbax checkpoint in the engine's layout, plus what serving needs."""
    with user_errors():
        import logging

        # Orbax logs its own failures (with tracebacks, from worker threads) through absl;
        # the one-line error below says what happened.
        logging.getLogger("absl").setLevel(logging.CRITICAL)
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        from sgljax.engine.convert import convert_model, request_cpu_devices
        from sgljax.engine.default_model import (DEFAULT_MODEL, DEFAULT_NAMES,
                                                 GENERATION_DEFAULTS, default_gguf)

        # Before anything starts JAX: the checkpoint is written in tp_size chunks per tensor
        # (so a multi-host restore reads only its part), one per CPU device.
        request_cpu_devices(tp_size)

        label = generation_defaults = None
        if source in DEFAULT_NAMES:
            label, source = DEFAULT_MODEL, str(default_gguf())
            generation_defaults = GENERATION_DEFAULTS
        console = Console(stderr=True)
        t0 = time.perf_counter()
        with Progress(TextColumn("{task.description:<16}"), BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                      transient=False) as bar:
            tasks: dict[str, int] = {}

            def on_progress(phase: str, advance: int, total: int) -> None:
                if phase not in tasks:
                    tasks[phase] = bar.add_task(PHASES.get(phase, phase), total=total)
                bar.update(tasks[phase], advance=advance)

            manifest = convert_model(source, output, dtype=dtype, tp_size=tp_size, force=force,
                                     progress=on_progress, label=label,
                                     generation_defaults=generation_defaults)
        typer.echo(f"wrote {output}: {manifest['param_count']:,} parameters, "
                   f"{manifest['bytes'] / 1e9:.2f} GB {manifest['dtype']}, "
                   f"in {time.perf_counter() - t0:.1f} s")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
