"""TP=1, 2 and 4 over CPU devices give the same greedy tokens (incl. TP > KV heads)."""

import numpy as np
import pytest

from sgljax.engine.engine import Engine
from sgljax.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _prompts():
    rng = np.random.default_rng(3)
    return [rng.integers(100, 150000, size=n).tolist() for n in (5, 17, 33)]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_tp_sizes_agree(arch, tiny_models):
    outs = {}
    for tp in (1, 2, 4):  # the tiny models have 2 KV heads: tp=4 replicates them
        eng = Engine(model_path=str(tiny_models[arch]), tp_size=tp, page_size=4,
                     chunked_prefill_size=16, max_running_requests=4, context_length=128,
                     max_total_tokens=1024)
        if tp == 4:
            assert eng.runner.k_cache.sharding.spec[2] == "tp"
            assert eng.runner.k_cache.shape[2] == 4
        outs[tp] = [o["token_ids"] for o in eng.generate(_prompts(), GREEDY)]
    assert outs[1] == outs[2] == outs[4]
