"""The HTTP application: OpenAI's chat completions and models routes, a health check and the web page.

At the edge (against hostile clients): the Host header and the API key are checked before any route (guard.py);
a request body is read chunk by chunk and refused with 413 as soon as the bytes received pass the limit, whether
or not a Content-Length was declared (chunked bodies too); JSON is parsed off the event loop; every malformed
input is a 4xx in OpenAI's error shape, and an unexpected failure a 500 whose details stay in the server's log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .continuous_scheduler import ContinuousScheduler
from .errors import APIError, bad_request
from .guard import Guard
from .jobs import Job, Outcome
from .methods import method_name, method_settings
from .metrics import metrics_text
from .protocol import Limits, parse_chat_request, parse_json
from .request_methods import documented
from .scheduler import Scheduler
from .worker import ModelWorker

log = logging.getLogger("corematching.apps.serve")
STATIC_DIR = Path(__file__).parent / "static"
DISCONNECT_POLL_S = 0.5
MAX_BODY_BYTES = 64 * 1024 * 1024  # a few images as data: URLs
BODY_TIMEOUT_S = 60.0


def create_app(worker: ModelWorker, limits: Limits, *, max_batch_size: int, max_wait_s: float, max_pending: int,
               shutdown_timeout_s: float = 60.0, max_body_bytes: int = MAX_BODY_BYTES, api_key: str | None = None,
               allowed_hosts: frozenset[str] | None = None, body_timeout_s: float = BODY_TIMEOUT_S,
               batching: str = "static", kv_budget_bytes: int | None = None, join_wait_steps: int = 0) -> FastAPI:
    if batching == "continuous":  # requests join and leave the running batch at every decode step
        scheduler = ContinuousScheduler(worker, max_batch_size, max_pending, kv_budget_bytes, join_wait_steps)
    elif batching == "static":
        scheduler = Scheduler(worker.run, max_batch_size, max_wait_s, max_pending)
    else:
        raise ValueError(f"batching must be 'static' or 'continuous', got {batching!r}")
    worker.on_finished = scheduler.finished
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(scheduler.close, shutdown_timeout_s)  # accepted requests finish first
        worker.close()

    app = FastAPI(title="corematching", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.worker, app.state.limits = scheduler, worker, limits

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        return APIError(error.status_code, str(error.detail)).response()

    @app.exception_handler(Exception)
    async def unexpected_error(request, error: Exception):
        log.exception("unexpected error on %s", request.url.path)  # details stay in the server's log
        return APIError(500, f"internal error ({type(error).__name__})").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": limits.model_name, "unfinished_requests": scheduler.pending,
                "batches_run": scheduler.batches_run}

    @app.get("/metrics")
    async def metrics():  # Prometheus text format: queue length, batch size, tokens/s, KV bytes
        return PlainTextResponse(metrics_text(scheduler), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": limits.model_name, "object": "model", "created": started, "owned_by": "corematching",
             "max_model_len": limits.max_model_len,
             "default_method": {"method": method_name(limits.default_method),
                                **method_settings(limits.default_method)},
             "request_methods": documented()}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await run_in_threadpool(parse_json, await read_body(request, max_body_bytes, body_timeout_s))
        chat = await run_in_threadpool(parse_chat_request, body, limits)  # decoding images is not free
        prompt, inputs = await run_in_threadpool(prepare, worker, chat)  # the template and the processor: once
        prompt_tokens = int(inputs["input_ids"].shape[1])
        room = limits.max_model_len - prompt_tokens
        if room < 1 or (chat.max_tokens_given and chat.max_tokens > room):
            raise bad_request(
                f"this model's maximum context length is {limits.max_model_len} tokens; the messages take "
                f"{prompt_tokens} tokens (images included) and max_tokens asks for {chat.max_tokens} more",
                param="messages", code="context_length_exceeded")
        chat.max_tokens = min(chat.max_tokens, room)
        job = Job(chat, prompt, inputs, asyncio.get_running_loop())
        scheduler.submit(job)
        if chat.stream:
            return StreamingResponse(stream_events(job, scheduler, limits.model_name), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await whole_answer(job, request, scheduler, limits.model_name)

    @app.get("/examples")
    async def examples():
        from .examples import example_images

        return await run_in_threadpool(example_images, limits.model_name)

    @app.get("/")
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if api_key is not None or allowed_hosts is not None:
        app.add_middleware(Guard, api_key=api_key, allowed_hosts=allowed_hosts)
    return app


def prepare(worker: ModelWorker, chat) -> tuple[str, dict]:
    """The prompt text and the request's encoding (its only preprocessing), or a 400."""
    try:
        prompt = worker.prompt_text(chat.messages)
    except Exception as error:  # the model's chat template refuses this conversation (roles, order, ...)
        raise bad_request(f"the chat template cannot render these messages: {error}", param="messages") from None
    return prompt, worker.encode_request(prompt, [image.image for image in chat.images])


async def read_body(request: Request, limit: int, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """The body, or 413 as soon as more than `limit` bytes arrived (the rest is never read); a declared
    Content-Length over the limit is refused before reading anything. A body still incomplete after timeout_s
    gets 408 (a client that sends slowly does not hold a connection for ever)."""
    declared = request.headers.get("content-length")
    too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise too_large
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pieces = request.stream().__aiter__()
    received = bytearray()
    while True:
        try:
            piece = await asyncio.wait_for(pieces.__anext__(), max(0.0, deadline - loop.time()))
        except StopAsyncIteration:
            return bytes(received)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {timeout_s:g} s",
                           code="request_timeout") from None
        received += piece
        if len(received) > limit:
            raise too_large


async def whole_answer(job: Job, request: Request, scheduler: Scheduler, model_name: str):
    done = False
    try:
        while True:
            try:
                kind, payload = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
                continue
            if kind == "error":
                done = True
                raise payload
            if kind == "done":
                done = True
                return completion_body(job, payload, model_name)
    finally:
        if not done:
            scheduler.cancel(job)


async def stream_events(job: Job, scheduler: Scheduler, model_name: str):
    """Server-sent events in OpenAI's chunk format; a client that goes away cancels the job."""
    done = False
    try:
        yield sse(chunk(job, model_name, {"role": "assistant", "content": ""}, None))
        while True:
            kind, payload = await job.events.get()
            if kind == "text":
                yield sse(chunk(job, model_name, {"content": payload}, None))
            elif kind == "error":
                done = True
                yield sse(payload.body())
                break
            elif kind == "done":
                done = True
                final = chunk(job, model_name, {}, payload.finish_reason)
                final["corematching"] = extension(job, payload)
                yield sse(final)
                if job.request.include_usage:
                    usage = chunk(job, model_name, None, None)
                    usage["choices"], usage["usage"] = [], payload.usage.as_dict()
                    yield sse(usage)
                break
        yield "data: [DONE]\n\n"
    finally:
        if not done:
            scheduler.cancel(job)


def sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def chunk(job: Job, model_name: str, delta: dict | None, finish_reason: str | None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                        "logprobs": None}]
    return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": model_name,
            "choices": choices}


def completion_body(job: Job, outcome: Outcome, model_name: str) -> dict:
    return {
        "id": job.id,
        "object": "chat.completion",
        "created": job.created,
        "model": model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": outcome.text},
                     "finish_reason": outcome.finish_reason, "logprobs": None}],
        "usage": outcome.usage.as_dict(),
        "corematching": extension(job, outcome),
    }


def extension(job: Job, outcome: Outcome) -> dict:
    """What the response adds to OpenAI's shape: the method that ran and the patches it kept per image."""
    method = job.request.method
    return {"method": method_name(method), "settings": method_settings(method), "kept_patches": outcome.kept_patches,
            "grid": list(outcome.grid) if outcome.grid else None}
