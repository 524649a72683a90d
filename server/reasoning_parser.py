"""Qwen3's thinking, ``<think>…</think>``, split from the answer as text streams in.

OpenAI-style clients read it as ``reasoning_content`` beside ``content`` (SGLang's and
vLLM's ``--reasoning-parser qwen3``). Text that could be the start of a tag is held back
until the next piece shows whether it is one, so a tag split across stream chunks never
leaks into either field.
"""

from __future__ import annotations


def held_back(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` could begin ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class Qwen3ReasoningParser:
    START, END = "<think>", "</think>"

    def __init__(self, in_reasoning: bool = False):
        # True when the prompt already opened the block (templates that end the
        # generation prompt with "<think>\n"): the output starts inside it.
        self.in_reasoning = in_reasoning
        self.seen_start = in_reasoning
        self.done = False  # the block closed: the rest is the answer
        self._pending = ""
        self._strip = in_reasoning  # newlines right after a tag belong to neither field

    def feed(self, text: str) -> tuple[str, str]:
        """Add generated text; returns the new (reasoning, content) that is safe to emit."""
        self._pending += text
        reasoning, content = [], []
        while self._pending:
            if self._strip:  # the newlines may come in a later piece than the tag
                self._pending = self._pending.lstrip("\n")
                if not self._pending:
                    break
                self._strip = False
            if self.done:
                content.append(self._pending)
                self._pending = ""
            elif self.in_reasoning:
                at = self._pending.find(self.END)
                if at < 0:
                    keep = held_back(self._pending, self.END)
                    reasoning.append(self._pending[:len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep:]
                    break
                reasoning.append(self._pending[:at])
                self._pending = self._pending[at + len(self.END):]
                self.in_reasoning, self.done, self._strip = False, True, True
            else:  # before any block: only an opening tag at the very start counts
                stripped = self._pending.lstrip()
                if stripped.startswith(self.START):
                    self._pending = stripped[len(self.START):]
                    self.in_reasoning = self.seen_start = self._strip = True
                elif self.START.startswith(stripped):
                    break  # could still become the tag: wait for more
                else:
                    self.done = True  # no thinking block: everything is the answer
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """At the end of the output: what was held back (an unclosed block is reasoning)."""
        rest, self._pending = self._pending, ""
        if self.in_reasoning:
            return rest, ""
        return "", rest


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str | None, str]:
    """A whole output → (reasoning or None when there was no block, content)."""
    parser = Qwen3ReasoningParser(in_reasoning)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.finish()
    return (r1 + r2 if parser.seen_start else None), c1 + c2
