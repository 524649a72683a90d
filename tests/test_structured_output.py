"""Constrained decoding in the engine: outputs match their schema, regex or grammar, at
temperature 1, batched with free requests, compiling nothing after warmup."""

import json
import re

import jsonschema_rs
import numpy as np
import pytest

from sgljax.engine.engine import Engine
from sgljax.engine.constraint import Constraint, json_schema_constraint
from sgljax.engine.grammar import fill_masks
from sgljax.engine.sampling import allowed_tokens
from sgljax.engine.sampling_params import RequestError, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 10}, "zip": {"type": "string",
                                                                 "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "color", "tags", "address", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tiny_models):
    eng = Engine(model_path=str(tiny_models["qwen3"]), page_size=4, chunked_prefill_size=64,
                 max_running_requests=16, context_length=512, max_total_tokens=8192)
    eng.warmup()
    return eng


def _params(constraint=None, seed=0, temperature=1.0, max_tokens=200):
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                          constraint=constraint)


def test_bitmask_unpacks_to_the_tokens_the_matcher_allows(engine):
    state = engine.grammars.matcher(Constraint("regex", "(yes|no)"))
    bits = fill_masks([state, None], 3, engine.model_config.vocab_size)
    allowed = np.asarray(allowed_tokens(bits, engine.model_config.vocab_size))
    assert allowed[1].all() and allowed[2].all()  # no grammar, and padding: everything
    ids = np.flatnonzero(allowed[0])
    texts = {engine.tokenizer.decode([int(i)]) for i in ids}
    assert ids.size and all("yes".startswith(t) or "no".startswith(t) for t in texts), texts


def test_json_schema_outputs_always_validate(engine):
    validator = jsonschema_rs.validator_for(SCHEMA)
    prompts = [[100 + i, 2000 + 7 * i, 30000 + i] for i in range(12)]
    constraint = json_schema_constraint(SCHEMA)
    outs = engine.generate(prompts, [_params(constraint, seed=s) for s in range(12)])
    for out in outs:
        assert out["finish_reason"] == "stop", out
        value = json.loads(out["text"])
        assert validator.is_valid(value), (out["text"], list(validator.iter_errors(value)))
    assert len({o["text"] for o in outs}) > 1  # temperature 1: not one answer twelve times


def test_json_object(engine):
    # Unbounded strings: a random model at temperature 1 may never close one, so an
    # output either ends as an object or runs to max_tokens inside one.
    outs = engine.generate([[500, 600, 700]] * 6,
                           [_params(Constraint("json_object"), seed=s, max_tokens=60)
                            for s in range(6)])
    for out in outs:
        if out["finish_reason"] == "stop":
            assert isinstance(json.loads(out["text"]), dict), out
        else:
            assert out["text"].startswith("{") and len(out["token_ids"]) == 60, out


def test_regex_and_ebnf(engine):
    cases = [(Constraint("regex", r"[A-Z][a-z]{2,8}( [a-z]{1,6}){1,3}\."),
              lambda t: re.fullmatch(r"[A-Z][a-z]{2,8}( [a-z]{1,6}){1,3}\.", t) is not None),
             (Constraint("ebnf", 'root ::= "answer: " ("yes" | "no") "!"'),
              lambda t: t in ("answer: yes!", "answer: no!"))]
    for constraint, ok in cases:
        outs = engine.generate([[500, 600, 700]] * 6,
                               [_params(constraint, seed=s, max_tokens=120) for s in range(6)])
        for out in outs:
            assert out["finish_reason"] == "stop" and ok(out["text"]), (constraint, out)


def test_constrained_and_free_requests_share_a_batch(engine):
    free = [[11, 12, 13, 14], [200, 300], [4000, 5000, 6000]]
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    alone = [o["token_ids"] for o in engine.generate(free, greedy)]
    compiles = engine.compiles_since_warmup()
    constrained = [json_schema_constraint(SCHEMA)] * 3
    outs = engine.generate(free + [[7, 8, 9]] * 3,
                           [greedy] * 3 + [_params(c, seed=s) for s, c in enumerate(constrained)])
    assert [o["token_ids"] for o in outs[:3]] == alone  # the masks touched only their rows
    for out in outs[3:]:
        json.loads(out["text"])
    assert engine.compiles_since_warmup() == compiles  # (eager ops elsewhere count too)


def test_bad_grammars_are_request_errors(engine):
    for constraint in (Constraint("regex", "[a-z"), Constraint("json_schema", '{"type": "nope"}'),
                       Constraint("ebnf", "root ::= undefined_rule")):
        with pytest.raises(RequestError) as e:
            engine.add_request([1, 2, 3], _params(constraint))
        assert e.value.param == "response_format" and "invalid" in str(e.value)
    assert not engine.has_work()


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json"])
def test_tool_call_grammar_output_parses_back(engine, fmt):
    from sgljax.server.protocol import Tool
    from sgljax.server.tool_calls import calls_grammar
    from sgljax.server.tool_parser import parse_tool_calls

    params = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    tools = [Tool.model_validate({"type": "function", "function": {"name": name,
                                                                   "parameters": params}})
             for name in ("alpha", "beta")]
    constraint = Constraint("lark", calls_grammar(engine.tokenizer, tools, True, fmt), "tools")
    outs = engine.generate([[300, 400, 500]] * 4,
                           [_params(constraint, seed=s, max_tokens=150) for s in range(4)])
    for out in outs:
        if out["finish_reason"] != "stop":  # several calls may run past max_tokens
            continue
        content, calls = parse_tool_calls(out["text"], fmt)
        assert content.strip() == "" and calls, out
        for call in calls:
            assert call.name in ("alpha", "beta") and 0 <= json.loads(call.arguments)["n"] <= 99
    assert any(o["finish_reason"] == "stop" for o in outs)
