"""``sgljax generate``: run prompts through the engine once, print the answers."""

from __future__ import annotations

import time
from typing import Optional

import typer

from sgljax.cli.engine_options import engine_options
from sgljax.cli.errors import user_errors
from sgljax.engine.args import EngineArgs


@engine_options(defaults={"max_running_requests": 16})  # a few prompts, not a server's load
def generate(
    engine_args: EngineArgs,
    prompts: list[str] = typer.Argument(..., help="One or more prompts."),
    max_tokens: int = typer.Option(128, "--max-tokens"),
    temperature: float = typer.Option(0.0, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed of these prompts."),
    chat: bool = typer.Option(True, "--chat/--raw", help="Apply the model's chat template."),
) -> None:
    """Generate completions for PROMPTS with the engine's Python API."""
    with user_errors():
        from sgljax.engine.engine import Engine
        from sgljax.engine.sampling_params import SamplingParams

        t0 = time.perf_counter()
        engine = Engine(engine_args)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed)
        inputs = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}])
                  if chat else p for p in prompts]
        for out in engine.generate(inputs, params):
            print(out["text"])
        typer.echo(f"({time.perf_counter() - t0:.1f} s)", err=True)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
