"""Qwen3-ASR's transcription prompt, and the parsing of what the model answers.

The released checkpoints' chat template, as transformers' ``Qwen3ASRProcessor.
apply_transcription_request`` renders it:

    <|im_start|>system\\n{context}<|im_end|>\\n
    <|im_start|>user\\n<|audio_start|><|audio_pad|><|audio_end|><|im_end|>\\n
    <|im_start|>assistant\\n[language {Name}<asr_text>]

The system turn is always there (empty without a context); a language hint is forced
by pre-filling the assistant turn, so the model writes only the transcription; without
one it writes ``language {Name}<asr_text>{text}`` itself. Each ``<|audio_pad|>`` is
expanded to one token per encoder output of its clip.
"""

from __future__ import annotations

from dataclasses import dataclass

ASR_TEXT = "<asr_text>"
AUDIO_BLOCK = "<|audio_start|><|audio_pad|><|audio_end|>"

# The language names the model was trained with (ISO code → name).
LANGUAGES = {
    "ar": "Arabic", "yue": "Cantonese", "zh": "Chinese", "cs": "Czech", "da": "Danish",
    "nl": "Dutch", "en": "English", "fil": "Filipino", "fi": "Finnish", "fr": "French",
    "de": "German", "el": "Greek", "hi": "Hindi", "hu": "Hungarian", "id": "Indonesian",
    "it": "Italian", "ja": "Japanese", "ko": "Korean", "mk": "Macedonian", "ms": "Malay",
    "fa": "Persian", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian",
    "es": "Spanish", "sv": "Swedish", "th": "Thai", "tr": "Turkish", "vi": "Vietnamese",
}


class UnknownLanguage(ValueError):
    pass


def language_name(language: str | None) -> str | None:
    """A code ("en") or a name ("english"), any case → the model's name ("English")."""
    if language is None:
        return None
    low = language.strip().lower()
    for code, name in LANGUAGES.items():
        if low in (code, name.lower()):
            return name
    raise UnknownLanguage(f"unknown language {language!r}; Qwen3-ASR knows "
                          f"{', '.join(sorted(LANGUAGES.values()))} (or their ISO codes)")


def prompt_text(num_clips: int = 1, language: str | None = None, context: str | None = None) -> str:
    """The prompt with one unexpanded ``<|audio_pad|>`` per clip."""
    name = language_name(language)
    prefill = f"language {name}{ASR_TEXT}" if name else ""
    return (f"<|im_start|>system\n{context or ''}<|im_end|>\n"
            f"<|im_start|>user\n{AUDIO_BLOCK * num_clips}<|im_end|>\n"
            f"<|im_start|>assistant\n{prefill}")


def expand_audio_pads(ids: list[int], audio_token_id: int, counts: list[int]) -> list[int]:
    """Each ``audio_token_id`` in ``ids`` (one per clip, in order) → ``counts[i]`` copies."""
    at = [i for i, t in enumerate(ids) if t == audio_token_id]
    if len(at) != len(counts):
        raise ValueError(f"the prompt has {len(at)} audio placeholders for {len(counts)} clips")
    out: list[int] = []
    prev = 0
    for i, n in zip(at, counts):
        out += ids[prev:i] + [audio_token_id] * n
        prev = i + 1
    return out + ids[prev:]


@dataclass
class Transcription:
    text: str
    language: str | None  # detected (or the one forced by the prompt); None: none said


def collapse_repeats(text: str, times: int = 20, max_unit: int = 20) -> str:
    """Undo a decoding loop: a character repeated more than ``times`` times in a row, or a
    unit of up to ``max_unit`` characters repeated at least ``times`` times, is kept once.

    The original Qwen3-ASR post-processing (transformers applies it when parsing): units
    are looked for left to right, the shortest first, and the search goes on after each
    collapsed run.
    """
    runs, i = [], 0
    while i < len(text):
        j = i
        while j < len(text) and text[j] == text[i]:
            j += 1
        runs.append(text[i] if j - i > times else text[i:j])
        i = j
    s, out = "".join(runs), []
    while True:
        n, i, found = len(s), 0, False
        if n < 2 * times:
            return "".join(out) + s
        while i <= n - 2 * times and not found:
            for k in range(1, max_unit + 1):
                if i + k * times > n:
                    break
                unit = s[i:i + k]
                if all(s[i + r * k:i + (r + 1) * k] == unit for r in range(1, times)):
                    end = i + times * k
                    while end + k <= n and s[end:end + k] == unit:
                        end += k
                    out.append(unit)
                    s, found = s[end:], True
                    break
            if not found:
                out.append(s[i])
                i += 1
        if not found:
            return "".join(out) + s[i:]


def parse_transcription(text: str, forced_language: str | None = None) -> Transcription:
    """The model's answer → (transcription, language).

    ``language {Name}<asr_text>{text}``: the text after the marker, the language before
    it ("None" for audio without speech). With a forced language the prompt already holds
    the marker, so the whole answer is the transcription. Decoding loops are collapsed
    (``collapse_repeats``), as the original post-processing does.
    """
    forced = language_name(forced_language)
    text = collapse_repeats(text.strip())
    if ASR_TEXT not in text:
        return Transcription(text.strip(), forced)
    head, body = text.split(ASR_TEXT, 1)
    head = head.strip()
    lang = head[len("language "):].strip() if head.lower().startswith("language ") else head
    if lang.lower() == "none" or not lang:
        lang = None
    return Transcription(body.strip(), lang or forced)
