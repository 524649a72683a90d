"""``sgljax generate``: run prompts through the engine once, print the answers."""

from __future__ import annotations

import time
from typing import Optional

import typer

from sgljax.cli import engine_options as eo
from sgljax.cli.errors import user_errors


def generate(
    prompts: list[str] = typer.Argument(..., help="One or more prompts."),
    model_path: Optional[str] = typer.Option(None, "--model-path", "-m",
                                             help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)."),
    max_tokens: int = typer.Option(128, "--max-tokens"),
    temperature: float = typer.Option(0.0, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    chat: bool = typer.Option(True, "--chat/--raw", help="Apply the model's chat template."),
    dtype: str = typer.Option("float32", "--dtype"),
    tp_size: int = typer.Option(1, "--tp-size"),
    context_length: int = typer.Option(4096, "--context-length"),
    device: eo.Device = "auto",
    controller: eo.Controller = "multi",
    pathways_proxy_addr: eo.PathwaysProxyAddr = None,
    device_discovery_timeout: eo.DiscoveryTimeout = 60.0,
) -> None:
    """Generate completions for PROMPTS with the engine's Python API."""
    with user_errors():
        from sgljax.engine.engine import Engine
        from sgljax.engine.sampling import SamplingParams

        t0 = time.perf_counter()
        engine = Engine(model_path=model_path, dtype=dtype, tp_size=tp_size,
                        context_length=context_length, max_running_requests=16,
                        device=device, controller=controller,
                        pathways_proxy_addr=pathways_proxy_addr,
                        device_discovery_timeout=device_discovery_timeout)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed)
        inputs = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}])
                  if chat else p for p in prompts]
        for out in engine.generate(inputs, params):
            print(out["text"])
        typer.echo(f"({time.perf_counter() - t0:.1f} s)", err=True)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
