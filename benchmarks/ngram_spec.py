"""What speculative decoding is worth on a repetitive workload: rewriting a given
text (engine API, no HTTP), with and without speculation, at concurrency 1 and 16.

    python benchmarks/ngram_spec.py --concurrency 1,16 --output-len 160
    python benchmarks/ngram_spec.py --algorithm EAGLE3 --draft-model-path HEAD_DIR
    python benchmarks/ngram_spec.py --algorithm EAGLE3 --random-head   # the head's cost
    python benchmarks/ngram_spec.py --algorithm EAGLE3 --random-head --serial-too  # + overlap off

``--random-head`` builds an untrained EAGLE3 head of the model's shape (its drafts are
almost never kept): what drafting costs a step, with nothing gained. No trained head
for the offline SmolLM2 exists, so that is the EAGLE figure this machine can measure.

Each request asks the model to copy a paragraph it is given, greedy, so the output
repeats the prompt and prompt lookup finds most drafts. Prints output tokens/s
(first token to last of the batch), the mean accept length (tokens a decode row
with drafts emitted per step), the share of drafts kept, and whether the outputs
equal the ones without speculation (they must: greedy is lossless).
"""

from __future__ import annotations

import argparse
import time

from sgljax.engine.engine import Engine
from sgljax.engine.sampling_params import SamplingParams

SENTENCES = [
    "The river rose for three days after the storm, and the old bridge held.",
    "Farmers along the valley moved their cattle to the higher fields before dawn.",
    "A small library in the town kept its doors open late for anyone without power.",
    "Volunteers filled sandbags in the square while children carried water bottles.",
    "By the fourth morning the water had begun to fall, leaving mud on every street.",
    "The mayor thanked the neighbours who had cooked meals for the rescue teams.",
    "Engineers inspected the bridge and found a crack in one of its stone arches.",
    "Repairs would take most of the summer, so a ferry began to cross twice a day.",
    "Shops reopened one by one, some with new floors and others with empty shelves.",
    "The school held its classes in the church hall until the ground floor dried.",
    "Every evening people gathered by the ferry landing to share news and bread.",
    "When the arch was finally mended, the whole town walked across it together.",
]
PROMPT = "Copy the following text exactly, word for word, and write nothing else:\n\n{text}"
# --workload free: questions whose answers copy little, so lookups rarely find a draft.
TOPICS = ["a lighthouse keeper", "the first snow of winter", "a lost key", "a market at dawn",
          "a train that never stops", "an old violin", "a garden on a roof", "a quiet library"]
FREE = "Write a short story about {topic}."


def paragraph(i: int, sentences: int = 6) -> str:
    return " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(sentences))


def run(engine: Engine, prompts, params, concurrency: int):
    """Run the prompts ``concurrency`` at a time; (seconds, tokens, outputs, stats delta)."""
    before = engine.stats()
    t0, outs = time.perf_counter(), []
    for at in range(0, len(prompts), concurrency):
        outs += engine.generate(prompts[at:at + concurrency], params)
    seconds = time.perf_counter() - t0
    after = engine.stats()
    rows = after.spec_verify_rows - before.spec_verify_rows
    drafts = after.spec_draft_tokens - before.spec_draft_tokens
    kept = after.spec_accepted_tokens - before.spec_accepted_tokens
    return seconds, sum(len(o["token_ids"]) for o in outs), outs, (rows, drafts, kept)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--requests", type=int, default=16, help="per concurrency level")
    ap.add_argument("--output-len", type=int, default=160)
    ap.add_argument("--num-draft-tokens", type=int, default=4,
                    help="NGRAM: drafts a step; EAGLE/EAGLE3: head passes a step")
    ap.add_argument("--algorithm", default="NGRAM", choices=["NGRAM", "EAGLE", "EAGLE3"])
    ap.add_argument("--workload", default="copy", choices=["copy", "free"],
                    help="copy: rewrite a given paragraph; free: short stories (little to copy)")
    ap.add_argument("--draft-model-path", default=None, help="EAGLE/EAGLE3: the head's folder")
    ap.add_argument("--eagle-topk", type=int, default=1,
                    help="EAGLE/EAGLE3: above 1, a token tree of --num-draft-tokens passes "
                    "and --tree-nodes nodes")
    ap.add_argument("--tree-nodes", type=int, default=8,
                    help="EAGLE/EAGLE3 trees: draft nodes verified a step")
    ap.add_argument("--serial-too", action="store_true",
                    help="also run the speculating engine with the overlap schedule off "
                    "(EAGLE overlaps its steps: engine/spec_overlap.py; NGRAM never does)")
    ap.add_argument("--random-head", action="store_true",
                    help="EAGLE3: an untrained head of the model's shape (its cost alone)")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    params = SamplingParams(max_tokens=args.output_len, temperature=0)
    spec = dict(speculative_algorithm=args.algorithm,
                speculative_num_draft_tokens=args.num_draft_tokens)
    if args.algorithm != "NGRAM":
        head = args.draft_model_path
        if args.random_head:
            head = random_eagle3_head(args.model_path)
        if head is None:
            ap.error("--algorithm EAGLE/EAGLE3 needs --draft-model-path or --random-head")
        spec = dict(speculative_algorithm=args.algorithm, speculative_draft_model_path=head,
                    speculative_num_steps=args.num_draft_tokens,
                    speculative_eagle_topk=args.eagle_topk)
        if args.eagle_topk > 1:
            spec["speculative_num_draft_tokens"] = args.tree_nodes + 1
    engines = {}
    kinds = [("plain", {}), (args.algorithm, spec)]
    if args.serial_too:
        kinds.append((args.algorithm + "-serial", {**spec, "disable_overlap_schedule": True}))
    for name, kw in kinds:
        eng = Engine(model_path=args.model_path, max_running_requests=max(levels),
                     context_length=1024, disable_radix_cache=True, **kw)
        eng.warmup()
        engines[name] = eng
    tok = engines["plain"].tokenizer
    asks = [PROMPT.format(text=paragraph(i)) if args.workload == "copy"
            else FREE.format(topic=TOPICS[i % len(TOPICS)]) for i in range(args.requests)]
    prompts = [tok.apply_chat_template([{"role": "user", "content": ask}]) for ask in asks]
    for eng in engines.values():
        run(eng, prompts[:2], params, 2)  # first use: any lazy setup
    # Compiles are counted per process: count from here, after both engines' warmups.
    compiled = {name: eng.compiles_since_warmup() for name, eng in engines.items()}
    for c in levels:
        expected = None
        for name, eng in engines.items():
            drafting = eng.stats().spec_draft_seconds
            seconds, tokens, outs, (rows, drafts, kept) = run(eng, prompts, params, c)
            drafting = eng.stats().spec_draft_seconds - drafting
            ids = [o["token_ids"] for o in outs]
            line = (f"concurrency {c:3d} {name:13s} {tokens / seconds:7.1f} output tok/s "
                    f"({tokens} tokens, {seconds:.1f} s)")
            if rows:
                line += (f"; accept length {1 + kept / rows:.2f}, {kept}/{drafts} drafts kept"
                         f"; drafting {100 * drafting / seconds:.1f}% of the time"
                         f"; same tokens as plain: {ids == expected}")
            expected = expected or ids
            print(line, flush=True)
    for name, eng in engines.items():
        print(f"{name}: compiles after warmup {eng.compiles_since_warmup() - compiled[name]}")
    print("first output:", engines[args.algorithm].generate([prompts[0]], params)[0]["text"][:300])


def random_eagle3_head(model_path: str | None) -> str:
    """An untrained EAGLE3 head for the model (one layer of its width; a 4,096-token
    draft vocabulary), saved in the HF layout in a temporary folder."""
    import json
    import tempfile
    from pathlib import Path

    import numpy as np
    from safetensors.numpy import save_file

    from sgljax.engine.config import ModelConfig
    from sgljax.engine.model_files import resolve_model_path

    cfg = ModelConfig.from_dir(resolve_model_path(model_path))
    H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nh, kvh, Vd = cfg.num_heads, cfg.num_kv_heads, min(4096, cfg.vocab_size)
    rng = np.random.default_rng(0)
    w = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)  # noqa: E731
    ones = lambda n: np.ones(n, np.float32)  # noqa: E731
    tensors = {"fc.weight": w(H, 3 * H), "norm.weight": ones(H), "lm_head.weight": w(Vd, H),
               "d2t": np.zeros(Vd, np.int64), "midlayer.input_layernorm.weight": ones(H),
               "midlayer.hidden_norm.weight": ones(H),
               "midlayer.post_attention_layernorm.weight": ones(H),
               "midlayer.self_attn.q_proj.weight": w(nh * hd, 2 * H),
               "midlayer.self_attn.k_proj.weight": w(kvh * hd, 2 * H),
               "midlayer.self_attn.v_proj.weight": w(kvh * hd, 2 * H),
               "midlayer.self_attn.o_proj.weight": w(H, nh * hd),
               "midlayer.mlp.gate_proj.weight": w(I, H), "midlayer.mlp.up_proj.weight": w(I, H),
               "midlayer.mlp.down_proj.weight": w(H, I)}
    out = Path(tempfile.mkdtemp(prefix="eagle3-random-"))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLMEagle3"], "hidden_size": H, "intermediate_size": I,
        "num_attention_heads": nh, "num_key_value_heads": kvh, "head_dim": hd,
        "num_hidden_layers": 1, "vocab_size": cfg.vocab_size, "draft_vocab_size": Vd,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings}))
    save_file(tensors, str(out / "model.safetensors"))
    return str(out)


if __name__ == "__main__":
    main()
