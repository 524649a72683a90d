"""One host of a two-host load (run by test_shard_reads.py): load, then check this host's shards.

Usage: shard_load_worker.py MODEL RANK PORT [HF_FOLDER]. MODEL is an HF folder or a
converted one; HF_FOLDER (default MODEL) is the source the shards are compared with.
Prints one line ``RESULT {json}``: the bytes this host read, what each parameter's
source tensors weigh and whether it is split over hosts, and whether every local
shard equals the same part of the whole-tensor read (the pre-slicing loader).
"""

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from sgljax.engine.distributed import init_distributed
from sgljax.engine.loader import load_model
from sgljax.engine.mesh import make_mesh
from sgljax.engine.params import kv_heads_for, param_shardings
from sgljax.engine.weights import LAYER_TENSORS, engine_tensors, expected_shapes, safetensors_getter

model, rank, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
reference = sys.argv[4] if len(sys.argv) > 4 else model
init_distributed(f"127.0.0.1:{port}", 2, rank)
mesh = make_mesh(4)
t0 = time.perf_counter()
loaded = load_model(model, mesh)
load_s = time.perf_counter() - t0
cfg = loaded.config
flat = dict(nnx.to_flat_state(nnx.state(loaded.model)))
kv_heads = kv_heads_for(cfg, 4)

mismatched = []
for name, full in engine_tensors(cfg, safetensors_getter(Path(reference)), kv_heads,
                                   np.float32):
    array = flat[tuple(name.split("."))].get_value()
    for shard in array.addressable_shards:
        if not np.array_equal(np.asarray(shard.data), full[shard.index]):
            mismatched.append(name)

shapes = expected_shapes(cfg)
hf_names = {"embed": ["model.embed_tokens.weight"], "final_norm": ["model.norm.weight"],
            "lm_head": ["lm_head.weight"]}
for short, hf in LAYER_TENSORS.items():
    hf_names[f"layers.{short}"] = [f"model.layers.{i}.{hf}" for i in range(cfg.num_layers)]
params = {}
for name, sharding in param_shardings(flat, mesh).items():
    source_bytes = sum(int(np.prod(shapes[n])) * 4 for n in hf_names[name])  # float32 source
    params[name] = {"source_bytes": source_bytes, "split": "tp" in tuple(sharding.spec)}
print("RESULT " + json.dumps({
    "rank": rank, "bytes_read": loaded.bytes_read, "bytes_total": loaded.bytes_total,
    "load_s": round(load_s, 3), "params": params, "mismatched": sorted(set(mismatched)),
    "local_devices": len(jax.local_devices())}), flush=True)
jax.distributed.shutdown()
