"""EAGLE / EAGLE3 speculative decoding: the heads propose what an independent reference
computes, greedy output is the target's, sampled output follows the target's
distribution, and nothing compiles after warmup."""

from collections import Counter

import numpy as np
import pytest

from eagle_heads import (SMALL_PROMPT, assert_follows_marginals, build_eagle3_head,
                         build_eagle_head, carried_rows, reference_drafts,
                         small_target_marginals)
from tiny_models import build_tiny_model
from sgljax.engine.config import ModelConfigError
from sgljax.engine.engine import Engine
from sgljax.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)


def _engine(path, head=None, kind="EAGLE3", **kw):
    args = dict(model_path=str(path), page_size=4, chunked_prefill_size=16,
                max_running_requests=8, context_length=256, max_total_tokens=4096)
    if head is not None:
        args.update(speculative_algorithm=kind, speculative_draft_model_path=str(head))
    args.update(kw)
    return Engine(**args)


def _prompts(seed=0, shared_prefix=0):
    rng = np.random.default_rng(seed)
    prefix = rng.integers(100, 150000, size=shared_prefix).tolist()
    return [prefix + rng.integers(100, 150000, size=n).tolist() for n in (13, 30, 2, 21, 7)]


def _recording(eng):
    """Every (sequence's tokens, drafts) the head proposes, as the engine hands them over."""
    seen, proposed = [], eng.scheduler.proposed

    def record(seq, drafts, parents):
        seen.append((list(seq.all_ids), list(drafts)))
        proposed(seq, drafts, parents)

    eng.scheduler.proposed = record
    return seen


# -- the heads ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,arch,build", [
    ("EAGLE3", "qwen3", lambda out, t: build_eagle3_head(out, t, aux_layer_ids=[0, 1, 2])),
    ("EAGLE3", "llama", lambda out, t: build_eagle3_head(out, t, seed=3)),  # default layers
    ("EAGLE", "llama", lambda out, t: build_eagle_head(out, t, num_layers=2)),
])
def test_heads_propose_what_the_reference_computes(tiny_models, tmp_path, kind, arch, build):
    """Drafts after prompt chunks (16 tokens, pages of 4) and after verify steps, in mixed
    batches, against a numpy head fed by transformers' hidden states."""
    target = tiny_models[arch]
    head = build(tmp_path / "head", target)
    eng = _engine(target, head, kind, disable_radix_cache=True)
    seen = _recording(eng)
    eng.generate(_prompts(seed=4), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    capture = eng.runner.eagle.cfg.capture
    # EAGLE reads the final hidden state; EAGLE3 the inputs of the layers the head names
    # (outputs of 0, 1, 2: inputs of 1, 2, 3, the last the final output) or else of 2, L/2, L-3.
    assert capture == (() if kind == "EAGLE" else {"qwen3": (1, 2, 3), "llama": (2, 1, 0)}[arch])
    compared = exact = 0
    for ids, drafts in seen[::3]:
        ref, logits = reference_drafts(head, target, kind, ids, len(drafts), capture)
        for got, want, row in zip(drafts, ref, logits):
            compared += 1
            if got != want:  # only a near tie may differ (float32 against float64)
                assert row[want] - row[got] < 1e-4, (ids, drafts, ref)
                break
            exact += 1
    assert compared >= 20 and exact >= 0.9 * compared


def test_head_checkpoints_are_checked(tiny_models, tmp_path):
    target = tiny_models["llama"]
    eagle = build_eagle_head(tmp_path / "e1", target)
    with pytest.raises(ModelConfigError, match="not an EAGLE3 head"):
        _engine(target, eagle, "EAGLE3")
    with pytest.raises(ModelConfigError, match="no config.json"):
        _engine(target, tmp_path / "missing", "EAGLE")
    pickled = tmp_path / "bin"
    pickled.mkdir()
    (pickled / "config.json").write_text((eagle / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"PK")
    with pytest.raises(ModelConfigError, match="save it as safetensors"):
        _engine(target, pickled, "EAGLE")
    wide = build_tiny_model("llama", tmp_path / "wide", hidden_size=96)
    with pytest.raises(ModelConfigError, match="hidden size"):
        _engine(wide, eagle, "EAGLE")
    with pytest.raises(ModelConfigError, match="fc is"):
        _engine(wide, build_eagle3_head(tmp_path / "e3", target), "EAGLE3")


# -- the engine -----------------------------------------------------------------------------
def _most_common_output(path, prompts):
    return _favourites(path, prompts, 1)[0]


@pytest.mark.parametrize("kind,arch", [("EAGLE3", "qwen3"), ("EAGLE", "llama")])
def test_lossless_at_temperature_zero(tiny_models, tmp_path, kind, arch):
    target = tiny_models[arch]
    prompts, shared = _prompts(seed=1), _prompts(seed=2, shared_prefix=21)
    expected = [o["token_ids"] for o in _engine(target).generate(prompts + shared, GREEDY)]
    if kind == "EAGLE3":  # a head that always guesses the target's favourite token
        head = build_eagle3_head(tmp_path / "head", target,
                                 constant=_most_common_output(target, prompts))
    else:
        head = build_eagle_head(tmp_path / "head", target, with_embed=True)
    eng = _engine(target, head, kind)
    got = [o["token_ids"] for o in eng.generate(prompts, GREEDY)]
    got += [o["token_ids"] for o in eng.generate(shared, GREEDY)]  # prefix-cache hits
    assert got == expected
    spec = eng.stats()
    assert spec.cache_hit_rate > 0 and spec.spec_draft_tokens > 0
    if kind == "EAGLE3":  # kept and rejected drafts both
        assert 0 < spec.spec_accepted_tokens < spec.spec_draft_tokens
        assert any(max(rec.chunk_lens[:rec.num_decodes] or [1]) > 1 for rec in eng.step_log())
    assert eng.pool.num_used == eng.prefix_cache.num_pages  # no page leaked


# Token trees (tests/test_eagle_trees.py): the head's top-2 at 2 frontier nodes, 5 verified.
TREE = dict(speculative_eagle_topk=2, speculative_num_steps=3, speculative_num_draft_tokens=6)


def _favourites(path, prompts, n):
    outs = _engine(path).generate(prompts, GREEDY)
    return [t for t, _ in Counter(t for o in outs for t in o["token_ids"]).most_common(n)]


def _favourite_head(out, target, prompts, tree: bool):
    """A head whose drafts are the target's favourite token (a tree: its two favourites)."""
    favourites = _favourites(target, prompts, 2 if tree else 1)
    return build_eagle3_head(out, target, constant=favourites if tree else favourites[0]), (
        TREE if tree else {})


@pytest.mark.parametrize("tree", [False, True])
def test_lossless_through_preemption_and_stops(tiny_models, tmp_path, tree):
    target = tiny_models["qwen3"]
    prompts = _prompts(seed=6) + _prompts(seed=7)
    head, shape = _favourite_head(tmp_path / "head", target, prompts, tree)
    plain = _engine(target, disable_radix_cache=True)
    first = [o["token_ids"] for o in plain.generate(prompts, GREEDY)]
    params = SamplingParams(max_tokens=23, temperature=0,
                            stop_token_ids=sorted({t[-1] for t in first}))
    expected = plain.generate(prompts, params)
    # 20 pages of 4 tokens for 10 requests: the scheduler preempts.
    eng = _engine(target, head, disable_radix_cache=True, max_total_tokens=80,
                  context_length=64, **shape)
    seqs = [eng.add_request(p, params) for p in prompts]
    while eng.has_work():
        eng.step()
    assert sum(s.num_preemptions for s in seqs) > 0
    assert [s.output_ids for s in seqs] == [e["token_ids"] for e in expected]
    assert [s.finish_reason for s in seqs] == [e["finish_reason"] for e in expected]
    assert eng.stats().spec_accepted_tokens > 0
    assert eng.pool.num_used == 0


def test_sampling_follows_the_target_distribution(tmp_path):
    """A 48-token vocabulary; the head always guesses the target's second likeliest second
    token, so it is kept now and then. The second and third tokens, drawn through verify,
    must follow the target's marginals (exact, from transformers)."""
    temp = 0.9
    target, p2, p3 = small_target_marginals(tmp_path / "small", temp)
    head = build_eagle3_head(tmp_path / "head", target, draft_vocab=16,
                             constant=int(np.argsort(-p2)[1]))
    eng = _engine(target, head, chunked_prefill_size=512, max_running_requests=64,
                  context_length=64, new_seqs_per_prefill=64, max_prefill_seqs=64)
    carried = carried_rows(eng)  # the overlap schedule runs (engine/spec_overlap.py)
    n = 1500
    outs = eng.generate([SMALL_PROMPT] * n, [
        SamplingParams(max_tokens=4, temperature=temp, seed=s, ignore_eos=True)
        for s in range(n)])
    assert eng.stats().spec_accepted_tokens > 100 and sum(carried) > 100
    assert_follows_marginals(outs, p2, p3)


@pytest.mark.parametrize("tree", [False, True])
def test_warm_and_without_compiles(tiny_models, tmp_path, tree):
    target = tiny_models["llama"]
    head, shape = _favourite_head(tmp_path / "head", target, _prompts(seed=8), tree)
    eng = _engine(target, head, max_running_requests=4, context_length=96, **shape)
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
    stats_ = eng.stats()
    assert stats_.spec_verify_rows > 0 and stats_.spec_draft_seconds > 0
    assert stats_.spec_accepted_tokens > 0
    assert all(len(s.output_ids) == 30 for s in seqs)
    again = eng.generate([prompts[0]], sampled)[0]["token_ids"]  # a seeded request repeats
    assert again == seqs[0].output_ids


def test_two_hosts_draft_as_one_process(tiny_models, tmp_path):
    """Rank 0 and rank 1 (2 CPU devices each, tp 4) run the head after every step alike."""
    import json

    from test_multihost import _free_port, _kill, _prompts, _start

    model = tiny_models["qwen3"]
    head = build_eagle3_head(tmp_path / "head", model,
                             constant=_most_common_output(model, _prompts()))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = [o["token_ids"] for o in _engine(model).generate(_prompts(), params)]
    port = _free_port()
    env = {"MULTIHOST_EAGLE3": str(head)}
    leader, follower = (_start(model, r, port, 8, env_extra=env) for r in (0, 1))
    try:
        out, err = leader.communicate(timeout=300)
        assert leader.returncode == 0, err[-2000:]
        lines = out.splitlines()
        assert json.loads(next(x for x in lines if x.startswith("TOKENS "))[7:]) == expected
        spec = json.loads(next(x for x in lines if x.startswith("SPEC "))[5:])
        assert 0 < spec["accepted"] < spec["drafts"]
        assert follower.wait(timeout=60) == 0
    finally:
        _kill(leader, follower)
