"""The OpenAPI document: request bodies and error answers as the routes really take them.

The routes read their bodies themselves (``server/errors.py:read_model``), so
FastAPI sees no body parameter and would describe none. This adds each route's
pydantic model (``server/protocol.py``) as its JSON request body, and the error
shape every 4xx / 5xx answer has, so clients and schema fuzzers (schemathesis,
``tests/test_fuzz_api.py``) see the API the server serves.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from sgljax.server.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest

REQUEST_BODIES = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/generate": GenerateRequest,
}
STREAMING = frozenset(REQUEST_BODIES)  # "stream": true answers text/event-stream
ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}}}},
}
# One server-sent event: a JSON chunk (or an error object), and last "[DONE]".
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
_REF = "#/components/schemas/{model}"


def _error_response(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": _REF.format(model="Error")}}}}


def build_openapi(app: FastAPI) -> dict:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    keys, defs = models_json_schema([(m, "validation") for m in REQUEST_BODIES.values()],
                                    ref_template=_REF)
    schemas.update(defs.get("$defs", {}))
    schemas["Error"] = ERROR_SCHEMA
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422, never sent
        schemas.pop(unused, None)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)  # FastAPI's own shape; the server never answers it
            model = REQUEST_BODIES.get(path)
            if model is not None and method == "post":
                op["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": keys[(model, "validation")]}}}
            ok = responses.setdefault("200", {"description": "Successful Response"})
            if path in STREAMING:
                ok["content"] = {"application/json": {"schema": {}},
                                 "text/event-stream": {"schema": SSE_EVENT}}
            elif path == "/metrics":
                ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
            elif path == "/health":
                ok.pop("content", None)
            responses["4XX"] = _error_response("the request cannot be served as sent (OpenAI's "
                                               "error shape)")
            responses["5XX"] = _error_response("the server is overloaded, stopping or failed")
    return doc


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi
