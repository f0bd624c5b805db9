"""The ASGI app: OpenAI's /v1/completions (and /v1/models) over the scheduler, plus /health and /metrics.

```
 POST /v1/completions ─▶ auth ─▶ body (size limit) ─▶ validate ─▶ Sequences ─▶ Scheduler.submit (429 when full)
                                     ◀── JSON or SSE chunks ◀── asyncio.Queue ◀── Update (scheduler thread)
```

`/v1/chat/completions` answers 404 pointing to /v1/completions: GPT-2 and GPT-J are base models with no chat
template, and a made-up one would silently change what the model is asked.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import GenerationError
from ..sampling import SamplingParams
from ..scheduler import NotAccepting, Overloaded, Scheduler, Sequence
from . import heads_app
from .metrics import Metrics
from .protocol import (ApiError, TokenText, choice, completion_object, error_body, logprobs_object,
                       parse_completion, usage)

log = logging.getLogger("gptexport.serve")
FAULT_ENV = "GPTEXPORT_SERVE_FAULT"  # tests: a prompt containing this text fails at its second token
DELAY_ENV = "GPTEXPORT_SERVE_STEP_DELAY"  # tests: seconds slept per decode step
ERROR_STATUS = {"server_error": 500, "timeout": 504, "shutdown": 503}
ERROR_TYPE = {"server_error": "server_error", "timeout": "timeout_error", "shutdown": "server_unavailable"}
_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


@dataclass
class ServeConfig:
    """The server's settings (see `gptrun serve --help`)."""

    artifact: str
    model_name: str
    max_batch: int = 8
    max_queue: int = 64
    context: int | None = None  # positions per slot (None: the model's)
    provider: str = "cpu"
    threads: int | None = None
    api_key: str | None = None
    request_timeout: float = 600.0
    drain_timeout: float = 30.0
    cors_origins: list = field(default_factory=list)
    max_body_bytes: int = 1 << 20
    manifest_sha256: str | None = None  # refuse any other manifest.json (a deployment's replicas pin one)
    verify: str = "auto"  # checksum policy at load (runtime.manifest); Ray replicas use "full"
    spin_threads: bool = False  # onnxruntime's idle threads spin between runs (off: they leave the cores to HTTP)


class Service:
    """The model, its scheduler and the server's state: "loading", "ready", "draining" or "failed"."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.state, self.error = "loading", None
        self.model = self.scheduler = self.cache = None
        self.context = self.slots = 0
        self.kv_note = ""
        self.token_text = None  # id -> text for logprobs, once the tokenizer is loaded
        self.head = None  # an artifact of another task (serve/heads_app.py): no scheduler, no slots
        self.metrics = Metrics(self)
        self.created = int(time.time())

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth if self.scheduler else 0

    @property
    def running(self) -> int:
        return self.scheduler.running if self.scheduler else 0

    def load(self) -> None:
        """Load the artifact, allocate the slots and start the scheduler (run in a thread; sets `state`)."""
        from ..slots import make_slots
        from .loader import load_for_serving

        if heads_app.head_task(self.config.artifact) is not None:
            return heads_app.load(self)
        try:
            self.model, self.kv_note = load_for_serving(self.config.artifact, self.config.provider,
                                                        self.config.threads, self.config.manifest_sha256,
                                                        self.config.verify, self.config.spin_threads)
            self.token_text = TokenText(self.model.tokenizer)
            positions = self.model.max_positions
            self.context = min(self.config.context or positions, positions)
            self.cache = make_slots(self.model.decoder, self.config.max_batch, self.context)
            self.slots = self.cache.slots
            delay = float(os.environ.get(DELAY_ENV) or 0)
            self.scheduler = Scheduler(self.model, self.cache, self.config.max_queue, observer=self.metrics,
                                       step_delay=delay)
            self.scheduler.start()
            if self.state == "loading":
                self.state = "ready"
        except Exception as e:  # noqa: BLE001 - reported as one line by the server, which then exits 2
            self.error, self.state = e, "failed"

    def begin_drain(self) -> None:
        """Stop accepting: /health turns 503, new requests get 503; what runs goes on."""
        self.state = "draining"
        if self.scheduler:
            self.scheduler.stop_accepting()

    def idle(self) -> bool:
        return self.scheduler is None or self.scheduler.idle()


# -- helpers -----------------------------------------------------------------------------------------------------

def _error(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def _check_key(service: Service, request: Request) -> None:
    key = service.config.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if not header:
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                       type="authentication_error", code="missing_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise ApiError(401, "invalid API key", type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def _check_ready(service: Service) -> None:
    if service.state != "ready":
        what = "is still loading the model" if service.state == "loading" else "is shutting down"
        raise ApiError(503, f"the server {what}; retry later", type="server_unavailable",
                       code="not_ready", headers={"Retry-After": "1"})


async def _read_json(request: Request, limit: int):
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f"the request body ({length} bytes) is over the limit of {limit} bytes",
                       code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    data = b"".join(chunks)
    if not data.strip():
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ApiError(400, f"the request body is not valid JSON: {first}") from None


# -- /v1/completions ---------------------------------------------------------------------------------------------

@dataclass
class _Choice:
    index: int
    seq: Sequence
    prompt_text: str
    text: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    finish_reason: str | None = None
    generated: int = 0


class _Completion:
    """One accepted request: its choices, its updates queue and its timings."""

    def __init__(self, service: Service, req, prompts: list, loop):
        self.service, self.req, self.loop = service, req, loop
        self.id = "cmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        self.prompt_tokens = sum(len(ids) for ids, _ in prompts) * req.n
        self.started = time.perf_counter()
        self.first_token = None
        model = service.model
        # a setting the request leaves out is the artifact's generation default, resolved as runtime.generate does
        setting = {name: model._default(name, getattr(req, name))
                   for name in ("temperature", "top_k", "top_p", "repetition_penalty")}
        params = SamplingParams.create(req.max_tokens, req.min_tokens, setting["temperature"] > 0,
                                       setting["temperature"], setting["top_k"], setting["top_p"],
                                       setting["repetition_penalty"])
        deadline = time.monotonic() + service.config.request_timeout
        fault = os.environ.get(FAULT_ENV)
        self.choices = []
        for p, (ids, text) in enumerate(prompts):
            for i in range(req.n):
                index = p * req.n + i
                seed = None if req.seed is None else req.seed + i  # choice i: what seed + i gives alone
                seq = Sequence(ids, params, req.stop, seed, model.eos_token_id, req.logprobs, deadline,
                               on_update=self._listener(index), speculative_tokens=req.speculative_tokens)
                seq.fault = bool(fault) and fault in text
                self.choices.append(_Choice(index, seq, text))
        self.seqs = [c.seq for c in self.choices]

    def _listener(self, index: int):
        def on_update(update):  # scheduler thread -> event loop
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, update))
        return on_update

    def take(self, index: int, update) -> None:
        c = self.choices[index]
        c.text.append(update.text)
        c.tokens.extend(update.tokens)
        c.generated = update.generated
        if update.finish_reason:
            c.finish_reason = update.finish_reason
        if self.first_token is None and (update.text or update.generated):
            self.first_token = time.perf_counter()

    @property
    def completion_tokens(self) -> int:
        return sum(c.generated for c in self.choices)

    def logprobs(self, tokens: list, offset: int = 0):
        if self.req.logprobs is None:
            return None
        body = logprobs_object(tokens, self.service.token_text)
        body["text_offset"] = [o + offset for o in body["text_offset"]]
        return body

    def finish_log(self, status: int) -> None:
        now = time.perf_counter()
        ttft = f"{(self.first_token - self.started) * 1000:.1f}" if self.first_token else "-"
        log.info("request %s status=%d prompt_tokens=%d completion_tokens=%d ttft_ms=%s total_ms=%.1f", self.id,
                 status, self.prompt_tokens, self.completion_tokens, ttft, (now - self.started) * 1000)
        self.service.metrics.requests.labels(status=str(status)).inc()


def _prepare_prompts(service: Service, req) -> list:
    """Tokenize and check each prompt: [(ids, text)]; raises ApiError naming the bad prompt."""
    model, vocab = service.model, service.model.manifest["config"]["vocab_size"]
    out = []
    for i, prompt in enumerate(req.prompts):
        where = "" if len(req.prompts) == 1 else f" {i} of the list"
        if isinstance(prompt, str):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ApiError(400, f"prompt{where} is not valid UTF-8 text (lone surrogate at index {e.start})",
                               param="prompt", code="invalid_value") from None
            ids, text = (model.tokenizer.encode(prompt).ids if prompt else []), prompt
        else:
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise ApiError(400, f"token id {bad} in prompt{where} is outside the vocabulary [0, {vocab})",
                               param="prompt", code="invalid_value")
            ids, text = prompt, model._decode(prompt)
        if not ids:
            raise ApiError(400, f"prompt{where} is empty", param="prompt", code="invalid_value")
        if len(ids) + req.max_tokens > service.context:
            raise ApiError(400, f"prompt{where} ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the "
                                f"model's context of {service.context} positions", param="max_tokens",
                           code="context_length_exceeded")
        out.append((ids, text))
    return out


async def completions(request: Request) -> Response:
    service: Service = request.app.state.service
    _check_key(service, request)
    _check_ready(service)
    heads_app.refuse_completions(service)
    req = parse_completion(await _read_json(request, service.config.max_body_bytes), service.config.model_name)
    if req.speculative_tokens and not service.cache.speculates:
        raise ApiError(400, "speculative: this artifact's graph returns one position's logits per row, which "
                            "cannot check drafts; re-export it with this gptexport", param="speculative",
                       code="invalid_value")
    prompts = _prepare_prompts(service, req)
    sequences = len(prompts) * req.n
    limit = service.config.max_queue + service.slots
    if sequences > limit:
        raise ApiError(400, f"the request asks for {sequences} sequences (prompts x n), more than this server can "
                            f"hold ({limit}: --max-batch + --max-queue)", param="n", code="invalid_value")
    try:
        job = _Completion(service, req, prompts, asyncio.get_running_loop())
    except GenerationError as e:
        raise ApiError(400, str(e), code="invalid_value") from None
    try:
        service.scheduler.submit(job.seqs)
    except Overloaded as e:
        service.metrics.requests.labels(status="429").inc()
        raise ApiError(429, f"{e}; retry later", type="rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": "1"}) from None
    except NotAccepting as e:
        raise ApiError(503, f"{e}; retry later", type="server_unavailable", code="not_ready",
                       headers={"Retry-After": "1"}) from None
    service.metrics.prompt_tokens.inc(job.prompt_tokens)
    if req.stream:
        return StreamingResponse(_stream(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _whole(job, request)


async def _whole(job: _Completion, request: Request) -> Response:
    status = 200
    try:
        left, checked = len(job.choices), time.monotonic()
        while left:
            try:
                index, update = await asyncio.wait_for(job.queue.get(), _POLL_S)
            except asyncio.TimeoutError:
                index, update = None, None
            if time.monotonic() - checked >= _POLL_S:  # updates may come every step: check by the clock
                checked = time.monotonic()
                if await request.is_disconnected():
                    status = 499  # client closed the request (nginx's convention), for the log and metrics
                    return Response(status_code=499)
            if update is None:
                continue
            if update.error:
                status = ERROR_STATUS.get(update.error_kind, 500)
                return _error(status, update.error, ERROR_TYPE.get(update.error_kind, "server_error"))
            job.take(index, update)
            left -= update.final
        choices = []
        for c in job.choices:
            prefix = c.prompt_text if job.req.echo else ""
            choices.append(choice(c.index, prefix + "".join(c.text), job.logprobs(c.tokens, len(prefix)),
                                  c.finish_reason))
        body = completion_object(job.id, job.created, job.service.config.model_name, choices,
                                 usage(job.prompt_tokens, job.completion_tokens))
        return JSONResponse(body)
    finally:
        job.service.scheduler.cancel(job.seqs)  # no-op for finished sequences
        job.finish_log(status)


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(job: _Completion):
    """SSE chunks in OpenAI's format; an error mid-stream is an error event, then [DONE]."""
    status, model = 200, job.service.config.model_name
    chunk = lambda choices, usage_=None: _sse(completion_object(job.id, job.created, model, choices, usage_))  # noqa: E731
    try:
        if job.req.echo:
            yield chunk([choice(c.index, c.prompt_text, None, None) for c in job.choices])
        left = len(job.choices)
        while left:
            index, update = await job.queue.get()
            if update.error:
                status = ERROR_STATUS.get(update.error_kind, 500)
                yield _sse(error_body(update.error, ERROR_TYPE.get(update.error_kind, "server_error"),
                                      code=update.error_kind))
                break
            job.take(index, update)
            left -= update.final
            if update.text or update.tokens or update.finish_reason:
                offset = sum(len(t) for t in job.choices[index].text[:-1])
                yield chunk([choice(index, update.text, job.logprobs(list(update.tokens), offset),
                                    update.finish_reason)])
        if job.req.include_usage and status == 200:
            yield chunk([], usage(job.prompt_tokens, job.completion_tokens))
        yield "data: [DONE]\n\n"
    except BaseException:  # the client went away (cancelled or the send failed)
        status = 499
        raise
    finally:
        job.service.scheduler.cancel(job.seqs)  # frees the slots at the next step
        job.finish_log(status)


# -- other endpoints ---------------------------------------------------------------------------------------------

async def chat_completions(request: Request) -> Response:
    _check_key(request.app.state.service, request)
    raise ApiError(404, "/v1/chat/completions is not served: GPT-2 and GPT-J are base models with no chat "
                        "template; send a text prompt to POST /v1/completions", code="chat_not_supported")


async def models(request: Request) -> Response:
    service: Service = request.app.state.service
    _check_key(service, request)
    return JSONResponse({"object": "list", "data": [_model_card(service)]})


async def model_info(request: Request) -> Response:
    service: Service = request.app.state.service
    _check_key(service, request)
    name = request.path_params["model_id"]
    if name != service.config.model_name:
        raise ApiError(404, f"model {name!r} does not exist; this server serves {service.config.model_name!r}",
                       param="model", code="model_not_found")
    return JSONResponse(_model_card(service))


def _model_card(service: Service) -> dict:
    return {"id": service.config.model_name, "object": "model", "created": service.created,
            "owned_by": "gptexport", "max_model_len": service.context or None}


async def health(request: Request) -> Response:
    service: Service = request.app.state.service
    ok = service.state == "ready"
    return JSONResponse({"status": "ok" if ok else service.state}, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    service: Service = request.app.state.service
    return Response(service.metrics.render(), media_type=service.metrics.content_type)


async def _api_error(request: Request, exc: ApiError) -> Response:
    return _error(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {404: f"no route {request.url.path}; see GET /v1/models and POST /v1/completions",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                        str(exc.detail))
    return _error(exc.status_code, message, "invalid_request_error", headers=getattr(exc, "headers", None))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s: %s: %s", request.url.path, type(exc).__name__, exc, exc_info=exc)
    return _error(500, f"internal error: {type(exc).__name__}", "server_error")


def create_app(service: Service) -> Starlette:
    """The Starlette app over a Service (see the module docstring for the endpoints)."""
    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", model_info, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *heads_app.routes(),  # /v1/embeddings, /v1/classifications
    ]
    middleware = []
    if service.config.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=service.config.cors_origins,
                                     allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type"]))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error,
                                        Exception: _internal_error})
    app.state.service = service
    return app
