"""Structured-output fields of a request → the engine's ``Constraint``.

OpenAI's ``response_format`` (json_object, json_schema), SGLang's ``regex`` and
``ebnf`` extras, and SGLang's native ``json_schema``/``regex``/``ebnf`` sampling
params. Whether a grammar compiles is checked where every constraint is checked,
``GrammarCompiler.check`` (called by the adapters before the engine sees the request).
"""

from __future__ import annotations

import json

from sgljax.engine.constraint import Constraint, json_schema_constraint
from sgljax.server.errors import bad_request
from sgljax.server.protocol import ResponseFormat


def _only_one(given: dict[str, object]) -> None:
    set_ = [name for name, value in given.items() if value is not None]
    if len(set_) > 1:
        raise bad_request(f"give at most one of {', '.join(set_)}", set_[1])


def from_response_format(fmt: ResponseFormat | None, regex: str | None,
                         ebnf: str | None) -> Constraint | None:
    fmt = None if fmt is not None and fmt.type == "text" else fmt
    _only_one({"response_format": fmt, "regex": regex, "ebnf": ebnf})
    if regex is not None:
        return Constraint("regex", regex, "regex")
    if ebnf is not None:
        return Constraint("ebnf", ebnf, "ebnf")
    if fmt is None:
        return None
    if fmt.type == "json_object":
        return Constraint("json_object")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise bad_request("response_format json_schema needs json_schema.schema",
                          "response_format")
    return json_schema_constraint(fmt.json_schema.schema_)


def from_native(json_schema: str | None, regex: str | None, ebnf: str | None) -> Constraint | None:
    """/generate's ``sampling_params``: json_schema is the schema as JSON text."""
    _only_one({"sampling_params.json_schema": json_schema, "sampling_params.regex": regex,
               "sampling_params.ebnf": ebnf})
    if json_schema is not None:
        try:
            schema = json.loads(json_schema)
        except ValueError as e:
            raise bad_request(f"json_schema is not JSON: {e}", "sampling_params.json_schema")
        if not isinstance(schema, dict):
            raise bad_request("json_schema must be a JSON object", "sampling_params.json_schema")
        return json_schema_constraint(schema, "sampling_params.json_schema")
    if regex is not None:
        return Constraint("regex", regex, "sampling_params.regex")
    if ebnf is not None:
        return Constraint("ebnf", ebnf, "sampling_params.ebnf")
    return None
