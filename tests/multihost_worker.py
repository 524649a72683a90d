"""One host of a two-host engine on 127.0.0.1 (run by test_multihost.py).

With a sixth argument (a compilation cache dir) the engine warms up first, over
fewer buckets, and each rank prints its executable-cache figures. $MULTIHOST_EP and
$MULTIHOST_TP set the mesh (default ep 1, tp 4); $MULTIHOST_EAGLE3, a draft head's folder,
turns EAGLE3 speculative decoding on.
"""

import json
import os
import sys

from sgljax.engine.engine import Engine
from sgljax.engine.sampling_params import SamplingParams

model, rank, port, prompts_json, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
cache_dir = sys.argv[6] if len(sys.argv) > 6 else None
settings = dict(model_path=model, ep_size=int(os.environ.get("MULTIHOST_EP", "1")),
                tp_size=int(os.environ.get("MULTIHOST_TP", "4")), nnodes=2, node_rank=rank,
                dist_init_addr=f"127.0.0.1:{port}", page_size=4, chunked_prefill_size=16,
                max_running_requests=4, context_length=128, max_total_tokens=1024)
if os.environ.get("MULTIHOST_EAGLE3"):
    settings.update(speculative_algorithm="EAGLE3",
                    speculative_draft_model_path=os.environ["MULTIHOST_EAGLE3"])
if cache_dir:  # few buckets: the test compiles them all, twice over two hosts
    settings.update(compilation_cache_dir=cache_dir, precompile_bs_paddings=[4],
                    max_prefill_seqs=1, context_length=64)
engine = Engine(**settings)


def print_cache_figures():
    cache = engine.runner.executable_cache
    print("CACHE " + json.dumps(dict(rank=rank, hits=cache.hits, jax_hits=cache.jax_hits,
                                     compiled=cache.compiled,
                                     after_warmup=engine.compiles_since_warmup())), flush=True)


if engine.is_follower:
    engine.follow()
    if cache_dir:
        print_cache_figures()
    print("follower done", flush=True)
    sys.exit(0)
prompts = json.loads(prompts_json)
params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
if cache_dir:
    engine.warmup()
print("MESH " + json.dumps([[d.process_index for d in row] for row in
                             engine.mesh.devices.reshape(engine.mesh.devices.shape[0], -1)]),
      flush=True)
print("READY", flush=True)
out = engine.generate(prompts, params)
print("TOKENS " + json.dumps([o["token_ids"] for o in out]), flush=True)
stats = engine.stats()
print("SPEC " + json.dumps(dict(drafts=stats.spec_draft_tokens,
                                accepted=stats.spec_accepted_tokens)), flush=True)
if cache_dir:
    print_cache_figures()
engine.shutdown()
