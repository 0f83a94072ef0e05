"""The router's gRPC front end: pdcluster.v1.PDCluster (proto/pdcluster/v1) on grpc.aio, with
standard health checking, server reflection and an optional bearer-token check.

Protobuf stops here: requests become the router's types (cluster/router/types.py), chunks
become responses, one conversion each way. A RouterError becomes the call's status; a client
that goes away (cancel, deadline, closed stream) closes the router's stream, which aborts the
request.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.api.pdcluster.v1 import pdcluster_pb2 as pb
from cluster.api.pdcluster.v1 import pdcluster_pb2_grpc as pb_grpc
from cluster.background import spawn
from cluster.engine.sampling_params import SamplingParams, StructuredOutputs
from cluster.router.router import Router
from cluster.router.tenants import Auth, Tenant
from cluster.router.tls import TLSFiles
from cluster.router.types import (
    GenerateInput,
    InvalidRequest,
    Overloaded,
    RouterError,
    StreamChunk,
)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PDCluster"].full_name  # pdcluster.v1.PDCluster
_OPTIONAL_PARAMS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "logprobs",
                    "repetition_penalty", "prompt_logprobs")  # fmt: skip


# -- proto -> router ------------------------------------------------------------------------


def to_generate_input(request: pb.GenerateRequest) -> GenerateInput:
    """Raises InvalidRequest for a missing prompt or bad sampling parameters."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidRequest("GenerateRequest needs a prompt: set `text` or `token_ids`")
    return GenerateInput(
        prompt=request.text if kind == "text" else list(request.token_ids.ids),
        params=to_sampling_params(request.sampling_params),
        request_id=request.request_id or None,
        model=request.model or None,
        priority=request.priority,
        cache_salt=request.cache_salt or None,
        failure_policy=request.failure_policy or None,
        n=request.n or 1,
        best_of=request.best_of if request.HasField("best_of") else None,
    )


def to_sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    """Unset optional fields keep SamplingParams' defaults."""
    given = {name: getattr(msg, name) for name in _OPTIONAL_PARAMS if msg.HasField(name)}
    try:
        return SamplingParams(
            **given,
            stop=list(msg.stop),
            stop_token_ids=list(msg.stop_token_ids),
            ignore_eos=msg.ignore_eos,
            include_stop_str_in_output=msg.include_stop_str_in_output,
            presence_penalty=msg.presence_penalty,
            frequency_penalty=msg.frequency_penalty,
            logit_bias=dict(msg.logit_bias) or None,
            min_tokens=msg.min_tokens,
            structured_outputs=_structured_outputs(msg),
        )
    except ValueError as e:
        raise InvalidRequest(f"sampling_params: {e}") from None


def _structured_outputs(msg: pb.SamplingParams) -> StructuredOutputs | None:
    if not msg.HasField("structured_outputs"):
        return None
    so = msg.structured_outputs
    kind = so.WhichOneof("kind")
    if kind is None:
        raise InvalidRequest("sampling_params.structured_outputs: set one of its kinds")
    if kind == "json_schema":
        return StructuredOutputs(json=so.json_schema)
    if kind == "choice":
        return StructuredOutputs(choice=list(so.choice.choices))
    return StructuredOutputs(**{kind: getattr(so, kind)})


# -- router -> proto ------------------------------------------------------------------------


def to_response(chunk: StreamChunk) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=chunk.request_id,
        token_ids=chunk.token_ids,
        text=chunk.text,
        logprobs=_token_logprobs(chunk),
        finish_reason=chunk.finish_reason or "",
        stop_reason="" if chunk.stop_reason is None else str(chunk.stop_reason),
        usage=pb.Usage(**dataclasses.asdict(chunk.usage)) if chunk.usage else None,
        timing=pb.Timing(**dataclasses.asdict(chunk.timing)) if chunk.timing else None,
        prompt_logprobs=_prompt_logprobs(chunk),
        index=chunk.index,
    )


def _prompt_logprobs(chunk: StreamChunk) -> list[pb.TokenLogprob]:
    """One entry per prompt token; the first (which has no logprob) is empty."""
    if chunk.prompt_logprobs is None:
        return []
    return [
        pb.TokenLogprob()
        if entry is None
        else pb.TokenLogprob(logprob=entry[0],
                             top=[pb.TopLogprob(token_id=t, logprob=x) for t, x in entry[1]])
        for entry in chunk.prompt_logprobs
    ]  # fmt: skip


def _token_logprobs(chunk: StreamChunk) -> list[pb.TokenLogprob]:
    if chunk.logprobs is None:
        return []
    tops = chunk.top_logprobs or [[] for _ in chunk.logprobs]
    return [
        pb.TokenLogprob(logprob=lp, top=[pb.TopLogprob(token_id=t, logprob=x) for t, x in top])
        for lp, top in zip(chunk.logprobs, tops, strict=True)
    ]


def complete_response(choices: dict[int, pb.CompleteResponse]) -> pb.CompleteResponse:
    """One choice: itself. n > 1: choice 0's fields, and every choice under `choices`."""
    if len(choices) <= 1:
        return next(iter(choices.values()), pb.CompleteResponse())
    response = pb.CompleteResponse()
    response.CopyFrom(choices[min(choices)])
    response.choices.extend(choices[i] for i in sorted(choices))
    return response


def merge_response(total: pb.CompleteResponse, part: pb.GenerateResponse) -> None:
    """Repeated fields concatenate and set scalars overwrite (the wire format's own merge
    rule, the two messages share field numbers); only text needs joining by hand."""
    text = total.text + part.text
    total.MergeFromString(part.SerializeToString())
    total.text = text


# -- the service ----------------------------------------------------------------------------


class PDClusterServicer(pb_grpc.PDClusterServicer):
    def __init__(self, router: Router, auth: Auth | None = None):
        self.router = router
        self.auth = auth

    def tenant(self, context) -> Tenant | None:
        """The caller's tenant (the interceptor has already refused unknown keys)."""
        if self.auth is None:
            return None
        metadata = dict(context.invocation_metadata() or ()) if context is not None else {}
        return self.auth.authenticate(metadata.get("authorization"))

    async def Generate(self, request, context) -> None:
        # A coroutine that writes, not an async generator: a cancelled call then raises here,
        # inside `_stream`, which closes the router's generator at once.
        async with self._stream(request, context) as chunks:
            async for chunk in chunks:
                await context.write(to_response(chunk))

    async def Complete(self, request, context) -> pb.CompleteResponse:
        choices: dict[int, pb.CompleteResponse] = {}
        async with self._stream(request, context) as chunks:
            async for chunk in chunks:
                merge_response(choices.setdefault(chunk.index, pb.CompleteResponse()),
                               to_response(chunk))  # fmt: skip
        return complete_response(choices)

    async def Abort(self, request, context) -> pb.AbortResponse:
        found = await self.router.abort(request.request_id, self.tenant(context))
        return pb.AbortResponse(found=found)

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        return pb.ModelInfo(**dataclasses.asdict(self.router.model_info))

    async def GetClusterStatus(self, request, context) -> pb.ClusterStatus:
        tenant = self.tenant(context)
        if tenant is not None and not tenant.admin:  # hosts and instance ids: operators only
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"tenant {tenant.name!r} may not read the cluster's status (needs admin: true)",
            )
        return json_format.ParseDict(await self.router.cluster_status(), pb.ClusterStatus())

    @asynccontextmanager
    async def _stream(self, request, context) -> AsyncIterator[AsyncIterator[StreamChunk]]:
        """The router's chunks for `request`; a RouterError ends the call with its status and
        leaving the block, however, closes the router's stream."""
        try:
            inp = to_generate_input(request)
            inp.trace_context = _trace_context(context.invocation_metadata())
            inp.tenant = self.tenant(context)
            async with aclosing(self.router.generate(inp)) as chunks:
                yield chunks
        except RouterError as e:
            if isinstance(e, Overloaded):
                context.set_trailing_metadata((("retry-after", str(e.retry_after_s)),))
            await context.abort(grpc.StatusCode[e.grpc_code], str(e))


def _trace_context(metadata) -> dict[str, str] | None:
    """A client's W3C trace context from gRPC metadata (traceparent, tracestate)."""
    found = {k: v[:512] for k, v in (metadata or ()) if k in ("traceparent", "tracestate")}
    return found if "traceparent" in found else None


# -- malformed messages ---------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Malformed:
    """Bytes protobuf could not parse (a string field that is not UTF-8, a truncated field):
    the client's error, answered INVALID_ARGUMENT (grpc itself would say INTERNAL)."""

    error: str


class _Capture:
    """Stands in for a server to take the generated method handlers."""

    handlers: dict

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers = handlers


def _add_servicer(servicer: PDClusterServicer, server: grpc.aio.Server) -> None:
    """The generated registration, with every request parsed leniently (_Malformed)."""
    capture = _Capture()
    pb_grpc.add_PDClusterServicer_to_server(servicer, capture)
    handlers = {name: _lenient(handler) for name, handler in capture.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _lenient(handler):
    parse = handler.request_deserializer

    def deserialize(raw: bytes):
        try:
            return parse(raw)
        except DecodeError as e:
            return _Malformed(str(e))

    def guard(method):
        async def guarded(request, context):
            if isinstance(request, _Malformed):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request is not a valid protobuf message ({request.error}): every "
                    "string field must be UTF-8",
                )
            return await method(request, context)

        return guarded

    kind = "unary_stream" if handler.response_streaming else "unary_unary"
    return handler._replace(
        request_deserializer=deserialize, **{kind: guard(getattr(handler, kind))}
    )


# -- authentication -------------------------------------------------------------------------


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <key>` of a tenant on PDCluster methods; health
    checking and reflection stay open (like vLLM's /health) so probes need no secret."""

    def __init__(self, auth: Auth):
        self._auth = auth

    async def intercept_service(self, continuation, handler_call_details):
        if not handler_call_details.method.startswith(f"/{SERVICE_NAME}/"):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if self._auth.authenticate(metadata.get("authorization")) is not None:
            return await continuation(handler_call_details)
        return grpc.unary_unary_rpc_method_handler(_deny)


async def _deny(request, context) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or wrong API key: send gRPC metadata `authorization: Bearer <key>`",
    )


# -- the server -----------------------------------------------------------------------------


_HEALTH_INTERVAL_S = 1.0


async def _set_health(servicer, ready: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if ready
        else (health_pb2.HealthCheckResponse.NOT_SERVING)
    )
    for service in (health.OVERALL_HEALTH, SERVICE_NAME):
        await servicer.set(service, status)


async def _track_health(router, servicer) -> None:
    """SERVING while every pool has a healthy instance (Router.is_ready), else NOT_SERVING."""
    ready = router.is_ready()
    while True:
        await asyncio.sleep(_HEALTH_INTERVAL_S)
        if router.is_ready() != ready:
            ready = not ready
            await _set_health(servicer, ready)


async def start_grpc_server(
    router: Router,
    host: str = "127.0.0.1",
    port: int = 50051,
    api_key: str | None = None,
    auth: Auth | None = None,
    tls: TLSFiles | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Serve `router` on host:port (0 picks a free port); returns the started server and the
    bound port. With `auth` (tenants) or `api_key` (one tenant) PDCluster methods need a
    key; with `tls`, TLS only (mutual with a client CA). Stop with `await server.stop(s)`."""
    auth = auth or (Auth.single_key(api_key) if api_key else None)
    server = grpc.aio.server(interceptors=[ApiKeyInterceptor(auth)] if auth else [])
    _add_servicer(PDClusterServicer(router, auth), server)
    health_servicer = health.aio.HealthServicer()
    await _set_health(health_servicer, router.is_ready())
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    spawn(_track_health(router, health_servicer))  # held until the loop ends
    services = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(services, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls is None:
        bound_port = server.add_insecure_port(address)
    else:
        bound_port = server.add_secure_port(address, tls.grpc_credentials())
    await server.start()
    return server, bound_port
