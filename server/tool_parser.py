"""Tool calls in a model's output → OpenAI ``tool_calls``, as text streams in.

Qwen2.5 / Qwen3 (and Hermes-style templates) write each call as
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``. Text outside the
blocks is the message content; each block becomes one call when it closes, so a
stream gets every call whole, in order, with its index. Text that could begin a tag
is held back until the next piece decides. A block whose JSON does not parse is
returned as content, as the model wrote it, rather than dropped.
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
                call = ToolCall(len(self.calls), f"call_{uuid.uuid4().hex[:24]}", *parsed)
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

    def finish(self) -> str:
        """At the end of the output: held-back text, and an unclosed block as content."""
        rest = (self.START if self._inside else "") + self._pending
        self._pending, self._inside = "", False
        return rest


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """A whole output → (content without the call blocks, the calls)."""
    parser = HermesToolParser()
    content, calls = parser.feed(text)
    return content + parser.finish(), calls
