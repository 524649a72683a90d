"""Qwen3 thinking blocks split from the answer, whole and at every stream split."""

import pytest

from sgljax.server.reasoning_parser import Qwen3ReasoningParser, split_reasoning

CASES = [
    # (output text, prompt opened the block, reasoning, content)
    ("<think>\nThe user greets me.\n</think>\n\nHello!", False, "The user greets me.\n", "Hello!"),
    ("<think></think>Paris.", False, "", "Paris."),
    ("Just an answer, no thinking.", False, None, "Just an answer, no thinking."),
    ("A < b and <thin is not a tag", False, None, "A < b and <thin is not a tag"),
    ("Let me think.\n</think>\n\n42", True, "Let me think.\n", "42"),
    ("<think>\nstill thinking when max_tokens hit", False, "still thinking when max_tokens hit", ""),
    ("<think>a</think>b</think>c", False, "a", "b</think>c"),  # only the first block counts
    ("<think>x < y, and </thin", False, "x < y, and </thin", ""),
]


@pytest.mark.parametrize("text,opened,reasoning,content", CASES)
def test_whole_output(text, opened, reasoning, content):
    assert split_reasoning(text, opened) == (reasoning, content)


@pytest.mark.parametrize("text,opened,reasoning,content", CASES)
def test_every_two_piece_stream_split_gives_the_same(text, opened, reasoning, content):
    for cut in range(len(text) + 1):
        parser = Qwen3ReasoningParser(opened)
        got_r, got_c = "", ""
        for piece in (text[:cut], text[cut:]):
            r, c = parser.feed(piece)
            got_r, got_c = got_r + r, got_c + c
        r, c = parser.finish()
        assert (got_r + r, got_c + c) == (reasoning or "", content), cut


def test_character_by_character_never_leaks_a_tag():
    text = "<think>\nfirst\n</think>\n\nsecond"
    parser = Qwen3ReasoningParser()
    pieces = [parser.feed(ch) for ch in text] + [parser.finish()]
    assert all("<" not in r and "<" not in c for r, c in pieces)
    assert "".join(r for r, _ in pieces) == "first\n"
    assert "".join(c for _, c in pieces) == "second"
