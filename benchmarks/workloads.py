"""The project's four serving workloads (issue 10), run with ``sgljax bench`` against one server.

    python benchmarks/workloads.py --base-url http://127.0.0.1:30000 [--only a,c]
        [--output-file results.jsonl] [--tokenizer DIR] [--backend openai] [--label NAME]

Each workload is one ``sgljax bench`` run (its JSON line is appended to
--output-file); a table of all of them is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# name → (description, sgljax bench arguments)
WORKLOADS: dict[str, tuple[str, list[str]]] = {
    "a": ("64 req, conc 16, 256 in / 128 out",
          ["--num-prompts", "64", "--max-concurrency", "16",
           "--random-input-len", "256", "--random-output-len", "128"]),
    "b": ("16 req, conc 1, 128 in / 128 out",
          ["--num-prompts", "16", "--max-concurrency", "1",
           "--random-input-len", "128", "--random-output-len", "128"]),
    "c": ("128 req, conc 64, 512 in / 64 out",
          ["--num-prompts", "128", "--max-concurrency", "64",
           "--random-input-len", "512", "--random-output-len", "64"]),
    "d": ("64 req, conc 16, 1,024 shared + 64 in / 64 out",
          ["--dataset", "shared-prefix", "--num-prompts", "64", "--max-concurrency", "16",
           "--shared-prefix-len", "1024", "--num-groups", "1", "--suffix-len", "64",
           "--random-output-len", "64"]),
}

# Longest prompt + output of each workload (for servers that need a per-slot context).
MAX_TOKENS_PER_REQUEST = {"a": 256 + 128, "b": 128 + 128, "c": 512 + 64, "d": 1024 + 64 + 64}
CONCURRENCY = {"a": 16, "b": 1, "c": 64, "d": 16}


def run_workload(name: str, base_url: str, output_file: Path, extra: list[str]) -> dict:
    """Run one workload with ``sgljax bench``; returns its JSON line."""
    cmd = [sys.executable, "-m", "sgljax.cli.main", "bench", "--base-url", base_url,
           *WORKLOADS[name][1], "--output-file", str(output_file), *extra]
    print(f"--- workload {name}: {WORKLOADS[name][0]}", file=sys.stderr, flush=True)
    before = len(output_file.read_text().splitlines()) if output_file.exists() else 0
    proc = subprocess.run(cmd)
    lines = output_file.read_text().splitlines() if output_file.exists() else []
    if proc.returncode != 0 or len(lines) <= before:
        raise SystemExit(f"error: workload {name} failed (sgljax bench exited {proc.returncode})")
    return json.loads(lines[-1])


def _ms(v) -> str:
    return "n/a" if v is None else f"{v:,.1f}"


def print_table(rows: list[tuple[str, str, dict]], title: str) -> None:
    """rows: (server label, workload name, bench JSON line)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, caption="  ".join(f"({k}) {v[0]}" for k, v in WORKLOADS.items()))
    for col in ("server", "workload", "req/s", "out tok/s", "peak out tok/s", "TTFT p50 ms",
                "TTFT p99 ms", "TPOT p50 ms", "ITL p50 ms", "E2E p50 ms", "cache hit", "ok"):
        t.add_column(col, justify="left" if col in ("server", "workload") else "right")
    for label, name, m in rows:
        hit = m.get("cache_hit_rate")
        t.add_row(label, name, f"{m['request_throughput']:.2f}",
                  f"{m['output_throughput']:,.1f}", f"{m['peak_output_throughput']:,.1f}",
                  _ms(m["median_ttft_ms"]), _ms(m["p99_ttft_ms"]), _ms(m["median_tpot_ms"]),
                  _ms(m["median_itl_ms"]), _ms(m["median_e2e_latency_ms"]),
                  "n/a" if hit is None else f"{hit:.0%}",
                  f"{m['completed']}/{m['completed'] + m['failed']}")
    Console(width=None if sys.stdout.isatty() else 160).print(t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True)
    p.add_argument("--only", default="a,b,c,d", help="comma-separated workloads (a,b,c,d)")
    p.add_argument("--output-file", default=None, help="JSONL to append to (default: a temp file)")
    p.add_argument("--label", default=None, help="server name in the table (default: the URL)")
    args, extra = p.parse_known_args()  # anything else goes to sgljax bench (--tokenizer, ...)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise SystemExit(f"error: unknown workload {', '.join(unknown)} (have a, b, c, d)")
    out = Path(args.output_file or tempfile.mkstemp(suffix=".jsonl", prefix="sgljax-bench-")[1])
    rows = [(args.label or args.base_url, n, run_workload(n, args.base_url, out, extra))
            for n in names]
    print_table(rows, f"sgljax bench workloads · {args.base_url}")
    print(f"results: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
