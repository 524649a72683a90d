"""Audio seconds transcribed per wall second through the engine, one request at a time
and N at once, on the tiny random Qwen3-ASR the tests build (needs the test extras).

    python benchmarks/asr_throughput.py --seconds 5 --requests 8 --tokens 32

Prints warmup_asr's time, then for concurrency 1 and N: audio seconds / wall second and
tokens/s (each request generates --tokens tokens, EOS ignored: random weights rarely stop).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_asr import build_tiny_asr, synth_audio  # noqa: E402

from sgljax.engine.engine import Engine  # noqa: E402
from sgljax.engine.sampling_params import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each clip")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    model = build_tiny_asr(Path(tempfile.mkdtemp()) / "tiny-asr")
    engine = Engine(model_path=str(model), context_length=1024, max_running_requests=16,
                    chunked_prefill_size=256)
    t0 = time.perf_counter()
    engine.warmup()
    figures = engine.warmup_asr()
    print(f"warmup + warmup_asr: {time.perf_counter() - t0:.1f} s "
          f"(encoder buckets {figures['encoder_buckets']}, unwarmed {figures['unwarmed']})")
    clips = [synth_audio(args.seconds, seed=i) for i in range(args.requests)]
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    prompt = engine.transcription_prompt(1)
    for concurrency in (1, args.requests):
        engine.flush_cache()
        t = time.perf_counter()
        for at in range(0, len(clips), concurrency):
            batch = clips[at:at + concurrency]
            engine.generate([prompt] * len(batch), params, audio=[[c] for c in batch])
        wall = time.perf_counter() - t
        audio = args.seconds * len(clips)
        print(f"concurrency {concurrency:2d}: {audio / wall:6.1f} audio s / wall s, "
              f"{args.tokens * len(clips) / wall:6.1f} tok/s ({len(clips)} x {args.seconds:g} s "
              f"in {wall:.2f} s)")
    print(f"compiles after warmup: {engine.compiles_since_warmup()}, "
          f"unwarmed audio shapes: {engine.unwarmed_audio_shapes()}")


if __name__ == "__main__":
    main()
