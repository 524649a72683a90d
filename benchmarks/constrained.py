"""What constrained decoding costs: the same batch of chat requests free and with a JSON
schema (engine API, no HTTP), and the host time spent filling the grammar masks.

    python benchmarks/constrained.py --concurrency 16 --output-len 128

For free requests with and without the overlap schedule, and for constrained ones,
prints output tokens/s over the whole batch (first token to last) and,
for the constrained run, the mean time per step spent building the packed masks
(llguidance fills one row per constrained request) and steps run. Constrained
requests land each step before the next is scheduled (engine.py), so the mask time
and the lost overlap are both in the figure.
"""

from __future__ import annotations

import argparse
import json
import time

from sgljax.engine.constraint import json_schema_constraint
from sgljax.engine.engine import Engine
from sgljax.engine.sampling_params import SamplingParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "hobbies": {"type": "array", "items": {"type": "string"}},
    "city": {"type": "string"}, "bio": {"type": "string"}},
    "required": ["name", "age", "hobbies", "city", "bio"], "additionalProperties": False}
QUESTION = ("Describe a fictional person as JSON with the keys name, age, hobbies, city and "
            "a long bio. Person number {i}.")


def run(engine: Engine, prompts, params) -> tuple[float, int]:
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    return time.perf_counter() - t0, sum(len(o["token_ids"]) for o in outs), outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()
    engine = Engine(model_path=args.model_path, max_running_requests=args.concurrency,
                    context_length=1024, disable_radix_cache=True)
    engine.warmup()
    prompts = [engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION.format(i=i)}]) for i in range(args.concurrency)]
    base = dict(max_tokens=args.output_len, temperature=0.7, top_p=0.9, ignore_eos=True)
    free = [SamplingParams(seed=i, **base) for i in range(args.concurrency)]
    constraint = json_schema_constraint(SCHEMA)
    constrained = [SamplingParams(seed=i, constraint=constraint, **base)
                   for i in range(args.concurrency)]
    run(engine, prompts[:2], free[:2])  # first use: the grammar tokenizer, any lazy setup
    run(engine, prompts[:2], constrained[:2])

    mask_s, steps = [0.0], [0]
    inner = engine.runner.packer.grammar

    def timed(sched, S):
        t = time.perf_counter()
        out = inner(sched, S)
        if out is not None:
            mask_s[0] += time.perf_counter() - t
            steps[0] += 1
        return out

    engine.runner.packer.grammar = timed
    compiles = engine.compiles_since_warmup()
    for name, params in (("free", free), ("free, no overlap", free),
                         ("json_schema", constrained)):
        # what the overlap schedule is worth here: constrained requests run without it
        engine.args.disable_overlap_schedule = name == "free, no overlap"
        seconds, tokens, outs = run(engine, prompts, params)
        line = f"{name:17s} {tokens / seconds:7.1f} output tok/s ({tokens} tokens, {seconds:.1f} s)"
        if name == "json_schema":
            valid = sum(_parses(o["text"]) for o in outs)
            line += (f"; masks {1000 * mask_s[0] / max(steps[0], 1):.2f} ms/step over "
                     f"{steps[0]} steps; {valid}/{len(outs)} outputs complete JSON")
        print(line)
    print(f"compiles after warmup: {engine.compiles_since_warmup() - compiles}")


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
