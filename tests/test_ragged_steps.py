"""Ragged steps on a tiny model: decodes are never stalled by prompts, and every
attention backend gives the same greedy tokens."""

import numpy as np
import pytest

from sgljax.engine.engine import Engine
from sgljax.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _engine(path, **kw):
    args = dict(model_path=str(path), page_size=4, chunked_prefill_size=16,
                max_running_requests=8, context_length=256, max_total_tokens=4096)
    args.update(kw)
    return Engine(**args)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 150000, size=n).tolist() for n in lengths]


@pytest.mark.parametrize("overlap", [True, False])
def test_a_long_prompt_never_stalls_running_decodes(tiny_models, overlap):
    eng = _engine(tiny_models["qwen3"], disable_overlap_schedule=not overlap)
    short = [eng.add_request(p, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
             for p in _prompts([5, 9, 3])]
    while not all(s.output_ids for s in short):
        eng.step()
    long = eng.add_request(_prompts([90], seed=1)[0], GREEDY)  # six chunks of 16 or fewer
    while eng.has_work():
        eng.step()
    log = eng.step_log()
    mixed = 0
    for rec in log:
        # Every sequence decoding when the step was chosen is in it, among its decode rows.
        assert set(rec.decoding) <= set(rec.rids[:rec.num_decodes]), rec
        assert all(n == 1 for n in rec.chunk_lens[:rec.num_decodes])
        assert sum(rec.chunk_lens) <= 16
        if long.rid in rec.rids[rec.num_decodes:] and rec.num_decodes:
            mixed += 1
    assert mixed >= 5  # the long prompt's chunks ran beside the decodes
    alone = _engine(tiny_models["qwen3"], disable_radix_cache=True)
    assert alone.generate([long.prompt_ids], GREEDY)[0]["token_ids"] == long.output_ids


def test_decode_and_prefill_rows_in_one_step_match_running_alone(tiny_models):
    """Prompts arriving one a step while others decode: every output as if alone."""
    prompts = _prompts([3, 40, 17, 1, 29, 8], seed=2)
    alone = _engine(tiny_models["llama"], disable_radix_cache=True)
    expected = [alone.generate([p], GREEDY)[0]["token_ids"] for p in prompts]
    eng = _engine(tiny_models["llama"], disable_radix_cache=True)
    seqs = []
    for p in prompts:
        seqs.append(eng.add_request(p, GREEDY))
        eng.step()
    while eng.has_work():
        eng.step()
    assert [s.output_ids for s in seqs] == expected
    assert any(0 < r.num_decodes < len(r.rids) for r in eng.step_log())
