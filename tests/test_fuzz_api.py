"""Schema fuzzing (schemathesis) of a live server from its own OpenAPI document: no 5xx, no
hang, every answer conforms to the document. A bounded, derandomized run here; more with
``python reliability/fuzz.py --examples N`` against any 127.0.0.1 server."""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server_harness import TINY_SERVER_ARGS, ServerProcess

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = 25  # per operation and mode: about 20 s on 2 cores


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
    # In a fresh interpreter: a library loaded earlier in this process (compiled with
    # -ffast-math) may have turned on flush-to-zero, and hypothesis refuses to draw floats
    # then (FloatingPointError about subnormals).
    code = ("import json, runpy, sys; fuzz = runpy.run_path(sys.argv[1])['fuzz']; "
            "print(json.dumps(fuzz(sys.argv[2], int(sys.argv[3]), timeout=60, seed=0, "
            "log=lambda m: print(m, file=sys.stderr))))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "reliability" / "fuzz.py"),
                          server.url, str(EXAMPLES)], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    ran = json.loads(out.stdout.strip().splitlines()[-1])
    posts = {k: v for k, v in ran.items() if k.startswith("POST")}
    # chat, completions and generate, positive and negative; audio transcriptions (a
    # multipart form the schema does not describe: positive only)
    json_posts = {k: v for k, v in posts.items() if "/audio/" not in k}
    assert len(json_posts) == 6 and all(n > 0 for n in json_posts.values()), ran
    assert posts["POST /v1/audio/transcriptions [positive]"] > 0, ran
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200
    state = httpx.get(server.url + "/get_server_info").json()["internal_states"]
    assert state["num_running"] == 0
