"""OpenAI / SGLang request bodies → prompt token ids and engine SamplingParams.

These functions run in a worker thread (tokenizing and chat templating can
take milliseconds), never in the engine thread. Everything a client can get
wrong is turned into a 400 here, before the engine sees the request.
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError

from sgljax.engine.sampling import SamplingParams, SamplingParamsError
from sgljax.engine.server.errors import APIError, bad_request
from sgljax.engine.server.protocol import (
    ChatCompletionRequest, CompletionRequest, GenerateRequest, SamplingFields)
from sgljax.engine.tokenizer import Tokenizer

SEED_STRIDE = 0x9E3779B9  # n>1: choice j samples with seed + j * stride (choice 0 uses the seed)
_RESERVED_TEMPLATE_KWARGS = {"tokenize", "conversation", "messages", "return_dict", "tools"}


@dataclass(frozen=True)
class Limits:
    context_length: int
    vocab_size: int


@dataclass
class Prepared:
    """A request ready for the engine: prompts, and n SamplingParams per prompt."""

    prompts: list[list[int]]
    params: list[SamplingParams]  # index p * n + j: prompt p, choice j
    n: int
    prompt_texts: list[str] | None = None  # for completions' echo


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


def _logit_bias(bias: dict[str, float] | None, vocab: int) -> dict[int, float]:
    out = {}
    for key, value in (bias or {}).items():
        try:
            tok = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids; got {key!r}",
                              "logit_bias") from None
        if not 0 <= tok < vocab:
            raise bad_request(f"logit_bias token id {tok} is outside the vocabulary "
                              f"(0..{vocab - 1})", "logit_bias")
        if not -100 <= value <= 100:
            raise bad_request(f"logit_bias value {value} for token {tok} is outside "
                              "[-100, 100]", "logit_bias")
        out[tok] = float(value)
    return out


def _check_ids(ids: list[int], vocab: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param)


def resolve_max_tokens(requested: int | None, prompt_len: int, limits: Limits,
                       param: str = "max_tokens") -> int:
    ctx = limits.context_length
    if prompt_len == 0:
        raise bad_request("the prompt is empty", "prompt")
    if prompt_len >= ctx:
        raise bad_request(f"This model's maximum context length is {ctx} tokens; the prompt "
                          f"has {prompt_len} tokens", param, "context_length_exceeded")
    if requested is None:
        return ctx - prompt_len
    if requested < 1:
        raise bad_request(f"{param} must be at least 1; got {requested}", param)
    if prompt_len + requested > ctx:
        raise bad_request(f"This model's maximum context length is {ctx} tokens; you asked "
                          f"for {prompt_len + requested} ({prompt_len} in the prompt, "
                          f"{requested} to generate)", param, "context_length_exceeded")
    return requested


def _params(req: SamplingFields, max_tokens: int, limits: Limits, logprobs: bool,
            top_logprobs: int, seed: int | None) -> SamplingParams:
    stop_ids = list(req.stop_token_ids or [])
    _check_ids(stop_ids, limits.vocab_size, "stop_token_ids")
    if req.min_tokens and req.min_tokens > max_tokens:
        raise bad_request(f"min_tokens ({req.min_tokens}) is larger than max_tokens "
                          f"({max_tokens})", "min_tokens")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0, min_p=req.min_p or 0.0, seed=seed,
        stop=_stop_list(req.stop), stop_token_ids=stop_ids, ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens or 0, presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        logit_bias=_logit_bias(req.logit_bias, limits.vocab_size), logprobs=logprobs,
        top_logprobs=top_logprobs, skip_special_tokens=req.skip_special_tokens)
    try:
        return params.validate(limits.vocab_size)
    except SamplingParamsError as e:
        raise bad_request(str(e)) from None


def _fan_out(req: SamplingFields, prompts: list[list[int]], requested_max: int | None,
             limits: Limits, logprobs: bool, top_logprobs: int, max_param: str) -> list:
    params = []
    for ids in prompts:
        max_tokens = resolve_max_tokens(requested_max, len(ids), limits, max_param)
        for j in range(req.n):
            params.append(_params(req, max_tokens, limits, logprobs, top_logprobs,
                                  choice_seed(req.seed, j)))
    return params


# -- chat ---------------------------------------------------------------------------
def chat_messages(req: ChatCompletionRequest) -> list[dict]:
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request("only text content parts ({\"type\": \"text\", \"text\": "
                                      "...}) are supported", f"messages[{i}].content[{j}]")
                texts.append(part["text"])
            content = "\n".join(texts)
        if content is None:
            if m.role != "assistant":
                raise bad_request("content is required", f"messages[{i}].content")
            content = ""
        msg = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        if m.reasoning_content is not None:
            msg["reasoning_content"] = m.reasoning_content
        out.append(msg)
    return out


def chat_prompt_ids(tok: Tokenizer, req: ChatCompletionRequest) -> list[int]:
    kwargs = dict(req.chat_template_kwargs or {})
    reserved = _RESERVED_TEMPLATE_KWARGS & set(kwargs)
    if reserved:
        raise bad_request(f"chat_template_kwargs may not set {sorted(reserved)[0]}",
                          "chat_template_kwargs")
    kwargs.setdefault("add_generation_prompt", True)
    try:
        text = tok.hf.apply_chat_template(chat_messages(req), tokenize=False, **kwargs)
    except TemplateError as e:
        raise bad_request(f"the chat template rejected the messages: {e}", "messages") from None
    except ValueError as e:  # e.g. the tokenizer has no chat template
        raise bad_request(f"cannot apply the chat template: {e}", "messages") from None
    # The template wrote the special tokens (BOS, role markers) as text already.
    return tok.encode(text, add_special_tokens=False)


def prepare_chat(tok: Tokenizer, req: ChatCompletionRequest, limits: Limits) -> Prepared:
    reject_unsupported(req)
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    if req.max_completion_tokens is not None:
        requested, param = req.max_completion_tokens, "max_completion_tokens"
    else:
        requested, param = req.max_tokens, "max_tokens"
    if requested is not None and requested < 1:
        raise bad_request(f"{param} must be at least 1; got {requested}", param)
    ids = chat_prompt_ids(tok, req)
    params = _fan_out(req, [ids], requested, limits, req.logprobs, req.top_logprobs or 0, param)
    return Prepared([ids], params, req.n)


# -- completions --------------------------------------------------------------------
def completion_prompts(tok: Tokenizer, prompt, vocab: int) -> tuple[list[list[int]], list[str]]:
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
        else:
            _check_ids(p, vocab, f"prompt[{i}]" if len(prompt) > 1 else "prompt")
            ids_list.append(list(p))
            texts.append(tok.decode(p, skip_special_tokens=False))
    return ids_list, texts


def prepare_completion(tok: Tokenizer, req: CompletionRequest, limits: Limits) -> Prepared:
    reject_unsupported(req)
    if req.max_tokens is not None and req.max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1; got {req.max_tokens}", "max_tokens")
    prompts, texts = completion_prompts(tok, req.prompt, limits.vocab_size)
    want_lp = req.logprobs is not None
    params = _fan_out(req, prompts, req.max_tokens, limits, want_lp, req.logprobs or 0,
                      "max_tokens")
    return Prepared(prompts, params, req.n, texts)


# -- native /generate ---------------------------------------------------------------
def prepare_generate(tok: Tokenizer, req: GenerateRequest, limits: Limits) -> Prepared:
    if (req.text is None) == (req.input_ids is None):
        raise bad_request("give exactly one of text and input_ids", "text")
    sp = req.sampling_params
    prompts, _ = completion_prompts(tok, req.text if req.text is not None else req.input_ids,
                                    limits.vocab_size)
    if sp.max_new_tokens < 1:
        raise bad_request("max_new_tokens must be at least 1", "sampling_params.max_new_tokens")
    # Already validated as NativeSamplingParams (whose ranges differ slightly): no re-check.
    fields = SamplingFields.model_construct(
        temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, min_p=sp.min_p,
        stop=sp.stop, stop_token_ids=sp.stop_token_ids, ignore_eos=sp.ignore_eos,
        min_tokens=sp.min_new_tokens, presence_penalty=sp.presence_penalty,
        frequency_penalty=sp.frequency_penalty, repetition_penalty=sp.repetition_penalty,
        skip_special_tokens=sp.skip_special_tokens, logit_bias=sp.logit_bias, n=sp.n,
        seed=sp.sampling_seed)
    params = _fan_out(fields, prompts, sp.max_new_tokens, limits, req.return_logprob,
                      req.top_logprobs_num, "sampling_params.max_new_tokens")
    return Prepared(prompts, params, sp.n)


def check_model_name(requested: str | None, served: set[str]) -> None:
    if requested is not None and requested not in served:
        raise APIError(404, f"The model '{requested}' does not exist; this server serves "
                            f"{sorted(served)[0]!r}", "model", "model_not_found")
