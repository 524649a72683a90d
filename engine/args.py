"""Engine settings, named as in SGLang / sglang-jax where a name exists."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import psutil

DTYPES = ("float32", "bfloat16")  # engine/loader.py's DTYPES
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULE_POLICIES = ("fcfs", "lpm")  # engine/scheduler.py
DEVICES = ("auto", "cpu", "tpu", "cuda", "gpu", "proxy")  # cuda: sglang-jax's name for gpu
ATTENTION_BACKENDS = ("auto", "native", "pallas", "cpu")  # engine/attention_backend.py
CONTROLLERS = ("multi", "pathways")
MOE_BACKENDS = ("dense", "grouped")  # engine/moe.py's MOE_BACKENDS
SPECULATIVE_ALGORITHMS = ("NGRAM", "EAGLE", "EAGLE3")  # engine/ngram.py, engine/eagle_head.py
POSITIVE_INTS = ("tp_size", "ep_size", "page_size", "max_running_requests", "chunked_prefill_size",
                 "max_prefill_seqs", "new_seqs_per_prefill", "context_length",
                 "max_total_tokens", "nnodes", "speculative_num_draft_tokens",
                 "speculative_num_steps", "speculative_eagle_topk",
                 "speculative_ngram_min_match_window_size",
                 "speculative_ngram_max_match_window_size")


def coarse_floor(n: int) -> int:
    """``n`` rounded down to one of eight steps per power of two (at most 12.5% less).

    The pool size is part of every compiled step's shape. Free memory drifts between
    starts; rounding it coarsely keeps a restart on the same shape, so it loads its
    compiled buckets instead of compiling them all again.
    """
    step = 1 << max(0, n.bit_length() - 4)
    return n // step * step


def _one_of(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{flag_name(name)} must be one of {', '.join(choices)}, not {value!r}")


def _flag(default, help: str, *flags: str, **extra):
    """A field with its CLI help (cli/engine_options.py turns each field into a flag).

    ``flags`` overrides the flag names (default: ``--field-name``); ``inverted=True``
    makes a true-by-default bool a switch that sets it false; other ``extra`` goes to
    the option as is (``envvar``, ``metavar``).
    """
    return field(default=default, metadata={"help": help, "flags": flags, **extra})


def flag_name(name: str) -> str:
    """The CLI spelling of an EngineArgs field: ``page_size`` → ``--page-size``."""
    return "--" + name.replace("_", "-")


@dataclass
class EngineArgs:
    """Every engine setting, its default, its help and its checks: the ``sgljax serve``,
    ``warmup`` and ``generate`` flags are made from these fields."""

    model_path: str | None = _flag(
        None, "HF folder, .gguf file, or converted checkpoint (default: SmolLM2-135M-Instruct).",
        "--model-path", "-m")
    dtype: str = _flag("float32", "Weights' dtype: float32 or bfloat16.")
    kv_cache_dtype: str = _flag(
        "auto", "auto (float32 on CPU, where activations stay float32 whatever the weights; "
        "else the weights'), float32, bfloat16 or float16 (halves the bytes attention reads; "
        "llama.cpp's default).")
    tp_size: int = _flag(1, "Tensor-parallel devices.")
    ep_size: int = _flag(
        1, "Expert-parallel groups (MoE models): the experts split over this many groups of "
        "--tp-size devices each (ep × tp devices in all); must divide the experts.")
    page_size: int = _flag(16, "Tokens per KV page.")
    max_running_requests: int = _flag(64, "Sequences decoded together at most.")
    chunked_prefill_size: int = _flag(
        512, "Token budget of one step: every running decode, then prompt chunks.",
        "--chunked-prefill-size", "--max-prefill-tokens")
    max_prefill_seqs: int = _flag(8, "Prompt chunks one step holds at most.")
    new_seqs_per_prefill: int | None = _flag(
        None, "New prompts one step takes (default 1 on CPU, where a prompt chunk is long "
        "next to a decode token, else up to --max-prefill-seqs). More admit a burst "
        "sooner; fewer keep steps short and requests out of lockstep.")
    context_length: int | None = _flag(
        4096, "Longest sequence in tokens (capped at the model's; unset: the model's).")
    max_total_tokens: int | None = _flag(
        None, "KV pool size in tokens (default: from --mem-fraction-static).")
    mem_fraction_static: float = _flag(
        0.25, "Share of the machine's memory for the KV pool, when --max-total-tokens is unset.")
    disable_radix_cache: bool = _flag(False, "Do not reuse cached prompt prefixes.")
    disable_overlap_schedule: bool = _flag(
        False, "Prepare each step only after the last one lands (else the host prepares "
        "step N+1 while step N runs).")
    speculative_algorithm: str | None = _flag(
        None, "Speculative decoding: NGRAM (prompt lookup: draft tokens copied from where the "
        "request's last tokens occurred before in its prompt or output; no draft model), "
        "EAGLE or EAGLE3 (a draft head over the target's hidden states: "
        "--speculative-draft-model-path). Every decode step verifies the drafts; lossless, "
        "greedy or sampled.")
    speculative_draft_model_path: str | None = _flag(
        None, "EAGLE / EAGLE3: the draft head's folder (config.json and safetensors, HF layout).")
    speculative_num_draft_tokens: int = _flag(
        4, "NGRAM: draft tokens verified a decode step at most. EAGLE / EAGLE3: tokens a "
        "verify row holds, its last token included: num-steps + 1 for a chain (set so), the "
        "tree's nodes + 1 with --speculative-eagle-topk above 1 (at most 32).")
    speculative_num_steps: int = _flag(
        3, "EAGLE / EAGLE3: draft head passes a step: the depth of its chain or tree.")
    speculative_eagle_topk: int = _flag(
        1, "EAGLE / EAGLE3: branches per draft step: 1 drafts a chain, more a token tree "
        "(the head's top-k at each of its top-k nodes; the best-scored nodes are verified "
        "in one step with a tree attention mask).")
    speculative_ngram_min_match_window_size: int = _flag(
        1, "NGRAM: the shortest run of last tokens looked up.")
    speculative_ngram_max_match_window_size: int = _flag(
        4, "NGRAM: the longest run of last tokens looked up (the longest match wins).")
    schedule_policy: str = _flag("fcfs", "fcfs (first come, first served) or lpm (longest "
                                 "cached prefix first).")
    random_seed: int | None = _flag(None, "Seed of the sampling of requests that set none.")
    attention_backend: str = _flag(
        "auto", "native (pure JAX, any platform), pallas (the TPU kernels; interpreted, slow "
        "but exact, on a CPU) or cpu (C++ kernels, one CPU device). auto: pallas on TPU, "
        "cpu on one CPU device, else native.")
    moe_backend: str = _flag(
        "grouped", "How MoE layers run their experts: grouped (each token's top-k experts "
        "only, assignments sorted by expert into grouped matmuls; no token dropped) or dense "
        "(every expert on every token: the reference, for few experts).")
    precompile_bs_paddings: list[int] | None = _flag(
        None, "Decode batch buckets, e.g. 1,4,16,64 (default: powers of two up to "
        "--max-running-requests).")
    asr_warmup: bool = _flag(
        False, "Speech models: warmup also precompiles the audio encoder and the audio "
        "prefill forms, then transcribes audio it makes itself (sgljax warmup-asr).")
    asr_token_paddings: list[int] | None = _flag(
        None, "Speech models: prefill token buckets whose audio form warmup compiles "
        "(default: all).", "--asr-token-paddings", "--token-paddings")
    precompile_token_paddings: list[int] | None = _flag(
        None, "Prefill token buckets, e.g. 64,256,512 (default: powers of two up to "
        "--chunked-prefill-size).")
    precompile_frame_paddings: list[int] | None = _flag(
        None, "Audio (ASR) models: clip lengths in mel frames (100 a second) whose audio "
        "encoder buckets warmup compiles, e.g. 800,3000 (default: every bucket). Encoder "
        "calls then use only those buckets.", "--precompile-frame-paddings",
        "--frame-paddings")
    nnodes: int = _flag(1, "Hosts running one engine together (each runs the same program "
                        "over the global mesh).")
    node_rank: int = _flag(0, "This host's rank (0 schedules and serves HTTP; others follow).")
    dist_init_addr: str | None = _flag(
        None, "HOST:PORT of rank 0's JAX coordinator (the next port is also used).")
    enable_compilation_cache: bool = _flag(
        True, "Compile everything afresh: no persistent compilation cache.",
        "--disable-compilation-cache", inverted=True)
    compilation_cache_dir: str | None = _flag(
        None, "Persistent compilation cache (default: $JAX_COMPILATION_CACHE_DIR or "
        "~/.cache/sgljax/jax-cache).")
    # Backend. device "proxy" == controller "pathways": one controller drives the whole
    # slice through a Pathways IFRT proxy (engine/pathways.py).
    device: str = _flag("auto", "auto, cpu, tpu, cuda (or gpu), or proxy (Pathways: one "
                        "controller drives the whole slice through an IFRT proxy; same as "
                        "--controller pathways).")
    controller: str = _flag("multi", "multi (one process per host) or pathways (same as "
                            "--device proxy).")
    pathways_proxy_addr: str | None = _flag(
        None, "Pathways IFRT proxy, e.g. grpc://localhost:29000 (default: $JAX_BACKEND_TARGET).",
        envvar="JAX_BACKEND_TARGET")
    device_discovery_timeout: float = _flag(
        60.0, "Seconds to wait for the Pathways proxy's devices before exiting (0: no bound).")

    def __post_init__(self):
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        _one_of("schedule_policy", self.schedule_policy, SCHEDULE_POLICIES)
        _one_of("device", self.device, DEVICES)
        _one_of("controller", self.controller, CONTROLLERS)
        _one_of("moe_backend", self.moe_backend, MOE_BACKENDS)
        _one_of("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.speculative_algorithm is not None:
            self.speculative_algorithm = self.speculative_algorithm.upper()
            _one_of("speculative_algorithm", self.speculative_algorithm, SPECULATIVE_ALGORITHMS)
        if self.eagle:
            if not self.speculative_draft_model_path:
                raise ValueError(f"--speculative-algorithm {self.speculative_algorithm} needs "
                                 "--speculative-draft-model-path (the draft head's folder)")
            k, steps = self.speculative_eagle_topk, self.speculative_num_steps
            if k == 1:  # a chain verifies its steps' tokens after the row's last one (SGLang)
                self.speculative_num_draft_tokens = steps + 1
            elif (steps - 1) * k > 32:
                raise ValueError(f"--speculative-num-steps {steps} x --speculative-eagle-topk "
                                 f"{k}: a tree's frontier holds at most 32 positions "
                                 "((num-steps - 1) x topk)")
            else:
                most = min(32, 1 + k + (steps - 1) * k * k)
                if not 2 <= self.speculative_num_draft_tokens <= most:
                    raise ValueError(f"--speculative-num-draft-tokens must be in 2..{most} for "
                                     f"a tree of {steps} steps and top-{k} (the row's last "
                                     "token and the tree's best nodes, at most 32)")
        elif self.speculative_draft_model_path:
            raise ValueError("--speculative-draft-model-path is for --speculative-algorithm "
                             "EAGLE or EAGLE3")
        if (self.speculative_ngram_min_match_window_size
                > self.speculative_ngram_max_match_window_size):
            raise ValueError("--speculative-ngram-min-match-window-size must not exceed "
                             "--speculative-ngram-max-match-window-size")
        for name in POSITIVE_INTS:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{flag_name(name)} must be at least 1, not {value}")
        for name in ("precompile_bs_paddings", "precompile_token_paddings",
                     "precompile_frame_paddings", "asr_token_paddings"):
            values = getattr(self, name)
            if values is not None and (not values or min(values) < 1):
                raise ValueError(f"{flag_name(name)} must list integers of at least 1, "
                                 f"not {values}")
        if not 0 < self.mem_fraction_static < 1:
            raise ValueError(f"--mem-fraction-static must be in (0, 1), "
                             f"not {self.mem_fraction_static}")
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
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in 0..{self.nnodes - 1} (--nnodes "
                             f"{self.nnodes}), not {self.node_rank}")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT")
        if self.dist_init_addr is not None:
            host, _, port = self.dist_init_addr.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65535:
                raise ValueError(f"--dist-init-addr must be HOST:PORT (a port below 65535: "
                                 f"the next one is also used), not {self.dist_init_addr!r}")

    @property
    def num_draft_tokens(self) -> int:
        """Draft tokens a decode row verifies at most (0: no speculative decoding)."""
        if self.draft_trees:
            return self.speculative_num_draft_tokens - 1
        if self.eagle:
            return self.speculative_num_steps
        return self.speculative_num_draft_tokens if self.speculative_algorithm else 0

    @property
    def draft_trees(self) -> bool:
        """EAGLE drafts token trees (top-k above 1), not chains."""
        return self.eagle and self.speculative_eagle_topk > 1

    @property
    def draft_lookahead(self) -> int:
        """Positions past a sampling row that the head's drafting writes (its frontiers)."""
        if not self.eagle:
            return 0
        return (self.speculative_num_steps - 1) * self.speculative_eagle_topk

    @property
    def eagle(self) -> bool:
        """Drafts from a draft head (EAGLE or EAGLE3), not from lookup."""
        return self.speculative_algorithm in ("EAGLE", "EAGLE3")

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
