"""Engine flags shared by ``serve``, ``warmup`` and ``up local`` (SGLang names).

Each command declares ``**ENGINE_OPTIONS``-style parameters through these
aliases, and ``engine_args(locals())`` turns them into ``EngineArgs``.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from sgljax.engine.args import EngineArgs


def _int_list(value: Optional[str]) -> Optional[list[int]]:
    if not value:
        return None
    try:
        return [int(v) for v in value.replace(",", " ").split()]
    except ValueError:
        raise typer.BadParameter("expected integers separated by commas") from None


ModelPath = Annotated[Optional[str], typer.Option(
    "--model-path", "-m", help="HF folder, .gguf file, or converted checkpoint (default: SmolLM2-135M-Instruct).")]
Dtype = Annotated[str, typer.Option("--dtype", help="float32 or bfloat16.")]
KvCacheDtype = Annotated[str, typer.Option(
    "--kv-cache-dtype", help="auto (float32 on CPU, else the weights'), float32, bfloat16 or float16.")]
TpSize = Annotated[int, typer.Option("--tp-size", help="Tensor-parallel devices.")]
PageSize = Annotated[int, typer.Option("--page-size", help="Tokens per KV page.")]
MaxRunning = Annotated[int, typer.Option("--max-running-requests")]
ChunkedPrefill = Annotated[int, typer.Option("--chunked-prefill-size", "--max-prefill-tokens",
                                             help="Token budget of one prefill step.")]
NewSeqsPerPrefill = Annotated[Optional[int], typer.Option(
    "--new-seqs-per-prefill",
    help="New prompts one prefill step takes (default 1 on CPU, else up to 8). More admit "
         "a burst sooner; fewer stall decodes less and keep requests out of lockstep.")]
ContextLength = Annotated[int, typer.Option("--context-length")]
MaxTotalTokens = Annotated[Optional[int], typer.Option("--max-total-tokens",
                                                       help="KV pool size in tokens.")]
MemFraction = Annotated[float, typer.Option("--mem-fraction-static",
                                            help="Share of free memory for the KV pool.")]
DisableRadix = Annotated[bool, typer.Option("--disable-radix-cache")]
DisableOverlap = Annotated[bool, typer.Option(
    "--disable-overlap-schedule", help="Prepare each step only after the last one lands.")]
SchedulePolicy = Annotated[str, typer.Option("--schedule-policy", help="fcfs or lpm.")]
RandomSeed = Annotated[Optional[int], typer.Option("--random-seed")]
BsPaddings = Annotated[Optional[str], typer.Option("--precompile-bs-paddings",
                                                   help="Decode batch buckets, e.g. 1,4,16,64.")]
TokenPaddings = Annotated[Optional[str], typer.Option("--precompile-token-paddings",
                                                      help="Prefill token buckets, e.g. 64,256,512.")]
CacheDir = Annotated[Optional[str], typer.Option(
    "--compilation-cache-dir", help="Persistent compilation cache (default ~/.cache/sgljax/jax-cache).")]

NNodes = Annotated[int, typer.Option("--nnodes", help="Hosts running one engine together.")]
NodeRank = Annotated[int, typer.Option("--node-rank", help="This host's rank (0 serves HTTP).")]
DistInitAddr = Annotated[Optional[str], typer.Option(
    "--dist-init-addr", help="HOST:PORT of rank 0's JAX coordinator (the next port is also used).")]

Device = Annotated[str, typer.Option(
    "--device", help="auto, cpu, tpu, gpu, or proxy (Pathways: one controller drives the "
                     "whole slice through an IFRT proxy; same as --controller pathways).")]
Controller = Annotated[str, typer.Option(
    "--controller", help="multi (one process per host) or pathways (same as --device proxy).")]
PathwaysProxyAddr = Annotated[Optional[str], typer.Option(
    "--pathways-proxy-addr", envvar="JAX_BACKEND_TARGET",
    help="Pathways IFRT proxy, e.g. grpc://localhost:29000 (default: $JAX_BACKEND_TARGET).")]
DiscoveryTimeout = Annotated[float, typer.Option(
    "--device-discovery-timeout",
    help="Seconds to wait for the Pathways proxy's devices before exiting (0: no bound).")]

ENGINE_DEFAULTS = EngineArgs()


def engine_args(opts: dict) -> EngineArgs:
    """EngineArgs from a command's local variables (names as in EngineArgs)."""
    fields = EngineArgs.__dataclass_fields__
    kw = {k: v for k, v in opts.items() if k in fields}
    for k in ("precompile_bs_paddings", "precompile_token_paddings"):
        if isinstance(kw.get(k), str):
            kw[k] = _int_list(kw[k])
    return EngineArgs(**kw)
