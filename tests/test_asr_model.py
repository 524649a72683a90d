"""Qwen3-ASR's audio side against transformers: log-mel features and encoder outputs."""

from __future__ import annotations

import numpy as np
import pytest

from sgljax.engine.asr_config import AsrConfig
from sgljax.engine.asr_features import audio_features, log_mel, num_audio_tokens
from tiny_asr import SR, build_tiny_asr, synth_audio

# Clip lengths (seconds): under the 0.5 s minimum, inside one chunk, not a multiple of a
# chunk or a hop, exactly two windows, and several windows with a partial last chunk.
LENGTHS = [0.3, 0.77, 1.0, 2.0, 3.456, 5.01]


@pytest.fixture(scope="module")
def tiny_asr(tmp_path_factory):
    return build_tiny_asr(tmp_path_factory.mktemp("asr") / "tiny")


def _hf_features(audio):
    from transformers import Qwen3ASRFeatureExtractor

    # As Qwen3ASRProcessor calls it for one clip (its audio_kwargs).
    out = Qwen3ASRFeatureExtractor()(audio, sampling_rate=SR, padding=True,
                                     return_attention_mask=True, n_window=50,
                                     return_tensors="np")
    return out["input_features"], out["attention_mask"]


@pytest.mark.parametrize("seconds", LENGTHS)
def test_log_mel_matches_transformers(seconds):
    audio = synth_audio(seconds, seed=int(seconds * 100))
    ref, mask = _hf_features(audio)
    frames = int(mask.sum())
    ours = log_mel(audio)
    assert ours.shape == (128, frames)
    # transformers pads the frame axis to whole chunks with zeros; we do that per window.
    assert np.all(ref[0, :, frames:] == 0)
    # torch's float32 STFT against our float64 one: features are O(1) log10 values, and
    # the largest differences (about 2.4e-5 seen) sit in low-energy bins.
    np.testing.assert_allclose(ours, ref[0, :, :frames], atol=5e-5, rtol=0)


def test_audio_token_counts_match_processor():
    from transformers.models.qwen3_asr.processing_qwen3_asr import Qwen3ASRProcessor
    import torch

    from sgljax.engine.asr_config import AudioEncoderConfig

    enc = AudioEncoderConfig.from_hf_dict(dict(encoder_layers=1, encoder_attention_heads=1,
                                               encoder_ffn_dim=8, d_model=8, output_dim=8))
    frames = torch.arange(1, 3001)
    want = Qwen3ASRProcessor._get_audio_token_length(None, frames, 50)
    got = [num_audio_tokens(int(f), enc) for f in frames]
    assert got == list(want)


def _hf_audio_embeds(model_dir, audios):
    import torch
    from transformers import Qwen3ASRForConditionalGeneration

    model = Qwen3ASRForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for audio in audios:  # one clip at a time, as the processor pads a batch to its longest
        feats, mask = _hf_features(audio)
        with torch.no_grad():
            emb = model.get_audio_features(torch.from_numpy(feats), torch.from_numpy(mask),
                                           return_dict=True).pooler_output
        outs.append(emb.numpy())
    return outs


@pytest.fixture(scope="module")
def tiny_asr_800(tmp_path_factory):
    """The released encoders' attention window: 800 frames (8 chunks)."""
    return build_tiny_asr(tmp_path_factory.mktemp("asr800") / "tiny", seed=1, n_window_infer=800)


@pytest.mark.parametrize("which", ["window_200", "window_800"])
def test_encoder_matches_transformers(which, request):
    from sgljax.engine.asr_loader import load_audio_params
    from sgljax.engine.asr_runner import AudioEncoderRunner
    from sgljax.engine.mesh import make_mesh

    tiny_asr = request.getfixturevalue("tiny_asr" if which == "window_200" else "tiny_asr_800")
    cfg = AsrConfig.from_dir(tiny_asr)
    # n_window_infer 200: 2 chunks a window, several windows per clip; 800 (the released
    # models'): 8 chunks, and the 9.3 s clip spans two windows.
    assert cfg.encoder.chunks_per_window == (2 if which == "window_200" else 8)
    lengths = LENGTHS + ([9.3] if which == "window_800" else [])
    audios = [synth_audio(s, seed=i) for i, s in enumerate(lengths)]
    want = _hf_audio_embeds(tiny_asr, audios)
    runner = AudioEncoderRunner(cfg.encoder, load_audio_params(tiny_asr, cfg), make_mesh(1),
                                max_windows=4)
    clips = [audio_features(a, cfg.encoder) for a in audios]
    together = runner.encode(clips)  # all clips in one stream of windows (several calls)
    alone = [runner.encode([c])[0] for c in clips]
    assert set(runner._executables) <= set(runner.buckets)  # compiled per bucket only
    scale = max(float(np.abs(w).max()) for w in want)
    for w, t, a, clip in zip(want, together, alone, clips):
        assert t.shape == w.shape == (clip.num_tokens, 64)
        np.testing.assert_allclose(t, w, atol=1e-5 * scale, rtol=0)
        # Batched or alone, a clip's windows are the same computation, but in another
        # bucket shape XLA may order float sums differently (about 1e-7 seen).
        np.testing.assert_allclose(t, a, atol=1e-6 * scale, rtol=0)


# -- checkpoint, tokenizer, prompt -------------------------------------------------

# transformers' test_chat_template: the released template's prompt for one clip.
RELEASED_PROMPT = ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n"
                   "<|audio_start|><|audio_pad|><|audio_end|><|im_end|>\n<|im_start|>assistant\n")


def test_prompt_layout_is_the_released_templates():
    from sgljax.engine.asr_prompt import prompt_text

    assert prompt_text() == RELEASED_PROMPT
    assert prompt_text(language="en") == RELEASED_PROMPT + "language English<asr_text>"
    assert prompt_text(context="Names: Ada") == RELEASED_PROMPT.replace(
        "system\n", "system\nNames: Ada", 1)


@pytest.mark.parametrize("language,context", [(None, None), ("en", None), ("French", "sgljax, XLA"),
                                              ("yue", "")])
def test_prompt_ids_match_processor(tiny_asr, language, context):
    from sgljax.engine.asr_prompt import expand_audio_pads, prompt_text
    from sgljax.engine.tokenizer import Tokenizer
    from tiny_asr import hf_processor

    cfg = AsrConfig.from_dir(tiny_asr)
    tok = Tokenizer(tiny_asr)
    proc = hf_processor(tiny_asr)
    for seconds in (0.3, 2.0, 3.456):
        audio = synth_audio(seconds)
        want = proc.apply_transcription_request(audio=audio, language=language, prompt=context)
        ids = tok.encode(prompt_text(1, language, context), add_special_tokens=False)
        ids = expand_audio_pads(ids, cfg.audio_token_id,
                                [audio_features(audio, cfg.encoder).num_tokens])
        assert ids == want["input_ids"][0].tolist()


def test_tokenizer_and_config_agree_on_audio_tokens(tiny_asr):
    from sgljax.engine.tokenizer import Tokenizer
    from tiny_asr import hf_config_dict

    cfg = AsrConfig.from_dir(tiny_asr)
    tok = Tokenizer(tiny_asr).hf
    assert cfg.audio_token_id == hf_config_dict(tiny_asr)["audio_token_id"] == 151676
    ids = tok.convert_tokens_to_ids(["<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
                                     "<asr_text>"])
    assert ids == [cfg.audio_start_id, cfg.audio_end_id, cfg.audio_token_id, 151704]
    # <asr_text> survives skip_special_tokens (transformers' parse relies on it); audio does not.
    text = tok.decode([151669, 151676, 151670, 151704], skip_special_tokens=True)
    assert text == "<asr_text>"


def test_decoder_weights_load_from_the_asr_checkpoint(tiny_asr):
    import torch
    from transformers import Qwen3ASRForConditionalGeneration

    from sgljax.engine.loader import load_model
    from sgljax.engine.mesh import make_mesh

    loaded = load_model(tiny_asr, make_mesh(1))
    assert loaded.config.architecture == "Qwen3ForCausalLM" and loaded.config.qk_norm
    assert loaded.config.tie_word_embeddings and loaded.config.eos_token_ids == (151643, 151645)
    hf = Qwen3ASRForConditionalGeneration.from_pretrained(tiny_asr, dtype=torch.float32)
    lm = hf.model.language_model
    top, layers = loaded.model.weights()
    np.testing.assert_array_equal(np.asarray(top["embed"]), lm.embed_tokens.weight.detach().numpy())
    np.testing.assert_array_equal(np.asarray(layers["q_proj"][1]),
                                  lm.layers[1].self_attn.q_proj.weight.detach().numpy())
    np.testing.assert_array_equal(np.asarray(layers["k_norm"][0]),
                                  lm.layers[0].self_attn.k_norm.weight.detach().numpy())


@pytest.mark.parametrize("text,forced,want", [
    ("language English<asr_text>Hello there.", None, ("Hello there.", "English")),
    ("language None<asr_text>", None, ("", None)),
    ("Bonjour.", "fr", ("Bonjour.", "French")),
    ("no marker at all", None, ("no marker at all", None)),
])
def test_parse_transcription(text, forced, want):
    from transformers.models.qwen3_asr.processing_qwen3_asr import _parse_single_output

    from sgljax.engine.asr_prompt import parse_transcription

    got = parse_transcription(text, forced)
    assert (got.text, got.language) == want
    if forced is None:  # transformers' parser agrees where it sees the same text
        ref = _parse_single_output(text)
        assert (ref["transcription"], ref["language"]) == want


# -- audio in ------------------------------------------------------------------------

def _wav(samples: np.ndarray, rate: int, width: int, channels: int = 1) -> bytes:
    import io
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        if width == 1:
            w.writeframes((np.clip(samples, -1, 1) * 127 + 128).astype(np.uint8).tobytes())
        else:
            w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("rate,width", [(16000, 2), (44100, 2), (8000, 1), (48000, 2)])
def test_wav_decodes_and_resamples_to_16k(rate, width):
    from sgljax.engine.asr_audio import load_audio

    t = np.arange(int(rate * 1.5)) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    x = load_audio(_wav(tone, rate, width))
    assert x.dtype == np.float32 and abs(len(x) - 24000) <= 1
    spectrum = np.abs(np.fft.rfft(x[2000:-2000]))
    peak_hz = np.argmax(spectrum) * SR / (len(x) - 4000)
    assert abs(peak_hz - 440.0) < 2.0  # the tone survives resampling
    assert abs(np.abs(x[2000:-2000]).max() - 0.5) < 0.02


def test_stereo_wav_is_averaged_and_junk_refused():
    from sgljax.engine.asr_audio import AudioDecodeError, load_audio

    left = np.full(1600, 0.5, np.float32)
    stereo = np.stack([left, -left * 0], axis=1).reshape(-1)  # right channel silent
    x = load_audio(_wav(stereo, 16000, 2, channels=2))
    assert len(x) == 1600 and np.allclose(x, 0.25, atol=1e-3)
    with pytest.raises(AudioDecodeError):
        load_audio(b"ID3\x03not a wav at all")


def test_collapse_repeats_matches_the_original_post_processing():
    from transformers.models.qwen3_asr.processing_qwen3_asr import _detect_and_fix_repetitions

    from sgljax.engine.asr_prompt import collapse_repeats

    rng = np.random.default_rng(0)
    cases = ["", "short", "a" * 21, "a" * 20, "ha" * 25 + " end", "x" + "abc" * 20 + "y" * 30,
             "the cat " * 19, "the cat " * 21 + "sat"]
    for _ in range(300):  # random texts with loops of random units spliced in
        parts = []
        for _ in range(int(rng.integers(1, 5))):
            unit = "".join(rng.choice(list("abc d"), size=int(rng.integers(1, 6))))
            parts.append(unit * int(rng.integers(1, 30)))
        cases.append("".join(parts))
    for text in cases:
        assert collapse_repeats(text) == _detect_and_fix_repetitions(text), text
