"""Schema fuzzing of a live sgljax server from its own OpenAPI document (schemathesis).

Every operation of ``/openapi.json`` gets generated requests, valid (positive) and
invalid (negative); each answer must be no 5xx, come back within the timeout, and
conform to the document (status code, content type, body schema, and for a 4xx
OpenAI's error shape). ``tests/test_fuzz_api.py`` runs a few examples in CI; this
script runs more:

    python reliability/fuzz.py --base-url http://127.0.0.1:30000 --examples 300

Only 127.0.0.1 servers are fuzzed (the load is real).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from urllib.parse import urlparse

MAX_FUZZ_TOKENS = 16  # valid requests generate at most this many tokens, so a run stays bounded
ERROR_KEYS = {"message", "type", "param", "code"}


def _bound(case) -> None:
    """Keep valid generation requests short (the schema allows the whole context)."""
    body = case.body
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        # null (or, in chat, absent) asks for the whole context: bounded too
        if key in body and (body[key] is None or (isinstance(body[key], int)
                                                  and body[key] > MAX_FUZZ_TOKENS)):
            body[key] = MAX_FUZZ_TOKENS
    if "messages" in body and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_FUZZ_TOKENS
    sp = body.get("sampling_params")
    if isinstance(sp, dict) and isinstance(sp.get("max_new_tokens"), int) \
            and sp["max_new_tokens"] > MAX_FUZZ_TOKENS:
        sp["max_new_tokens"] = MAX_FUZZ_TOKENS


def _error_shape(response) -> str | None:
    """None if a 4xx body is OpenAI's error object, else what is wrong with it."""
    if not 400 <= response.status_code < 500:
        return None
    try:
        err = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} body is not {{'error': ...}}: {response.content[:200]!r}"
    if not isinstance(err, dict) or set(err) != ERROR_KEYS or not err["message"]:
        return f"{response.status_code} error object has the wrong keys: {err!r}"
    return None


def fuzz(base_url: str, examples: int, timeout: float = 60.0, modes=("positive", "negative"),
         skip=("/flush_cache",), seed: int | None = 0, log=print) -> dict:
    """Fuzz every operation; returns {operation: cases run}. Raises AssertionError on the
    first failure, with the request that caused it."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance, response_schema_conformance, status_code_conformance)

    host = urlparse(base_url).hostname
    if host not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"error: fuzzing only targets 127.0.0.1, not {host}")
    schema = schemathesis.openapi.from_url(base_url.rstrip("/") + "/openapi.json",
                                           wait_for_schema=30)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    ran: dict[str, int] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path in skip:
            continue
        for mode in modes:
            gen_mode = GenerationMode(mode)
            label = f"{op.method.upper()} {op.path} [{mode}]"
            count = [0]

            @settings(max_examples=examples, deadline=None, database=None,
                      phases=[Phase.generate], derandomize=seed is not None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=gen_mode))
            def run(case):
                if gen_mode.is_positive:
                    _bound(case)
                t0 = time.monotonic()
                response = case.call(base_url=base_url, timeout=timeout)
                took = time.monotonic() - t0
                assert took < timeout, f"{label}: no answer in {timeout} s"
                case.validate_response(response, checks=checks)
                problem = _error_shape(response)
                assert problem is None, f"{label}: {problem}\n{case.as_curl_command()}"
                count[0] += 1

            t0 = time.monotonic()
            try:
                run()
            except Unsatisfiable:  # negative mode on an operation with no inputs to break
                pass
            ran[label] = count[0]
            log(f"{label}: {count[0]} cases, {time.monotonic() - t0:.1f} s")
    return ran


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:30000")
    ap.add_argument("--examples", type=int, default=200, help="examples per operation and mode")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds one answer may take")
    ap.add_argument("--mode", choices=["all", "positive", "negative"], default="all")
    ap.add_argument("--seed", type=int, default=None, help="derandomize (default: random)")
    a = ap.parse_args()
    modes = ("positive", "negative") if a.mode == "all" else (a.mode,)
    ran = fuzz(a.base_url, a.examples, a.timeout, modes, seed=a.seed)
    print(f"ok: {sum(ran.values())} requests over {len(ran)} operation/mode pairs, no failures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
