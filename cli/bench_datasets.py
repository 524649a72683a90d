"""Benchmark prompts of known token lengths, built with the served model's tokenizer.

``sgljax bench`` is a client: it never imports the engine. The tokenizer comes
from transformers, found through ``--tokenizer``, the server's
``/get_model_info`` or the model name in ``/v1/models``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path


class BenchError(ValueError):
    """A bad benchmark setting or an unusable server: one plain line for the user."""


@dataclass
class BenchRequest:
    prompt: str | list[int]  # text, or token ids (the random-ids dataset)
    prompt_len: int  # tokens in ``prompt`` with the benchmark's tokenizer, no special tokens
    output_len: int  # max_tokens asked for


# --- tokenizer ----------------------------------------------------------------------------


def load_tokenizer(path: str):
    """AutoTokenizer from a local folder (or a .gguf file, or a cached hub name)."""
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    try:
        if p.is_file() and p.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        if p.exists():
            return AutoTokenizer.from_pretrained(str(p))
        # Not a local path: only the local HF cache is tried, never the network.
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises many kinds; all mean "not usable"
        raise BenchError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from None


def find_tokenizer(explicit: str | None, model_info: dict | None, model_name: str | None):
    """The tokenizer to build prompts with, and where it came from.

    Order: ``--tokenizer``; the server's ``/get_model_info`` (``tokenizer_path``
    then ``model_path``, when they exist on this machine); the served model
    name when it is a local path or in the HF cache.
    """
    if explicit:
        return load_tokenizer(explicit), explicit
    candidates = []
    for key in ("tokenizer_path", "model_path"):
        value = (model_info or {}).get(key)
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            candidates.append(value)
    if model_name:
        candidates.append(model_name)
    for cand in candidates:
        try:
            return load_tokenizer(cand), cand
        except BenchError:
            continue
    raise BenchError(f"cannot find the tokenizer of the served model {model_name!r}; "
                     "pass --tokenizer PATH (a local model folder)")


# --- exact-length random text --------------------------------------------------------------

# Vocabulary entries that are a space plus lowercase ASCII letters (byte-level BPE
# writes the space as "Ġ", SentencePiece as "▁"). Each is its own pre-token when
# joined with spaces, so a text made of them re-encodes to the same ids: the
# prompt length is exact by construction (and checked, see ``_exact_text``).
_WORD_TOKEN = re.compile("^[\u0120\u2581][a-z]{2,}$")


class PromptBuilder:
    def __init__(self, tokenizer, seed: int = 0):
        self.tok = tokenizer
        self.rng = random.Random(seed)
        special = set(tokenizer.all_special_ids)
        vocab = tokenizer.get_vocab()
        self.word_ids = sorted(i for s, i in vocab.items()
                               if _WORD_TOKEN.match(s) and i not in special)
        self.plain_ids = [i for i in range(tokenizer.vocab_size) if i not in special]
        if not self.plain_ids:
            raise BenchError("the tokenizer has an empty vocabulary")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def random_ids(self, n: int) -> list[int]:
        return [self.rng.choice(self.plain_ids) for _ in range(n)]

    def random_text(self, n: int) -> tuple[str, int]:
        """A text of ``n`` tokens (the achieved length, ``n`` unless the vocabulary is odd)."""
        pool = self.word_ids or self.plain_ids
        return self._exact_text([self.rng.choice(pool) for _ in range(n)], n)

    def _exact_text(self, ids: list[int], n: int) -> tuple[str, int]:
        text = self.tok.decode(ids)
        for _ in range(8):  # decode/encode may merge or split tokens: trim or pad, retry
            got = self.encode(text)
            if len(got) == n:
                return text, n
            ids = got[:n] if len(got) > n else got + self.random_ids(n - len(got))
            text = self.tok.decode(ids)
        return text, len(self.encode(text))


def _lengths(rng: random.Random, n: int, full: int, ratio: float) -> list[int]:
    """SGLang's convention: uniform in [full * ratio, full]; ratio 1.0 = exactly ``full``."""
    low = max(1, int(full * ratio))
    return [rng.randint(low, full) for _ in range(n)]


def random_dataset(builder: PromptBuilder, num: int, input_len: int, output_len: int,
                   ratio: float, as_ids: bool) -> list[BenchRequest]:
    ins = _lengths(builder.rng, num, input_len, ratio)
    outs = _lengths(builder.rng, num, output_len, ratio)
    reqs = []
    for i, o in zip(ins, outs):
        if as_ids:
            reqs.append(BenchRequest(builder.random_ids(i), i, o))
        else:
            text, got = builder.random_text(i)
            reqs.append(BenchRequest(text, got, o))
    return reqs


def shared_prefix_dataset(builder: PromptBuilder, num: int, num_groups: int, prefix_len: int,
                          suffix_len: int, output_len: int) -> list[BenchRequest]:
    """``num_groups`` prefixes; requests take them in turn, each with its own suffix."""
    pool = builder.word_ids or builder.plain_ids
    prefixes = [[builder.rng.choice(pool) for _ in range(prefix_len)] for _ in range(num_groups)]
    reqs = []
    for k in range(num):
        ids = prefixes[k % num_groups] + [builder.rng.choice(pool) for _ in range(suffix_len)]
        text, got = builder._exact_text(ids, prefix_len + suffix_len)
        reqs.append(BenchRequest(text, got, output_len))
    return reqs


def _conversation_pairs(item: dict):
    turns = item.get("conversations") or item.get("conversation") or item.get("messages") or []
    texts = [(t.get("from") or t.get("role"), t.get("value") or t.get("content") or "")
             for t in turns if isinstance(t, dict)]
    if len(texts) >= 2 and texts[0][0] in ("human", "user") and texts[1][0] in ("gpt", "assistant"):
        return texts[0][1], texts[1][1]
    return None


def sharegpt_dataset(builder: PromptBuilder, path: str, num: int,
                     output_len: int | None) -> list[BenchRequest]:
    """First human turn → prompt; the reply's token count → output length (unless given).

    Like SGLang, pairs with under 4 tokens on either side, prompts over 1,024
    tokens or prompt + reply over 2,048 are skipped.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise BenchError(f"dataset file {path} does not exist")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchError(f"{path}: not a ShareGPT JSON file ({e})") from None
    if not isinstance(data, list):
        raise BenchError(f"{path}: expected a JSON list of conversations")
    order = list(range(len(data)))
    builder.rng.shuffle(order)
    reqs = []
    for idx in order:
        pair = _conversation_pairs(data[idx]) if isinstance(data[idx], dict) else None
        if pair is None:
            continue
        prompt_len = len(builder.encode(pair[0]))
        out_len = output_len or len(builder.encode(pair[1]))
        if prompt_len < 4 or out_len < 4 or prompt_len > 1024 or prompt_len + out_len > 2048:
            continue
        reqs.append(BenchRequest(pair[0], prompt_len, out_len))
        if len(reqs) == num:
            return reqs
    raise BenchError(f"{path}: only {len(reqs)} usable conversations, {num} asked for")
