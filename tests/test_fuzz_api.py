"""Schema fuzzing (schemathesis) of a live server from its own OpenAPI document: no 5xx, no
hang, every answer conforms to the document. A bounded, derandomized run here; more with
``python reliability/fuzz.py --examples N`` against any 127.0.0.1 server."""

import importlib.util
from pathlib import Path

import httpx
import pytest

from server_harness import TINY_SERVER_ARGS, ServerProcess

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = 25  # per operation and mode: about 20 s on 2 cores


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("sgljax_fuzz", ROOT / "reliability" / "fuzz.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def server(tiny_models):
    srv = ServerProcess(tiny_models["qwen3"], *TINY_SERVER_ARGS)
    yield srv
    srv.stop()


def test_openapi_describes_the_request_bodies(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, model in [("/v1/chat/completions", "ChatCompletionRequest"),
                        ("/v1/completions", "CompletionRequest"), ("/generate", "GenerateRequest")]:
        op = doc["paths"][path]["post"]
        body = op["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
        assert "4XX" in op["responses"] and "422" not in op["responses"]
    assert "messages" in schemas["ChatCompletionRequest"]["required"]
    assert schemas["CompletionRequest"]["additionalProperties"] is False
    assert schemas["NativeSamplingParams"]["properties"]["n"]["maximum"] == 16


def test_schema_fuzzing_finds_no_5xx_and_no_nonconformance(server):
    ran = _fuzz_module().fuzz(server.url, EXAMPLES, timeout=60, seed=0, log=print)
    posts = {k: v for k, v in ran.items() if k.startswith("POST")}
    assert len(posts) == 6 and all(n > 0 for n in posts.values()), ran
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200
    state = httpx.get(server.url + "/get_server_info").json()["internal_states"]
    assert state["num_running"] == 0
