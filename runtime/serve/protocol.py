"""OpenAI's completions API: request validation and response shapes (plain dicts; json does the rest).

Every bad value is an `ApiError` naming the field, the value and what is accepted, answered as OpenAI's error
body `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..speculative import DEFAULT_LOOKUP_TOKENS, MAX_SPECULATIVE_TOKENS, PROMPT_LOOKUP

MAX_N = 16  # choices per prompt
MAX_STOPS = 16
MAX_LOGPROBS = 5  # as OpenAI's completions endpoint
DEFAULT_MAX_TOKENS = 16  # as OpenAI's completions endpoint
SEED_LIMIT = 2 ** 63
SPECULATIVE = (PROMPT_LOOKUP,)  # a request's speculative methods (a draft model would be the server's: none yet)


class ApiError(Exception):
    """An error answered with OpenAI's error body.

    Args:
        status: the HTTP status.
        message: one line naming the bad value and what is accepted.
        type: OpenAI's error type ("invalid_request_error", "authentication_error", ...).
        param: the request field at fault, or None.
        code: a short machine-readable code, or None.
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None,
                 headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class CompletionRequest:
    """A validated /v1/completions request (prompts still as given: text or token ids)."""

    prompts: list  # of str or of list[int]
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float | None = None  # None: the artifact's generation default (as runtime.generate)
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    echo: bool = False
    stop: list = field(default_factory=list)
    seed: int | None = None
    speculative_tokens: int = 0  # "speculative": "prompt_lookup" -> K (num_speculative_tokens, default 10)


def _get(body: dict, name: str, check, accepted: str, default):
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise _bad(name, f"{name} must be {accepted}, got {_short(value)}")
    return value


def parse_completion(body, model_name: str) -> CompletionRequest:
    """Validate a decoded JSON body of POST /v1/completions.

    Args:
        body: the decoded JSON value.
        model_name: the served model's name.
    Returns:
        A CompletionRequest (prompt lengths are checked later, once tokenized).
    Raises:
        ApiError: 400 naming the bad field, 404 for an unknown model.
    """
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("model", f"model must be a string naming the served model ({model_name!r}), got {_short(model)}")
    if model != model_name:
        raise ApiError(404, f"model {_short(model)} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    req = CompletionRequest(prompts=_prompts(body.get("prompt")))
    req.max_tokens = _get(body, "max_tokens", lambda v: _is_int(v) and v >= 1, "an integer >= 1",
                          DEFAULT_MAX_TOKENS)
    req.temperature = _get(body, "temperature", lambda v: _is_number(v) and v >= 0, "a number >= 0", None)
    req.top_p = _get(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]", None)
    req.top_k = _get(body, "top_k", lambda v: _is_int(v) and v >= -1, "an integer >= 0 (0 or -1: off)", None)
    req.top_k = None if req.top_k is None else max(req.top_k, 0)
    req.repetition_penalty = _get(body, "repetition_penalty", lambda v: _is_number(v) and v > 0, "a number > 0",
                                  None)
    req.min_tokens = _get(body, "min_tokens", lambda v: _is_int(v) and v >= 0, "an integer >= 0", 0)
    if req.min_tokens > req.max_tokens:
        raise _bad("min_tokens", f"min_tokens ({req.min_tokens}) must be <= max_tokens ({req.max_tokens})")
    req.n = _get(body, "n", lambda v: _is_int(v) and 1 <= v <= MAX_N, f"an integer in [1, {MAX_N}]", 1)
    req.stream = _get(body, "stream", lambda v: isinstance(v, bool), "true or false", False)
    options = _get(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    if options and not req.stream:
        raise _bad("stream_options", "stream_options is only allowed with stream: true")
    req.include_usage = _get(options, "include_usage", lambda v: isinstance(v, bool), "true or false", False)
    req.logprobs = _get(body, "logprobs", lambda v: _is_int(v) and 0 <= v <= MAX_LOGPROBS,
                        f"an integer in [0, {MAX_LOGPROBS}]", None)
    req.echo = _get(body, "echo", lambda v: isinstance(v, bool), "true or false", False)
    if req.echo and req.logprobs is not None:
        raise _bad("echo", "echo with logprobs is not supported (the prompt's own logprobs are not computed); "
                           "drop one of them")
    req.stop = _stops(body.get("stop"))
    req.seed = _get(body, "seed", lambda v: _is_int(v) and 0 <= v < SEED_LIMIT, "an integer in [0, 2**63)", None)
    req.speculative_tokens = _speculative(body)
    _unsupported(body, req.n)
    return req


def _prompts(prompt) -> list:
    """A str, a list of str, a list of token ids, or a list of lists of token ids -> list of prompts."""
    accepted = "a string, a list of strings, a list of token ids, or a list of lists of token ids"
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(_is_int(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    if prompt is None:
        raise _bad("prompt", f"prompt is required: {accepted}")
    if isinstance(prompt, list) and not prompt:
        raise _bad("prompt", "prompt is empty")
    raise _bad("prompt", f"prompt must be {accepted}, got {_short(prompt)}")


def _speculative(body: dict) -> int:
    """The extension `speculative` ("prompt_lookup") with `num_speculative_tokens` -> K, or 0 when off."""
    method = _get(body, "speculative", lambda v: v in SPECULATIVE,
                  " or ".join(repr(m) for m in SPECULATIVE) + " (or null: off)", None)
    k = _get(body, "num_speculative_tokens", lambda v: _is_int(v) and 1 <= v <= MAX_SPECULATIVE_TOKENS,
             f"an integer in [1, {MAX_SPECULATIVE_TOKENS}]", None)
    if method is None:
        if k is not None:
            raise _bad("num_speculative_tokens", "num_speculative_tokens needs speculative: 'prompt_lookup'")
        return 0
    return DEFAULT_LOOKUP_TOKENS if k is None else k


def _stops(stop) -> list:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop", f"stop must be a non-empty string or a list of at most {MAX_STOPS} non-empty strings, "
                           f"got {_short(stop)}")
    return list(stops)


def _unsupported(body: dict, n: int) -> None:
    """Fields of OpenAI's API this server does not implement are refused unless they ask for the default."""
    for name, default in (("presence_penalty", 0), ("frequency_penalty", 0)):
        if body.get(name) not in (None, default, 0.0):
            raise _bad(name, f"{name} is not supported (only 0); use repetition_penalty")
    if body.get("logit_bias") not in (None, {}):
        raise _bad("logit_bias", "logit_bias is not supported")
    if body.get("suffix") not in (None, ""):
        raise _bad("suffix", "suffix is not supported (base models have no insertion mode)")
    if body.get("best_of") not in (None, 1, n):
        raise _bad("best_of", f"best_of is not supported (only equal to n, {n})")


# -- responses ---------------------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_object(request_id: str, created: int, model: str, choices: list, usage_: dict | None) -> dict:
    """A `text_completion` object: a whole response, or one streamed chunk."""
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage_}


def choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def logprobs_object(tokens: list, token_text) -> dict:
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset.

    Args:
        tokens: scheduler `Token`s (id, logprob, top, offset).
        token_text: id -> the token's text (see `TokenText`).
    """
    return {"tokens": [token_text(t.id) for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{token_text(i): lp for i, lp in t.top} for t in tokens],
            "text_offset": [t.offset for t in tokens]}


def _byte_decoder() -> dict:
    """GPT-2 byte-level BPE's printable character -> byte table (the format's published mapping)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenText:
    """A token id's text as OpenAI shows it: the decoded string, or `bytes:\\xNN...` for part of a character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.bytes_of = tokenizer, _byte_decoder()
        self.cache: dict = {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            piece = self.tokenizer.id_to_token(token_id) or ""
            if all(c in self.bytes_of for c in piece):
                raw = bytes(self.bytes_of[c] for c in piece)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            else:  # a special or added token: its own spelling
                text = piece
            self.cache[token_id] = text
        return self.cache[token_id]
