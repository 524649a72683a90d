"""Engine settings, named as in SGLang / sglang-jax where a name exists."""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

DEVICES = ("auto", "cpu", "tpu", "gpu", "proxy")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16")
CONTROLLERS = ("multi", "pathways")

def coarse_floor(n: int) -> int:
    """``n`` rounded down to one of eight steps per power of two (at most 12.5% less).

    The pool size is part of every compiled step's shape. Free memory drifts between
    starts; rounding it coarsely keeps a restart on the same shape, so it loads its
    compiled buckets instead of compiling them all again.
    """
    step = 1 << max(0, n.bit_length() - 4)
    return n // step * step


@dataclass
class EngineArgs:
    model_path: str | None = None  # None → the embedded SmolLM2-135M-Instruct
    dtype: str = "float32"
    # auto: float32 on CPU (where activations stay float32 whatever the weights), the
    # weights' dtype elsewhere. float16 halves the bytes attention reads (llama.cpp's default).
    kv_cache_dtype: str = "auto"
    tp_size: int = 1
    page_size: int = 16
    max_running_requests: int = 64
    chunked_prefill_size: int = 512
    max_prefill_seqs: int = 8
    # New prompts one prefill step takes (see scheduler.py); None → 1 on CPU, where a
    # prefill step is long next to a decode step, else up to max_prefill_seqs.
    new_seqs_per_prefill: int | None = None
    context_length: int | None = 4096
    max_total_tokens: int | None = None  # KV pool size in tokens; None → from mem_fraction_static
    mem_fraction_static: float = 0.25
    disable_radix_cache: bool = False
    disable_overlap_schedule: bool = False  # else the host prepares step N+1 while step N runs
    schedule_policy: str = "fcfs"
    random_seed: int | None = None
    precompile_bs_paddings: list[int] | None = None
    precompile_token_paddings: list[int] | None = None
    nnodes: int = 1  # hosts; each runs the same program over the global mesh
    node_rank: int = 0  # 0 schedules and serves HTTP; others follow
    dist_init_addr: str | None = None  # HOST:PORT of rank 0's JAX coordinator
    enable_compilation_cache: bool = True
    compilation_cache_dir: str | None = None  # None → $JAX_COMPILATION_CACHE_DIR or ~/.cache/sgljax/jax-cache
    # Backend. device "proxy" == controller "pathways": one controller drives the whole
    # slice through a Pathways IFRT proxy (engine/pathways.py).
    device: str = "auto"  # auto | cpu | tpu | gpu | proxy
    controller: str = "multi"  # multi (one process per host) | pathways
    pathways_proxy_addr: str | None = None  # None → $JAX_BACKEND_TARGET
    device_discovery_timeout: float = 60.0  # seconds to find the proxy's devices; 0 → no bound

    def __post_init__(self):
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"not {self.kv_cache_dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.controller not in CONTROLLERS:
            raise ValueError(f"--controller must be one of {', '.join(CONTROLLERS)}, "
                             f"not {self.controller!r}")
        # Pathways on Cloud sets JAX_PLATFORMS=proxy for its users: honour it under "auto".
        if self.device == "auto" and "proxy" in os.environ.get("JAX_PLATFORMS", "").split(","):
            self.device = "proxy"
        if self.controller == "pathways":
            if self.device not in ("auto", "proxy"):
                raise ValueError(f"--controller pathways runs on the proxy device, "
                                 f"not --device {self.device}")
            self.device = "proxy"
        elif self.device == "proxy":
            self.controller = "pathways"
        if self.pathways and self.nnodes > 1:
            raise ValueError("Pathways mode (--device proxy / --controller pathways) runs one "
                             f"controller for the whole slice: drop --nnodes {self.nnodes}")
        if self.device_discovery_timeout < 0:
            raise ValueError("--device-discovery-timeout must be >= 0 (0 waits without a bound)")

    @property
    def pathways(self) -> bool:
        return self.controller == "pathways"

    def resolve_num_pages(self, bytes_per_page: int, max_pages_per_seq: int) -> int:
        """Pages in the KV pool (page 0 is reserved as the padding sink)."""
        if self.max_total_tokens:
            pages = -(-self.max_total_tokens // self.page_size)
        else:
            # From total memory, so a restart gets the same pool (and the same compiled
            # shapes); free memory only caps it when the machine is short.
            mem = psutil.virtual_memory()
            budget = min(mem.total * self.mem_fraction_static, mem.available * 0.9)
            pages = coarse_floor(int(budget // bytes_per_page))
            pages = min(pages, self.max_running_requests * max_pages_per_seq)
        if pages < max_pages_per_seq:
            raise ValueError(
                f"the KV pool ({pages} pages of {self.page_size} tokens) cannot hold one "
                f"request of the full context ({max_pages_per_seq} pages): raise "
                "--max-total-tokens or --mem-fraction-static, or lower --context-length")
        return pages + 1
