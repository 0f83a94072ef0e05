"""The router's OpenAI-compatible HTTP front end: a Starlette app over `Router`, served by
uvicorn inside the caller's event loop.

    POST /v1/completions, /v1/chat/completions   JSON, or SSE when stream=true
    GET  /v1/models                              the one served model
    GET  /health                                 200 ready / 503 not
    GET  /metrics                                Prometheus text

docs/architecture.md places it in router/ beside the gRPC servicer: both are thin edges that
turn wire requests into `GenerateInput` and `RouterError`s into statuses (openai_protocol.py
holds the shapes). A client that goes away is noticed while it waits, not only on the next
write: the request's task is cancelled and the router's stream closed, which aborts the
request and frees its KV (invariant 2, docs/architecture.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from cluster.router.openai_protocol import (
    OpenAIRequest,
    ResponseFormatter,
    ServedModel,
    error_body,
    model_list,
    parse_chat_request,
    parse_completion_request,
    router_error_body,
)
from cluster.router.tenants import Auth
from cluster.router.tls import TLSFiles
from cluster.router.types import (
    InvalidRequest,
    Overloaded,
    RequestFailed,
    RouterError,
    StreamChunk,
)
from cluster.router.validation import MAX_BODY_BYTES, parse_json_body

logger = logging.getLogger(__name__)
T = TypeVar("T")

REQUEST_ID_HEADER = "X-Request-Id"
TENANT_SCOPE_KEY = "pdcluster.tenant"  # the ASGI scope entry _Authenticate fills
# What a 500 says: no exception text (it may carry hosts, actor ids, tracebacks); the log has it.
INTERNAL_ERROR_MESSAGE = "internal server error: the server log has the details; retry the request"
_CLIENT_CLOSED_STATUS = 499  # nginx's "client closed request": nobody reads it, logs do
_SSE_DONE = b"data: [DONE]\n\n"
_BODY_TIMEOUT_S = 30.0  # a body that trickles in slower than this is refused (408)
_INLINE_BODY_BYTES = 16 * 1024  # smaller bodies are parsed on the event loop, larger off it


def build_http_app(router: Any, api_key: str | None = None, auth: Auth | None = None) -> Starlette:
    """The HTTP app over `router`. With `auth` (tenants) or `api_key` (one tenant), /v1/* needs
    `Authorization: Bearer <key>` (vLLM's --api-key) and each request runs as the key's
    tenant; /health and /metrics stay open for probes and scrapers."""
    auth = auth or (Auth.single_key(api_key) if api_key else None)
    api = _OpenAIRoutes(router)
    routes = [
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
    ]
    middleware = [Middleware(_Authenticate, auth=auth)] if auth else []
    handlers = {
        RouterError: _router_error_response,
        HTTPException: _http_error_response,
        Exception: _internal_error_response,
    }
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)


class _OpenAIRoutes:
    def __init__(self, router: Any) -> None:
        self._router = router
        self._served = ServedModel.from_router(router)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, await self._parse(request, parse_completion_request))

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, await self._parse(request, parse_chat_request))

    async def _parse(self, request: Request, parse) -> OpenAIRequest:
        """Body → OpenAIRequest. A large body is parsed (JSON, chat template, tokenizer)
        off the event loop, so it never stalls other streams."""
        raw = await _read_body(request)
        request_id = request.headers.get(REQUEST_ID_HEADER)

        def work() -> OpenAIRequest:
            return parse(parse_json_body(raw), self._served, request_id)

        if len(raw) <= _INLINE_BODY_BYTES:
            return work()
        return await asyncio.to_thread(work)

    async def models(self, request: Request) -> Response:
        return JSONResponse(model_list(self._served))

    async def health(self, request: Request) -> Response:
        return Response(status_code=200 if self._router.is_ready() else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(await self._router.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    async def _generate(self, request: Request, parsed: OpenAIRequest) -> Response:
        parsed.input.trace_context = _trace_context(request.headers)
        parsed.input.tenant = request.scope.get(TENANT_SCOPE_KEY)
        formatter = ResponseFormatter.for_request(parsed, self._served)
        headers = {REQUEST_ID_HEADER: parsed.request_id}
        chunks = self._router.generate(parsed.input)
        try:
            if not parsed.stream:
                collected = await _until_disconnect(request.receive, _collect(chunks))
                return JSONResponse(formatter.response(collected), headers=headers)
            # Admission errors (400/429/503) come before the first chunk: answer them with a
            # status, not inside a 200 stream.
            first = await _until_disconnect(request.receive, _first(chunks))
        except _ClientGone:
            return Response(status_code=_CLIENT_CLOSED_STATUS)
        events = _sse_events(formatter, _prepend(first, chunks))
        return _EventStreamResponse(events, headers=headers)


def _trace_context(headers) -> dict[str, str] | None:
    """A client's W3C trace context (traceparent, tracestate), for the request's trace."""
    if "traceparent" not in headers:
        return None
    return {k: headers[k][:512] for k in ("traceparent", "tracestate") if k in headers}


# -- the router's stream -----------------------------------------------------------------------


async def _collect(chunks: AsyncGenerator[StreamChunk, None]) -> list[StreamChunk]:
    try:
        return [chunk async for chunk in chunks]
    finally:
        await chunks.aclose()


async def _first(chunks: AsyncGenerator[StreamChunk, None]) -> StreamChunk:
    try:
        return await anext(chunks)
    except StopAsyncIteration:
        raise RequestFailed("the router's stream ended without any output") from None
    except BaseException:
        await chunks.aclose()
        raise


async def _prepend(
    first: StreamChunk, rest: AsyncGenerator[StreamChunk, None]
) -> AsyncGenerator[StreamChunk, None]:
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()  # closing this stream must close the router's: that aborts it


async def _sse_events(
    formatter: ResponseFormatter, chunks: AsyncGenerator[StreamChunk, None]
) -> AsyncGenerator[bytes, None]:
    """OpenAI's event stream: chunks, the usage chunk if asked for, [DONE]. An error after
    the first chunk can only travel inside the stream, as an error object (vLLM does too)."""
    try:
        for opening in formatter.opening_chunks():
            yield _sse(opening)
        last = None
        async for chunk in chunks:
            last = chunk
            event = formatter.stream_chunk(chunk)
            if event is not None:
                yield _sse(event)
        if formatter.request.include_usage and last is not None and last.usage is not None:
            yield _sse(formatter.usage_chunk(last.usage, last.timing))
    except RouterError as exc:
        yield _sse(router_error_body(exc))
    except Exception:
        logger.exception("request %s failed mid-stream", formatter.request.request_id)
        yield _sse(error_body(INTERNAL_ERROR_MESSAGE, "InternalServerError", 500))
    finally:
        await chunks.aclose()
    yield _SSE_DONE


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class _EventStreamResponse(StreamingResponse):
    """SSE that watches for the client leaving while it waits for the next event, and always
    closes its event stream (Starlette's leaves the generator to the garbage collector)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None], headers: dict[str, str]) -> None:
        super().__init__(events, headers={**headers, "Cache-Control": "no-cache"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with contextlib.suppress(_ClientGone):
            await _until_disconnect(receive, self._pump(send))

    async def _pump(self, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code}
        try:
            await send({**start, "headers": self.raw_headers})
            async for event in self.body_iterator:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-write (uvicorn's ClientDisconnected)
            pass
        finally:
            await self.body_iterator.aclose()


class _ClientGone(Exception):
    pass


async def _until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (its cleanup runs to the end)
    and raise _ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))
    if task.cancelled():
        raise _ClientGone()
    return task.result()


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# -- errors and auth ---------------------------------------------------------------------------


class PayloadTooLarge(InvalidRequest):
    http_status = 413
    error_type = "PayloadTooLargeError"


class BodyTimeout(InvalidRequest):
    http_status = 408
    error_type = "RequestTimeoutError"


async def _read_body(request: Request) -> bytes:
    """The body, at most MAX_BODY_BYTES (413 beyond, before reading it when the length is
    announced), within _BODY_TIMEOUT_S (408: a slow-loris client holds nothing for long)."""
    too_large = PayloadTooLarge(
        f"the request body is larger than {MAX_BODY_BYTES} bytes: shorten the prompt"
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_large

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), _BODY_TIMEOUT_S)
    except TimeoutError:
        raise BodyTimeout(
            f"the request body did not arrive within {_BODY_TIMEOUT_S:.0f} s"
        ) from None


def _json_error(body: dict[str, Any], status: int) -> Response:
    return Response(_dumps(body), status_code=status, media_type="application/json")


async def _router_error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RouterError)
    response = _json_error(router_error_body(exc), exc.http_status)
    if isinstance(exc, Overloaded):
        response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


async def _http_error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error_type = "NotFoundError" if exc.status_code == 404 else "BadRequestError"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return _json_error(error_body(message, error_type, exc.status_code), exc.status_code)


async def _internal_error_response(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s", request.url.path, exc_info=exc)
    return _json_error(error_body(INTERNAL_ERROR_MESSAGE, "InternalServerError", 500), 500)


class _Authenticate:
    """ASGI middleware: /v1/* needs `Authorization: Bearer <key>` of a tenant (else a 401
    error object); the tenant goes into the scope for the handler."""

    def __init__(self, app: ASGIApp, auth: Auth) -> None:
        self._app = app
        self._auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _needs_key(scope):
            tenant = self._auth.authenticate(dict(scope["headers"]).get(b"authorization"))
            if tenant is None:
                body = error_body(
                    "invalid or missing API key: send 'Authorization: Bearer <key>'",
                    "AuthenticationError",
                    401,
                )
                await _json_error(body, 401)(scope, receive, send)
                return
            scope[TENANT_SCOPE_KEY] = tenant
        await self._app(scope, receive, send)


def _needs_key(scope: Scope) -> bool:
    return scope["path"].startswith("/v1") and scope["method"] != "OPTIONS"


# -- serving -----------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the process embedding it owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def start_http_server(
    router: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    auth: Auth | None = None,
    tls: TLSFiles | None = None,
) -> tuple[uvicorn.Server, asyncio.Task, int]:
    """Serve the app in the running loop; returns (server, its task, the bound port) once it
    accepts connections. port=0 picks a free port; with `tls`, HTTPS only. Stop with
    `stop_http_server`."""
    config = uvicorn.Config(
        build_http_app(router, api_key, auth),
        host=host,
        port=port,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=5,  # open streams get this long to end, then are dropped
        # Connections beyond what admission could ever take get uvicorn's 503 at once, so a
        # flood of idle or slow connections cannot exhaust the process (probes keep room).
        limit_concurrency=_connection_limit(router),
        timeout_keep_alive=5,
        **(tls.uvicorn_options() if tls else {}),
    )
    server = _Server(config)
    task = asyncio.create_task(_serve(server), name=f"http-server-{host}:{port}")
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise RuntimeError(f"HTTP server on {host}:{port} stopped during startup")
        await asyncio.sleep(0.01)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    return server, task, bound_port


def _connection_limit(router: Any) -> int:
    settings = getattr(router, "settings", None)
    if settings is None:
        return 2048
    return settings.max_in_flight + settings.max_queued + 64


async def stop_http_server(server: uvicorn.Server, task: asyncio.Task) -> None:
    server.should_exit = True
    await task


async def _serve(server: uvicorn.Server) -> None:
    try:
        await server.serve()
    except SystemExit as exc:  # uvicorn exits the process when it cannot bind; we must not
        raise RuntimeError(
            f"HTTP server failed to start on {server.config.host}:{server.config.port} "
            f"(see the log above)"
        ) from exc
