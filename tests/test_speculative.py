"""Speculative decoding (NGRAM): lossless at temperature 0, the target's distribution above
it, and no compiles after warmup."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sgljax.engine.args import EngineArgs
from sgljax.engine.batch import GrammarMask, LogitAdjust, SamplingBatch
from sgljax.engine.engine import Engine
from sgljax.engine.ngram import NgramDrafter
from sgljax.engine.sampling_params import SamplingParams
from sgljax.engine.speculative import verify

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def _engine(path, **kw):
    args = dict(model_path=str(path), page_size=4, chunked_prefill_size=32,
                max_running_requests=8, context_length=256, max_total_tokens=4096)
    args.update(kw)
    return Engine(**args)


def _prompts(seed=0, shared_prefix=0):
    """Mixed lengths, some repeating a phrase (drafts found in the prompt), some not."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(100, 150000, size=shared_prefix).tolist()
    phrase = lambda n: rng.integers(100, 150000, size=n).tolist()  # noqa: E731
    return [prefix + p for p in (phrase(12) * 3, phrase(7) * 2 + phrase(3), phrase(30),
                                 phrase(2), phrase(5) * 4, phrase(17))]


# -- the drafter ----------------------------------------------------------------------
def test_ngram_drafter_takes_the_longest_then_most_recent_match():
    d = NgramDrafter(3, min_window=1, max_window=3)
    assert d.propose([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3]) == [7, 8, 5]  # "2 3" most recent
    assert d.propose([4, 1, 2, 3, 5, 6, 1, 2, 3, 8, 1, 2, 3]) == [8, 1, 2]  # longest: "1 2 3"
    assert d.propose([5, 6, 7, 5]) == [6, 7, 5]
    assert d.propose([5, 6, 7, 5], limit=1) == [6]
    assert d.propose([1, 2, 3, 4]) == []  # nothing repeats
    assert d.propose([7]) == []
    assert NgramDrafter(2, min_window=2, max_window=2).propose([1, 2, 3, 1]) == []
    assert d.propose([1, 2, 1, 2], limit=0) == []


def test_speculation_flags_are_checked():
    with pytest.raises(ValueError, match="needs --speculative-draft-model-path"):
        EngineArgs(model_path="x", speculative_algorithm="EAGLE3")
    with pytest.raises(ValueError, match="at most 32 positions"):
        EngineArgs(model_path="x", speculative_algorithm="eagle", speculative_draft_model_path="h",
                   speculative_eagle_topk=8, speculative_num_steps=6)
    with pytest.raises(ValueError, match=r"must be in 2\.\.32"):
        EngineArgs(model_path="x", speculative_algorithm="eagle", speculative_draft_model_path="h",
                   speculative_eagle_topk=4, speculative_num_draft_tokens=40)
    with pytest.raises(ValueError, match=r"must be in 2\.\.7"):  # 1 + 2 + 2 * 2: all nodes
        EngineArgs(model_path="x", speculative_algorithm="eagle", speculative_draft_model_path="h",
                   speculative_eagle_topk=2, speculative_num_steps=2, speculative_num_draft_tokens=8)
    tree = EngineArgs(model_path="x", speculative_algorithm="eagle3",
                      speculative_draft_model_path="h", speculative_eagle_topk=4,
                      speculative_num_steps=3, speculative_num_draft_tokens=10)
    assert (tree.num_draft_tokens, tree.draft_trees, tree.draft_lookahead) == (9, True, 8)
    with pytest.raises(ValueError, match="is for --speculative-algorithm EAGLE"):
        EngineArgs(model_path="x", speculative_algorithm="ngram", speculative_draft_model_path="h")
    eagle = EngineArgs(model_path="x", speculative_algorithm="EAGLE3",
                       speculative_draft_model_path="h", speculative_num_steps=5)
    assert (eagle.num_draft_tokens, eagle.speculative_num_draft_tokens) == (5, 6)
    with pytest.raises(ValueError, match="must be one of NGRAM"):
        EngineArgs(model_path="x", speculative_algorithm="MEDUSA")
    with pytest.raises(ValueError, match="must not exceed"):
        EngineArgs(model_path="x", speculative_algorithm="ngram",
                   speculative_ngram_min_match_window_size=5)
    with pytest.raises(ValueError, match="at least 1"):
        EngineArgs(model_path="x", speculative_algorithm="ngram", speculative_num_draft_tokens=0)
    assert EngineArgs(model_path="x", speculative_algorithm="ngram").num_draft_tokens == 4
    assert EngineArgs(model_path="x").num_draft_tokens == 0


# -- the verify step: the target's distribution ---------------------------------------------
def _filtered_probs(logits, temperature, top_k, top_p):
    """numpy: what engine/sampling.py samples from (temperature, then top-k and top-p)."""
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, bool)
    cum = 0.0
    for rank, i in enumerate(order):
        if (top_k and rank >= top_k) or cum >= top_p:
            break
        keep[i] = True
        cum += p[i]
    q = np.where(keep, p, 0)
    return q / q.sum()


def _verify(logits_per_pos, drafts, n, temperature, top_k=0, top_p=1.0):
    R, V = logits_per_pos.shape
    K = R - 1
    logits = jnp.asarray(np.tile(logits_per_pos, (n, 1)), jnp.float32)
    sb = SamplingBatch(
        temperature=jnp.full(n, temperature, jnp.float32), top_k=jnp.full(n, top_k, jnp.int32),
        top_p=jnp.full(n, top_p, jnp.float32), min_p=jnp.zeros(n, jnp.float32),
        seeds=jnp.arange(n, dtype=jnp.uint32), steps=jnp.full(n, 7, jnp.int32),
        all_greedy=jnp.asarray(temperature == 0), want_top=jnp.asarray(False))
    adjust = LogitAdjust(jnp.asarray(False), jnp.zeros((n, V)), jnp.zeros((n, V), bool),
                         jnp.ones(n))
    grammar = GrammarMask(jnp.asarray(False), jnp.full((n, 1), -1, jnp.int32))
    parents = jnp.tile(jnp.arange(K, dtype=jnp.int32), (n, 1))  # a chain
    out = jax.jit(verify)(logits, jnp.asarray(np.tile(drafts, (n, 1)), jnp.int32),
                          jnp.full(n, K, jnp.int32), parents, sb, adjust, grammar)
    tokens, logprobs, _, _, accepted, _ = map(np.asarray, out)
    return tokens, logprobs, accepted


def _assert_follows(samples, probs):
    counts = np.bincount(samples, minlength=len(probs))
    assert counts[probs == 0].sum() == 0, (counts, probs)
    live = probs > 0
    expected = probs[live] * len(samples)
    assert stats.chisquare(counts[live], expected).pvalue > 1e-3, (counts, expected)


# The second draft: the third likeliest token, or (filtered) the least likely: ruled out.
@pytest.mark.parametrize("temperature,top_k,top_p,rank2", [(1.0, 0, 1.0, 2), (0.7, 4, 0.9, -1)])
def test_verify_emits_the_target_distribution(temperature, top_k, top_p, rank2):
    n = 20000
    base = np.log([0.35, 0.3, 0.2, 0.1, 0.04, 0.01])
    logits = np.stack([np.roll(base, shift) for shift in (0, 2, 5)])
    p = [_filtered_probs(row, temperature, top_k, top_p) for row in logits]
    # Draft 1 is likely but not the top token.
    drafts = [int(np.argsort(-p[0])[1]), int(np.argsort(-p[1])[rank2])]
    tokens, _, accepted = _verify(logits, drafts, n, temperature, top_k, top_p)
    # Every row's first token follows p_0, whether its draft was kept or not ...
    _assert_follows(tokens[:, 0], p[0])
    assert abs((accepted >= 1).mean() - p[0][drafts[0]]) < 0.02
    # ... and given the draft was kept, the next token follows p_1, then p_2.
    kept = accepted >= 1
    _assert_follows(tokens[kept, 1], p[1])
    both = accepted == 2
    if p[1][drafts[1]] > 0:
        assert both.sum() > 100
        _assert_follows(tokens[both, 2], p[2])
    else:
        assert both.sum() == 0


def test_verify_greedy_keeps_the_drafts_the_argmax_agrees_with():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(4, 10))
    top = logits.argmax(axis=1)
    for drafts, kept in (([top[0], top[1], top[2]], 3), ([top[0], (top[1] + 1) % 10, top[2]], 1),
                         ([(top[0] + 1) % 10, top[1], top[2]], 0)):
        tokens, logprobs, accepted = _verify(logits, drafts, 2, 0.0)
        assert accepted.tolist() == [kept, kept]
        assert tokens[0, :kept + 1].tolist() == top[:kept + 1].tolist()
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        np.testing.assert_allclose(logprobs[0, :kept + 1],
                                   logp[np.arange(kept + 1), top[:kept + 1]], rtol=1e-5)


def test_verify_walks_a_tree_to_the_branch_the_argmax_agrees_with():
    """Nodes 1, 2 under the root, 3 under 1, 4 under 2: the root's argmax is node 2's token
    and node 2's is node 4's, so the path is 0, 2, 4 and its K/V move to depths 1, 2."""
    rng = np.random.default_rng(7)
    V = 12
    logits = rng.normal(size=(5, V))
    top = logits.argmax(axis=1)
    drafts = [(top[0] + 1) % V, top[0], top[1], top[2]]
    parents = [0, 0, 1, 2]
    sb = SamplingBatch(jnp.zeros(1), jnp.zeros(1, jnp.int32), jnp.ones(1), jnp.zeros(1),
                       jnp.zeros(1, jnp.uint32), jnp.zeros(1, jnp.int32), jnp.asarray(True),
                       jnp.asarray(False))
    adjust = LogitAdjust(jnp.asarray(False), jnp.zeros((1, V)), jnp.zeros((1, V), bool),
                         jnp.ones(1))
    grammar = GrammarMask(jnp.asarray(False), jnp.full((1, 1), -1, jnp.int32))
    out = jax.jit(verify)(jnp.asarray(logits, jnp.float32), jnp.asarray([drafts], jnp.int32),
                          jnp.asarray([4], jnp.int32), jnp.asarray([parents], jnp.int32), sb,
                          adjust, grammar)
    tokens, logprobs, _, _, accepted, path = map(np.asarray, out)
    assert accepted.tolist() == [2] and path[0, :3].tolist() == [0, 2, 4]
    assert tokens[0, :3].tolist() == [top[0], top[2], top[4]]
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(logprobs[0, :3], logp[[0, 2, 4], [top[0], top[2], top[4]]],
                               rtol=1e-5)


# -- the engine -----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_ngram_is_lossless_at_temperature_zero(tiny_models, arch):
    prompts = _prompts(seed=1)
    shared = _prompts(seed=2, shared_prefix=21)  # a second round: prefix-cache hits
    plain = _engine(tiny_models[arch])
    expected = [o["token_ids"] for o in plain.generate(prompts + shared, GREEDY)]
    eng = _engine(tiny_models[arch], speculative_algorithm="NGRAM")
    got = [o["token_ids"] for o in eng.generate(prompts, GREEDY)]
    got += [o["token_ids"] for o in eng.generate(shared, GREEDY)]
    assert got == expected
    spec = eng.stats()
    assert spec.cache_hit_rate > 0
    # Both sides of verification ran: drafts kept and drafts rejected.
    assert 0 < spec.spec_accepted_tokens < spec.spec_draft_tokens
    assert spec.spec_accept_length > 1
    # Rows emitted several tokens in one step.
    assert any(len(rec.chunk_lens) and max(rec.chunk_lens[:rec.num_decodes] or [1]) > 1
               for rec in eng.step_log())
    assert eng.pool.num_used == eng.prefix_cache.num_pages  # no page leaked


def test_ngram_stops_and_lengths_match_decoding_without_it(tiny_models):
    path = tiny_models["qwen3"]
    prompts = _prompts(seed=5)
    plain = _engine(path)
    first = [o["token_ids"] for o in plain.generate(prompts, GREEDY)]
    # Stop on a token each output repeats, so it often comes in a kept draft; odd lengths.
    stops = sorted({toks[-1] for toks in first})
    params = SamplingParams(max_tokens=23, temperature=0, stop_token_ids=stops)
    expected = plain.generate(prompts, params)
    eng = _engine(path, speculative_algorithm="NGRAM", speculative_num_draft_tokens=3)
    got = eng.generate(prompts, params)
    for e, g in zip(expected, got):
        assert g["token_ids"] == e["token_ids"]
        assert g["finish_reason"] == e["finish_reason"]
    assert {g["finish_reason"] for g in got} == {"stop", "length"}
    assert eng.stats().spec_accepted_tokens > 0


def test_ngram_survives_preemption(tiny_models):
    path = tiny_models["qwen3"]
    prompts = _prompts(seed=6) + _prompts(seed=7)
    expected = [o["token_ids"] for o in _engine(path, disable_radix_cache=True).generate(
        prompts, GREEDY)]
    # 40 pages of 4 tokens for 12 requests of up to 80 tokens: the scheduler preempts.
    eng = _engine(path, disable_radix_cache=True, max_total_tokens=160, context_length=128,
                  speculative_algorithm="NGRAM")
    seqs = [eng.add_request(p, GREEDY) for p in prompts]
    while eng.has_work():
        eng.step()
    assert sum(s.num_preemptions for s in seqs) > 0
    assert [s.output_ids for s in seqs] == expected
    assert eng.pool.num_used == 0


def test_ngram_sampling_warm_and_without_compiles(tiny_models):
    eng = _engine(tiny_models["llama"], speculative_algorithm="NGRAM")
    eng.warmup()
    prompts = _prompts(seed=8)
    sampled = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.95, seed=11,
                             ignore_eos=True, logprobs=True, top_logprobs=2)
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    penalised = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                               repetition_penalty=1.3)
    seqs = [eng.add_request(p, sampled if i % 3 else greedy if i % 2 else penalised)
            for i, p in enumerate(prompts)]
    while eng.has_work():
        eng.step()
    assert eng.compiles_since_warmup() == 0
    assert eng.stats().spec_verify_rows > 0
    for seq in seqs:
        assert len(seq.output_ids) == 30
        if seq.params.logprobs:
            assert len(seq.output_logprobs) == len(seq.output_top_logprobs) == 30
    # A seeded request samples the same tokens again.
    again = eng.generate([prompts[1]], sampled)[0]["token_ids"]
    assert again == seqs[1].output_ids


# -- the server and the bench ---------------------------------------------------------------
def test_server_streams_speculative_tokens_and_reports_accept_length(tiny_models):
    import httpx

    from server_harness import TINY_SERVER_ARGS, ServerProcess
    from sgljax.cli.bench_client import spec_accept_length

    prompt = _prompts(seed=9)[0]  # a phrase three times: drafts from the prompt
    body = {"model": "default", "prompt": prompt, "max_tokens": 40, "temperature": 0,
            "ignore_eos": True}
    srv = ServerProcess(tiny_models["qwen3"], *TINY_SERVER_ARGS, "--speculative-algorithm",
                        "NGRAM")
    try:
        before = httpx.get(srv.url + "/get_server_info").json()["internal_states"]
        whole = httpx.post(srv.url + "/v1/completions", json=body, timeout=120).json()
        assert whole["usage"]["completion_tokens"] == 40
        text = ""
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True},
                          timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        assert text == whole["choices"][0]["text"]
        after = httpx.get(srv.url + "/get_server_info").json()["internal_states"]
        assert after["spec_verify_rows"] > before["spec_verify_rows"]
        metrics = httpx.get(srv.url + "/metrics").text
        line = next(m for m in metrics.splitlines() if m.startswith("sgljax:spec_accept_length"))
        assert float(line.split()[-1]) == pytest.approx(spec_accept_length(
            {k: 0 for k in before}, after))
        assert "sgljax:spec_verify_seconds" in metrics
    finally:
        srv.stop()


def test_bench_accept_length_from_counter_readings():
    from sgljax.cli.bench_client import spec_accept_length

    before = {"spec_verify_rows": 10, "spec_accepted_tokens": 5, "spec_draft_tokens": 40}
    after = {"spec_verify_rows": 30, "spec_accepted_tokens": 35, "spec_draft_tokens": 120}
    assert spec_accept_length(before, after) == 2.5
    assert spec_accept_length(before, before) is None  # nothing verified in between
    assert spec_accept_length(None, after) is None  # not an sgljax server
    from sgljax.cli.bench_client import spec_seconds
    assert spec_seconds({**before, "spec_draft_seconds": 1.0}, {**after, "spec_draft_seconds": 3.5}) \
        == {"spec_draft_seconds": 2.5}  # a server without spec_verify_seconds: that one left out
    assert spec_seconds(None, after) == {}


def test_bench_report_prints_the_speculative_rows():
    import io

    from rich.console import Console

    from sgljax.cli.bench_report import compute_metrics, result_table

    m = compute_metrics([], 1.0, 0.0, ignore_eos=True)
    m.update(spec_accept_length=2.25, spec_draft_share=0.125, spec_verify_share=0.5,
             usage_missing=0)
    out = io.StringIO()
    config = {"backend": "sglang", "model": "m", "dataset": "random", "request_rate": "inf",
              "max_concurrency": 4}
    Console(file=out, width=120).print(result_table(config, m))
    text = out.getvalue()
    assert "Speculative accept length" in text and "2.25" in text
    assert "Speculative drafting (share of time)" in text and "12.5%" in text
