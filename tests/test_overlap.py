"""The overlap schedule: step N+1 is packed and launched before step N's tokens land.

It must change nothing a client can see: the same tokens, finish reasons and freed
pages as running one step at a time, through stops, preemption, aborts and penalties.
"""

import pytest

from sgljax.engine.engine import Engine
from sgljax.engine.sampling_params import SamplingParams
from test_engine import _engine, _mixed_prompts


@pytest.fixture(scope="module")
def qwen3(tiny_models):
    return tiny_models["qwen3"]


def _params(stop_tokens):
    """Varied requests: lengths, stop tokens met mid-batch, sampling, penalties."""
    out = []
    for i, stop in enumerate(stop_tokens):
        kw = dict(max_tokens=6 + (i * 7) % 19, temperature=0, ignore_eos=True)
        if i % 3 == 1:
            kw["stop_token_ids"] = [stop]
        if i % 4 == 2:
            kw.update(temperature=1.0, top_p=0.9, seed=100 + i)
        out.append(SamplingParams(**kw))
    return out


def _run(path, prompts, params, **kw):
    eng = _engine(path, disable_radix_cache=True, **kw)
    seqs = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    while eng.has_work():
        eng.step()
    assert eng.pool.num_used == 0
    return eng, [(s.output_ids, s.finish_reason) for s in seqs], seqs


@pytest.mark.parametrize("pool_tokens", [4096, 120])  # 120: the scheduler preempts
def test_same_outputs_as_one_step_at_a_time(qwen3, pool_tokens):
    prompts = _mixed_prompts(14, seed=7)
    base = _engine(qwen3, disable_radix_cache=True)
    # Stop on a token each greedy request really produces, a few tokens in.
    greedy = base.generate(prompts, SamplingParams(max_tokens=20, temperature=0,
                                                   ignore_eos=True))
    params = _params([g["token_ids"][min(3, len(g["token_ids"]) - 1)] for g in greedy])
    kw = dict(max_total_tokens=pool_tokens, context_length=96)
    _, serial, _ = _run(qwen3, prompts, params, disable_overlap_schedule=True, **kw)
    _, overlapped, seqs = _run(qwen3, prompts, params, disable_overlap_schedule=False, **kw)
    assert overlapped == serial
    assert any(reason == "stop" for _, reason in serial)
    if pool_tokens == 120:
        assert sum(s.num_preemptions for s in seqs) > 0


def test_penalties_land_each_step(qwen3):
    prompts = _mixed_prompts(4, seed=3)
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                             repetition_penalty=1.5 if i == 0 else 1.0,
                             frequency_penalty=0.5 if i == 1 else 0.0) for i in range(4)]
    _, serial, _ = _run(qwen3, prompts, params, disable_overlap_schedule=True)
    _, overlapped, _ = _run(qwen3, prompts, params, disable_overlap_schedule=False)
    assert overlapped == serial


def test_a_step_is_in_flight_between_calls(qwen3):
    eng = _engine(qwen3)
    seqs = [eng.add_request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
            for p in _mixed_prompts(2, seed=4)]
    seen_ahead = False
    while not all(s.output_ids for s in seqs):
        eng.step()
    for _ in range(4):
        eng.step()
        # Step N landed, step N+1 is already on the device with its input token there.
        seen_ahead |= eng._in_flight is not None and all(s.num_pending == 1 for s in seqs)
    assert seen_ahead


def test_abort_while_in_flight_frees_pages(qwen3):
    eng = _engine(qwen3, disable_radix_cache=True)
    keep, gone = (eng.add_request(p, SamplingParams(max_tokens=10, temperature=0,
                                                     ignore_eos=True))
                  for p in _mixed_prompts(2, seed=5))
    while not gone.output_ids:
        eng.step()
    assert eng._in_flight is not None
    eng.abort(gone.rid)
    n_before = len(gone.output_ids)
    late = []
    while eng.has_work():
        late += [o for o in eng.step() if o.rid == gone.rid]
    assert late == [] and len(gone.output_ids) == n_before
    assert gone.finish_reason == "abort" and len(keep.output_ids) == 10
    assert eng.pool.num_used == 0


def test_overlap_can_be_turned_off(qwen3):
    eng = _engine(qwen3, disable_overlap_schedule=True)
    eng.add_request(_mixed_prompts(1)[0], SamplingParams(max_tokens=3, ignore_eos=True))
    while eng.has_work():
        eng.step()
        assert eng._in_flight is None
    assert isinstance(eng, Engine)
