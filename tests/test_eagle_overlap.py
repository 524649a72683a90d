"""EAGLE under the overlap schedule: verify rows packed before the step before them lands
(engine/spec_overlap.py) give the same greedy outputs as running one step at a time,
chains and trees, through stops, max_tokens and preemption. (Sampled outputs follow the
target's distribution with the overlap on: the sampling tests of tests/test_eagle.py and
tests/test_eagle_trees.py. They are not the same draws as one step at a time: a verify
row's draws depend on how many drafts it verifies, and that depends on which rows share
the step's token budget.)"""

import numpy as np
import pytest

from eagle_heads import build_copying_head, build_copying_target, carried_rows
from test_eagle import TREE, _engine, _prompts
from sgljax.engine.sampling_params import SamplingParams
from sgljax.engine.spec_overlap import tree_bits_on_device
from sgljax.kernels.paged_attention import tree_bits_of


def _random_tree(rng, n):
    return [int(rng.integers(0, j + 1)) for j in range(n)]  # draft j + 1's parent: < j + 1


def test_tree_bits_on_device_match_the_host(rng=np.random.default_rng(0)):
    for n in (0, 1, 2, 5, 17, 31):
        trees = [_random_tree(rng, n) for _ in range(4)] + [list(range(n))]  # and a chain
        parents = np.asarray([[0] + t for t in trees], np.int32)
        got = np.asarray(tree_bits_on_device(parents))
        assert got.tolist() == [tree_bits_of(t).tolist() for t in trees]


def _params(stops):
    """Greedy requests, some with stop tokens or logprobs, various max_tokens."""
    out = []
    for i in range(len(stops)):
        kw = dict(max_tokens=9 + (i * 5) % 17, ignore_eos=True, temperature=0)
        if i % 3 == 1:
            kw.update(logprobs=True, top_logprobs=2)
        if i % 4 == 2:
            kw["stop_token_ids"] = [stops[i]]
        out.append(SamplingParams(**kw))
    return out


def _run(eng, prompts, params):
    seqs = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    while eng.has_work():
        eng.step()
    assert eng.pool.num_used == 0
    return [(s.output_ids, s.finish_reason, s.output_logprobs) for s in seqs], seqs


@pytest.fixture(scope="module")
def copying(tmp_path_factory):
    """A target that mostly repeats its last token and a head that drafts repeats: most
    drafts are kept, so carried rows start well past where the host packed them."""
    root = tmp_path_factory.mktemp("copying")
    target = build_copying_target(root / "target")
    return target, build_copying_head(root / "head", target)


@pytest.mark.parametrize("tree", [False, True])
@pytest.mark.parametrize("pool_tokens", [4096, 80])  # 80: 20 pages of 4, the scheduler preempts
def test_overlap_changes_no_output(copying, tree, pool_tokens):
    target, head = copying
    prompts = _prompts(seed=6) + _prompts(seed=7)
    kw = dict(disable_radix_cache=True, max_total_tokens=pool_tokens, context_length=64,
              **(TREE if tree else {}))
    greedy = _engine(target, **kw).generate(prompts, SamplingParams(
        max_tokens=12, temperature=0, ignore_eos=True))
    params = _params([g["token_ids"][4] for g in greedy])
    serial, _ = _run(_engine(target, head, "EAGLE", disable_overlap_schedule=True, **kw),
                     prompts, params)
    eng = _engine(target, head, "EAGLE", **kw)
    carried = carried_rows(eng)
    overlapped, seqs = _run(eng, prompts, params)
    assert [o[:2] for o in overlapped] == [s[:2] for s in serial]
    for (_, _, got), (_, _, want) in zip(overlapped, serial):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert sum(carried) > 10  # the overlap ran: verify rows packed ahead
    assert any(reason == "stop" for _, reason, _ in serial)
    assert eng.stats().spec_accepted_tokens > 30  # carried rows start past the host's guess
    if pool_tokens == 80:
        assert sum(s.num_preemptions for s in seqs) > 0
