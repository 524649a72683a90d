"""Engine outputs → OpenAI response bodies and stream chunks (plain dicts, JSON-ready)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache

from sgljax.engine.outputs import Completion
from sgljax.engine.tokenizer import Tokenizer
from sgljax.server.chat_output import ChatOutputParser, whole_message

LOGPROB_FLOOR = -9999.0  # JSON has no -inf


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def _finite(x: float) -> float:
    return x if math.isfinite(x) else LOGPROB_FLOOR


class TokenStrings:
    """Each token id's own text, as logprobs report it (cached: the vocabulary is fixed)."""

    def __init__(self, tok: Tokenizer):
        self._decode = lru_cache(maxsize=1 << 16)(
            lambda t: tok.decode([t], skip_special_tokens=False))

    def __call__(self, token_id: int) -> str:
        return self._decode(token_id)


@dataclass
class ChoiceState(Completion):
    """Everything generated so far for one choice (one engine sequence)."""

    index: int = 0
    prompt_index: int = 0


def usage(choices: list[ChoiceState], prompt_lens: list[int]) -> dict:
    """Prompts count once however many choices share them (as OpenAI counts n>1)."""
    cached = {}
    for c in choices:
        cached[c.prompt_index] = max(cached.get(c.prompt_index, 0), c.cached_tokens)
    prompt = sum(prompt_lens)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": min(sum(cached.values()), prompt)}}


# -- logprobs -------------------------------------------------------------------------
def chat_logprobs(names: TokenStrings, ids: list[int], lps: list[float],
                  tops: list[list[tuple[int, float]]], k: int) -> dict:
    def entry(t: int, lp: float) -> dict:
        s = names(t)
        return {"token": s, "logprob": _finite(lp), "bytes": list(s.encode("utf-8"))}

    content = []
    for t, lp, top in zip(ids, lps, tops):
        e = entry(t, lp)
        e["top_logprobs"] = [entry(a, b) for a, b in top[:k]]
        content.append(e)
    return {"content": content, "refusal": None}


def completion_logprobs(names: TokenStrings, ids: list[int], lps: list[float],
                        tops: list[list[tuple[int, float]]], k: int, offset: int) -> dict:
    tokens, offsets = [], []
    for t in ids:
        offsets.append(offset)
        s = names(t)
        tokens.append(s)
        offset += len(s)
    top = []
    for row in tops:
        d = {}
        for a, b in row[:k]:
            d.setdefault(names(a), _finite(b))
        top.append(d)
    return {"tokens": tokens, "token_logprobs": [_finite(x) for x in lps],
            "top_logprobs": top, "text_offset": offsets}


# -- whole responses --------------------------------------------------------------------
def chat_response(rid: str, created: int, model: str, choices: list[ChoiceState],
                  prompt_lens: list[int], names: TokenStrings, logprobs: bool, k: int,
                  new_parser=ChatOutputParser) -> dict:
    """``new_parser()``: a ChatOutputParser set up as the request asks."""
    out = []
    for c in choices:
        lp = (chat_logprobs(names, c.token_ids, c.logprobs, c.top_logprobs, k)
              if logprobs else None)
        parser = new_parser()
        out.append({"index": c.index, "message": whole_message(parser, c.text),
                    "logprobs": lp, "finish_reason": parser.finish_reason(c.finish_reason),
                    "matched_stop": c.matched_stop})
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": out, "usage": usage(choices, prompt_lens), "system_fingerprint": None}


def completion_response(rid: str, created: int, model: str, choices: list[ChoiceState],
                        prompt_lens: list[int], names: TokenStrings, logprobs: int | None,
                        echo_texts: list[str] | None) -> dict:
    out = []
    for c in choices:
        prefix = echo_texts[c.prompt_index] if echo_texts else ""
        lp = (completion_logprobs(names, c.token_ids, c.logprobs, c.top_logprobs, logprobs,
                                  len(prefix)) if logprobs is not None else None)
        out.append({"index": c.index, "text": prefix + c.text, "logprobs": lp,
                    "finish_reason": c.finish_reason, "matched_stop": c.matched_stop})
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": out, "usage": usage(choices, prompt_lens), "system_fingerprint": None}


# -- stream chunks ------------------------------------------------------------------------
def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict,
               finish_reason: str | None = None, logprobs: dict | None = None,
               matched_stop=None, with_usage_field: bool = False) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": logprobs,
              "finish_reason": finish_reason}
    if finish_reason is not None:
        choice["matched_stop"] = matched_stop
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [choice]}
    if with_usage_field:
        chunk["usage"] = None
    return chunk


def completion_chunk(rid: str, created: int, model: str, index: int, text: str,
                     finish_reason: str | None = None, logprobs: dict | None = None,
                     matched_stop=None, with_usage_field: bool = False) -> dict:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if finish_reason is not None:
        choice["matched_stop"] = matched_stop
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": [choice]}
    if with_usage_field:
        chunk["usage"] = None
    return chunk


def usage_chunk(rid: str, created: int, model: str, obj: str, usage_body: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage_body}
