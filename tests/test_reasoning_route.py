"""reasoning_content in chat answers (--reasoning-parser qwen3), streamed and whole, on
outputs fed to the route's own functions (a tiny random model never thinks on cue)."""

import asyncio
import json
from types import SimpleNamespace

from sgljax.engine.outputs import RequestOutput
from sgljax.server.openai_adapters import Prepared
from sgljax.server.openai_routes import _chat_events
from sgljax.server.chat_output import ChatOutputParser
from sgljax.server.responses import ChoiceState, chat_response

PIECES = ["<thi", "nk>\nThe user", " says hi.</th", "ink>\n\nHel", "lo!"]


class FakeHandle:
    """Delivers one RequestOutput per piece, the last one finishing."""

    def __init__(self, rid, pieces):
        self.outputs = [RequestOutput(rid, p, [i], i == len(pieces) - 1,
                                      "stop" if i == len(pieces) - 1 else None)
                        for i, p in enumerate(pieces)]

    @property
    def done(self):
        return not self.outputs

    async def next_batch(self):
        return [self.outputs.pop(0)]

    def abort(self):
        pass


def _stream(parser: ChatOutputParser, pieces=PIECES):
    ctx = SimpleNamespace(model_name="m", token_strings=None)
    states = {"r": ChoiceState(index=0, prompt_index=0)}
    prep = Prepared([[1, 2]], [None], 1)

    async def run():
        return [e async for e in _chat_events(ctx, "id", 0, FakeHandle("r", pieces), states,
                                              prep, False, 0, False, {"r": parser})]

    events = asyncio.run(run())
    chunks = [json.loads(e[len("data: "):]) for e in events if e.startswith("data: {")]
    return [c["choices"][0]["delta"] for c in chunks], chunks[-1]["choices"][0]["finish_reason"]


def test_streamed_thinking_goes_to_reasoning_content():
    deltas, _ = _stream(ChatOutputParser(reasoning=True))
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    assert reasoning == "The user says hi."
    assert content == "Hello!"
    assert not any("<" in v for d in deltas for v in d.values() if isinstance(v, str))


def test_without_a_parser_the_text_is_left_as_written():
    deltas, _ = _stream(ChatOutputParser())
    assert "".join(d.get("content", "") for d in deltas) == "".join(PIECES)
    assert not any("reasoning_content" in d for d in deltas)


def test_whole_answer_carries_reasoning_content():
    st = ChoiceState(index=0, prompt_index=0, text="".join(PIECES), finish_reason="stop")
    body = chat_response("id", 0, "m", [st], [2], None, False, 0,
                         lambda: ChatOutputParser(reasoning=True))
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == "The user says hi." and message["content"] == "Hello!"
    plain = chat_response("id", 0, "m", [st], [2], None, False, 0)["choices"][0]["message"]
    assert "reasoning_content" not in plain and plain["content"] == "".join(PIECES)


def test_unknown_reasoning_parser_is_refused():
    import pytest

    from sgljax.server.args import ServerArgs

    with pytest.raises(ValueError, match="--reasoning-parser must be one of qwen3"):
        ServerArgs(reasoning_parser="deepseek").validate()
