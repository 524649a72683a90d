"""Engine behaviour: batching, preemption, prefix cache and bad input, on tiny models."""

import numpy as np
import pytest

from sgljax.engine.engine import Engine
from sgljax.engine.sampling_params import RequestError
from sgljax.engine.loader import ModelNotFound
from sgljax.engine.config import ModelConfigError
from sgljax.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


def _mixed_prompts(n, seed=0, shared_prefix=0):
    rng = np.random.default_rng(seed)
    prefix = rng.integers(100, 150000, size=shared_prefix).tolist()
    return [prefix + rng.integers(100, 150000, size=int(rng.integers(2, 60))).tolist()
            for _ in range(n)]


def _engine(path, **kw):
    args = dict(model_path=str(path), page_size=4, chunked_prefill_size=32, max_running_requests=16,
                max_prefill_seqs=4, context_length=256, max_total_tokens=4096)
    args.update(kw)
    return Engine(**args)


@pytest.fixture(scope="module")
def qwen3(tiny_models):
    return tiny_models["qwen3"]


@pytest.fixture(scope="module")
def alone(qwen3):
    """Each prompt's greedy output when it runs alone, one request at a time."""
    eng = _engine(qwen3, disable_radix_cache=True)
    prompts = _mixed_prompts(16, seed=1, shared_prefix=0) + _mixed_prompts(8, seed=2, shared_prefix=21)
    return prompts, [eng.generate([p], GREEDY)[0]["token_ids"] for p in prompts]


@pytest.mark.parametrize("new_seqs", [None, 4])  # the CPU default (1 new prompt a step), 4
def test_batch_invariance(qwen3, alone, new_seqs):
    prompts, expected = alone
    # A 128-token budget, so that several prompts fit one prefill step.
    eng = _engine(qwen3, disable_radix_cache=True, new_seqs_per_prefill=new_seqs,
                  chunked_prefill_size=128)
    assert eng.scheduler.cfg.new_seqs_per_prefill == (new_seqs or 1)
    widest = 0
    seqs = [eng.add_request(p, GREEDY) for p in prompts]
    while eng.has_work():
        eng.step()
        if eng._in_flight is not None:  # rows with prompt chunks
            sched = eng._in_flight.sched
            widest = max(widest, len(sched.seqs) - sched.num_decodes)
    assert [s.output_ids for s in seqs] == expected
    # At most the new prompts plus one part-way through its chunks share a step.
    assert widest <= (new_seqs or 1) + 1
    if new_seqs:
        assert widest > 2


def test_preemption_keeps_outputs(qwen3, alone):
    prompts, expected = alone
    # 40 pages of 4 tokens: far fewer than 24 requests need at once, so the scheduler preempts.
    eng = _engine(qwen3, disable_radix_cache=True, max_total_tokens=160, context_length=128)
    seqs = [eng.add_request(p, GREEDY) for p in prompts]
    while eng.has_work():
        eng.step()
    assert sum(s.num_preemptions for s in seqs) > 0
    assert [s.output_ids for s in seqs] == expected
    assert eng.pool.num_used == 0


@pytest.mark.parametrize("pool_tokens", [4096, 200])
def test_prefix_cache_same_outputs(qwen3, alone, pool_tokens):
    prompts, expected = alone
    eng = _engine(qwen3, max_total_tokens=pool_tokens, context_length=128)
    # Twice: the second round finds the prefixes (and, with a small pool, some were evicted).
    for _ in range(2):
        got = [o["token_ids"] for o in eng.generate(prompts, GREEDY)]
        assert got == expected
    assert eng.prefix_cache.hit_tokens > 0
    # At idle the only pages in use are the tree's; flushing returns them all.
    assert eng.pool.num_used == eng.prefix_cache.num_pages
    eng.prefix_cache.flush()
    assert eng.pool.num_used == 0


def test_seeded_sampling_reproducible(qwen3):
    eng = _engine(qwen3)
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234,
                       ignore_eos=True)
    a = eng.generate(_mixed_prompts(3, seed=5), p)
    b = eng.generate(_mixed_prompts(3, seed=5)[:1], p)
    assert a[0]["token_ids"] == b[0]["token_ids"]
    c = eng.generate(_mixed_prompts(3, seed=5)[:1],
                     SamplingParams(**{**vars(p), "seed": 99}))
    assert c[0]["token_ids"] != a[0]["token_ids"]


def test_stop_and_max_tokens(qwen3, alone):
    prompts, expected = alone
    eng = _engine(qwen3)
    stop_tok = expected[0][5]
    out = eng.generate([prompts[0]], SamplingParams(max_tokens=20, temperature=0,
                                                    stop_token_ids=[stop_tok], ignore_eos=True))
    assert out[0]["token_ids"] == expected[0][:expected[0].index(stop_tok) + 1]
    assert out[0]["finish_reason"] == "stop"
    out = eng.generate([prompts[0]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert out[0]["token_ids"] == expected[0][:3] and out[0]["finish_reason"] == "length"


def test_bad_input_api(qwen3, tmp_path):
    eng = _engine(qwen3)
    with pytest.raises(RequestError):
        eng.add_request(list(range(1, 300)), GREEDY)  # longer than the 256-token context
    with pytest.raises(RequestError):
        eng.add_request([], GREEDY)
    with pytest.raises(RequestError):
        eng.add_request([1, 2, 3], SamplingParams(max_tokens=0))
    with pytest.raises(ModelNotFound):
        Engine(model_path=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound):
        Engine(model_path=str(tmp_path / "empty"))
    assert eng.pool.num_used == eng.prefix_cache.num_pages  # nothing leaked by refusals


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ModelConfigError, match="unsupported architecture"):
        Engine(model_path=str(tmp_path))
