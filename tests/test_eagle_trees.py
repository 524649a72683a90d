"""EAGLE token trees (--speculative-eagle-topk > 1): greedy output is the target's,
sampled output follows the target's distribution, kept branches other than the first
move their K/V into place, and nothing compiles after warmup."""

from collections import Counter

import numpy as np

from eagle_heads import (SMALL_PROMPT, assert_follows_marginals, build_eagle3_head,
                         build_eagle_head, small_target_marginals)
from sgljax.engine.engine import Engine
from sgljax.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
TREE = dict(speculative_eagle_topk=2, speculative_num_steps=3, speculative_num_draft_tokens=6)


def _engine(path, head=None, kind="EAGLE3", **kw):
    args = dict(model_path=str(path), page_size=4, chunked_prefill_size=16,
                max_running_requests=8, context_length=256, max_total_tokens=4096)
    if head is not None:
        args.update(speculative_algorithm=kind, speculative_draft_model_path=str(head), **TREE)
    args.update(kw)
    return Engine(**args)


def _prompts(seed=0, shared_prefix=0):
    rng = np.random.default_rng(seed)
    prefix = rng.integers(100, 150000, size=shared_prefix).tolist()
    return [prefix + rng.integers(100, 150000, size=n).tolist() for n in (13, 30, 2, 21, 7)]


def _favourites(path, prompts, n=2):
    outs = _engine(path).generate(prompts, GREEDY)
    return [t for t, _ in Counter(t for o in outs for t in o["token_ids"]).most_common(n)]


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
    head = build_eagle3_head(tmp_path / "head", target, constant=_favourites(target, prompts))
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


def test_tree_lossless_through_preemption_and_stops(tiny_models, tmp_path):
    target = tiny_models["qwen3"]
    prompts = _prompts(seed=6) + _prompts(seed=7)
    head = build_eagle3_head(tmp_path / "head", target, constant=_favourites(target, prompts))
    plain = _engine(target, disable_radix_cache=True)
    first = [o["token_ids"] for o in plain.generate(prompts, GREEDY)]
    params = SamplingParams(max_tokens=23, temperature=0,
                            stop_token_ids=sorted({t[-1] for t in first}))
    expected = plain.generate(prompts, params)
    eng = _engine(target, head, disable_radix_cache=True, max_total_tokens=80,
                  context_length=64)
    seqs = [eng.add_request(p, params) for p in prompts]
    while eng.has_work():
        eng.step()
    assert sum(s.num_preemptions for s in seqs) > 0
    assert [s.output_ids for s in seqs] == [e["token_ids"] for e in expected]
    assert [s.finish_reason for s in seqs] == [e["finish_reason"] for e in expected]
    assert eng.pool.num_used == 0


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
    n = 1500
    outs = eng.generate([SMALL_PROMPT] * n, [
        SamplingParams(max_tokens=4, temperature=temp, seed=s, ignore_eos=True)
        for s in range(n)])
    assert eng.stats().spec_accepted_tokens > 100
    assert _second_branches_kept(seen) > 50
    assert_follows_marginals(outs, p2, p3)


def test_tree_warm_and_without_compiles(tiny_models, tmp_path):
    target = tiny_models["llama"]
    head = build_eagle3_head(tmp_path / "head", target,
                             constant=_favourites(target, _prompts(seed=8)))
    eng = _engine(target, head, max_running_requests=4, context_length=96)
    eng.warmup()
    sampled = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.95, seed=11,
                             ignore_eos=True, logprobs=True, top_logprobs=2)
    penalised = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                               repetition_penalty=1.3)
    prompts = _prompts(seed=8)
    seqs = [eng.add_request(p, [sampled, penalised, GREEDY][i % 3])  # prompt 2 repeats
            for i, p in enumerate(prompts)]  # a favourite: its greedy drafts are kept
    while eng.has_work():
        eng.step()
    assert eng.compiles_since_warmup() == 0
    assert eng.stats().spec_accepted_tokens > 0
    assert all(len(s.output_ids) == 30 for s in seqs)
    again = eng.generate([prompts[0]], sampled)[0]["token_ids"]  # a seeded request repeats
    assert again == seqs[0].output_ids
