"""A chat request's ``tools`` and ``tool_choice`` → what the template, the engine and the
response parser do with them.

- ``none``: the tools stay out of the prompt and nothing is parsed.
- ``auto`` (the default when tools are given): the chat template shows the tools, and
  the output's tool-call blocks are parsed into ``tool_calls`` by the server's
  ``--tool-call-parser``; without one the request is refused, as vLLM does, rather
  than answered with calls left in the text.
- ``required`` / a named function: a grammar makes the output one call (or, with
  ``parallel_tool_calls``, one or more) in the parser's format, whose arguments
  match the tool's ``parameters`` schema; these work with any model.

Every supported format is Hermes-style (``<tool_call>{"name": ..., "arguments":
...}</tool_call>``, Qwen2.5 / Qwen3): server/tool_parser.py reads it back.
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
    parse: bool  # read tool-call blocks out of the output


def plan_tools(tok: Tokenizer, req: ChatCompletionRequest, parser: str | None) -> ToolPlan:
    tools, choice = req.tools or [], req.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return ToolPlan(None, None, False)
    if choice == "none":
        return ToolPlan(None, None, False)
    names = [t.function.name for t in tools]
    if len(set(names)) < len(names):
        raise bad_request("tool names must be unique", "tools")
    template_tools = [t.model_dump(exclude_none=True) for t in tools]
    if choice in (None, "auto"):
        if parser is None:
            raise bad_request('tool_choice "auto" needs the server started with '
                              "--tool-call-parser", "tool_choice")
        return ToolPlan(template_tools, None, True)
    if choice == "required":
        chosen = tools
    else:
        chosen = [t for t in tools if t.function.name == choice.function.name]
        if not chosen:
            raise bad_request(f"tool_choice names {choice.function.name!r}, which is not "
                              "one of the tools", "tool_choice")
    grammar = calls_grammar(tok, chosen, req.parallel_tool_calls)
    return ToolPlan(template_tools, Constraint("lark", grammar, "tools"), True)


def _tag(tok: Tokenizer, text: str) -> str:
    """A tag that the vocabulary holds as one added token is matched as that token
    (llguidance sees added tokens only by id); otherwise as its bytes."""
    token_id = tok.hf.get_added_vocab().get(text)
    return f"<[{token_id}]>" if token_id is not None else json.dumps(text)


def call_schema(tool: Tool) -> dict:
    params = tool.function.parameters or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": tool.function.name},
                                             "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def calls_grammar(tok: Tokenizer, tools: list[Tool], parallel: bool) -> str:
    """Lark: one call block (or several, one per line) whose JSON names one of ``tools``."""
    schema = {"anyOf": [call_schema(t) for t in tools], "x-guidance": JSON_STYLE}
    start, end = _tag(tok, HermesToolParser.START), _tag(tok, HermesToolParser.END)
    calls = 'call ("\\n" call)*' if parallel else "call"
    return (f"start: {calls}\n"
            f'call: {start} "\\n" body "\\n" {end}\n'
            f"body: %json {json.dumps(schema)}\n")


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
