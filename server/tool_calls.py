"""A chat request's ``tools`` and ``tool_choice`` → what the template, the engine and the
response parser do with them.

- ``none``: the tools stay out of the prompt and nothing is parsed.
- ``auto`` (the default when tools are given): the chat template shows the tools, and
  the output's tool-call blocks are parsed into ``tool_calls`` by the server's
  ``--tool-call-parser``; without one the request is refused, as vLLM does, rather
  than answered with calls left in the text.
- ``required`` / a named function: a grammar makes the output one call (or, with
  ``parallel_tool_calls``, one or more) in the parser's format (Hermes when the
  server has none), whose arguments match the tool's ``parameters`` schema; these
  work with any model.

server/tool_parser.py reads the formats back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sgljax.engine.constraint import JSON_STYLE, Constraint
from sgljax.engine.tokenizer import Tokenizer
from sgljax.server.errors import bad_request
from sgljax.server.protocol import ChatCompletionRequest, Tool
from sgljax.server.tool_parser import HermesToolParser


@dataclass
class ToolPlan:
    template_tools: list[dict] | None  # what the chat template gets as ``tools``
    constraint: Constraint | None  # required / named: the grammar of the calls
    format: str | None  # the tool-call format to read out of the output (None: none)


def plan_tools(tok: Tokenizer, req: ChatCompletionRequest, parser: str | None) -> ToolPlan:
    tools, choice = req.tools or [], req.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return ToolPlan(None, None, None)
    if choice == "none":
        return ToolPlan(None, None, None)
    names = [t.function.name for t in tools]
    if len(set(names)) < len(names):
        raise bad_request("tool names must be unique", "tools")
    template_tools = [t.model_dump(exclude_none=True) for t in tools]
    if choice in (None, "auto"):
        if parser is None:
            raise bad_request('tool_choice "auto" needs the server started with '
                              "--tool-call-parser", "tool_choice")
        return ToolPlan(template_tools, None, parser)
    if choice == "required":
        chosen = tools
    else:
        chosen = [t for t in tools if t.function.name == choice.function.name]
        if not chosen:
            raise bad_request(f"tool_choice names {choice.function.name!r}, which is not "
                              "one of the tools", "tool_choice")
    fmt = parser or "hermes"
    grammar = calls_grammar(tok, chosen, req.parallel_tool_calls, fmt)
    return ToolPlan(template_tools, Constraint("lark", grammar, "tools"), fmt)


def _tag(tok: Tokenizer, text: str) -> str:
    """A tag that the vocabulary holds as one added token is matched as that token
    (llguidance sees added tokens only by id); otherwise as its bytes."""
    token_id = tok.hf.get_added_vocab().get(text)
    return f"<[{token_id}]>" if token_id is not None else json.dumps(text)


def call_schema(tool: Tool, arguments_key: str) -> dict:
    params = tool.function.parameters or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": tool.function.name},
                                             arguments_key: params},
            "required": ["name", arguments_key], "additionalProperties": False}


def calls_grammar(tok: Tokenizer, tools: list[Tool], parallel: bool, fmt: str) -> str:
    """Lark: one call (or several) in format ``fmt`` whose JSON names one of ``tools``:
    Hermes blocks one per line, Llama 3 JSON objects joined by "; "."""
    llama = fmt == "llama3_json"
    schema = {"anyOf": [call_schema(t, "parameters" if llama else "arguments") for t in tools],
              "x-guidance": JSON_STYLE}
    if llama:
        calls, call = 'call ("; " call)*' if parallel else "call", "call: body"
    else:
        start, end = _tag(tok, HermesToolParser.START), _tag(tok, HermesToolParser.END)
        calls = 'call ("\\n" call)*' if parallel else "call"
        call = f'call: {start} "\\n" body "\\n" {end}'
    return f"start: {calls}\n{call}\nbody: %json {json.dumps(schema)}\n"


def tool_call_message(raw_calls, where: str) -> list[dict]:
    """An assistant message's ``tool_calls`` as chat templates read them (arguments as
    an object; templates that want a string get ``tojson`` of it)."""
    out = []
    for j, call in enumerate(raw_calls):
        try:
            args = json.loads(call.function.arguments)
        except ValueError:
            args = None
        if not isinstance(args, dict):
            raise bad_request("arguments must be a JSON object, as a string",
                              f"{where}.tool_calls[{j}].function.arguments")
        out.append({"id": call.id, "type": "function",
                    "function": {"name": call.function.name, "arguments": args}})
    return out
