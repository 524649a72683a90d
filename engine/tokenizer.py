"""Tokenizing prompts (with the model's chat template) and detokenizing streams."""

from __future__ import annotations

from pathlib import Path

from jinja2 import TemplateError
from transformers import AutoTokenizer


class ChatTemplateError(ValueError):
    """The chat template cannot render these messages (or the model has none)."""


class Tokenizer:
    """The model's tokenizer; one instance serves the engine and the HTTP routes (HF fast
    tokenizers encode and decode safely from several threads)."""

    def __init__(self, path: str | Path):
        self.hf = AutoTokenizer.from_pretrained(str(path))
        self.eos_token_id = self.hf.eos_token_id
        self.vocab_size = len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs) -> list[int]:
        """Prompt ids for a conversation; ``kwargs`` reach the template (enable_thinking...)."""
        try:
            text = self.hf.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=add_generation_prompt,
                                               **kwargs)
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template rejected the messages: {e}") from None
        except ValueError as e:  # e.g. the tokenizer has no chat template
            raise ChatTemplateError(f"cannot apply the chat template: {e}") from None
        # The template already wrote the special tokens (BOS, role markers) as text.
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a character.

    Stop strings are cut from the output; text that could be the start of a
    stop string is held back until it is known not to be one.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True,
                 stop: list[str] | None = None):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (stop string excluded once found)
        self.emitted = 0  # characters of ``text`` already handed out
        self._prefix_offset = 0
        self._read_offset = 0
        self.stopped_by: str | None = None

    def add(self, token_id: int) -> str:
        """Add one token; returns the new text that is safe to emit."""
        self.ids.append(token_id)
        if self.stopped_by is not None:
            return ""
        prefix = self.tok.decode(self.ids[self._prefix_offset:self._read_offset], self.skip)
        full = self.tok.decode(self.ids[self._prefix_offset:], self.skip)
        if full.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        search_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        for s in self.stop:
            at = self.text.find(s, search_from)
            if at != -1:
                self.text = self.text[:at]
                self.stopped_by = s
                return self.flush()
        return self._take(len(self.text) - self._holdback())

    def _holdback(self) -> int:
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    best = max(best, k)
                    break
        return best

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out

    def flush(self) -> str:
        """At the end of a request: everything not yet emitted."""
        return self._take(len(self.text))
