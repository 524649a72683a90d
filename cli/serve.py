"""``sgljax serve``: the OpenAI-compatible HTTP server (flags named as in SGLang)."""

from __future__ import annotations

from typing import Optional

import typer

from sgljax.cli import engine_options as eo
from sgljax.cli.errors import user_errors
from sgljax.cli.warmup import warmup_progress

SCHEDULE_POLICIES = ("fcfs", "lpm")
D = eo.ENGINE_DEFAULTS


def serve(
    model_path: eo.ModelPath = None,
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(30000, "--port"),
    tp_size: eo.TpSize = D.tp_size,
    dtype: eo.Dtype = D.dtype,
    kv_cache_dtype: eo.KvCacheDtype = D.kv_cache_dtype,
    page_size: eo.PageSize = D.page_size,
    context_length: eo.ContextLength = D.context_length,
    mem_fraction_static: eo.MemFraction = D.mem_fraction_static,
    max_total_tokens: eo.MaxTotalTokens = None,
    max_running_requests: eo.MaxRunning = D.max_running_requests,
    chunked_prefill_size: eo.ChunkedPrefill = D.chunked_prefill_size,
    new_seqs_per_prefill: eo.NewSeqsPerPrefill = None,
    max_queued_requests: Optional[int] = typer.Option(
        None, "--max-queued-requests", help="Answer 503 beyond this many waiting requests."),
    disable_radix_cache: eo.DisableRadix = False,
    disable_overlap_schedule: eo.DisableOverlap = False,
    schedule_policy: eo.SchedulePolicy = D.schedule_policy,
    random_seed: eo.RandomSeed = None,
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
        from sgljax.engine.server.app import run_server
        from sgljax.engine.server.args import ServerArgs

        if schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(f"--schedule-policy must be one of {', '.join(SCHEDULE_POLICIES)}")
        for name in ("page_size", "context_length", "max_running_requests",
                     "chunked_prefill_size", "max_total_tokens", "new_seqs_per_prefill"):
            value = locals()[name]
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 < mem_fraction_static < 1:
            raise ValueError("--mem-fraction-static must be in (0, 1)")
        engine_args = eo.engine_args(locals())
        server_args = ServerArgs(host=host, port=port, served_model_name=served_model_name,
                                 api_key=api_key, max_queued_requests=max_queued_requests,
                                 skip_server_warmup=skip_server_warmup,
                                 log_level=log_level,
                                 graceful_shutdown_timeout=graceful_shutdown_timeout).validate()
        with warmup_progress(quiet=skip_server_warmup or node_rank > 0) as progress:
            run_server(engine_args, server_args, progress=progress)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
