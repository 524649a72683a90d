"""What a constrained request's output must match (checked and run by engine/grammar.py).

JSON is compact, as ``json.dumps`` writes it (", " and ": ", no other whitespace):
a model at temperature 1 that may put whitespace anywhere tends to write nothing
else; a schema's ``x-guidance`` options override that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

KINDS = ("json_object", "json_schema", "regex", "ebnf", "lark")
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Constraint:
    """What the output must match. ``spec``: the schema as JSON text (json_schema), the
    expression (regex), or the grammar (ebnf: GBNF as llama.cpp writes it; lark)."""

    kind: str
    spec: str = ""
    param: str = "response_format"  # the request field to name in an error

    def grammar(self) -> str:
        """The llguidance grammar text."""
        from llguidance import LLMatcher, gbnf_to_lark

        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_STYLE)
        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.spec, defaults=JSON_STYLE)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "ebnf":
            return LLMatcher.grammar_from_lark(gbnf_to_lark.any_to_lark(self.spec))
        return LLMatcher.grammar_from_lark(self.spec)


def json_schema_constraint(schema: dict, param: str = "response_format") -> Constraint:
    return Constraint("json_schema", json.dumps(schema), param)
