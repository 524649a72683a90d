"""One chat choice's generated text → the assistant message's fields, as text streams in.

The reasoning parser takes the thinking block out first; what remains is content, from
which the tool-call parser takes the call blocks. Streaming and whole responses run
the same parsers (a whole response is one feed and a finish), so they always agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sgljax.server.reasoning_parser import Qwen3ReasoningParser
from sgljax.server.tool_parser import PARSERS, ToolCall


@dataclass
class ChatOutputParser:
    reasoning: bool = False  # --reasoning-parser is on and the request keeps it separate
    thinking_opened: bool = False  # the prompt ended inside a <think> block
    tools: str | None = None  # the tool-call format to read out (server/tool_parser.py)
    calls: list[ToolCall] = field(default_factory=list)

    def __post_init__(self):
        self._reasoning = Qwen3ReasoningParser(self.thinking_opened) if self.reasoning else None
        self._tools = PARSERS[self.tools]() if self.tools else None

    def feed(self, text: str, finished: bool = False) -> dict:
        """New text → the delta's fields (reasoning_content, content, tool_calls)."""
        reasoning, content = (self._reasoning.feed(text) if self._reasoning else ("", text))
        if finished and self._reasoning:
            more_r, more_c = self._reasoning.finish()
            reasoning, content = reasoning + more_r, content + more_c
        closed: list[ToolCall] = []
        if self._tools:
            content, closed = self._tools.feed(content)
            if finished:
                rest, more = self._tools.finish()
                content, closed = content + rest, closed + more
            self.calls += closed
        delta = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        if closed:
            delta["tool_calls"] = [c.to_openai() for c in closed]
        return delta

    @property
    def saw_reasoning(self) -> bool:
        return self._reasoning is not None and self._reasoning.seen_start

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """OpenAI says "tool_calls" when the answer ended with calls to make."""
        return "tool_calls" if self.calls and engine_reason == "stop" else engine_reason


def whole_message(parser: ChatOutputParser, text: str) -> dict:
    """A finished choice's assistant message."""
    delta = parser.feed(text, finished=True)
    message = {"role": "assistant", "content": delta.get("content", ""), "refusal": None,
               "tool_calls": None}
    if parser.saw_reasoning:
        message["reasoning_content"] = delta.get("reasoning_content", "")
    if parser.calls:
        message["tool_calls"] = [{k: v for k, v in c.to_openai().items() if k != "index"}
                                 for c in parser.calls]
        message["content"] = message["content"] or None
    return message
