"""Errors in OpenAI's shape, and reading a request body that may be anything.

Every failure a client can cause ends as ``{"error": {"message", "type",
"param", "code"}}`` with a 4xx status; the server never answers a bad body
with a 500 or FastAPI's own 422 shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
MAX_JSON_DEPTH = 64  # no request body nests deeper; deeper would reach Python's recursion limit


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _default_type(status)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 503:
        return "service_unavailable_error"
    if status >= 500:
        return "internal_server_error"
    return "invalid_request_error"


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def _param_path(loc: tuple) -> str:
    """('messages', 0, 'content') → 'messages[0].content'; union member tags dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or "-" in part or part in _TYPE_TAGS:
            continue  # pydantic names the union member it tried, e.g. 'list[int]'
        else:
            out += f".{part}" if out else part
    return out


def validation_error(err: ValidationError) -> APIError:
    first = err.errors()[0]
    param = _param_path(first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param)
    if first["type"] == "missing":
        return bad_request(f"Missing required parameter: {param}", param)
    where = f"{param}: " if param else ""
    return bad_request(f"Invalid value for {where}{first['msg']}", param)


async def read_model(request: Request, model: type[BaseModel], max_bytes: int,
                     timeout: float | None = None) -> BaseModel:
    """Parse the body into ``model``: 413 if too large, 408 if it does not arrive within
    ``timeout`` seconds, 400 for anything malformed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body is larger than {max_bytes} bytes",
                       code="request_too_large")
    try:
        raw = await asyncio.wait_for(_read_body(request, max_bytes), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s",
                       code="request_timeout") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("the request body is not valid UTF-8") from None
    if not text.strip():
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise bad_request(f"malformed JSON in the request body: {e}") from None
    except RecursionError:
        raise bad_request(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # NaN / Infinity, or an integer too long to convert
        raise bad_request(f"invalid number in the request body: {e}") from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise bad_request(f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


async def _read_body(request: Request, max_bytes: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"request body is larger than {max_bytes} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as infinity
        raise ValueError(f"{text} is out of a float's range")
    return value


def _depth(data) -> int:
    """How deeply lists and objects nest (iteratively: no recursion on hostile input).
    A string with a lone surrogate (JSON's "\\ud800": not Unicode text) is a 400 here."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, str):
            _check_text(node)
        elif isinstance(node, (list, dict)):
            deepest = max(deepest, d)
            if deepest > MAX_JSON_DEPTH:
                return deepest
            if isinstance(node, dict):
                stack.extend((k, d) for k in node)
                stack.extend((v, d + 1) for v in node.values())
            else:
                stack.extend((v, d + 1) for v in node)
    return deepest


def _check_text(text: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"a string in the request body is not valid Unicode ({e.reason} at "
                          f"character {e.start}: a lone UTF-16 surrogate)") from None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        # A 408 leaves the body unread: the connection cannot carry another request.
        headers = {"connection": "close"} if exc.status == 408 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(
            exc.status_code, str(exc.detail))
        return JSONResponse(error_body(msg, _default_type(exc.status_code),
                                       code=str(exc.status_code)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}",
                                       "internal_server_error"), status_code=500)
