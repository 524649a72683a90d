"""The ``sgljax`` command line. Each sub-command lives in its own module."""

from __future__ import annotations

import os
import sys

# Serving needs no PyTorch; transformers would say at every start that it is missing.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import typer  # noqa: E402

from sgljax.cli import bench, convert, generate, serve, up, warmup  # noqa: E402

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


def run() -> None:
    """The program: ``app()``; once a command has failed with its one ``error:`` line, the
    rest of stderr is dropped, so that library threads still winding down (TensorStore's
    reads after a damaged checkpoint, say) print no tracebacks after it."""
    try:
        app()
    except SystemExit as e:
        if e.code not in (0, None):
            sys.stderr.flush()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
        raise


if __name__ == "__main__":
    run()
