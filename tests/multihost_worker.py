"""One host of a two-host engine on 127.0.0.1 (run by test_multihost.py)."""

import json
import sys

from sgljax.engine.engine import Engine
from sgljax.engine.sampling import SamplingParams

model, rank, port, prompts_json, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
engine = Engine(model_path=model, tp_size=4, nnodes=2, node_rank=rank,
                dist_init_addr=f"127.0.0.1:{port}", page_size=4, chunked_prefill_size=16,
                max_running_requests=4, context_length=128, max_total_tokens=1024)
if engine.is_follower:
    engine.follow()
    print("follower done", flush=True)
    sys.exit(0)
prompts = json.loads(prompts_json)
params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
print("READY", flush=True)
out = engine.generate(prompts, params)
print("TOKENS " + json.dumps([o["token_ids"] for o in out]), flush=True)
engine.shutdown()
