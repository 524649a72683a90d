"""The HF fast tokenizer of a GGUF file, built from its metadata without torch.

transformers' `AutoTokenizer.from_pretrained(folder, gguf_file=...)` reads the file with a
torch-based reader, and the serving venv has no torch. A GGUF carries no tokenizer.json, only
llama.cpp's description of one (vocabulary, merges, token types, special ids, and the name of
the pre-tokenizer in `tokenizer.ggml.pre`), so we rebuild it from that with `tokenizers`,
splitting text the way llama.cpp does for that name: that is how the model sees its prompts.
(`tokenizer.ggml.add_space_prefix` is not read: llama.cpp uses it for sentencepiece only.)
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

_FIELDS = ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id",
           "unknown_token_id", "padding_token_id", "add_bos_token", "add_eos_token")

# llama.cpp's split regexes (llama-vocab.cpp, `llm_tokenizer_bpe`), applied one after another,
# each splitting the pieces the one before left. Where llama.cpp spells a regex with its
# workaround for `(?i:...)`, we use the original from the model's tokenizer.json: the same splits.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one at a time
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
          r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# What llama.cpp does with "default" (and files from before `tokenizer.ggml.pre` existed):
# punctuation runs apart, then GPT-2, then numbers apart and cut into threes.
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]

# tokenizer.ggml.pre -> (splits, llama.cpp's ignore_merges, its add_bos when the file is silent).
# "gpt2" is not a name llama.cpp writes ("gpt-2" is), but files made by other tools use it.
_PRE: dict[str, tuple[list[str], bool, bool]] = {}
for _names, _spec in (
    ("smollm starcoder refact command-r codeshell exaone minerva-7b",
     ([r"\p{N}", _GPT2], False, False)),  # every digit apart, then GPT-2
    ("gpt2 gpt-2 phi-2 mpt olmo", ([_GPT2], False, False)),
    ("default", (_DEFAULT, False, False)),
    ("qwen2 stablelm2 deepseek-r1-qwen megrez", ([_QWEN2], False, False)),
    ("llama3 llama-v3 llama-bpe falcon3 dbrx smaug-bpe", ([_LLAMA3], True, True)),
    ("gpt-4o llama4", ([_GPT4O], False, False)),
):
    _PRE.update(dict.fromkeys(_names.split(), _spec))

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types


def read_gguf_tokenizer_metadata(path: str | Path) -> dict:
    """The `tokenizer.*` fields a tokenizer needs, keyed by their GGUF names.

    GGUFReader memory-maps the file; only these fields' values are converted, never tensors.
    """
    import gguf  # here, so importing this module stays cheap

    reader = gguf.GGUFReader(str(path))
    wanted = {f"tokenizer.ggml.{name}" for name in _FIELDS} | {"tokenizer.chat_template"}
    return {name: field.contents() for name, field in reader.fields.items() if name in wanted}


def _pre_tokenizer(splits: list[str]):
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
    # The regexes above did the splitting; ByteLevel only maps bytes to its alphabet.
    return pre_tokenizers.Sequence(steps + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                     use_regex=False)])


def gguf_tokenizer(path: str | Path):
    """The fast tokenizer the GGUF file at `path` describes (byte-level BPE files only)."""
    from transformers import PreTrainedTokenizerFast

    meta = read_gguf_tokenizer_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer model {kind!r} in GGUF is not supported "
                         "(only 'gpt2', byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre") or "default"  # llama.cpp's choice for files without one
    if pre not in _PRE:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} in GGUF is not supported "
                         f"(supported: {', '.join(sorted(_PRE))})")
    splits, ignore_merges, add_bos_default = _PRE[pre]

    # Tokens stay as the file spells them. Normal ones are in the byte alphabet; control and
    # user-defined ones may be raw text (`<｜begin▁of▁sentence｜>`, `<my tool>`), which is fine:
    # they are added tokens, matched in the raw text as llama.cpp does, never reached by merges.
    # Like llama.cpp, an empty token is named "[EMPTY_<id>]" and a repeated one maps to its last id.
    tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(meta["tokenizer.ggml.tokens"])]
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    backend.pre_tokenizer = _pre_tokenizer(splits)
    backend.decoder = decoders.ByteLevel()

    types = meta.get("tokenizer.ggml.token_type") or []
    # Special tokens are matched whole and dropped by skip_special_tokens; user-defined ones
    # are matched whole but are ordinary text.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == _USER_DEFINED])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"), pad_token=token("padding_token_id"),
        # Passed explicitly, so transformers builds the post-processor that adds them.
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
        # Decoding must give back the bytes the tokens stand for (streams are cut from it).
        clean_up_tokenization_spaces=False,
    )


def save_gguf_tokenizer(path: str | Path, out_dir: str | Path) -> None:
    """Write the GGUF's tokenizer as an HF folder that `AutoTokenizer` loads without torch."""
    tokenizer = gguf_tokenizer(path)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json.
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
    # transformers 5 no longer writes this file; older readers of the folder look for it.
    (Path(out_dir) / "special_tokens_map.json").write_text(
        json.dumps(tokenizer.special_tokens_map, indent=2, ensure_ascii=False) + "\n")
