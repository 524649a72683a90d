"""/v1/audio/transcriptions: OpenAI's speech-to-text route, served by Qwen3-ASR models.

The upload is decoded and resampled (server/audio_input.py); audio past 30 s is cut
into pieces at quiet points, each piece one engine request (they batch with each other
and with every other request). The model answers ``language X<asr_text>text``; the
route returns the text (joined over the pieces), the language in verbose_json, and
``usage`` as ``{"type": "duration", "seconds": ...}``. ``stream=true`` sends OpenAI's
``transcript.text.delta`` events, piece after piece, then ``transcript.text.done``.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from sgljax.engine.asr_prompt import ASR_TEXT, expand_audio_pads, parse_transcription
from sgljax.engine.sampling_params import RequestError, SamplingParams, tokens_left
from sgljax.server.audio_input import MAX_AUDIO_BYTES, decode_audio, split_long_audio
from sgljax.server.context import EngineEventStream, ServerContext, collect
from sgljax.server.errors import APIError, bad_request
from sgljax.server.openai_adapters import Prepared, check_model_name
from sgljax.server.responses import sse

router = APIRouter()
FIELDS = {"file", "model", "language", "prompt", "response_format", "temperature", "stream",
          "timestamp_granularities[]"}
FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
RATE = 16000


async def _read_form(request: Request) -> dict:
    if "multipart/form-data" not in request.headers.get("content-type", ""):
        raise bad_request("send the audio as multipart/form-data (a file field)", "file")
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_AUDIO_BYTES + (1 << 20):
        raise APIError(413, f"the upload is larger than {MAX_AUDIO_BYTES >> 20} MiB", "file")
    try:
        form = await request.form(max_files=1, max_fields=len(FIELDS),
                                  max_part_size=MAX_AUDIO_BYTES)
    except Exception as e:  # noqa: BLE001 - starlette's multipart errors vary by version
        raise bad_request(f"cannot read the form: {e}", "file") from None
    unknown = sorted(set(form) - FIELDS)
    if unknown:
        raise bad_request(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    return form


def _options(form) -> dict:
    fmt = form.get("response_format") or "json"
    if fmt not in FORMATS:
        raise bad_request(f"response_format must be one of {', '.join(FORMATS)}",
                          "response_format")
    try:
        temperature = float(form.get("temperature") or 0.0)
    except ValueError:
        raise bad_request("temperature must be a number", "temperature") from None
    if not 0 <= temperature <= 2:
        raise bad_request("temperature must be in [0, 2]", "temperature")
    stream = str(form.get("stream") or "false").lower()
    if stream not in ("true", "false"):
        raise bad_request("stream must be true or false", "stream")
    if stream == "true" and fmt not in ("json", "text"):
        raise bad_request("stream needs response_format json or text", "stream")
    for g in form.getlist("timestamp_granularities[]"):
        if g != "segment":
            raise bad_request("only segment timestamps are available (verbose_json)",
                              "timestamp_granularities[]")
    return {"format": fmt, "temperature": temperature, "stream": stream == "true",
            "language": form.get("language") or None, "prompt": form.get("prompt") or None}


def _prepare(ctx: ServerContext, data: bytes, opts: dict) -> tuple[Prepared, list]:
    samples = decode_audio(data, "file")
    pieces = split_long_audio(samples, RATE)
    try:
        ids = ctx.transcription_prompt(1, opts["language"], opts["prompt"])
        clips = ctx.limits.prepare_audio([samples[a:b] for a, b in pieces])
        prompts, params = [], []
        for clip in clips:
            expanded = expand_audio_pads(ids, ctx.limits.audio_token_id,
                                         [clip.features.num_tokens])
            left = tokens_left(expanded, ctx.limits.request)
            params.append(SamplingParams(max_tokens=left, temperature=opts["temperature"])
                          .validate(ctx.limits.request, expanded))
            prompts.append(expanded)
    except RequestError as e:
        raise bad_request(str(e), {"prompt": "file", "max_tokens": "file"}.get(
            e.param, e.param), e.code) from None
    return Prepared(prompts, params, 1, audio=[[c] for c in clips]), pieces


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request):
    arrival = time.monotonic()
    ctx: ServerContext = request.app.state.ctx
    if ctx.transcription_prompt is None:
        raise APIError(404, f"the model {ctx.model_name!r} does not transcribe audio (serve a "
                            "Qwen3-ASR checkpoint)", "model", "model_not_found")
    form = await _read_form(request)
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise bad_request("a file field with the audio is required", "file")
    check_model_name(form.get("model") or None, ctx.served_names)
    opts = _options(form)
    data = await upload.read()
    prep, pieces = await run_in_threadpool(_prepare, ctx, data, opts)
    rid, handle, states = ctx.submit("trsc", None, prep, arrival)
    duration = pieces[-1][1] / RATE
    usage = {"type": "duration", "seconds": round(duration, 3)}
    if opts["stream"]:
        return EngineEventStream(_events(handle, states, opts, usage), handle)
    if not await collect(request, handle, states):
        return Response(status_code=499)
    answers = [parse_transcription(st.text, opts["language"]) for st in states.values()]
    text = " ".join(a.text for a in answers if a.text)
    language = next((a.language for a in answers if a.language), None)
    fmt = opts["format"]
    if fmt == "text":
        return PlainTextResponse(text)
    segments = [{"id": i, "seek": 0, "start": round(a / RATE, 3), "end": round(b / RATE, 3),
                 "text": ans.text, "tokens": st.token_ids, "temperature": opts["temperature"]}
                for i, ((a, b), ans, st) in enumerate(zip(pieces, answers, states.values()))]
    if fmt in ("srt", "vtt"):
        return PlainTextResponse(_subtitles(segments, fmt))
    if fmt == "verbose_json":
        return JSONResponse({"task": "transcribe", "language": (language or "").lower(),
                             "duration": round(duration, 3), "text": text,
                             "segments": segments, "usage": usage})
    return JSONResponse({"text": text, "usage": usage})


class _AnswerText:
    """The transcription part of one piece's streamed answer: what follows <asr_text>
    (the whole answer when the prompt forced the language and holds the marker)."""

    def __init__(self, forced: bool):
        self.started, self._pending = forced, ""

    def feed(self, text: str) -> str:
        if self.started:
            return text
        self._pending += text
        at = self._pending.find(ASR_TEXT)
        if at < 0:
            return ""  # the language part, or (if the marker never comes) the whole answer
        self.started = True
        out, self._pending = self._pending[at + len(ASR_TEXT):].lstrip(), ""
        return out

    def finish(self) -> str:
        """An answer without the marker is all transcription (as parse_transcription
        reads it)."""
        out, self._pending = ("" if self.started else self._pending.strip()), ""
        return out


async def _events(handle, states, opts, usage):
    """Deltas of piece 0 as they come, later pieces' held until the ones before end."""
    order = list(states)
    readers = {r: _AnswerText(opts["language"] is not None) for r in order}
    held = {r: [] for r in order}
    finished, current, text = set(), 0, []
    raw = {r: [] for r in order}
    try:
        while not handle.done:
            for d in await handle.next_batch():
                if d.error:
                    yield sse({"type": "error", "error": {"message": d.error}})
                    return
                raw[d.rid].append(d.text)
                piece = readers[d.rid].feed(d.text)
                if d.finished:
                    piece += readers[d.rid].finish()
                    finished.add(d.rid)
                if piece:
                    held[d.rid].append(piece)
            while current < len(order):
                rid = order[current]
                for piece in held[rid]:
                    if not text and current == 0:
                        piece = piece.lstrip()
                    text.append(piece)
                    yield sse({"type": "transcript.text.delta", "delta": piece})
                held[rid] = []
                if rid not in finished:
                    break
                current += 1
                if current < len(order) and text:
                    text.append(" ")
                    yield sse({"type": "transcript.text.delta", "delta": " "})
        # The final text is post-processed as whole answers are (decoding loops collapsed),
        # so it may be shorter than the deltas sent as they came.
        answers = [parse_transcription("".join(raw[r]), opts["language"]).text for r in order]
        yield sse({"type": "transcript.text.done", "usage": usage,
                   "text": " ".join(a for a in answers if a)})
    finally:
        handle.abort()


def _clock(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _subtitles(segments: list[dict], fmt: str) -> str:
    sep = "," if fmt == "srt" else "."
    cues = []
    for seg in segments:
        times = f"{_clock(seg['start'], sep)} --> {_clock(seg['end'], sep)}"
        cues.append((f"{seg['id'] + 1}\n" if fmt == "srt" else "") + f"{times}\n{seg['text']}\n")
    return ("WEBVTT\n\n" if fmt == "vtt" else "") + "\n".join(cues)
