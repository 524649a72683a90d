"""Qwen/Hermes tool-call blocks → OpenAI tool_calls, whole and at every stream split."""

import json

import pytest

from sgljax.server.tool_parser import HermesToolParser, Llama3JsonToolParser, parse_tool_calls

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
TIME = '{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}'
CASES = [
    # (output, content, [(name, arguments as a dict)])
    (f"<tool_call>\n{WEATHER}\n</tool_call>", "",
     [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    (f"Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call>",
     "Let me check.\n\n", [("get_weather", {"city": "Paris", "unit": "celsius"}),
                           ("get_time", {"tz": "Europe/Paris"})]),
    ("No tools needed: 2 < 3.", "No tools needed: 2 < 3.", []),
    ("<tool_call>\n{not json}\n</tool_call>", "<tool_call>\n{not json}\n</tool_call>", []),
    (f"<tool_call>\n{WEATHER}", f"<tool_call>\n{WEATHER}", []),  # cut off by max_tokens
    ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', "", [("f", {"x": 1})]),
    ('<tool_call>{"name": "héllo", "arguments": {"q": "日本"}}</tool_call>', "",
     [("héllo", {"q": "日本"})]),
]


def _calls(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("text,content,calls", CASES)
def test_whole_output(text, content, calls):
    got_content, got_calls = parse_tool_calls(text)
    assert got_content == content and _calls(got_calls) == calls
    assert [c.index for c in got_calls] == list(range(len(calls)))
    assert len({c.id for c in got_calls}) == len(calls)


def _fed_in_two(parser, text: str, cut: int):
    """(content, calls) of ``text`` fed as two pieces, cut at ``cut``, then finished."""
    got_content, got_calls = "", []
    for piece in (text[:cut], text[cut:]):
        c, closed = parser.feed(piece)
        got_content += c
        got_calls += closed
    rest, more = parser.finish()
    return got_content + rest, got_calls + more


@pytest.mark.parametrize("text,content,calls", CASES)
def test_split_at_every_position(text, content, calls):
    for cut in range(len(text) + 1):
        got_content, got_calls = _fed_in_two(HermesToolParser(), text, cut)
        assert (got_content, _calls(got_calls)) == (content, calls), cut


def test_a_tag_never_leaks_into_streamed_content():
    text = f"Sure.<tool_call>\n{TIME}\n</tool_call>"
    parser = HermesToolParser()
    streamed = [parser.feed(ch)[0] for ch in text] + [parser.finish()[0]]
    assert all("<" not in piece for piece in streamed)
    assert "".join(streamed) == "Sure."
    assert [c.to_openai()["function"]["name"] for c in parser.calls] == ["get_time"]
    assert parser.calls[0].to_openai()["type"] == "function"


LLAMA_CASES = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', "",
     [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": [1]}}',
     "", [("a", {}), ("b", {"x": [1]})]),
    ("  \n{\"name\": \"f\", \"arguments\": {\"q\": \"日本\"}}", "", [("f", {"q": "日本"})]),
    ("The weather is fine.", "The weather is fine.", []),
    ('{"not": "a call"}', '{"not": "a call"}', []),
    ('{"name": "f", "parameters": {"x": ', '{"name": "f", "parameters": {"x": ', []),  # cut off
]


@pytest.mark.parametrize("text,content,calls", LLAMA_CASES)
def test_llama3_json_at_every_split(text, content, calls):
    assert (lambda c: (c[0], _calls(c[1])))(parse_tool_calls(text, "llama3_json")) == (
        content, calls)
    for cut in range(len(text) + 1):
        got_content, got_calls = _fed_in_two(Llama3JsonToolParser(), text, cut)
        assert (got_content, _calls(got_calls)) == (content, calls), cut
        assert [c.index for c in got_calls] == list(range(len(calls)))
