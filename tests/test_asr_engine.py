"""Qwen3-ASR through the engine: greedy transcription tokens exactly transformers'."""

from __future__ import annotations

import numpy as np
import pytest

from sgljax.engine.asr_prompt import collapse_repeats
from sgljax.engine.engine import Engine
from sgljax.engine.sampling_params import RequestError, SamplingParams
from tiny_asr import build_tiny_asr, hf_processor, synth_audio

N = 12  # tokens generated per request (EOS ignored: random weights rarely stop)
GREEDY = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
SECONDS = [0.3, 1.0, 2.0, 3.456]


@pytest.fixture(scope="module")
def tiny_asr(tmp_path_factory):
    return build_tiny_asr(tmp_path_factory.mktemp("asr") / "tiny")


@pytest.fixture(scope="module")
def engine(tiny_asr):
    # Chunks of 16 tokens: audio runs are split across prefill steps (and across pages of 4).
    return Engine(model_path=str(tiny_asr), page_size=4, chunked_prefill_size=16,
                  max_running_requests=8, max_prefill_seqs=4, context_length=512,
                  max_total_tokens=8192)


@pytest.fixture(scope="module")
def hf(tiny_asr):
    import torch
    from transformers import Qwen3ASRForConditionalGeneration

    model = Qwen3ASRForConditionalGeneration.from_pretrained(tiny_asr, dtype=torch.float32)
    return model.eval(), hf_processor(tiny_asr)


def _hf_transcribe(hf, audio, language=None, context=None):
    import torch

    model, proc = hf
    inputs = proc.apply_transcription_request(audio=audio, language=language, prompt=context)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def _clips():
    return [synth_audio(s, seed=10 + i) for i, s in enumerate(SECONDS)]


@pytest.mark.parametrize("language,context", [(None, None), ("en", "Proper nouns: Ada")])
def test_transcription_tokens_match_transformers(engine, hf, language, context):
    prompt = engine.transcription_prompt(1, language, context)
    ours = [engine.generate([prompt], GREEDY, audio=[[a]])[0]["token_ids"] for a in _clips()]
    theirs = [_hf_transcribe(hf, a, language, context) for a in _clips()]
    assert ours == theirs
    assert len({tuple(t) for t in ours}) > 1  # the audio matters: not one answer for all


def test_batched_audio_mixed_with_text_gives_the_same_tokens(engine):
    prompt = engine.transcription_prompt()
    clips = _clips()
    alone = [engine.generate([prompt], GREEDY, audio=[[a]])[0]["token_ids"] for a in clips]
    text = engine.tokenizer.encode("Some text without audio, to share the steps with.")
    text_alone = engine.generate([text], GREEDY)[0]["token_ids"]
    engine.flush_cache()
    prompts = [prompt, text, prompt, prompt, text, prompt]
    audio = [[clips[0]], None, [clips[1]], [clips[2]], None, [clips[3]]]
    calls = engine.audio.runner.calls
    outs = engine.generate(prompts, GREEDY, audio=audio)
    assert engine.audio.runner.calls == calls + 1  # all four clips in one encoder call
    got = [o["token_ids"] for o in outs]
    assert got == [alone[0], text_alone, alone[1], alone[2], text_alone, alone[3]]


def test_prefix_cache_tells_clips_apart(engine):
    prompt = engine.transcription_prompt()
    a, b = synth_audio(2.0, seed=1), synth_audio(2.0, seed=2)  # same length, other audio
    engine.flush_cache()
    first = engine.generate([prompt], GREEDY, audio=[[a]])[0]["token_ids"]
    seq = engine.add_request(prompt, GREEDY, audio=[b])
    before_audio = int(seq.audio_positions[0])
    other = _run(engine, seq)
    assert seq.num_cached_prompt <= before_audio  # only the text before the audio is shared
    again = engine.add_request(prompt, GREEDY, audio=[a])
    assert _run(engine, again) == first
    assert again.num_cached_prompt > int(again.audio_positions[-1])  # a's audio came from cache
    assert other != first


def _run(engine, seq):
    while not seq.finished or engine.has_work():
        engine.step()
    return list(seq.output_ids)


def test_one_placeholder_per_clip_is_expanded_and_miscounts_refused(engine):
    prompt = engine.transcription_prompt(2)  # two clips in one user turn
    a, b = synth_audio(1.0, seed=3), synth_audio(0.77, seed=4)
    seq = engine.add_request(prompt, GREEDY, audio=[a, b])
    pad = engine.audio.cfg.audio_token_id
    assert sum(t == pad for t in seq.prompt_ids) == 13 + 10
    _run(engine, seq)
    with pytest.raises(RequestError):
        engine.add_request(prompt, GREEDY, audio=[a])  # two placeholders, one clip
    with pytest.raises(RequestError):
        engine.add_request(prompt, GREEDY, audio=[np.zeros((2, 100), np.float32)] * 2)
    with pytest.raises(RequestError):
        engine.add_request(prompt, GREEDY)  # placeholders without audio


def test_transcribe_parses_the_answer(engine):
    out = engine.transcribe([synth_audio(1.0, seed=5)], language="fr",
                            params=SamplingParams(max_tokens=6, temperature=0))
    assert out[0]["language"] == "French"  # forced: the answer is all transcription
    assert out[0]["text"] == collapse_repeats(out[0]["raw"].strip())


def test_no_compiles_after_warmup(tiny_asr, tmp_path):
    eng = Engine(model_path=str(tiny_asr), compilation_cache_dir=str(tmp_path), page_size=4,
                 chunked_prefill_size=32, max_running_requests=4, max_prefill_seqs=4,
                 context_length=256, max_total_tokens=2048)
    buckets = len(eng.audio.runner.buckets)
    # Each bucket twice (text, and with audio embeddings), then the encoder's.
    assert eng.warmup() == 2 * len(eng.plan.all_shapes()) + buckets
    rng = np.random.default_rng(0)
    prompt = eng.transcription_prompt(1, "en")
    for n in (1, 3, 4):  # audio and text requests together, clips of 0.2 s .. 9 s
        clips = [synth_audio(float(rng.uniform(0.2, 9.0)), seed=n + i) for i in range(n)]
        text = rng.integers(1, 150000, size=int(rng.integers(1, 60))).tolist()
        eng.generate([prompt] * n + [text], SamplingParams(max_tokens=4, temperature=0),
                     audio=[[c] for c in clips] + [None])
    assert eng.compiles_since_warmup() == 0
    assert eng.audio.runner.unwarmed_shapes == 0


def test_converted_checkpoint_serves_the_same_transcriptions(tiny_asr, engine, tmp_path):
    from sgljax.engine.convert import convert_model

    manifest = convert_model(tiny_asr, tmp_path / "converted")
    assert manifest["architecture"] == "Qwen3ForCausalLM"
    assert "layers.q_w" in manifest["audio_tensors"] and "conv1_w" in manifest["audio_tensors"]
    conv = Engine(model_path=str(tmp_path / "converted"), page_size=4, chunked_prefill_size=16,
                  max_running_requests=8, max_prefill_seqs=4, context_length=512,
                  max_total_tokens=8192)
    prompt = engine.transcription_prompt(1, "en")
    clips = _clips()
    want = engine.generate([prompt] * len(clips), GREEDY, audio=[[c] for c in clips])
    got = conv.generate([prompt] * len(clips), GREEDY, audio=[[c] for c in clips])
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in want]


def test_warmup_asr_compiles_what_audio_needs(tiny_asr, tmp_path):
    eng = Engine(model_path=str(tiny_asr), compilation_cache_dir=str(tmp_path), page_size=4,
                 chunked_prefill_size=32, max_running_requests=4, max_prefill_seqs=4,
                 context_length=256, max_total_tokens=2048)
    span = eng.audio.runner.window_frames  # 200 frames: 2 s per window in the tiny model
    out = eng.warmup_asr(frame_paddings=[150, 700], token_paddings=[32])
    assert out["encoder_buckets"] == [1, 4] and out["unwarmed"] == 0, out
    assert out["audio_shapes"] == 1  # the one token bucket asked for
    eng.warmup()  # the rest; from here on every compile counts
    assert eng.unwarmed_audio_shapes() == 0
    eng.transcribe([synth_audio(9 * span / 100, seed=9)],  # 9 windows: the 16 bucket
                   params=SamplingParams(max_tokens=2, temperature=0))
    assert eng.compiles_since_warmup() == 0 and eng.unwarmed_audio_shapes() == 0


def test_preempted_audio_request_resumes_without_re_encoding(tiny_asr, engine):
    prompt = engine.transcription_prompt()
    clips = [synth_audio(2.0, seed=21), synth_audio(2.2, seed=22), synth_audio(1.9, seed=23)]
    alone = [engine.generate([prompt], GREEDY, audio=[[c]])[0]["token_ids"] for c in clips]
    # Room for about two of the three requests: decoding runs out of pages and preempts.
    small = Engine(model_path=str(tiny_asr), page_size=4, chunked_prefill_size=64,
                   max_running_requests=3, max_prefill_seqs=3, context_length=96,
                   max_total_tokens=96, disable_radix_cache=True)
    seqs = [small.add_request(prompt, GREEDY, audio=[c]) for c in clips]
    while any(not s.finished for s in seqs) or small.has_work():
        small.step()
    assert sum(s.num_preemptions for s in seqs) > 0
    assert small.audio.runner.calls == 1  # encoded once, together; never again on resume
    assert [list(s.output_ids) for s in seqs] == alone


def test_tensor_parallel_gives_the_same_transcriptions(tiny_asr, engine):
    prompt = engine.transcription_prompt(1, "en")
    clips = _clips()[:2]
    want = engine.generate([prompt] * 2, GREEDY, audio=[[c] for c in clips])
    tp2 = Engine(model_path=str(tiny_asr), tp_size=2, page_size=4, chunked_prefill_size=16,
                 max_running_requests=8, max_prefill_seqs=4, context_length=512,
                 max_total_tokens=8192)
    got = tp2.generate([prompt] * 2, GREEDY, audio=[[c] for c in clips])
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in want]


def test_frame_paddings_flag_limits_the_encoder_buckets(tiny_asr, tmp_path):
    eng = Engine(model_path=str(tiny_asr), compilation_cache_dir=str(tmp_path), page_size=4,
                 chunked_prefill_size=32, max_running_requests=4, max_prefill_seqs=4,
                 context_length=256, max_total_tokens=2048,
                 precompile_frame_paddings=[150, 700])  # 1 and 4 windows of 200 frames
    eng.warmup()
    assert sorted(eng.audio.runner._executables) == [1, 4]
    assert eng.audio.runner.call_sizes(9) == [4, 4, 1]
    eng.transcribe([synth_audio(18.0, seed=8), synth_audio(3.0, seed=9)],  # 9 + 2 windows
                   params=SamplingParams(max_tokens=2, temperature=0))
    assert eng.compiles_since_warmup() == 0 and eng.unwarmed_audio_shapes() == 0
