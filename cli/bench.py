"""``sgljax bench``: a serving benchmark against any OpenAI-compatible server.

It is a client only (sgljax, vLLM, SGLang and llama.cpp's server are measured
the same way) and does not import the engine. How TTFT, ITL and TPOT are counted
is written at the top of bench_client.py.
"""

from __future__ import annotations

import asyncio
import datetime
import math
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from sgljax.cli.errors import user_errors

DATASETS = ("random", "random-ids", "sharegpt", "shared-prefix")


def _check_args(a: dict) -> None:
    from sgljax.cli.bench_client import BACKENDS
    from sgljax.cli.bench_datasets import BenchError

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise BenchError(msg)

    need(a["backend"] in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}")
    need(a["dataset"] in DATASETS, f"--dataset must be one of {', '.join(DATASETS)}")
    need(a["base_url"].startswith(("http://", "https://")),
         f"--base-url must start with http:// or https:// (got {a['base_url']!r})")
    need(a["num_prompts"] >= 1, "--num-prompts must be at least 1")
    need(a["random_input_len"] >= 1, "--random-input-len must be at least 1")
    need(a["random_output_len"] >= 1, "--random-output-len must be at least 1")
    need(0.0 <= a["random_range_ratio"] <= 1.0, "--random-range-ratio must be in [0, 1]")
    need(a["request_rate"] > 0, "--request-rate must be positive (inf: send all at once)")
    need(a["max_concurrency"] is None or a["max_concurrency"] >= 1,
         "--max-concurrency must be at least 1")
    need(a["warmup_requests"] >= 0, "--warmup-requests must be 0 or more")
    need(a["num_groups"] >= 1, "--num-groups must be at least 1")
    need(a["shared_prefix_len"] >= 1 and a["suffix_len"] >= 0,
         "--shared-prefix-len must be at least 1 and --suffix-len 0 or more")
    need(not (a["dataset"] == "random-ids" and a["backend"] == "openai-chat"),
         "--dataset random-ids sends token ids, which needs a completions backend (sgljax or openai)")
    if a["dataset"] == "sharegpt":
        need(a["dataset_path"] is not None, "--dataset sharegpt needs --dataset-path FILE.json")
        need(Path(a["dataset_path"]).expanduser().is_file(),
             f"dataset file {a['dataset_path']} does not exist")
    for opt in ("output_file", "plot"):
        if a[opt]:
            parent = Path(a[opt]).expanduser().resolve().parent
            need(parent.is_dir(), f"--{opt.replace('_', '-')}: folder {parent} does not exist")
    if a["plot"]:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError("--plot needs matplotlib (pip install matplotlib)") from None


def _build_requests(a: dict, tokenizer):
    from sgljax.cli.bench_datasets import (PromptBuilder, random_dataset, shared_prefix_dataset,
                                           sharegpt_dataset)

    builder = PromptBuilder(tokenizer, seed=a["seed"])
    n = a["num_prompts"] + a["warmup_requests"]
    if a["dataset"] in ("random", "random-ids"):
        reqs = random_dataset(builder, n, a["random_input_len"], a["random_output_len"],
                              a["random_range_ratio"], as_ids=a["dataset"] == "random-ids")
    elif a["dataset"] == "shared-prefix":
        reqs = shared_prefix_dataset(builder, n, a["num_groups"], a["shared_prefix_len"],
                                     a["suffix_len"], a["random_output_len"])
    else:
        reqs = sharegpt_dataset(builder, a["dataset_path"], n, a["sharegpt_output_len"])
    # Warmup requests come first, from the same distribution, and are not measured.
    return reqs[:a["warmup_requests"]], reqs[a["warmup_requests"]:]


async def _run(a: dict, console) -> tuple[dict, dict, list, float, float]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sgljax.cli.bench_client import (Backend, fetch_server_info, fetch_spec_counters,
                                         make_client, run_requests, spec_accept_length,
                                         spec_seconds)
    from sgljax.cli.bench_datasets import BenchError, find_tokenizer
    from sgljax.cli.bench_report import compute_metrics

    base_url = a["base_url"].rstrip("/")
    conns = min(a["max_concurrency"] or a["num_prompts"], a["num_prompts"]) + a["warmup_requests"]
    async with make_client(base_url, max(conns, 1), a["api_key"]) as client:
        names, info = await fetch_server_info(client, base_url)
        model = a["model"] or (names[0] if names else None)
        if model is None:
            raise BenchError(f"{base_url}/v1/models lists no model; pass --model NAME")
        tokenizer, tok_source = await asyncio.to_thread(find_tokenizer, a["tokenizer"], info, model)
        warmup, requests = await asyncio.to_thread(_build_requests, a, tokenizer)
        backend = Backend(a["backend"], model, ignore_eos=not a["disable_ignore_eos"],
                          stream=not a["disable_stream"])
        for req in warmup:
            res = await run_requests(client, backend, [req], math.inf, None, a["seed"])
            if not res[0].ok:
                raise BenchError(f"warmup request failed: {res[0].error}")
        with Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("requests"), TimeElapsedColumn(), console=console,
                      transient=False) as progress:
            task = progress.add_task("requests", total=len(requests))
            spec_before = await fetch_spec_counters(client)
            t0 = time.perf_counter()
            results = await run_requests(client, backend, requests, a["request_rate"],
                                         a["max_concurrency"], a["seed"],
                                         on_done=lambda _: progress.advance(task))
            duration = time.perf_counter() - t0
            spec_after = await fetch_spec_counters(client)
    missing_usage = 0
    for r in results:
        if r.ok and r.completion_tokens is None:  # no usage from the server: count ourselves
            r.completion_tokens = len(tokenizer.encode(r.text, add_special_tokens=False))
            missing_usage += 1
    config = {
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "backend": a["backend"], "base_url": base_url, "model": model, "tokenizer": tok_source,
        "dataset": a["dataset"], "num_prompts": a["num_prompts"],
        "random_input_len": a["random_input_len"], "random_output_len": a["random_output_len"],
        "random_range_ratio": a["random_range_ratio"],
        "request_rate": a["request_rate"] if not math.isinf(a["request_rate"]) else "inf",
        "max_concurrency": a["max_concurrency"], "warmup_requests": a["warmup_requests"],
        "seed": a["seed"], "stream": not a["disable_stream"],
        "ignore_eos": not a["disable_ignore_eos"],
    }
    if a["dataset"] == "shared-prefix":
        config.update(shared_prefix_len=a["shared_prefix_len"], num_groups=a["num_groups"],
                      suffix_len=a["suffix_len"])
    metrics = compute_metrics(results, duration, t0, ignore_eos=not a["disable_ignore_eos"])
    metrics["usage_missing"] = missing_usage
    metrics["spec_accept_length"] = spec_accept_length(spec_before, spec_after)
    if metrics["spec_accept_length"] is not None:  # shares of the run's wall time
        for name, seconds in spec_seconds(spec_before, spec_after).items():
            metrics[name.replace("_seconds", "_share")] = seconds / duration
    return config, metrics, results, t0, duration


def _warnings(m: dict, console) -> None:
    if m["failed"]:
        console.print(f"[bold red]WARNING: {m['failed']} requests failed; first error: "
                      f"{m['first_error']}[/bold red]")
    if m["usage_missing"]:
        console.print(f"[bold red]WARNING: the server reported no token usage for "
                      f"{m['usage_missing']} requests; their output tokens were counted by "
                      f"re-tokenizing the text (approximate)[/bold red]")
    if m["output_len_mismatches"]:
        console.print(f"[bold red]WARNING: {m['output_len_mismatches']} of {m['completed']} requests "
                      f"did not return the requested number of tokens (got {m['output_len_min']} to "
                      f"{m['output_len_max']}); the server may not honour ignore_eos, so throughput "
                      f"numbers are not comparable[/bold red]")


def bench(
    base_url: str = typer.Option("http://127.0.0.1:30000", "--base-url",
                                 help="Server root, e.g. http://127.0.0.1:30000"),
    backend: str = typer.Option("sgljax", "--backend",
                                help="sgljax | openai (both /v1/completions) | openai-chat."),
    dataset: str = typer.Option("random", "--dataset",
                                help="random | random-ids | sharegpt | shared-prefix."),
    dataset_path: Optional[str] = typer.Option(None, "--dataset-path", help="ShareGPT JSON file."),
    num_prompts: int = typer.Option(64, "--num-prompts"),
    random_input_len: int = typer.Option(256, "--random-input-len"),
    random_output_len: int = typer.Option(128, "--random-output-len",
                                          help="Output tokens (all datasets but sharegpt)."),
    random_range_ratio: float = typer.Option(
        1.0, "--random-range-ratio",
        help="Lengths uniform between len*ratio and len (SGLang's convention); 1.0 = exact."),
    request_rate: float = typer.Option(float("inf"), "--request-rate",
                                       help="Poisson arrivals per second; inf = all at once."),
    max_concurrency: Optional[int] = typer.Option(None, "--max-concurrency"),
    warmup_requests: int = typer.Option(1, "--warmup-requests", help="Unmeasured requests first."),
    seed: int = typer.Option(1, "--seed"),
    disable_stream: bool = typer.Option(False, "--disable-stream",
                                        help="Non-streaming requests (no TTFT/ITL)."),
    disable_ignore_eos: bool = typer.Option(False, "--disable-ignore-eos",
                                            help="Let requests stop at EOS."),
    output_file: Optional[str] = typer.Option(None, "--output-file",
                                              help="Append one JSON line per run."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write a PNG of the run."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer",
                                            help="Tokenizer folder (default: the server's model)."),
    model: Optional[str] = typer.Option(None, "--model",
                                        help="Model name in requests (default: first of /v1/models)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY"),
    shared_prefix_len: int = typer.Option(1024, "--shared-prefix-len"),
    num_groups: int = typer.Option(1, "--num-groups", help="Distinct shared prefixes."),
    suffix_len: int = typer.Option(64, "--suffix-len", help="Unique tokens after the prefix."),
    sharegpt_output_len: Optional[int] = typer.Option(None, "--sharegpt-output-len"),
) -> None:
    """Benchmark an OpenAI-compatible server: throughput, TTFT, TPOT, ITL, E2E latency."""
    args = dict(locals())
    from rich.console import Console

    err_console = Console(stderr=True)
    with user_errors():
        _check_args(args)
        config, metrics, results, t0, duration = asyncio.run(_run(args, err_console))
        from sgljax.cli.bench_report import append_jsonl, result_table, write_plot

        Console().print(result_table(config, metrics))
        _warnings(metrics, err_console)
        if output_file:
            append_jsonl(output_file, config, metrics)
        if plot:
            write_plot(plot, results, t0, duration,
                       f"{config['backend']} {config['model']} · {config['dataset']} · "
                       f"{config['num_prompts']} req")
        if metrics["completed"] == 0:
            print(f"error: every request failed; first error: {metrics['first_error']}",
                  file=sys.stderr)
            raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
