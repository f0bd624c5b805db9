"""The server's routes for artifacts of the other tasks (runtime/heads.py): one forward per request, no scheduler.

```
 POST /v1/embeddings       feature-extraction   OpenAI's embeddings API: input str | [str] | [ids] | [[ids]],
                                                encoding_format "float" | "base64", extra "pooling" last | mean
 POST /v1/classifications  text-classification  {"model", "input": str | [str]} -> per input label, score, scores
```

A request runs in a worker thread (onnxruntime sessions are thread-safe); at most --max-batch requests run at once
and --max-queue wait, past that 429. A request to a route of another task, or to /v1/completions on one of these
artifacts, is a 400 naming the route that serves it.
"""

from __future__ import annotations

import base64
import threading

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import heads
from ..manifest import read_manifest
from .protocol import ApiError

MAX_INPUTS = 2048  # OpenAI's limit on inputs per embeddings request
ROUTES = {"feature-extraction": "/v1/embeddings", "text-classification": "/v1/classifications"}


def head_task(artifact) -> str | None:
    """The artifact's task when it is not text-generation, else None (also for a manifest that cannot be read:
    the generation loader then reports what is wrong)."""
    try:
        task = heads.task_of(read_manifest(artifact, verify="size"))
    except Exception:  # noqa: BLE001 - reported by the normal load path
        return None
    return None if task == heads.TEXT_GENERATION else task


def load(service) -> None:
    """Service.load for these artifacts: the session and the concurrency gate; sets `state`."""
    config = service.config
    try:
        task = head_task(config.artifact)
        if task not in ROUTES:
            raise heads.ArtifactError(f"{config.artifact} is a {task} artifact; the server serves text-generation "
                                      f"(/v1/completions), feature-extraction (/v1/embeddings) and "
                                      f"text-classification (/v1/classifications); use gptrun "
                                      f"{heads.FUNCTIONS.get(task, task)} for it")
        service.head = heads.load_head(config.artifact, config.provider, config.verify, threads=config.threads,
                                       manifest_sha256=config.manifest_sha256)
        service.head_gate = _Gate(config.max_batch, config.max_queue)
        service.kv_note = f"task {task}, POST {ROUTES[task]}"
        service.context = service.head.max_positions
        if service.state == "loading":
            service.state = "ready"
    except Exception as e:  # noqa: BLE001 - reported as one line by the server, which then exits 2
        service.error, service.state = e, "failed"


class _Gate:
    """At most `running` requests at once and `waiting` more; beyond that, 429."""

    def __init__(self, running: int, waiting: int):
        self.slots, self.limit, self.inside, self.lock = threading.Semaphore(running), running + waiting, 0, \
            threading.Lock()

    def enter(self) -> None:
        with self.lock:
            if self.inside >= self.limit:
                raise ApiError(429, f"the server is busy ({self.inside} requests running or waiting); retry later",
                               type="server_overloaded", code="overloaded", headers={"Retry-After": "1"})
            self.inside += 1

    def leave(self) -> None:
        with self.lock:
            self.inside -= 1

    def run(self, fn, *args):
        with self.slots:
            return fn(*args)


def _require(service, task: str, route: str) -> heads.HeadModel:
    have = service.head.task if service.head is not None else heads.TEXT_GENERATION
    if have != task:
        where = ROUTES.get(have, "/v1/completions")
        raise ApiError(400, f"{route} needs a {task} model; this server serves a {have} model: use {where}",
                       code="wrong_task")
    return service.head


def refuse_completions(service) -> None:
    """/v1/completions on a server of one of these artifacts: a 400 naming its route."""
    if getattr(service, "head", None) is not None:
        task = service.head.task
        raise ApiError(400, f"/v1/completions needs a text-generation model; this server serves a {task} model: "
                            f"use {ROUTES[task]}", code="wrong_task")


def _model(body: dict, service) -> None:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "'model' is required: the name this server serves "
                            f"({service.config.model_name!r})", param="model", code="missing_model")
    if name != service.config.model_name:
        raise ApiError(404, f"model {name!r} does not exist; this server serves {service.config.model_name!r}",
                       param="model", code="model_not_found")


def _inputs(body: dict, model: heads.HeadModel, allow_ids: bool) -> list[list[int]]:
    """Token rows of `input`: str | [str] (and, for embeddings, [int] | [[int]] token ids, as OpenAI's API)."""
    value = body.get("input")
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, int) for v in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'input' must be a non-empty string or list of strings"
                       + (" (or token ids)" if allow_ids else ""), param="input", code="invalid_value")
    if len(value) > MAX_INPUTS:
        raise ApiError(400, f"'input' has {len(value)} items; at most {MAX_INPUTS}", param="input",
                       code="invalid_value")
    vocab, rows = model.manifest["config"]["vocab_size"], []
    for i, item in enumerate(value):
        if isinstance(item, str):
            try:
                ids = model.encode(item, f"input {i}")[0] if item else []
            except heads.InputError as e:
                raise ApiError(400, str(e), param="input", code="invalid_value") from None
        elif allow_ids and isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in item):
            bad = [t for t in item if not 0 <= t < vocab]
            if bad:
                raise ApiError(400, f"input {i}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                               param="input", code="invalid_value")
            ids = list(item)
        else:
            raise ApiError(400, f"input {i} must be a string" + (" or a list of token ids" if allow_ids else ""),
                           param="input", code="invalid_value")
        if not ids:
            raise ApiError(400, f"input {i} is empty: give some text", param="input", code="invalid_value")
        if len(ids) > model.max_positions:
            raise ApiError(400, f"input {i} has {len(ids)} tokens; the model takes at most {model.max_positions}",
                           param="input", code="context_length_exceeded")
        rows.append(ids)
    return rows


async def _gated(service, fn, *args):
    gate = service.head_gate
    gate.enter()
    try:
        return await run_in_threadpool(gate.run, fn, *args)
    finally:
        gate.leave()


async def _request(request: Request, task: str, route: str):
    """Auth, readiness, the artifact's task, the body (a JSON object) and its `model`: (service, model, body)."""
    from .app import _check_key, _check_ready, _read_json

    service = request.app.state.service
    _check_key(service, request)
    _check_ready(service)
    model = _require(service, task, route)
    body = await _read_json(request, service.config.max_body_bytes)
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _model(body, service)
    return service, model, body


async def embeddings(request: Request) -> Response:
    service, model, body = await _request(request, "feature-extraction", "/v1/embeddings")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise ApiError(400, f"'encoding_format' {encoding!r}: use 'float' or 'base64'", param="encoding_format",
                       code="invalid_value")
    pooling = body.get("pooling", "last")
    if pooling not in heads.POOLINGS:
        raise ApiError(400, f"'pooling' {pooling!r}: use one of {', '.join(heads.POOLINGS)}", param="pooling",
                       code="invalid_value")
    dims = body.get("dimensions")
    hidden = model.manifest["config"]["hidden_size"]
    if dims is not None and dims != hidden:
        raise ApiError(400, f"'dimensions' {dims!r}: this model's embeddings have {hidden}", param="dimensions",
                       code="invalid_value")
    rows = _inputs(body, model, allow_ids=True)
    vectors = await _gated(service, heads.embed_rows, model, rows, pooling)
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if encoding == "base64" else v.tolist()}
            for i, v in enumerate(vectors)]
    tokens = sum(map(len, rows))
    return JSONResponse({"object": "list", "data": data, "model": service.config.model_name,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def classifications(request: Request) -> Response:
    service, model, body = await _request(request, "text-classification", "/v1/classifications")
    rows = _inputs(body, model, allow_ids=False)
    results = await _gated(service, heads.classify_rows, model, rows)
    tokens = sum(map(len, rows))
    return JSONResponse({"object": "list", "model": service.config.model_name,
                         "data": [{"object": "classification", "index": i, **r} for i, r in enumerate(results)],
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def routes() -> list:
    return [Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/classifications", classifications, methods=["POST"])]
