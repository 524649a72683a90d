"""EAGLE token trees (--speculative-eagle-topk > 1): greedy output is the target's,
sampled output follows the target's distribution, and kept branches other than the
first move their K/V into place (preemption, stops and compiles: tests/test_eagle.py,
with a tree as well as a chain)."""

import numpy as np

from eagle_heads import (SMALL_PROMPT, assert_follows_marginals, build_eagle3_head,
                         build_eagle_head, carried_rows, small_target_marginals)
from test_eagle import TREE, _engine as chain_engine, _favourites, _prompts
from sgljax.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)


def _engine(path, head=None, kind="EAGLE3", **kw):
    if head is not None:
        kw = {**TREE, **kw}
    return chain_engine(path, head, kind, **kw)


def _recording(eng):
    """(sequence, its length, drafts, parents) of every tree the head proposes."""
    seen, proposed = [], eng.scheduler.proposed

    def record(seq, drafts, parents):
        seen.append((seq, len(seq.all_ids), list(drafts), list(parents)))
        proposed(seq, drafts, parents)

    eng.scheduler.proposed = record
    return seen


def _second_branches_kept(seen) -> int:
    """Times the token after a proposal was a level-1 node other than the first: the
    verify step kept a branch whose K/V had to move."""
    kept = 0
    for seq, at, drafts, parents in seen:
        level1 = [d for d, p in zip(drafts, parents) if p == 0]
        if at < len(seq.all_ids) and seq.all_ids[at] in level1[1:]:
            kept += 1
    return kept


def test_tree_is_lossless_at_temperature_zero(tiny_models, tmp_path):
    """EAGLE3 over Qwen3 with a head whose top-2 are the target's two favourite tokens:
    mixed lengths, pages of 4, a second round with prefix-cache hits."""
    target = tiny_models["qwen3"]
    prompts, shared = _prompts(seed=1), _prompts(seed=2, shared_prefix=21)
    expected = [o["token_ids"] for o in _engine(target).generate(prompts + shared, GREEDY)]
    head = build_eagle3_head(tmp_path / "head", target, constant=_favourites(target, prompts, 2))
    eng = _engine(target, head)
    seen = _recording(eng)
    got = [o["token_ids"] for o in eng.generate(prompts, GREEDY)]
    got += [o["token_ids"] for o in eng.generate(shared, GREEDY)]
    assert got == expected
    spec = eng.stats()
    assert spec.cache_hit_rate > 0 and 0 < spec.spec_accepted_tokens < spec.spec_draft_tokens
    assert any(len(set(parents)) < len(parents) for *_, parents in seen)  # branching trees
    assert _second_branches_kept(seen) > 0
    assert eng.pool.num_used == eng.prefix_cache.num_pages  # no page leaked


def test_eagle_tree_over_llama_is_lossless(tiny_models, tmp_path):
    target = tiny_models["llama"]
    prompts = _prompts(seed=3)
    expected = [o["token_ids"] for o in _engine(target).generate(prompts, GREEDY)]
    head = build_eagle_head(tmp_path / "head", target, with_embed=True)
    eng = _engine(target, head, "EAGLE", speculative_eagle_topk=3,
                  speculative_num_draft_tokens=8)
    assert [o["token_ids"] for o in eng.generate(prompts, GREEDY)] == expected
    assert eng.stats().spec_draft_tokens > 0


def test_tree_sampling_follows_the_target_distribution(tmp_path):
    """A 48-token vocabulary; the head's top-2 are the target's second and first likeliest
    second tokens, so both branches are kept now and then. The second and third tokens,
    drawn through the tree's verify, must follow the target's marginals (transformers)."""
    temp = 0.9
    target, p2, p3 = small_target_marginals(tmp_path / "small", temp)
    order = np.argsort(-p2)
    head = build_eagle3_head(tmp_path / "head", target, draft_vocab=16,
                             constant=[int(order[1]), int(order[0])])
    eng = _engine(target, head, chunked_prefill_size=512, max_running_requests=64,
                  context_length=64, new_seqs_per_prefill=64, max_prefill_seqs=64)
    seen = _recording(eng)
    carried = carried_rows(eng)  # the overlap schedule runs (engine/spec_overlap.py)
    n = 1500
    outs = eng.generate([SMALL_PROMPT] * n, [
        SamplingParams(max_tokens=4, temperature=temp, seed=s, ignore_eos=True)
        for s in range(n)])
    assert eng.stats().spec_accepted_tokens > 100 and sum(carried) > 100
    assert _second_branches_kept(seen) > 50
    assert_follows_marginals(outs, p2, p3)
