"""An OpenAI-compatible HTTP server over one `Engine` (FastAPI + uvicorn: the `serve` extra).

    POST /v1/chat/completions   chat (the model's chat template), streaming or not
    POST /v1/completions        plain text or token-id prompts, streaming or not
    GET  /v1/models             the one model served (and /v1/models/{id})
    GET  /health                liveness, queue length, the fallback's current figures

One model is loaded once. Requests run one at a time (batch size 1) on one engine
thread, in arrival order: on an edge device one sequence already uses the device, and
a speculative step fills it with a whole tree, so batching would buy little and cost
a KV cache per sequence. At most `max_queue` requests wait or run; more are refused
with 429. Each request reuses the longest prefix of its prompt that the KV cache still
holds (a chat client resends the whole history every turn, so turn n+1 prefills only
its new tokens; `usage.prompt_tokens_details.cached_tokens` says how many came from
the cache).

Limits are checked before a request is queued, and before a streamed answer starts
(no 200 and then an error), and refused with a 4xx in OpenAI's error format
(`{"error": {"message", "type", "param", "code"}}`), so the official client raises
`BadRequestError` and the like with one clear sentence: a prompt over
`max_prompt_tokens` or over the model's length (code `context_length_exceeded`),
max_tokens over `max_tokens`, unsupported options (n > 1, logprobs, penalties, tools),
values of the wrong JSON type (strict: "stream": "yes" is no boolean, a null content
no message). The `model` field is accepted and ignored (one model). temperature
defaults to 1 as in OpenAI's API; 0 is greedy and exact.

Hostile input stays cheap (docs/serving.md lists every limit): `_Guard`, in front of
FastAPI, checks the API key in constant time (on everything but /health, the API
documentation included), admits at most `max_queue` requests in progress, and is the
one reader of request bodies: it counts bytes as they arrive, whatever the framing
(Content-Length or chunked), and answers 413 past `max_body_bytes` without holding
more. A prompt is bounded by its length before it is tokenized
(`Engine.check_prompt_size`), and tokenized off the event loop with the GIL released,
so /health and other clients never wait for it.

This module imports FastAPI and pydantic at import time; only `streamspec serve`,
tests and embedding code import it, never `streamspec.runtime` itself.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from streamspec.errors import StreamspecError

from .checks import is_integer
from .engine import Engine, Generation, PromptTooLong

log = logging.getLogger("streamspec.serve")


@dataclass
class ServerSettings:
    """What a server allows. max_tokens: the most new tokens one request may ask for
    (also the chat default); max_prompt_tokens: the longest prompt (None: what the
    model's length allows); max_queue: requests waiting or running at once."""

    model_name: str = "streamspec"
    max_tokens: int = 512
    max_prompt_tokens: Optional[int] = None
    max_queue: int = 64
    api_key: Optional[str] = None
    speculative: bool = True
    max_body_bytes: int = 1 << 20
    completion_default_tokens: int = 16  # /v1/completions without max_tokens, as OpenAI

    def check(self, engine: Engine) -> int:
        """Refuse (one sentence) settings that make no sense for `engine`; returns the
        prompt limit in tokens (max_prompt_tokens, or what the model's length allows)."""
        for name in ("max_tokens", "max_queue", "max_body_bytes", "completion_default_tokens"):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise StreamspecError(f"The server's {name} must be a positive integer, got {value!r}.")
        longest = engine.max_length - 1  # the answer needs at least one row
        limit = self.max_prompt_tokens
        if limit is not None and (not is_integer(limit) or not 1 <= limit <= longest):
            raise StreamspecError(f"--max-prompt-tokens must be between 1 and {longest} (the model's maximum length "
                                  f"of {engine.max_length} tokens less one for the answer), got {limit!r}.")
        return limit or longest


class RequestError(Exception):
    """A refused request: an HTTP status and one sentence, sent in OpenAI's error format."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def kind(self) -> str:
        default = "invalid_request_error" if self.status < 500 else "server_error"
        return {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(self.status, default)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ------------------------------------------------------------------------------ request bodies
# Strict: JSON types are taken as they are ("stream": "yes" is no boolean, 1.0 no
# integer), as OpenAI's API does; floats still take integers (temperature: 0).
_STRICT = ConfigDict(extra="ignore", strict=True)  # extra: OpenAI clients send options we have no use for
MAX_STOPS = 4  # stop sequences per request, as OpenAI allows


class _StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: StrictBool = False


class _Body(BaseModel):
    model_config = _STRICT

    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[StrictInt] = None  # not OpenAI's; vLLM and llama.cpp take it too
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: Optional[StrictInt] = None
    stream: StrictBool = False
    stream_options: Optional[_StreamOptions] = None
    n: StrictInt = 1
    logprobs: Union[StrictBool, StrictInt, None] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class _TextPart(BaseModel):
    model_config = _STRICT

    type: StrictStr
    text: Optional[StrictStr] = None


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[_TextPart]]  # required, and never null: a null content is no message


class ChatRequest(_Body):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[StrictInt] = None
    tools: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None


class CompletionRequest(_Body):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    echo: StrictBool = False
    suffix: Optional[StrictStr] = None
    best_of: Optional[StrictInt] = None


# ------------------------------------------------------------------------------ the engine thread
@dataclass
class Job:
    """One request for the engine thread: its prompt ids and generation options. Events
    ("piece", text), then ("done", Generation) or ("error", RequestError) come back on
    `events`, in the event loop of the request."""

    ids: list[int]
    options: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float = 0.0

    def run(self, engine: Engine) -> Optional[tuple[str, Any]]:
        """Generate, sending the text pieces; return the last event ("done" or "error"),
        or None when the client left."""
        self.started_at = time.perf_counter()
        if self.cancelled.is_set():  # the client left while it waited
            return None
        try:
            pieces = engine.stream(self.ids, reuse_cache=True, **self.options)
            for piece in pieces:
                if self.cancelled.is_set():
                    pieces.close()  # stops the generation at this step
                    return None
                self.emit(("piece", piece))
            return "done", engine.last_result
        except StreamspecError as error:
            return "error", RequestError(400, str(error))
        except Exception:  # a bug or a device failure: answer 500, keep serving
            log.exception("generation failed")
            return "error", RequestError(500, "The generation failed inside the server; see its log.")

    def emit(self, event: tuple[str, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled.set()

    async def stream(self) -> AsyncIterator[tuple[str, Any]]:
        """The job's events until "done" or "error"; leaving early cancels the job."""
        try:
            while True:
                kind, value = await self.events.get()
                yield kind, value
                if kind != "piece":
                    return
        finally:
            self.cancelled.set()


class EngineWorker:
    """The one thread that runs the engine, jobs in arrival order (batch size 1)."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine = engine
        self.max_queue = max_queue
        self._jobs: queue.Queue = queue.Queue()
        self._count = 0  # jobs queued or running
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="streamspec-engine", daemon=True)
        self._thread.start()

    @property
    def load(self) -> int:
        return self._count

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._count >= self.max_queue:
                raise busy(self._count, self.max_queue)
            self._count += 1
        self._jobs.put(job)

    def stop(self) -> None:
        self._jobs.put(None)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                last = job.run(self.engine)
            finally:
                with self._lock:  # before the client hears the end, so that /health agrees
                    self._count -= 1
            if last is not None:
                job.emit(last)


def busy(count: int, limit: int) -> RequestError:
    return RequestError(429, f"The server is busy: {count} requests are queued or running (limit {limit}); "
                             "retry later.", code="server_busy")


# ------------------------------------------------------------------------------ the app
def create_app(engine: Engine, settings: Optional[ServerSettings] = None) -> FastAPI:
    """The FastAPI app serving `engine` (the engine is used by the app's own thread only)."""
    settings = settings or ServerSettings()
    prompt_limit = settings.check(engine)
    worker = EngineWorker(engine, settings.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.stop()

    app = FastAPI(title="streamspec", description="OpenAI-compatible API over a streamspec engine",
                  lifespan=lifespan)
    app.state.worker, app.state.settings = worker, settings
    app.add_middleware(_Guard, settings=settings)
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError):
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):  # unknown paths, wrong methods
        return RequestError(error.status_code, str(error.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request")
        return RequestError(400, f"Invalid request ({message}).", param=where or None).response()

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "streamspec"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "batch_size": 1, "queue": worker.load,
                "max_queue": settings.max_queue, "max_length": engine.max_length,
                "speculative": settings.speculative and engine.can_speculate,
                "fallback": engine.fallback.summary() if engine.fallback else None}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != settings.model_name:
            raise RequestError(404, f"This server serves {settings.model_name!r}, not {model_id!r}.",
                               param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        if body.tools:
            raise RequestError(400, "Tools are not supported by this server.", param="tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise RequestError(400, "Only text responses are supported (response_format).", param="response_format")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text_of(m.content)}
                    for m in body.messages]
        if not messages:
            raise RequestError(400, "messages must hold at least one message.", param="messages")
        ids = await _tokenize(engine, messages, prompt_limit, "messages")
        wanted = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        job = _job(engine, settings, prompt_limit, body, ids, wanted, settings.max_tokens)
        return await _respond(worker, job, body, settings.model_name, "chat")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        for name, unsupported in (("echo", body.echo), ("suffix", body.suffix), ("best_of", (body.best_of or 1) > 1)):
            if unsupported:
                raise RequestError(400, f"{name} is not supported by this server.", param=name)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise RequestError(400, "One prompt per request: batches are not supported.", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise RequestError(400, "The prompt is empty.", param="prompt")
        ids = await _tokenize(engine, prompt, prompt_limit, "prompt")
        job = _job(engine, settings, prompt_limit, body, ids, body.max_tokens, settings.completion_default_tokens)
        return await _respond(worker, job, body, settings.model_name, "text")

    return app


class _Guard:
    """ASGI middleware in front of FastAPI: the API key, the number of requests in
    progress, and the one reader of request bodies (FastAPI then reads the copy it is
    handed). Refusals close the connection, so an unread body costs nothing more."""

    def __init__(self, app: Any, settings: ServerSettings):
        self.app, self.settings = app, settings
        self.in_progress = 0  # requests with a body, from their first byte to their answer's last (one event loop)
        self._expected = f"Bearer {settings.api_key}".encode() if settings.api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._authorize(scope)
        if error is None and _has_body(scope):  # any method: a body sent to a GET is read and counted too
            if self.in_progress < self.settings.max_queue:
                await self._admitted(scope, receive, send)
                return
            error = busy(self.in_progress, self.settings.max_queue)
        if error is not None:
            await _refuse(error, scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorize(self, scope: dict) -> Optional[RequestError]:
        """With a key set, every path but /health needs it (/docs and /openapi.json
        too: they describe the API to whoever asks). compare_digest takes the same time
        however much of the key a guess gets right."""
        if self._expected is None or scope["path"] == "/health":
            return None
        given = next((value for name, value in scope["headers"] if name.lower() == b"authorization"), b"")
        if hmac.compare_digest(given, self._expected):
            return None
        return RequestError(401, "The API key is missing or wrong.", code="invalid_api_key")

    async def _admitted(self, scope: dict, receive: Any, send: Any) -> None:
        """Read the body (refused past the limit), then run the app on it; the request
        counts as in progress until its answer's last byte is handed to the server."""
        self.in_progress += 1
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                self.in_progress -= 1

        async def send_then_release(message: dict) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                release()  # before the client sees the end, so that its next request is admitted
            await send(message)

        try:
            body = await read_body(scope, receive, self.settings.max_body_bytes)
            if isinstance(body, RequestError):
                await _refuse(body, scope, receive, send)
            elif body is not None:  # None: the client left
                await self.app(scope, _replay(body, receive), send_then_release)
        finally:
            release()


def _has_body(scope: dict) -> bool:
    """Whether the request announces a body: a Content-Length above 0, or chunks."""
    headers = dict((name.lower(), value) for name, value in scope["headers"])
    return headers.get(b"content-length", b"0").strip() not in (b"0", b"") or b"transfer-encoding" in headers


async def read_body(scope: dict, receive: Any, limit: int) -> Union[bytes, RequestError, None]:
    """The request body, counted as it arrives whatever the framing (Content-Length,
    chunked, none): a RequestError (413) as soon as it passes `limit` bytes, having held
    at most `limit` bytes plus one chunk; None when the client leaves first."""
    announced = next((value for name, value in scope["headers"] if name.lower() == b"content-length"), b"")
    if announced.isdigit() and int(announced) > limit:
        return too_large(limit, int(announced))
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def too_large(limit: int, announced: Optional[int] = None) -> RequestError:
    size = f"is {announced} bytes" if announced is not None else "goes on"
    return RequestError(413, f"The request body {size}, more than this server's limit of {limit} bytes.",
                        code="request_too_large")


def _replay(body: bytes, receive: Any) -> Any:
    """An ASGI receive that hands on the body already read, then the real events (a
    disconnect, which a streamed answer listens for)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again() -> dict:
        return pending.pop() if pending else await receive()

    return receive_again


async def _refuse(error: RequestError, scope: dict, receive: Any, send: Any) -> None:
    """Answer with the error and close the connection (the body, if any, stays unread)."""
    response = error.response()
    response.headers["connection"] = "close"
    await response(scope, receive, send)


def _text_of(content: Union[str, list[_TextPart]]) -> str:
    if isinstance(content, str):
        return content
    if any(part.type != "text" or part.text is None for part in content):
        raise RequestError(400, "Only text message content is supported (parts of type \"text\" with a text).",
                           param="messages")
    return "".join(part.text for part in content)


async def _tokenize(engine: Engine, prompt: Any, limit: int, param: str) -> list[int]:
    """Prompt ids, off the event loop (a long prompt takes a while to render and encode;
    the tokenizer releases the GIL for it). A prompt whose length alone shows it is over
    `limit` tokens is refused before it is tokenized."""
    try:
        return await asyncio.to_thread(engine.prompt_ids, prompt, limit)
    except PromptTooLong as error:
        raise RequestError(400, str(error), param=param, code="context_length_exceeded") from None
    except StreamspecError as error:
        raise RequestError(400, str(error), param=param) from None


def _job(engine: Engine, settings: ServerSettings, prompt_limit: int, body: _Body, ids: list[int],
         wanted: Optional[int], default_tokens: int) -> Job:
    """Check the request against the limits (one sentence each) and make its job. Every
    check happens here, before the job is queued: a streamed answer never starts (200)
    for a request that the engine would then refuse."""
    if body.n != 1:
        raise RequestError(400, "n must be 1: one completion per request.", param="n")
    if body.logprobs:
        raise RequestError(400, "logprobs are not supported by this server.", param="logprobs")
    if body.presence_penalty or body.frequency_penalty:
        raise RequestError(400, "Presence and frequency penalties are not supported by this server.",
                           param="presence_penalty" if body.presence_penalty else "frequency_penalty")
    room = engine.room_for(len(ids))
    if len(ids) > prompt_limit or room < 1:
        raise RequestError(400, f"The prompt has {len(ids)} tokens, more than this server's limit of "
                                f"{prompt_limit} (the model's maximum context length is {engine.max_length} "
                                "tokens); shorten it.", param="messages" if isinstance(body, ChatRequest) else "prompt",
                           code="context_length_exceeded")
    if wanted is None:
        max_tokens = min(default_tokens, settings.max_tokens, room)
    elif wanted < 1:
        raise RequestError(400, f"max_tokens must be at least 1, got {wanted}.", param="max_tokens")
    elif wanted > settings.max_tokens:
        raise RequestError(400, f"max_tokens is {wanted}, more than this server's limit of {settings.max_tokens}.",
                           param="max_tokens")
    elif wanted > room:
        raise RequestError(400, f"The prompt has {len(ids)} tokens and max_tokens asks for {wanted} more, beyond "
                                f"the model's maximum context length of {engine.max_length} tokens; lower "
                                "max_tokens or shorten the prompt.", param="max_tokens",
                           code="context_length_exceeded")
    else:
        max_tokens = wanted
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOPS:
        raise RequestError(400, f"stop holds {len(stop)} sequences; at most {MAX_STOPS} are allowed.", param="stop")
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    try:  # the engine's own checks of these options, so that the two never disagree
        params, stop = engine.check_options(len(ids), max_tokens, temperature, top_p, body.top_k or 0, body.seed, stop)
    except StreamspecError as error:
        raise RequestError(400, str(error)) from None
    options = dict(max_new_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p,
                   top_k=params.top_k, seed=params.seed, stop=stop, speculative=settings.speculative)
    return Job(ids, options, asyncio.get_running_loop())


async def _respond(worker: EngineWorker, job: Job, body: _Body, model: str, kind: str):
    """Queue the job; answer with one JSON body, or stream server-sent events."""
    worker.submit(job)  # raises 429 when the queue is full, before any answer starts
    ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    reply = _Reply(ident, int(time.time()), model, kind)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(reply.events(job, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    async for event, value in job.stream():
        if event == "error":
            raise value
        if event == "done":
            return reply.whole(value, job)
    raise RequestError(500, "The generation ended without a result.")


@dataclass
class _Reply:
    """OpenAI's response shapes for one request (chat: message / delta; text: text)."""

    ident: str
    created: int
    model: str
    kind: str  # "chat" | "text"

    def _base(self, chunk: bool) -> dict[str, Any]:
        kinds = {"chat": ("chat.completion", "chat.completion.chunk"), "text": ("text_completion", "text_completion")}
        return {"id": self.ident, "object": kinds[self.kind][chunk], "created": self.created, "model": self.model}

    def _choice(self, text: Optional[str], finish: Optional[str], chunk: bool, first: bool = False) -> dict:
        if self.kind == "text":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if not chunk:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}
        delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def whole(self, result: Generation, job: Job) -> dict[str, Any]:
        return {**self._base(False), "choices": [self._choice(result.text, _finish_reason(result), False)],
                "usage": _usage(result), "streamspec": _figures(result, job)}

    async def events(self, job: Job, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: a first chunk (chat: the role), one per text piece, the
        finish reason, the usage chunk when asked, then [DONE]."""
        base = self._base(True)
        if self.kind == "chat":
            yield _sse({**base, "choices": [self._choice(None, None, True, first=True)]})
        async for event, value in job.stream():
            if event == "piece":
                yield _sse({**base, "choices": [self._choice(value, None, True)]})
            elif event == "error":  # headers are sent: the error travels as an event
                yield _sse(value.body())
                break
            else:
                yield _sse({**base, "choices": [self._choice(None, _finish_reason(value), True)]})
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": _usage(value), "streamspec": _figures(value, job)})
        yield "data: [DONE]\n\n"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _finish_reason(result: Generation) -> str:
    return "length" if result.stats.stop_reason == "length" else "stop"


def _usage(result: Generation) -> dict[str, Any]:
    stats = result.stats
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": len(result.token_ids),
            "total_tokens": stats.prompt_tokens + len(result.token_ids),
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def _figures(result: Generation, job: Job) -> dict[str, Any]:
    """streamspec's own figures for a request (an extra field; OpenAI clients keep it)."""
    stats = result.stats
    log.info("%d prompt tokens (%d cached) + %d new, %.2f tokens/pass, %.1f tokens/s, waited %.0f ms",
             stats.prompt_tokens, stats.cached_tokens, stats.new_tokens, stats.mean_accepted_length,
             stats.tokens_per_second, 1000 * (job.started_at - job.queued_at))
    return {"speculative": stats.speculative, "mean_accepted_length": stats.mean_accepted_length,
            "tokens_per_second": stats.tokens_per_second, "cached_tokens": stats.cached_tokens,
            "fallback_steps": stats.fallback_steps, "queue_seconds": job.started_at - job.queued_at}


# ------------------------------------------------------------------------------ running it
class ServerThread:
    """uvicorn serving an app in a background thread (tests, embedding, the load test).

        with ServerThread(create_app(engine), port=0) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))  # bound here, so port 0 gets a free port and the URL is known
        self.host, self.port = host, self._socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise StreamspecError("The server thread did not start.")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()
