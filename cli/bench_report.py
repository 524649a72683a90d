"""Benchmark metrics (named and computed as SGLang's bench_serving does), the rich
table, the JSON line per run and the optional PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from sgljax.cli.bench_client import RequestResult

PERCENTILES = (("mean", None), ("median", 50), ("p90", 90), ("p99", 99))
LATENCIES = (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
             ("itl", "Inter-Token Latency"), ("e2e_latency", "End-to-End Latency"))


def _stats(name: str, values_s: list[float]) -> dict:
    out = {}
    for label, q in PERCENTILES:
        key = f"{label}_{name}_ms"
        if not values_s:
            out[key] = None
        else:
            v = np.mean(values_s) if q is None else np.percentile(values_s, q)
            out[key] = float(v) * 1000.0
    return out


def output_tokens(r: RequestResult) -> int:
    return r.completion_tokens if r.completion_tokens is not None else 0


def token_timeline(results: list[RequestResult]) -> list[tuple[float, float]]:
    """(time, tokens) events. A request's tokens are spread evenly over its content
    chunks (the stream does not say how many each chunk holds)."""
    events = []
    for r in results:
        n = output_tokens(r)
        if r.chunk_times:
            per = n / len(r.chunk_times)
            events += [(t, per) for t in r.chunk_times]
        elif n:
            events.append((r.start + r.e2e, float(n)))
    return events


def peak_output_throughput(results: list[RequestResult], t0: float, duration: float,
                           window: float = 1.0) -> float:
    """Most output tokens in any whole 1 s bucket since the start (tok/s); a run
    shorter than one bucket reports its average (a partial bucket is too noisy)."""
    events = token_timeline(results)
    full = int(duration // window)
    if not events or full == 0:
        return sum(n for _, n in events) / duration if duration else 0.0
    buckets = [0.0] * full
    for t, n in events:
        k = int((t - t0) // window)
        if 0 <= k < full:
            buckets[k] += n
    return max(buckets) / window


def peak_concurrency(results: list[RequestResult]) -> int:
    edges = sorted([(r.start, 1) for r in results] + [(r.start + r.e2e, -1) for r in results],
                   key=lambda e: (e[0], e[1]))
    peak = cur = 0
    for _, d in edges:
        cur += d
        peak = max(peak, cur)
    return peak


def compute_metrics(results: list[RequestResult], duration: float, t0: float,
                    ignore_eos: bool) -> dict:
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    total_in = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in done)
    total_out = sum(output_tokens(r) for r in done)
    ttfts = [r.ttft for r in done if r.ttft is not None]
    tpots = [(r.e2e - r.ttft) / (output_tokens(r) - 1) for r in done
             if r.ttft is not None and output_tokens(r) > 1]
    itls = [g for r in done for g in r.itls]
    e2es = [r.e2e for r in done]
    chunks = sum(len(r.chunk_times) for r in done)
    reporting_cache = [r for r in done if r.cached_tokens is not None]
    cache_prompt = sum(r.prompt_tokens or r.prompt_len for r in reporting_cache)
    mismatched = [r for r in done if output_tokens(r) != r.output_len]
    m = {
        "completed": len(done), "failed": len(failed),
        "first_error": failed[0].error if failed else None,
        "duration_s": duration,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(done) / duration if duration else 0.0,
        "input_throughput": total_in / duration if duration else 0.0,
        "output_throughput": total_out / duration if duration else 0.0,
        "total_throughput": (total_in + total_out) / duration if duration else 0.0,
        "peak_output_throughput": peak_output_throughput(done, t0, duration),
        "peak_concurrent_requests": peak_concurrency(done),
        "concurrency": sum(e2es) / duration if duration else 0.0,  # mean requests in flight
        "tokens_per_chunk": total_out / chunks if chunks else None,
        "cached_tokens": sum(r.cached_tokens for r in reporting_cache) if reporting_cache else None,
        "cache_hit_rate": (sum(r.cached_tokens for r in reporting_cache) / cache_prompt
                           if reporting_cache and cache_prompt else None),
        "output_len_mismatches": len(mismatched) if ignore_eos else None,
        "output_len_min": min((output_tokens(r) for r in done), default=None),
        "output_len_max": max((output_tokens(r) for r in done), default=None),
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2e_latency", e2es)):
        m.update(_stats(name, values))
    m["per_request"] = {
        "prompt_tokens": [r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in done],
        "output_tokens": [output_tokens(r) for r in done],
        "ttft_ms": [None if r.ttft is None else round(r.ttft * 1000, 3) for r in done],
        "e2e_ms": [round(r.e2e * 1000, 3) for r in done],
    }
    return m


# --- presentation ------------------------------------------------------------------------


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def result_table(config: dict, m: dict):
    from rich.table import Table

    table = Table(title="Serving Benchmark Result", show_header=False, title_style="bold")
    table.add_column("metric", style="cyan")
    table.add_column("value", justify="right")
    rows = [
        ("Backend", config["backend"]), ("Model", config["model"]),
        ("Dataset", config["dataset"]),
        ("Traffic request rate (req/s)", _fmt(config["request_rate"])),
        ("Max request concurrency", config["max_concurrency"] or "not set"),
        ("Successful requests", f"{m['completed']} / {m['completed'] + m['failed']}"),
        ("Benchmark duration (s)", _fmt(m["duration_s"])),
        ("Total input tokens", _fmt(m["total_input_tokens"])),
        ("Total generated tokens", _fmt(m["total_output_tokens"])),
        ("Request throughput (req/s)", _fmt(m["request_throughput"])),
        ("Input token throughput (tok/s)", _fmt(m["input_throughput"])),
        ("Output token throughput (tok/s)", _fmt(m["output_throughput"])),
        ("Peak output token throughput (tok/s)", _fmt(m["peak_output_throughput"])),
        ("Peak concurrent requests", _fmt(m["peak_concurrent_requests"])),
        ("Total token throughput (tok/s)", _fmt(m["total_throughput"])),
        ("Concurrency", _fmt(m["concurrency"])),
        ("Output length check", "not checked (EOS allowed)" if m["output_len_mismatches"] is None
         else "ok" if m["output_len_mismatches"] == 0
         else f"{m['output_len_mismatches']} requests short/long"),
        ("Cached-token hit rate", "n/a" if m["cache_hit_rate"] is None
         else f"{m['cache_hit_rate']:.1%}"),
    ]
    if m.get("spec_accept_length") is not None:  # sgljax with speculative decoding
        rows.append(("Speculative accept length", _fmt(m["spec_accept_length"])))
        for key, label in (("spec_draft_share", "drafting"), ("spec_verify_share", "verify steps")):
            if m.get(key) is not None:
                rows.append((f"Speculative {label} (share of time)", f"{m[key]:.1%}"))
    for k, v in rows:
        table.add_row(k, str(v))
    for key, title in LATENCIES:
        table.add_section()
        table.add_row(f"[bold]{title}[/bold]", "")
        short = "E2E Latency" if key == "e2e_latency" else key.upper()
        for label, _ in PERCENTILES:
            table.add_row(f"{label.capitalize()} {short} (ms)", _fmt(m[f"{label}_{key}_ms"]))
    return table


def append_jsonl(path: str, config: dict, m: dict) -> None:
    line = dict(config)
    line.update(m)
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def write_plot(path: str, results: list[RequestResult], t0: float, duration: float, title: str) -> None:
    """Latency histograms (TTFT, ITL, E2E) and output tok/s + requests in flight over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r.ok]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    series = (("TTFT (ms)", [r.ttft * 1000 for r in done if r.ttft is not None]),
              ("ITL (ms)", [g * 1000 for r in done for g in r.itls]),
              ("E2E latency (ms)", [r.e2e * 1000 for r in done]))
    for ax, (label, values) in zip(axes.flat, series):
        if values:
            ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="tab:blue", alpha=0.8)
            for q, style in ((50, "-"), (99, "--")):
                ax.axvline(np.percentile(values, q), color="tab:red", linestyle=style,
                           label=f"p{q} {np.percentile(values, q):.1f}")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data (streaming off?)", ha="center", transform=ax.transAxes)
        ax.set_xlabel(label)
        ax.set_ylabel("count")
    ax = axes.flat[3]
    width = max(duration / 30, 0.05)
    nb = max(1, int(math.ceil(duration / width)))
    tokens = np.zeros(nb)
    for t, n in token_timeline(done):
        tokens[min(nb - 1, max(0, int((t - t0) / width)))] += n
    centers = (np.arange(nb) + 0.5) * width
    ax.plot(centers, tokens / width, color="tab:green", label="output tok/s")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tok/s")
    inflight = [sum(1 for r in done if r.start - t0 <= c < r.start - t0 + r.e2e) for c in centers]
    ax2 = ax.twinx()
    ax2.plot(centers, inflight, color="tab:orange", label="requests in flight")
    ax2.set_ylabel("requests in flight")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
