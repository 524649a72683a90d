"""The ``sgljax`` command line. Each sub-command lives in its own module."""

from __future__ import annotations

import typer

from sgljax.cli import bench, convert, generate, serve, up, warmup

app = typer.Typer(
    name="sgljax",
    help="JAX/XLA inference engine for Qwen and Llama models, and the tool that puts it on TPU slices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

@app.callback()
def main() -> None:
    """sgljax: serve Qwen and Llama models with JAX, locally or on TPU slices."""


for module in (generate, serve, convert, warmup, up, bench):
    module.register(app)


if __name__ == "__main__":
    app()
