"""Baseline: transformers ``generate`` on torch CPU, batched, with no server in the way.

    python benchmarks/hf_generate_baseline.py [--model-path HF_DIR] [--batch-sizes 1,16,64]
        [--input-len 256] [--output-len 128] [--threads 2] [--output-file r.jsonl]

Every batch holds prompts of exactly --input-len tokens (built as ``sgljax bench``
builds them, so no padding), greedy, EOS ignored (min_new_tokens = max_new_tokens).
It reports output tok/s (all sequences), the prefill time of the batch (one forward
pass over the prompts: the best TTFT a server could give that batch) and the mean
time per decode step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def default_model_dir() -> Path:
    code = "from sgljax.engine.model_files import resolve_model_path; print(resolve_model_path(None))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=None, help="HF folder (default: sgljax's SmolLM2 folder)")
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output-file", default=None, help="append one JSON line per batch size")
    args = p.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not batch_sizes or min(batch_sizes) < 1 or args.input_len < 1 or args.output_len < 1:
        raise SystemExit("error: batch sizes, --input-len and --output-len must be positive")

    import torch
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sgljax.cli.bench_datasets import PromptBuilder

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model_path).expanduser() if args.model_path else default_model_dir()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, args.dtype))
    model.eval()
    builder = PromptBuilder(tok, seed=args.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def batch(n: int) -> torch.Tensor:
        ids = [tok.encode(builder.random_text(args.input_len)[0], add_special_tokens=False)
               for _ in range(n)]
        return torch.tensor(ids)

    def generate(ids: torch.Tensor, new: int) -> torch.Tensor:
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=pad)

    with torch.inference_mode():
        generate(batch(1), 2)  # warm up (first-call allocations)
        rows = []
        for bs in batch_sizes:
            ids = batch(bs)
            t0 = time.perf_counter()
            model(ids, attention_mask=torch.ones_like(ids))
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = generate(ids, args.output_len)
            total = time.perf_counter() - t0
            new_tokens = (out.shape[1] - ids.shape[1]) * bs
            row = {"backend": "transformers-generate", "model": model_dir.name,
                   "dtype": args.dtype, "threads": args.threads, "batch_size": bs,
                   "input_len": args.input_len, "output_len": args.output_len,
                   "total_s": total, "output_throughput": new_tokens / total,
                   "prefill_ms": prefill * 1000,
                   "decode_step_ms": max(0.0, total - prefill) / max(1, args.output_len - 1) * 1000}
            rows.append(row)
            if args.output_file:
                with open(args.output_file, "a") as f:
                    f.write(json.dumps(row) + "\n")

    t = Table(title=f"transformers generate · {model_dir.name} · {args.dtype} · "
                    f"{args.threads} threads · {args.input_len} in / {args.output_len} out")
    for col in ("batch", "total s", "out tok/s", "prefill ms (≈ best TTFT)", "ms / decode step"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["batch_size"]), f"{r['total_s']:.2f}", f"{r['output_throughput']:,.1f}",
                  f"{r['prefill_ms']:,.1f}", f"{r['decode_step_ms']:,.1f}")
    Console().print(t)


if __name__ == "__main__":
    main()
