"""The FastAPI app: OpenAI's `/v1/chat/completions` and `/v1/models`, plus `/health` and `/metrics`.

`create_app(state)` builds it over a `ServeState` (the loaded model, its `Scheduler`, limits, metrics). The
request body is read here under the size limit and parsed by hand, so malformed JSON is a 400 (not FastAPI's 422)
and every error is OpenAI's `{"error": {"message", "type", "param", "code"}}`:

400 malformed JSON, bad fields, bad or disallowed images, a prompt that does not fit the slot's context;
401 a missing or wrong API key (`Authorization: Bearer KEY`, when the server has one); 404 an unknown model or
path; 413 a body over the limit; 429 the queue is full; 503 shutting down.

`stream: true` answers server-sent events in OpenAI's chunk format (a role chunk, content chunks, a chunk with
`finish_reason`, the usage chunk when `stream_options.include_usage`, then `data: [DONE]`). A client that goes away
cancels its job: it leaves the queue, or its generation stops at the next token and its slot is free again.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from qvl.errors import QvlError
from qvl.runtime.model import Model, _sampling_config
from qvl.runtime.serve.limits import ServeLimits, runtime_messages
from qvl.runtime.serve.metrics import ServeMetrics
from qvl.runtime.serve.openai_schema import (ApiError, AssistantMessage, ChatCompletion, ChatCompletionChunk,
                                             ChatCompletionRequest, Choice, ChunkChoice, Delta, ModelCard, ModelList,
                                             completion_id, now, usage, validation_error)
from qvl.runtime.serve.scheduler import GenerationJob, QueueFull, Scheduler, ShuttingDown

CHAT = "/v1/chat/completions"


@dataclass
class ServeState:
    model: Model
    scheduler: Scheduler
    model_id: str
    limits: ServeLimits = field(default_factory=ServeLimits)
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    api_key: str | None = None
    created: int = field(default_factory=now)
    closing: bool = False


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def create_app(state: ServeState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        state.closing = True
        await run_in_threadpool(state.scheduler.close)

    app = FastAPI(title="qvl-compile serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = state.metrics

    def count(endpoint: str, status: int) -> None:
        metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        count(request.url.path if request.url.path in (CHAT, "/v1/models") else "other", exc.status)
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        count("other", exc.status_code)
        kind = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        return _error(ApiError(exc.status_code, str(exc.detail), code=kind))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):  # a bug: Starlette re-raises it into the log
        count("other", 500)
        return _error(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _error(ApiError(400, str(exc.errors()[0].get("msg", "invalid request")), code="invalid_value"))

    def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), state.api_key.encode()):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> bytes:
        limit = state.limits.max_body_bytes
        declared = request.headers.get("content-length")
        too_large = ApiError(413, f"request body over the limit of {limit:,} bytes", code="payload_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/health")
    async def health():
        s = state.scheduler
        body = {"status": "shutting_down" if state.closing else "ok", "model": state.model_id,
                "slots": len(s.slots), "batched": s.batched, "running": s.running, "queued": s.queued,
                "pid": os.getpid()}  # which process answered (one per Ray Serve replica)
        return JSONResponse(body, status_code=503 if state.closing else 200)

    @app.get("/metrics")
    async def metrics_endpoint():
        data, content_type = metrics.exposition()
        return Response(data, media_type=content_type)

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        count("/v1/models", 200)
        return ModelList(data=[ModelCard(id=state.model_id, created=state.created)]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        check_key(request)
        if model_id != state.model_id:
            raise ApiError(404, f"the model {model_id!r} does not exist (this server has {state.model_id!r})",
                           param="model", code="model_not_found")
        return ModelCard(id=state.model_id, created=state.created).model_dump()

    @app.post(CHAT)
    async def chat_completions(request: Request):
        check_key(request)
        if state.closing:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
        raw = await read_body(request)
        try:
            payload = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            req = ChatCompletionRequest.model_validate(payload)
        except ValidationError as exc:
            raise validation_error(exc) from None
        if req.model != state.model_id:
            raise ApiError(404, f"the model {req.model!r} does not exist (this server has {state.model_id!r})",
                           param="model", code="model_not_found")
        bad = req.unsupported()
        if bad is not None:
            raise bad
        job = await run_in_threadpool(_prepare_job, state, req, asyncio.get_running_loop())
        try:
            state.scheduler.submit(job)
        except QueueFull:
            raise ApiError(429, f"the server's queue is full ({state.scheduler.max_queue} waiting); retry later",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down") from None
        cid, created = completion_id(), now()
        gone = asyncio.ensure_future(_disconnected(request))
        event, handed_off = ("delta", None), False  # handed_off: the job ended, or the stream owns it
        try:
            event = first = await _next_event(job, gone)
            if first[0] == "error":
                raise first[1]
            if req.stream:
                count(CHAT, 200)
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                gone.cancel()  # from here the streaming response watches the connection
                handed_off = True
                return StreamingResponse(_sse(state, job, first, cid, created, include_usage),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            pieces = []
            while event[0] == "delta":
                pieces.append(event[1])
                event = await _next_event(job, gone)
            handed_off = True
        except _ClientGone:
            count(CHAT, 499)
            return Response(status_code=499)  # nobody reads it
        finally:
            gone.cancel()
            if not handed_off:  # the client left (or the handler was cancelled): stop the generation
                state.scheduler.cancel(job)
        if event[0] == "error":
            raise event[1]
        count(CHAT, 200)
        return ChatCompletion(id=cid, created=created, model=state.model_id, usage=usage(job.stats),
                              choices=[Choice(message=AssistantMessage(content="".join(pieces)),
                                              finish_reason=_finish(event[1]))]).model_dump()

    return app


def _finish(reason: str | None) -> str:
    return reason if reason in ("stop", "length") else "stop"


def _prepare_job(state: ServeState, req: ChatCompletionRequest, loop) -> GenerationJob:
    """Messages -> prompt (images checked and preprocessed, tokens counted) -> a job; ApiError(400) on bad input."""
    model, capacity = state.model, state.scheduler.capacity
    try:
        sampling = _sampling_config(model.generation_config, req.temperature, req.top_p, req.top_k,
                                    req.repetition_penalty)
        prompt = model.prepare(runtime_messages(req, state.limits))
    except QvlError as exc:
        raise ApiError(400, str(exc), code="invalid_request") from None
    n = len(prompt)
    if n >= capacity:
        raise ApiError(400, f"the prompt has {n} tokens; this server's context is {capacity} tokens (prompt + "
                       "completion)", param="messages", code="context_length_exceeded")
    limit = req.token_limit
    if limit is None:
        limit = min(state.limits.default_max_tokens, capacity - n)
    elif n + limit > capacity:
        raise ApiError(400, f"the prompt ({n} tokens) + max_tokens ({limit}) exceeds this server's context of "
                       f"{capacity} tokens", param="max_tokens", code="context_length_exceeded")
    return GenerationJob(prompt=prompt, max_tokens=limit, sampling=sampling,
                         seed=0 if req.seed is None else req.seed, stop=req.stop or [], loop=loop)


class _ClientGone(Exception):
    pass


async def _next_event(job: GenerationJob, gone: asyncio.Future):
    """The job's next event, or _ClientGone when the client disconnects first (`gone` completes)."""
    get = asyncio.ensure_future(job.events.get())
    done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    raise _ClientGone()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _sse(state: ServeState, job: GenerationJob, first, cid: str, created: int, include_usage: bool):
    def chunk(delta: Delta | None, finish: str | None = None) -> str:
        """A content chunk (`delta`), or the usage chunk (`delta` None: no choices, the usage counts)."""
        c = ChatCompletionChunk(id=cid, created=created, model=state.model_id,
                                choices=[] if delta is None else [ChunkChoice(delta=delta, finish_reason=finish)],
                                usage=usage(job.stats) if delta is None else None)
        body = c.model_dump()
        for choice in body["choices"]:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if delta is not None and not include_usage:
            body.pop("usage")
        return _data(body)

    event, finished = first, False
    try:
        yield chunk(Delta(role="assistant", content=""))
        while True:
            kind, value = event
            if kind == "delta":
                yield chunk(Delta(content=value))
            elif kind == "done":
                finished = True
                yield chunk(Delta(), _finish(value))
                if include_usage:
                    yield chunk(None)
                break
            else:  # an error after the stream began: OpenAI's error object as an event
                finished = True
                yield _data(value.body())
                break
            event = await job.events.get()
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away (the response task was cancelled): free the slot
            state.scheduler.cancel(job)
