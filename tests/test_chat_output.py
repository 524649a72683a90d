"""A Qwen3 answer with a thinking block, text and tool calls → the assistant message,
whole and streamed at every split, with the finish_reason OpenAI gives it."""

import json

import pytest

from sgljax.server.chat_output import ChatOutputParser, whole_message

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TIME = '{"name": "get_time", "arguments": {"zone": "CET"}}'
TEXT = (f"<think>\nThe user wants weather.\n</think>\n\nLet me check.\n<tool_call>\n{WEATHER}\n"
        f"</tool_call>\n<tool_call>\n{TIME}\n</tool_call>")
CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]


def _streamed(parser, pieces, reason="stop"):
    fields = {"reasoning_content": "", "content": ""}
    calls = []
    for i, piece in enumerate(pieces):
        delta = parser.feed(piece, finished=i == len(pieces) - 1)
        for key in fields:
            fields[key] += delta.get(key, "")
        calls += delta.get("tool_calls", [])
    return fields, calls, parser.finish_reason(reason)


def test_whole_message():
    message = whole_message(ChatOutputParser(reasoning=True, tools="hermes"), TEXT)
    assert message["reasoning_content"] == "The user wants weather.\n"
    assert message["content"] == "Let me check.\n\n"
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
           for c in message["tool_calls"]]
    assert got == CALLS and all("index" not in c and c["type"] == "function"
                                for c in message["tool_calls"])


def test_calls_only_leave_content_none_and_finish_with_tool_calls():
    parser = ChatOutputParser(tools="hermes")
    message = whole_message(parser, f"<tool_call>\n{WEATHER}\n</tool_call>")
    assert message["content"] is None and len(message["tool_calls"]) == 1
    assert parser.finish_reason("stop") == "tool_calls"
    assert parser.finish_reason("length") == "length"  # cut off: not a finished call list


@pytest.mark.parametrize("cut", range(0, len(TEXT) + 1, 3))
def test_streamed_at_every_split_equals_whole(cut):
    whole = whole_message(ChatOutputParser(reasoning=True, tools="hermes"), TEXT)
    fields, calls, reason = _streamed(ChatOutputParser(reasoning=True, tools="hermes"),
                                      [TEXT[:cut], TEXT[cut:]])
    assert fields["reasoning_content"] == whole["reasoning_content"]
    assert fields["content"] == whole["content"]
    assert [c["index"] for c in calls] == [0, 1] and reason == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == CALLS


def test_one_character_at_a_time_never_leaks_a_tag():
    fields, calls, _ = _streamed(ChatOutputParser(reasoning=True, tools="hermes"), list(TEXT))
    assert "<" not in fields["content"] + fields["reasoning_content"] and len(calls) == 2


def test_without_tools_the_blocks_stay_in_content():
    message = whole_message(ChatOutputParser(reasoning=True), TEXT)
    assert message["tool_calls"] is None and "<tool_call>" in message["content"]
