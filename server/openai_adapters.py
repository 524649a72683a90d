"""OpenAI / SGLang request bodies → prompt token ids and engine SamplingParams.

These functions run in a worker thread (tokenizing and chat templating can
take milliseconds), never in the engine thread. They parse and fill in
defaults; the limits are checked by ``SamplingParams.validate`` (the same check
``Engine.add_request`` makes), whose errors become 400s naming the field as
this route spells it, before the engine sees the request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sgljax.engine.asr_prompt import AUDIO_BLOCK, expand_audio_pads
from sgljax.engine.constraint import Constraint
from sgljax.engine.grammar import GrammarCompiler
from sgljax.engine.sampling_params import (RequestError, RequestLimits, SamplingParams,
                                           tokens_left)
from sgljax.server.audio_input import MAX_AUDIOS_PER_REQUEST, audio_part, is_audio_part
from sgljax.server.errors import APIError, bad_request
from sgljax.server.protocol import (
    ChatCompletionRequest, CompletionRequest, GenerateRequest, SamplingFields)
from sgljax.server.structured import from_native, from_response_format
from sgljax.server.tool_calls import plan_tools, tool_call_message
from sgljax.engine.tokenizer import ChatTemplateError, Tokenizer

SEED_STRIDE = 0x9E3779B9  # n>1: choice j samples with seed + j * stride (choice 0 uses the seed)
_RESERVED_TEMPLATE_KWARGS = {"tokenize", "conversation", "messages", "return_dict", "tools"}


@dataclass(frozen=True)
class Limits:
    """What requests are checked against and filled in with (from ``Engine.describe``)."""

    request: RequestLimits
    # The model's sampling defaults (engine/generation_defaults.py) for fields a request
    # leaves out: temperature, top_p, top_k, min_p, repetition_penalty.
    sampling_defaults: dict
    grammars: GrammarCompiler | None = None  # checks constraints compile (the engine's)
    # Speech models (Qwen3-ASR): chat messages may carry audio, checked and featurized by
    # Engine.prepare_audio (in the worker thread). None: text only.
    prepare_audio: Callable[[list], list] | None = None
    audio_token_id: int | None = None


@dataclass
class Prepared:
    """A request ready for the engine: prompts, and n SamplingParams per prompt."""

    prompts: list[list[int]]
    params: list[SamplingParams]  # index p * n + j: prompt p, choice j
    n: int
    prompt_texts: list[str] | None = None  # for completions' echo
    thinking_opened: bool = False  # the chat prompt ends inside a <think> block
    tool_format: str | None = None  # chat: read tool calls of this format into tool_calls
    audio: list = field(default_factory=list)  # per prompt: its clips (16 kHz), or None


def choice_seed(seed: int | None, j: int) -> int | None:
    if seed is None:
        return None
    return (seed + j * SEED_STRIDE) & 0xFFFFFFFF


def reject_unsupported(req: SamplingFields) -> None:
    problems = req.unsupported()
    if problems:
        param, why = problems[0]
        raise bad_request(why, param, "unsupported_parameter")


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [s for s in ([stop] if isinstance(stop, str) else stop) if s]


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out = {}
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = float(value)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids; got {key!r}",
                              "logit_bias") from None
    return out


def _params(req: SamplingFields, ids: list[int], max_tokens: int | None, limits: Limits,
            logprobs: bool, top_logprobs: int, seed: int | None,
            spelling: dict[str, str], constraint: Constraint | None) -> SamplingParams:
    """SamplingParams for one choice of one prompt, validated; fields the request left out
    take the model's defaults. ``spelling``: this route's names for SamplingParams'."""
    defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                "repetition_penalty": 1.0, **limits.sampling_defaults}

    def pick(name: str):
        value = getattr(req, name)
        return defaults[name] if value is None else value

    try:
        if max_tokens is None:  # as many as the context leaves
            max_tokens = tokens_left(ids, limits.request)
        params = SamplingParams(
            max_tokens=max_tokens, temperature=pick("temperature"), top_p=pick("top_p"),
            top_k=pick("top_k"), min_p=pick("min_p"), seed=seed,
            stop=_stop_list(req.stop), stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos, min_tokens=req.min_tokens or 0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=pick("repetition_penalty"),
            logit_bias=_logit_bias(req.logit_bias), logprobs=logprobs,
            top_logprobs=top_logprobs, skip_special_tokens=req.skip_special_tokens,
            constraint=constraint)
        if constraint is not None:
            limits.grammars.check(constraint)
        return params.validate(limits.request, ids)
    except RequestError as e:
        raise bad_request(str(e), spelling.get(e.param, e.param), e.code) from None


def _fan_out(req: SamplingFields, prompts: list[list[int]], max_tokens: int | None,
             limits: Limits, logprobs: bool, top_logprobs: int,
             spelling: dict[str, str], constraint: Constraint | None) -> list[SamplingParams]:
    params = []
    for i, ids in enumerate(prompts):
        names = {"prompt": f"prompt[{i}]" if len(prompts) > 1 else "prompt", **spelling}
        for j in range(req.n):
            params.append(_params(req, ids, max_tokens, limits, logprobs, top_logprobs,
                                  choice_seed(req.seed, j), names, constraint))
    return params


# -- chat ---------------------------------------------------------------------------
def chat_messages(req: ChatCompletionRequest, clips: list | None = None) -> list[dict]:
    """The messages as chat templates take them. Audio parts (when ``clips`` is a list)
    become the model's audio placeholder in the text, their samples appended to ``clips``."""
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                if clips is not None and is_audio_part(part) and m.role == "user":
                    if len(clips) == MAX_AUDIOS_PER_REQUEST:
                        raise bad_request(f"at most {MAX_AUDIOS_PER_REQUEST} audios per "
                                          "request", where)
                    clips.append(audio_part(part, where))
                    texts.append(AUDIO_BLOCK)
                    continue
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kinds = "text and (user) audio" if clips is not None else "text"
                    raise bad_request(f"only {kinds} content parts are supported", where)
                texts.append(part["text"])
            content = "".join(texts) if clips else "\n".join(texts)
        if content is None:
            if m.role != "assistant":
                raise bad_request("content is required", f"messages[{i}].content")
            content = ""
        msg = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        if m.reasoning_content is not None:
            msg["reasoning_content"] = m.reasoning_content
        if m.tool_calls:
            if m.role != "assistant":
                raise bad_request("only assistant messages carry tool_calls",
                                  f"messages[{i}].tool_calls")
            msg["tool_calls"] = tool_call_message(m.tool_calls, f"messages[{i}]")
        if m.role == "tool":
            if not m.tool_call_id:
                raise bad_request("a tool message needs the tool_call_id it answers",
                                  f"messages[{i}].tool_call_id")
            msg["tool_call_id"] = m.tool_call_id
        elif m.tool_call_id is not None:
            raise bad_request("only tool messages carry tool_call_id",
                              f"messages[{i}].tool_call_id")
        out.append(msg)
    return out


def chat_prompt_ids(tok: Tokenizer, req: ChatCompletionRequest,
                    tools: list[dict] | None = None, clips: list | None = None) -> list[int]:
    kwargs = dict(req.chat_template_kwargs or {})
    reserved = _RESERVED_TEMPLATE_KWARGS & set(kwargs)
    if reserved:
        raise bad_request(f"chat_template_kwargs may not set {sorted(reserved)[0]}",
                          "chat_template_kwargs")
    if tools is not None:
        kwargs["tools"] = tools
    messages = chat_messages(req, clips)
    if clips and messages[0]["role"] != "system":  # speech models' prompts always have one
        messages.insert(0, {"role": "system", "content": ""})
    try:
        return tok.apply_chat_template(messages, **kwargs)
    except ChatTemplateError as e:
        raise bad_request(str(e), "messages") from None


def prepare_chat(tok: Tokenizer, req: ChatCompletionRequest, limits: Limits,
                 tool_call_parser: str | None = None) -> Prepared:
    reject_unsupported(req)
    tools = plan_tools(tok, req, tool_call_parser)
    constraint = from_response_format(req.response_format, req.regex, req.ebnf)
    if tools.constraint is not None:
        if constraint is not None:
            raise bad_request("tool_choice required (or a named function) cannot be combined "
                              "with response_format, regex or ebnf", "tool_choice")
        constraint = tools.constraint
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    if req.max_completion_tokens is not None:
        requested, param = req.max_completion_tokens, "max_completion_tokens"
    else:
        requested, param = req.max_tokens, "max_tokens"
    clips = [] if limits.prepare_audio is not None else None
    ids = chat_prompt_ids(tok, req, tools.template_tools, clips)
    if clips:  # the placeholders as many as the encoder will give: limits see the real length
        try:
            clips = limits.prepare_audio(clips)
            ids = expand_audio_pads(ids, limits.audio_token_id,
                                    [c.features.num_tokens for c in clips])
        except ValueError as e:  # RequestError from the clips, or a placeholder miscount
            raise bad_request(str(e), "messages") from None
    params = _fan_out(req, [ids], requested, limits, req.logprobs, req.top_logprobs or 0,
                      {"max_tokens": param, "prompt": "messages"}, constraint)
    # Templates of thinking models may end the generation prompt with "<think>\n": the
    # answer then starts inside the block.
    opened = tok.decode(ids[-3:], skip_special_tokens=False).rstrip().endswith("<think>")
    return Prepared([ids], params, req.n, thinking_opened=opened,
                    tool_format=tools.format, audio=[clips or None])


# -- completions --------------------------------------------------------------------
def completion_prompts(tok: Tokenizer, prompt) -> tuple[list[list[int]], list[str]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    ids_list, texts = [], []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            ids_list.append(tok.encode(p))
            texts.append(p)
        else:  # token ids: SamplingParams.validate checks they are in the vocabulary
            ids_list.append(list(p))
            texts.append(tok.decode([t for t in p if 0 <= t < tok.vocab_size],
                                    skip_special_tokens=False))
    return ids_list, texts


def prepare_completion(tok: Tokenizer, req: CompletionRequest, limits: Limits) -> Prepared:
    reject_unsupported(req)
    prompts, texts = completion_prompts(tok, req.prompt)
    want_lp = req.logprobs is not None
    constraint = from_response_format(req.response_format, req.regex, req.ebnf)
    params = _fan_out(req, prompts, req.max_tokens, limits, want_lp, req.logprobs or 0, {},
                      constraint)
    return Prepared(prompts, params, req.n, texts)


# -- native /generate ---------------------------------------------------------------
def prepare_generate(tok: Tokenizer, req: GenerateRequest, limits: Limits) -> Prepared:
    if (req.text is None) == (req.input_ids is None):
        raise bad_request("give exactly one of text and input_ids", "text")
    sp = req.sampling_params
    prompts, _ = completion_prompts(tok, req.text if req.text is not None else req.input_ids)
    # Already validated as NativeSamplingParams (whose ranges differ slightly): no re-check.
    # Fields the client left out take the model's defaults, as in the OpenAI routes.
    given = sp.model_fields_set

    def chosen(name: str):
        return getattr(sp, name) if name in given else None

    fields = SamplingFields.model_construct(
        temperature=chosen("temperature"), top_p=chosen("top_p"), top_k=chosen("top_k"),
        min_p=chosen("min_p"),
        stop=sp.stop, stop_token_ids=sp.stop_token_ids, ignore_eos=sp.ignore_eos,
        min_tokens=sp.min_new_tokens, presence_penalty=sp.presence_penalty,
        frequency_penalty=sp.frequency_penalty, repetition_penalty=chosen("repetition_penalty"),
        skip_special_tokens=sp.skip_special_tokens, logit_bias=sp.logit_bias, n=sp.n,
        seed=sp.sampling_seed)
    spelling = {name: f"sampling_params.{name}" for name in SamplingParams.__dataclass_fields__}
    spelling.update(max_tokens="sampling_params.max_new_tokens",
                    min_tokens="sampling_params.min_new_tokens", prompt="text")
    params = _fan_out(fields, prompts, sp.max_new_tokens, limits, req.return_logprob,
                      req.top_logprobs_num, spelling,
                      from_native(sp.json_schema, sp.regex, sp.ebnf))
    return Prepared(prompts, params, sp.n)


def check_model_name(requested: str | None, served: set[str]) -> None:
    if requested is not None and requested not in served:
        raise APIError(404, f"The model '{requested}' does not exist; this server serves "
                            f"{sorted(served)[0]!r}", "model", "model_not_found")
