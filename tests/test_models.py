"""Our decoder against transformers on tiny random checkpoints: tokens exact, logits close."""

import numpy as np
import pytest

from sgljax.engine.engine import Engine
from sgljax.engine.sampling_params import SamplingParams
from tiny_models import hf_greedy, hf_last_logits

ARCHS = ["qwen3", "qwen2", "llama"]
LOGPROB_TOL = 2e-4  # float32 both sides; differences come from summation order only


def _prompts(n, lo, hi, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 150000, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def engines(tiny_models):
    # page_size 4 and chunks of 16: prompts span several chunks, generation crosses pages.
    return {a: Engine(model_path=str(tiny_models[a]), page_size=4, chunked_prefill_size=16,
                      max_running_requests=8, max_prefill_seqs=4, context_length=256,
                      max_total_tokens=4096) for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_match_transformers(arch, engines, tiny_models):
    prompts = _prompts(5, 3, 40, seed=ARCHS.index(arch))
    ours = engines[arch].generate(prompts, SamplingParams(max_tokens=24, temperature=0,
                                                          ignore_eos=True))
    theirs = hf_greedy(tiny_models[arch], prompts, 24)
    for o, t in zip(ours, theirs):
        assert o["token_ids"] == t


@pytest.mark.parametrize("arch", ARCHS)
def test_logprobs_match_transformers(arch, engines, tiny_models):
    ids = _prompts(1, 30, 31, seed=7)[0]
    eng = engines[arch]
    seq = eng.add_request(ids, SamplingParams(max_tokens=1, temperature=0, logprobs=True,
                                              top_logprobs=20))
    while not seq.finished:
        eng.step()
    logits = hf_last_logits(tiny_models[arch], ids).astype(np.float64)
    ref = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    top = seq.output_top_logprobs[0]
    assert [t for t, _ in top] == list(np.argsort(-ref)[:20])
    np.testing.assert_allclose([v for _, v in top], ref[[t for t, _ in top]], atol=LOGPROB_TOL)
