"""The FastAPI app: OpenAI's chat-completions API over one model, `create_app(vlm, settings)`.

Routes: POST /v1/chat/completions (JSON or server-sent events), GET /v1/models, GET /health.
Before any route, an ASGI gate checks the API key (constant-time) and caps the body's size. Every error
leaves as OpenAI's `{"error": {"message", "type", "param", "code"}}` with its status, FastAPI's 422s
included (they become 400s). Each request is logged on one line to stderr.

A request is checked and measured in a worker thread (images fetched and decoded, prompt rendered
and tokenized with a processor of its own, context checked), so a bad request is refused before it
ever meets the batch; then it waits in the `Batcher`'s queue and its events come back through an
asyncio queue.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmkit.errors import VlmkitError
from vlmkit.infer.engine import Engine
from vlmkit.serve.batcher import Batcher, Job
from vlmkit.serve.errors import ApiError, bad_request
from vlmkit.serve.media import MediaPolicy
from vlmkit.serve.requests import ChatCompletionRequest, budget, context_length, image_token_ids, parse_chat

log = logging.getLogger("vlmkit.serve")


@dataclass(frozen=True)
class Settings:
    model_id: str = ""  # the name /v1/models reports (default: the model as given)
    api_key: str | None = None  # required as `Authorization: Bearer KEY` on /v1/* when set
    allow_media_url: bool = False  # fetch http(s) image URLs (public addresses only)
    media_root: str | None = None  # local image paths allowed under this folder only
    max_images: int = 8  # per request
    max_body_mb: float = 32.0  # a request body, and one image fetched or read
    max_batch: int = 16  # rows decoded together (a request with n choices is n rows)
    max_queue: int = 64  # requests waiting for the model; one more is a 503
    batch_wait_ms: float = 20.0  # how long the worker waits to fill a batch
    media_timeout_s: float = 10.0  # one image URL fetch
    log_requests: bool = False  # log messages and replies too

    @property
    def max_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


def create_app(vlm, settings: Settings) -> FastAPI:
    """The app serving `vlm` (a `vlmkit.infer.load.VLM`). The batcher's thread starts and stops with the app."""
    model_id = settings.model_id or vlm.name or "vlmkit"
    # Two processors of our own: one for the worker, one (behind a lock) for checking requests as they
    # come; a fast tokenizer must not be used from two threads at once.
    worker = Engine(vlm.model, copy.deepcopy(vlm.processor), family=vlm.family, decode=vlm.decode)
    checker = Engine(vlm.model, copy.deepcopy(vlm.processor), family=vlm.family, decode="transformers")  # never decodes
    check_lock = threading.Lock()
    batcher = Batcher(worker, settings.max_batch, settings.max_queue, settings.batch_wait_ms / 1000)
    context = context_length(vlm.model)
    image_ids = image_token_ids(vlm.model, vlm.processor)
    policy = MediaPolicy.of(settings.allow_media_url, settings.media_root, settings.max_bytes, settings.media_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.close()

    app = FastAPI(title="vlmkit", summary=f"OpenAI-compatible API for {model_id}", lifespan=lifespan)
    app.state.batcher = batcher
    app.add_middleware(Gate, api_key=settings.api_key, max_bytes=settings.max_bytes)
    _error_handlers(app)

    def prepare(body: ChatCompletionRequest, rid: str, emit) -> tuple[Job, bool, bool]:
        chat = parse_chat(body, policy, settings.max_images, settings.max_batch)
        with check_lock:
            try:
                inputs = checker.inputs([chat.messages], [chat.images])
            except VlmkitError as e:
                raise bad_request(f"messages: {e}", param="messages") from None
        size = budget(inputs["input_ids"][0], image_ids, context, chat.sampling.max_tokens)
        job = Job(rid, chat.messages, chat.images, chat.sampling, size.max_tokens, emit,
                  prompt_tokens=size.prompt_tokens, image_tokens=size.image_tokens)
        return job, chat.stream, chat.include_usage

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        rid, start, created = f"chatcmpl-{secrets.token_hex(12)}", time.monotonic(), int(time.time())
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            job, stream, include_usage = await run_in_threadpool(
                prepare, body, rid, lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
            )
            batcher.submit(job)
        except ApiError as e:
            _log_line(rid, e.status, start, error=e.message)
            raise
        head = {"id": rid, "created": created, "model": model_id}
        if stream:
            return EventStream(
                _events(job, events, head, include_usage, start, settings.log_requests, body),
                on_close=lambda: batcher.cancel(job) if not job.finished else None,
            )
        return await _complete(job, events, head, request, batcher, start, settings.log_requests, body)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_id, context)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            raise ApiError(404, f"model {name!r} not found; this server serves {model_id!r}", param="model", code="model_not_found")
        return _model_card(model_id, context)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "active": batcher.active, "queued": batcher.queued,
                "running": batcher.running, "max_batch_run": batcher.max_batch_run, "batches": batcher.batches,
                "joined": batcher.joined,
                "cancelled": batcher.cancelled}

    return app


def _model_card(model_id: str, context: int | None) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "vlmkit",
            "input_modalities": ["text", "image"], "output_modalities": ["text"], "max_model_len": context}


# -- replies ----------------------------------------------------------------------------------------
def _usage(job: Job) -> dict:
    completion = job.completion_tokens
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
            "total_tokens": job.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": job.image_tokens}}


async def _complete(job: Job, events: asyncio.Queue, head: dict, request: Request, batcher: Batcher,
                    start: float, log_content: bool, body) -> JSONResponse:
    """Wait for the whole reply; a client that disconnects meanwhile cancels its request."""
    getter = asyncio.ensure_future(events.get())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=0.5)
            if not done:
                if await request.is_disconnected():
                    batcher.cancel(job)
                    _log_line(job.id, 499, start, job, error="client disconnected")
                    return JSONResponse({}, status_code=499)
                continue
            event = getter.result()
            if event[0] == "error":
                _log_line(job.id, event[1].status, start, job, error=event[1].message)
                raise event[1]
            if event[0] == "done":
                break
            getter = asyncio.ensure_future(events.get())
    finally:
        getter.cancel()
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": None, "finish_reason": c.finish_reason} for c in job.choices]
    _log_line(job.id, 200, start, job, stream=False, content=(body, job) if log_content else None)
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": _usage(job)})


async def _events(job: Job, events: asyncio.Queue, head: dict, include_usage: bool, start: float, log_content: bool, body):
    """The reply as OpenAI's chunks: the role, text deltas, each choice's finish reason, the usage when
    asked for, then [DONE]."""

    def chunk(choices: list, usage: dict | None = None) -> str:
        obj = {**head, "object": "chat.completion.chunk", "choices": choices}
        if include_usage:
            obj["usage"] = usage
        return f"data: {json.dumps(obj)}\n\n"

    def choice(index: int, delta: dict, finish: str | None = None) -> dict:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

    status = 499
    try:
        yield chunk([choice(i, {"role": "assistant", "content": ""}) for i in range(job.sampling.n)])
        while True:
            event = await events.get()
            if event[0] == "delta":
                yield chunk([choice(event[1], {"content": event[2]})])
            elif event[0] == "finish":
                yield chunk([choice(event[1], {}, event[2])])
            elif event[0] == "error":
                status = event[1].status
                yield f"data: {json.dumps(event[1].body())}\n\n"
                break
            elif event[0] == "done":
                status = 200
                if include_usage:
                    yield chunk([], _usage(job))
                break
        yield "data: [DONE]\n\n"
    finally:
        error = None if status == 200 else "client disconnected" if status == 499 else "failed"
        _log_line(job.id, status, start, job, stream=True, error=error, content=(body, job) if log_content else None)


class EventStream(StreamingResponse):
    """Server-sent events; `on_close` runs however the response ends (a client that went away included)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _log_line(rid: str, status: int, start: float, job: Job | None = None, stream: bool | None = None,
              error: str | None = None, content=None) -> None:
    """One line per request: id, status, tokens, time to first token and latency (and content if asked)."""
    parts = [rid, f"status={status}"]
    if job is not None:
        parts += [f"prompt_tokens={job.prompt_tokens}", f"image_tokens={job.image_tokens}",
                  f"completion_tokens={job.completion_tokens}", f"n={job.sampling.n}"]
        if job.first_token is not None:
            parts.append(f"ttft={job.first_token - job.submitted:.3f}s")
    if stream is not None:
        parts.append(f"stream={str(stream).lower()}")
    parts.append(f"latency={time.monotonic() - start:.3f}s")
    if error:
        parts.append(f"error={json.dumps(error)}")
    if content is not None:
        body, job = content
        parts.append(f"messages={json.dumps(body.messages)[:20000]}")
        parts.append(f"replies={json.dumps([c.text for c in job.choices])}")
    log.info(" ".join(parts))


# -- errors -----------------------------------------------------------------------------------------
def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif first.get("type") == "model_attributes_type":
            message = "the request body must be a JSON object"
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid')}"
        error = bad_request(message, param=param)
        _log_line("-", 400, time.monotonic(), error=message)
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return _error_response(ApiError(e.status_code, str(e.detail), kind=kind, headers=dict(e.headers or {})))

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):
        log.exception("unexpected error")
        return _error_response(ApiError(500, f"internal error ({type(e).__name__}); see the server log", kind="server_error"))


class Gate:
    """ASGI middleware in front of every route: the API key on /v1/*, then the body's size."""

    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.key is not None and scope["path"].startswith("/v1"):
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                await _drain(receive, self.max_bytes)
                _log_line("-", 401, time.monotonic(), error="missing or wrong API key")
                return await _send(send, ApiError(
                    401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                ))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_large = ApiError(
            413, f"the request body is over the server's limit of {self.max_bytes / 2**20:g} MB (--max-body-mb)",
            code="request_too_large",
        )
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            if int(length) <= 4 * self.max_bytes:  # read it, so the client gets to see the answer
                await _drain(receive, 4 * self.max_bytes)
            _log_line("-", 413, time.monotonic(), error="body too large")
            return await _send(send, too_large)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await _drain(receive, 4 * self.max_bytes)
                _log_line("-", 413, time.monotonic(), error="body too large")
                return await _send(send, too_large)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _drain(receive, limit: int) -> None:
    """Read and drop the rest of a refused body (up to `limit` bytes)."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _send(send, error: ApiError) -> None:
    payload = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
