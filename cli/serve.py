"""``sgljax serve``: the OpenAI-compatible HTTP server (flags named as in SGLang)."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from sgljax.cli.errors import user_errors

SCHEDULE_POLICIES = ("fcfs", "lpm")


def serve(
    model_path: Optional[str] = typer.Option(
        None, "--model-path", "-m",
        help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(30000, "--port"),
    tp_size: int = typer.Option(1, "--tp-size", help="Tensor-parallel degree (devices)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16."),
    page_size: Optional[int] = typer.Option(None, "--page-size", help="Tokens per KV page."),
    context_length: Optional[int] = typer.Option(None, "--context-length"),
    mem_fraction_static: Optional[float] = typer.Option(
        None, "--mem-fraction-static", help="Share of free memory for the KV cache."),
    max_total_tokens: Optional[int] = typer.Option(
        None, "--max-total-tokens", help="KV cache size in tokens (overrides the fraction)."),
    max_running_requests: Optional[int] = typer.Option(None, "--max-running-requests"),
    chunked_prefill_size: Optional[int] = typer.Option(
        None, "--chunked-prefill-size", help="Prompt tokens per prefill step."),
    max_prefill_tokens: Optional[int] = typer.Option(
        None, "--max-prefill-tokens", help="Alias of --chunked-prefill-size."),
    max_queued_requests: Optional[int] = typer.Option(
        None, "--max-queued-requests", help="Answer 503 beyond this many waiting requests."),
    disable_radix_cache: bool = typer.Option(False, "--disable-radix-cache"),
    schedule_policy: str = typer.Option("fcfs", "--schedule-policy", help="fcfs or lpm."),
    random_seed: Optional[int] = typer.Option(None, "--random-seed"),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SGLJAX_API_KEY",
                                          help="Require 'Authorization: Bearer KEY'."),
    skip_server_warmup: bool = typer.Option(False, "--skip-server-warmup",
                                            help="Serve at once; compile shapes on first use."),
    log_level: str = typer.Option("info", "--log-level"),
    graceful_shutdown_timeout: float = typer.Option(
        10.0, "--graceful-shutdown-timeout",
        help="On SIGTERM, seconds in-flight requests get to finish before they are aborted."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API."""
    with user_errors():
        from sgljax.engine.args import EngineArgs
        from sgljax.engine.server.args import ServerArgs

        if schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(f"--schedule-policy must be one of {', '.join(SCHEDULE_POLICIES)}")
        if (chunked_prefill_size and max_prefill_tokens
                and chunked_prefill_size != max_prefill_tokens):
            raise ValueError("--chunked-prefill-size and --max-prefill-tokens disagree; give one")
        overrides = {k: v for k, v in dict(
            page_size=page_size, context_length=context_length,
            mem_fraction_static=mem_fraction_static, max_total_tokens=max_total_tokens,
            max_running_requests=max_running_requests,
            chunked_prefill_size=chunked_prefill_size or max_prefill_tokens).items()
            if v is not None}
        for name, value in overrides.items():
            if name != "mem_fraction_static" and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if mem_fraction_static is not None and not 0 < mem_fraction_static < 1:
            raise ValueError("--mem-fraction-static must be in (0, 1)")
        engine_args = EngineArgs(model_path=model_path, dtype=dtype, tp_size=tp_size,
                                 disable_radix_cache=disable_radix_cache,
                                 schedule_policy=schedule_policy, random_seed=random_seed,
                                 **overrides)
        server_args = ServerArgs(host=host, port=port, served_model_name=served_model_name,
                                 api_key=api_key, max_queued_requests=max_queued_requests,
                                 skip_server_warmup=skip_server_warmup,
                                 log_level=log_level,
                                 graceful_shutdown_timeout=graceful_shutdown_timeout).validate()
        from sgljax.engine.server.app import run_server

        def progress(done: int, total: int) -> None:
            if done == total or done % max(1, total // 10) == 0:
                print(f"warmup: compiled {done}/{total} step shapes", file=sys.stderr, flush=True)

        run_server(engine_args, server_args, progress=progress)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
