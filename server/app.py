"""Build the FastAPI app around an Engine, and run it with uvicorn.

``build_app`` wires routes, errors, auth and the engine thread;
``run_server`` adds loading, warmup and signal handling, and is what
``sgljax serve`` (and other commands that start a server) call.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import signal
from collections.abc import Callable

from fastapi import FastAPI

from sgljax.engine.args import EngineArgs
from sgljax.engine.engine import Engine
from sgljax.engine.default_model import DEFAULT_MODEL
from sgljax.server.args import ServerArgs
from sgljax.server.async_engine import AsyncEngine
from sgljax.server.audio_routes import router as audio_router
from sgljax.server.context import ServerContext
from sgljax.server.errors import error_body, install_error_handlers
from sgljax.server.metrics import ServerMetrics
from sgljax.server.native_routes import router as native_router
from sgljax.server.openai_adapters import Limits
from sgljax.server.openai_routes import router as openai_router
from sgljax.server.openapi import install_openapi

log = logging.getLogger("sgljax.server")
OPEN_PATHS = frozenset({"/health"})  # answered without the API key (load-balancer probes)


class APIKeyMiddleware:
    """Every route but /health needs ``Authorization: Bearer <key>``."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        body = json.dumps(error_body("invalid or missing API key: send 'Authorization: Bearer "
                                     "<key>'", "authentication_error", code="invalid_api_key"))
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body.encode()})


def served_model_name(engine_args: EngineArgs, server_args: ServerArgs) -> str:
    return server_args.served_model_name or engine_args.model_path or DEFAULT_MODEL


def _limits(engine: Engine) -> Limits:
    info = engine.describe()
    audio = info["audio_token_id"] is not None
    return Limits(engine.limits, engine.generation_defaults, engine.grammars,
                  engine.prepare_audio if audio else None, info["audio_token_id"])


def build_app(engine_args: EngineArgs, server_args: ServerArgs,
              engine: Engine | None = None) -> FastAPI:
    """The app; the engine thread starts with the app's lifespan and stops with it."""
    server_args.validate()
    engine = engine or Engine(engine_args)
    name = served_model_name(engine_args, server_args)
    bridge: AsyncEngine | None = None
    metrics = ServerMetrics(name, lambda: bridge.stats)
    bridge = AsyncEngine(engine, metrics, server_args.max_queued_requests)
    served = {name, "default"}  # "default": clients that don't know the name still work
    if engine_args.model_path:
        served.add(engine_args.model_path)
    ctx = ServerContext(bridge=bridge, tokenizer=engine.tokenizer,
                        limits=_limits(engine),
                        info=engine.describe(),
                        model_name=name, served_names=served, metrics=metrics,
                        engine_args=engine_args, server_args=server_args,
                        transcription_prompt=(engine.transcription_prompt
                                              if engine.describe()["audio_token_id"] is not None
                                              else None))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        bridge.start()
        log.info("serving %s", name)
        try:
            yield
        finally:
            bridge.stop()

    app = FastAPI(title="sgljax", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(native_router)
    app.include_router(audio_router)
    install_openapi(app)
    if server_args.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=server_args.api_key)
    return app


def configure_logging(level: str) -> None:
    """sgljax's and uvicorn's own lines at ``level``; the libraries' (absl, Orbax, JAX) only
    from warnings up, unless ``level`` is debug: their INFO lines would flood the log."""
    level = level.upper()
    logging.basicConfig(level="DEBUG" if level in ("DEBUG", "TRACE") else "WARNING",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("sgljax", "uvicorn"):
        logging.getLogger(name).setLevel("DEBUG" if level == "TRACE" else level)


def _exit_quietly(signum, frame):
    raise SystemExit(0)


def _graceful_server(config, bridge: AsyncEngine, grace_s: float):
    """A uvicorn Server whose shutdown gives requests ``grace_s`` to finish, then aborts them.

    Aborting through the engine ends each stream with an error event and
    ``[DONE]`` (and frees its pages), instead of uvicorn cancelling handler tasks.
    """
    import asyncio

    import uvicorn

    class GracefulServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            bridge.drain()
            asyncio.get_running_loop().call_later(grace_s, bridge.abort_all)
            await super().shutdown(sockets)

    return GracefulServer(config)


def serve_follower(engine: Engine, server_args: ServerArgs) -> None:
    """A multi-host follower: run rank 0's steps; answer only ``GET /health``.

    It listens on ``--port`` + its rank, so hosts sharing one machine (tests) don't clash.
    """
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    port = server_args.port + engine.args.node_rank
    health = http.server.ThreadingHTTPServer((server_args.host, port), Health)
    threading.Thread(target=health.serve_forever, daemon=True).start()
    try:
        engine.follow()
    finally:
        health.shutdown()


def run_server(engine_args: EngineArgs, server_args: ServerArgs,
               progress: Callable[[int, int, tuple], None] | None = None,
               engine: Engine | None = None) -> None:
    """Load, warm up, serve until SIGTERM / SIGINT; returns after a graceful shutdown."""
    import uvicorn

    from sgljax.server.slow_clients import header_deadline_protocol

    server_args.validate()
    configure_logging(server_args.log_level)
    # SIGTERM while loading or compiling: leave at once, exit status 0.
    previous = signal.signal(signal.SIGTERM, _exit_quietly)
    try:
        engine = engine or Engine(engine_args)
        if engine.is_follower:
            serve_follower(engine, server_args)
            return
        if not server_args.skip_server_warmup:
            n = engine.warmup(progress=progress)
            log.info("warmup compiled %d step shapes", n)
        app = build_app(engine_args, server_args, engine)
        grace = server_args.graceful_shutdown_timeout
        config = uvicorn.Config(app, host=server_args.host, port=server_args.port,
                                log_level=server_args.log_level.lower(),
                                timeout_graceful_shutdown=grace + 5,  # backstop; see below
                                http=header_deadline_protocol(server_args.request_timeout),
                                access_log=server_args.log_level.lower() == "debug")
        server = _graceful_server(config, app.state.ctx.bridge, grace)
        # uvicorn re-raises the signal it caught after its graceful shutdown; with these
        # no-op handlers in place, that re-raise does nothing and we return normally: a
        # drained SIGINT (Ctrl-C) exits 0 like SIGTERM, not 130 through KeyboardInterrupt.
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        previous_int = signal.signal(signal.SIGINT, lambda signum, frame: None)
        try:
            server.run()
        finally:
            signal.signal(signal.SIGINT, previous_int)
        engine.shutdown()  # multi-host: release the followers
        if not server.started:
            raise OSError(f"could not serve on {server_args.host}:{server_args.port} "
                          "(is the port in use?)")
    finally:
        signal.signal(signal.SIGTERM, previous)
