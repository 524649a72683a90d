"""Tool calls in a model's output → OpenAI ``tool_calls``, as text streams in.

Two formats (``--tool-call-parser``), each a parser with ``feed(text) -> (content,
closed calls)`` and ``finish() -> (content, calls)``:

- ``hermes`` / ``qwen25``: Qwen2.5 / Qwen3 (and Hermes-style templates) write each
  call as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``. Text
  outside the blocks is the message content; each block becomes one call when it
  closes, so a stream gets every call whole, in order, with its index. Text that
  could begin a tag is held back until the next piece decides. A block whose JSON does
  not parse is returned as content, as the model wrote it, rather than dropped.
- ``llama3_json``: Llama 3.x answers a call with the whole message as JSON,
  ``{"name": ..., "parameters": {...}}`` (several joined by ``;``), after an optional
  ``<|python_tag|>``. An answer that starts that way is held until it ends and then
  parsed; if it is not calls after all, it is returned as content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from sgljax.server.reasoning_parser import held_back


@dataclass(frozen=True)
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str  # a JSON object as a string, as OpenAI sends it

    def to_openai(self) -> dict:
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def _parse_call(body: str) -> tuple[str, str] | None:
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    args = call.get("arguments", call.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments already as a string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return call["name"], json.dumps(args, ensure_ascii=False)


class HermesToolParser:
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self):
        self.calls: list[ToolCall] = []
        self._pending = ""
        self._inside = False

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """Add generated text; returns (new content, calls that closed)."""
        self._pending += text
        content, closed = [], []
        while self._pending:
            if self._inside:
                at = self._pending.find(self.END)
                if at < 0:
                    break  # the call is not complete yet
                body, self._pending = self._pending[:at], self._pending[at + len(self.END):]
                self._inside = False
                parsed = _parse_call(body.strip())
                if parsed is None:
                    content.append(self.START + body + self.END)
                    continue
                call = _new_call(len(self.calls), *parsed)
                self.calls.append(call)
                closed.append(call)
            else:
                at = self._pending.find(self.START)
                if at < 0:
                    keep = held_back(self._pending, self.START)
                    content.append(self._pending[:len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep:]
                    break
                content.append(self._pending[:at])
                self._pending = self._pending[at + len(self.START):]
                self._inside = True
        return "".join(content), closed

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end of the output: held-back text, and an unclosed block as content."""
        rest = (self.START if self._inside else "") + self._pending
        self._pending, self._inside = "", False
        return rest, []


def _new_call(index: int, name: str, arguments: str) -> ToolCall:
    return ToolCall(index, f"call_{uuid.uuid4().hex[:24]}", name, arguments)


class Llama3JsonToolParser:
    PYTHON_TAG = "<|python_tag|>"

    def __init__(self):
        self.calls: list[ToolCall] = []
        self._held = ""
        self._calls_maybe: bool | None = None  # undecided until the first non-space text

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if self._calls_maybe is False:
            return text, []
        self._held += text
        head = self._held.lstrip()
        if not head or self.PYTHON_TAG.startswith(head):
            return "", []  # nothing decisive yet
        self._calls_maybe = head.startswith("{") or head.startswith(self.PYTHON_TAG)
        if self._calls_maybe:
            return "", []
        out, self._held = self._held, ""
        return out, []

    def finish(self) -> tuple[str, list[ToolCall]]:
        held, self._held = self._held, ""
        if not self._calls_maybe:
            return held, []
        parsed = self._parse(held.strip().removeprefix(self.PYTHON_TAG))
        if parsed is None:
            return held, []
        self.calls = [_new_call(i, name, args) for i, (name, args) in enumerate(parsed)]
        return "", self.calls

    @staticmethod
    def _parse(text: str) -> list[tuple[str, str]] | None:
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(text):
            try:
                obj, at = decoder.raw_decode(text, at)
            except ValueError:
                return None
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return None
            parsed = _parse_call(json.dumps({"name": obj["name"], "arguments": obj.get(
                "parameters", obj.get("arguments", {}))}))
            if parsed is None:
                return None
            calls.append(parsed)
            while at < len(text) and text[at] in " \t\n;":
                at += 1
        return calls or None


PARSERS = {"hermes": HermesToolParser, "qwen25": HermesToolParser,
           "llama3_json": Llama3JsonToolParser}


def parse_tool_calls(text: str, fmt: str = "hermes") -> tuple[str, list[ToolCall]]:
    """A whole output → (content without the calls, the calls)."""
    parser = PARSERS[fmt]()
    content, calls = parser.feed(text)
    rest, more = parser.finish()
    return content + rest, calls + more
