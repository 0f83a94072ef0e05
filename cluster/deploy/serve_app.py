"""The Ray Serve application a KubeRay RayService runs (`import_path:
cluster.deploy.serve_app:build`, its `args` a `cluster serve --config` mapping).

One ingress deployment holds what the `cluster serve` driver holds on a single machine: it
starts the prefill/decode pools as Ray actors (placed by their GPU resources on the worker
groups), owns the router, and answers both APIs through Serve's proxies — the OpenAI HTTP app
through the HTTP proxy (`__serve_build_asgi_app__`), PDCluster gRPC through the gRPC proxy
(methods named like the RPCs; `grpcOptions.grpcServicerFunctions` registers the service).
The router stays one replica: it is the one place that knows every pool's load.

Serve's health check calls `check_health` (the router's readiness: every role has a healthy
instance); on shutdown the replica drains (refuses new requests, finishes in-flight ones up to
`drain_timeout_s`) before the pools go.
"""

from __future__ import annotations

import hmac
from typing import Any

import grpc
from ray import serve

from cluster.api.pdcluster.v1 import pdcluster_pb2 as pb
from cluster.launch import DeploymentConfig, start_ray
from cluster.router.grpc_server import (
    PDClusterServicer,
    merge_response,
    to_generate_input,
    to_response,
)
from cluster.router.http_server import build_http_app
from cluster.router.types import RouterError

SERVE_MAX_QUEUED = 64  # requests Serve may hold before the replica takes them


class _Denied(Exception):
    pass


@serve.ingress()
class PDClusterIngress:
    async def __init__(self, config: dict[str, Any]):
        self.config = DeploymentConfig.from_dict(config)
        self.router = await start_ray(self.config)
        self._servicer = PDClusterServicer(self.router)

    def __serve_build_asgi_app__(self):
        return build_http_app(self.router, self.config.api_key)

    async def check_health(self) -> None:
        if not self.router.is_ready():
            raise RuntimeError("a pool has no healthy instance (or the router is draining)")

    async def __del__(self) -> None:
        await self.router.drain(self.config.drain_timeout_s)
        await self.router.shutdown()

    # -- PDCluster over Serve's gRPC proxy ------------------------------------------------------

    def _check_key(self, grpc_context) -> None:
        key = self.config.api_key
        if not key:
            return
        metadata = dict(grpc_context.invocation_metadata()) if grpc_context else {}
        given = metadata.get("authorization", "").encode("utf-8", "surrogatepass")
        if not hmac.compare_digest(given, f"Bearer {key}".encode()):
            _fail(grpc_context, "UNAUTHENTICATED", "missing or wrong API key")
            raise _Denied

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None):
        try:
            self._check_key(grpc_context)
            async for chunk in self.router.generate(to_generate_input(request)):
                yield to_response(chunk)
        except _Denied:
            return
        except RouterError as e:
            _fail(grpc_context, e.grpc_code, str(e))

    async def Complete(self, request: pb.GenerateRequest, grpc_context=None):
        response = pb.CompleteResponse()
        async for part in self.Generate(request, grpc_context):
            merge_response(response, part)
        return response

    async def Abort(self, request: pb.AbortRequest, grpc_context=None):
        return await self._unary("Abort", request, grpc_context, pb.AbortResponse)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, grpc_context=None):
        return await self._unary("GetModelInfo", request, grpc_context, pb.ModelInfo)

    async def GetClusterStatus(self, request: pb.GetClusterStatusRequest, grpc_context=None):
        return await self._unary("GetClusterStatus", request, grpc_context, pb.ClusterStatus)

    async def _unary(self, method: str, request, grpc_context, empty):
        try:
            self._check_key(grpc_context)
        except _Denied:
            return empty()
        return await getattr(self._servicer, method)(request, grpc_context)


def _fail(grpc_context, code: str, details: str) -> None:
    if grpc_context is not None:
        grpc_context.set_code(grpc.StatusCode[code])
        grpc_context.set_details(details)


def build(args: dict[str, Any]) -> serve.Application:
    """The application for `import_path: cluster.deploy.serve_app:build`. `args` is a
    deployment config; validated here so that a bad one fails `serve deploy`, not a replica."""
    config = DeploymentConfig.from_dict(dict(args))
    deployment = serve.deployment(
        PDClusterIngress,
        name="PDClusterIngress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 1},
        # The router admits max_in_flight and queues max_queued itself (429 beyond); Serve in
        # front of it holds at most SERVE_MAX_QUEUED more (503 beyond), never an unbounded
        # queue at the proxy or the handle.
        max_ongoing_requests=config.router_settings().max_in_flight
        + config.router_settings().max_queued,
        max_queued_requests=SERVE_MAX_QUEUED,
        graceful_shutdown_timeout_s=config.drain_timeout_s + 5,
        health_check_period_s=5,
    )
    return deployment.bind(dict(args))
