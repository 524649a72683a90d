"""Settings of the HTTP layer (the engine's own settings are EngineArgs)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PORT = 30000  # SGLang's default
MAX_BODY_BYTES = 8 * 1024 * 1024
REASONING_PARSERS = ("qwen3",)
# hermes / qwen25: <tool_call>{json}</tool_call>; llama3_json: {"name", "parameters"}
TOOL_CALL_PARSERS = ("hermes", "qwen25", "llama3_json")


@dataclass
class ServerArgs:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    served_model_name: str | None = None  # None → the model path (or the default model's name)
    api_key: str | None = None
    max_queued_requests: int | None = None  # None → no limit
    skip_server_warmup: bool = False
    log_level: str = "info"
    max_request_bytes: int = MAX_BODY_BYTES
    graceful_shutdown_timeout: float = 10.0  # seconds in-flight requests get to finish on SIGTERM
    # seconds a client has to send a request's headers, and again its body (408 after)
    request_timeout: float = 30.0
    # "qwen3": chat answers carry <think>…</think> as reasoning_content (server/reasoning_parser.py)
    reasoning_parser: str | None = None
    # TOOL_CALL_PARSERS: the model's tool calls in chat answers become tool_calls
    # (server/tool_parser.py; needed for tool_choice "auto")
    tool_call_parser: str | None = None

    def validate(self) -> "ServerArgs":
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535; got {self.port}")
        if self.max_queued_requests is not None and self.max_queued_requests < 1:
            raise ValueError("--max-queued-requests must be at least 1")
        if self.log_level.lower() not in ("critical", "error", "warning", "info", "debug",
                                          "trace"):
            raise ValueError(f"--log-level {self.log_level!r}: use debug, info, warning, "
                             "error or critical")
        if not self.request_timeout > 0:
            raise ValueError("--request-timeout must be > 0")
        if self.graceful_shutdown_timeout < 0:
            raise ValueError("--graceful-shutdown-timeout must be >= 0")
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(f"--reasoning-parser must be one of {', '.join(REASONING_PARSERS)}, "
                             f"not {self.reasoning_parser!r}")
        if self.tool_call_parser not in (None, *TOOL_CALL_PARSERS):
            raise ValueError(f"--tool-call-parser must be one of {', '.join(TOOL_CALL_PARSERS)}, "
                             f"not {self.tool_call_parser!r}")
        if self.api_key == "":
            raise ValueError("--api-key must not be empty")
        return self
