"""``sgljax serve``: the OpenAI-compatible HTTP server (flags named as in SGLang)."""

from __future__ import annotations

from typing import Optional

import typer

from sgljax.cli.engine_options import engine_options
from sgljax.cli.errors import user_errors
from sgljax.cli.warmup import warmup_progress
from sgljax.engine.args import EngineArgs


@engine_options()
def serve(
    engine_args: EngineArgs,
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(30000, "--port"),
    max_queued_requests: Optional[int] = typer.Option(
        None, "--max-queued-requests", help="Answer 503 beyond this many waiting requests."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SGLJAX_API_KEY",
                                          help="Require 'Authorization: Bearer KEY'."),
    skip_server_warmup: bool = typer.Option(False, "--skip-server-warmup",
                                            help="Serve at once; compile shapes on first use."),
    log_level: str = typer.Option("info", "--log-level"),
    reasoning_parser: Optional[str] = typer.Option(
        None, "--reasoning-parser",
        help="qwen3: chat answers carry <think>...</think> as reasoning_content."),
    tool_call_parser: Optional[str] = typer.Option(
        None, "--tool-call-parser",
        help="hermes | qwen25 (<tool_call> blocks) | llama3_json: the model's tool calls "
             "become tool_calls (needed for tool_choice auto)."),
    graceful_shutdown_timeout: float = typer.Option(
        10.0, "--graceful-shutdown-timeout",
        help="On SIGTERM, seconds in-flight requests get to finish before they are aborted."),
    request_timeout: float = typer.Option(
        30.0, "--request-timeout",
        help="Seconds a client has to send a request's headers, and again its body (408 after)."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API."""
    with user_errors():
        from sgljax.server.app import run_server
        from sgljax.server.args import ServerArgs

        server_args = ServerArgs(host=host, port=port, served_model_name=served_model_name,
                                 api_key=api_key, max_queued_requests=max_queued_requests,
                                 skip_server_warmup=skip_server_warmup,
                                 log_level=log_level,
                                 graceful_shutdown_timeout=graceful_shutdown_timeout,
                                 request_timeout=request_timeout,
                                 reasoning_parser=reasoning_parser,
                                 tool_call_parser=tool_call_parser).validate()
        with warmup_progress(quiet=skip_server_warmup or engine_args.node_rank > 0) as progress:
            run_server(engine_args, server_args, progress=progress)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
