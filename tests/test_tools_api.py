"""Tool calling and structured outputs through a live server (tiny random Qwen3, whose
chat template renders tools), with the official openai client: a required or named
tool call is always well formed, json_schema answers always validate, regex answers
match, and bad tools or schemas are 400s."""

import json
import re

import httpx
import jsonschema_rs
import openai
import pytest

from server_harness import TINY_SERVER_ARGS, ServerProcess

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"],
        "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3}},
    "required": ["name", "age", "pets"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tiny_models):
    srv = ServerProcess(tiny_models["qwen3"], *TINY_SERVER_ARGS, "--context-length", "1024",
                        "--tool-call-parser", "hermes",
                        "--served-model-name", "tiny")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def _check_call(call, tools=TOOLS):
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in by_name
    args = json.loads(call.function.arguments)
    assert jsonschema_rs.validator_for(by_name[call.function.name]).is_valid(args), args


def test_required_tool_call_is_always_well_formed(client):
    for seed in range(4):
        r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                           tool_choice="required", temperature=1.0, seed=seed,
                                           max_tokens=100, parallel_tool_calls=False)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert len(choice.message.tool_calls) == 1 and not choice.message.content
        _check_call(choice.message.tool_calls[0])


def test_named_tool_choice_calls_that_tool(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny", messages=USER, tools=TOOLS, seed=seed, temperature=1.0,
            tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=100)
        calls = r.choices[0].message.tool_calls
        assert calls and all(c.function.name == "get_time" for c in calls)
        for c in calls:
            _check_call(c)


def test_streamed_tool_calls_equal_whole(client):
    kw = dict(model="tiny", messages=USER, tools=TOOLS, tool_choice="required", seed=7,
              temperature=1.0, max_tokens=100, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kw).choices[0]
    calls, reason = {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                calls.setdefault(tc.index, tc)
            reason = ch.finish_reason or reason
    assert reason == "tool_calls" and len(calls) == 1
    got, want = calls[0], whole.message.tool_calls[0]
    assert (got.function.name, json.loads(got.function.arguments)) == (
        want.function.name, json.loads(want.function.arguments))


def test_tool_history_round_trips(client):
    first = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                           tool_choice="required", max_tokens=100,
                                           parallel_tool_calls=False, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS,
                                       max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.prompt_tokens > first.usage.prompt_tokens


def test_json_schema_answers_validate(client):
    validator = jsonschema_rs.validator_for(PERSON)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                  "strict": True}}
    for seed in range(6):
        r = client.chat.completions.create(model="tiny", messages=USER, response_format=fmt,
                                           temperature=1.0, seed=seed, max_tokens=120)
        assert r.choices[0].finish_reason == "stop"
        assert validator.is_valid(json.loads(r.choices[0].message.content))
    # completions take response_format too
    r = client.completions.create(model="tiny", prompt="A person:", max_tokens=120, seed=1,
                                  temperature=1.0, extra_body={"response_format": fmt})
    assert validator.is_valid(json.loads(r.choices[0].text))


def test_regex_and_ebnf_extras(client, server):
    pattern = r"(red|green|blue) [0-9]{2}"
    for seed in range(4):
        r = client.chat.completions.create(model="tiny", messages=USER, seed=seed,
                                           temperature=1.0, max_tokens=30,
                                           extra_body={"regex": pattern})
        assert re.fullmatch(pattern, r.choices[0].message.content), r.choices[0].message
    r = httpx.post(server.url + "/generate", timeout=120, json={
        "text": "Answer:", "sampling_params": {"ebnf": 'root ::= ("yes" | "no") "."',
                                               "max_new_tokens": 10, "temperature": 1.0}})
    assert r.status_code == 200 and r.json()["text"] in ("yes.", "no."), r.text


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "bogus"}}}], "tool_choice": "required"}, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ({"regex": "[a-z"}, "regex"),
    ({"regex": "a", "ebnf": 'root ::= "a"'}, "ebnf"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages[0].tool_calls"),
])
def test_bad_tools_and_formats_are_400s(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": USER, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"], err


def test_langchain_tool_round_trip_and_structured_output(server):
    from typing import Literal

    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, ConfigDict, Field

    class WeatherArgs(BaseModel):  # bounded: a random model's strings would run on
        model_config = ConfigDict(extra="forbid")
        city: str = Field(max_length=12)
        unit: Literal["celsius", "fahrenheit"]

    @tool(args_schema=WeatherArgs)
    def get_weather(city: str, unit: str) -> str:
        """Weather for a city."""
        return f"21 degrees {unit} in {city}"

    class Person(BaseModel):  # closed: extra keys of a random model's choosing would run on
        model_config = ConfigDict(extra="forbid")
        name: str = Field(max_length=10)
        age: int = Field(ge=0, le=120)

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="tiny",
                     temperature=0, max_tokens=200, max_retries=0, timeout=120)
    question = HumanMessage("What is the weather in Paris?")
    ai = llm.bind_tools([get_weather], tool_choice="get_weather").invoke([question])
    assert len(ai.tool_calls) >= 1 and ai.tool_calls[0]["name"] == "get_weather"
    call = ai.tool_calls[0]
    assert call["args"]["unit"] in ("celsius", "fahrenheit") and isinstance(call["args"]["city"], str)
    result = ToolMessage(content=get_weather.invoke(call["args"]), tool_call_id=call["id"])
    answer = llm.bind_tools([get_weather]).invoke([question, ai, result])  # tool_choice auto
    assert answer.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")
    for method in ("json_schema", "function_calling"):
        person = llm.with_structured_output(Person, method=method).invoke("Invent a person.")
        assert isinstance(person, Person), (method, person)
