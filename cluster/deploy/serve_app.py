"""The Ray Serve application a KubeRay RayService runs (`import_path:
cluster.deploy.serve_app:build`, its `args` a `cluster serve --config` mapping).

One ingress deployment holds what the `cluster serve` driver holds on a single machine: it
starts the prefill/decode pools as Ray actors (placed by their GPU resources on the worker
groups), owns the router, and answers both APIs through Serve's proxies — the OpenAI HTTP app
through the HTTP proxy (`__serve_build_asgi_app__`), PDCluster gRPC through the gRPC proxy
(methods named like the RPCs; `grpcOptions.grpcServicerFunctions` registers the service).
The router stays one replica: it is the one place that knows every pool's load. With an
`autoscale` section it also runs the SLO autoscaler (cluster/elastic/), which grows, shrinks
and flips the detached pools; the Ray autoscaler brings the nodes their actors ask for.

The pools outlive the replica. Their instances are detached Ray actors named by `pool_tag`
(the application's name and a digest of what the pools run), so a replica that Serve restarts
(it crashed, ran out of memory, lost its node) re-attaches to the running pools by name: their
requests and caches survive; only the requests the dead router held are lost. Ray restarts an
instance that dies, whoever owns the router. What ends the pools:

    the application deleted (serve delete, serve shutdown, a RayService config without it):
        the replica's graceful stop (`__del__`) sees it DELETING, drains, then ends them
    redeployed with other pool settings (model, engine, pools, transfer): the new replica
        starts pools of a new tag and ends the old tag's once the old replica has drained
    redeployed with router settings only (router, ports, keys, drain): same tag, same pools
    the Ray cluster deleted (under KubeRay, with its RayService): everything

Serve's health check (`check_health`) is liveness: whether this replica can still serve (its
router's background tasks run). A pool with no healthy instance is readiness, not a reason to
restart the router: GET /health answers 503, requests get 503 / UNAVAILABLE once no instance
came back within `router.instance_wait_s`, and the pools' state is in GetClusterStatus.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any
from urllib.parse import quote

import grpc
from ray import serve
from ray.serve.schema import ApplicationStatus

from cluster.api.pdcluster.v1 import pdcluster_pb2 as pb
from cluster.background import spawn
from cluster.elastic.autoscaler import start_autoscaler
from cluster.launch import DeploymentConfig, pool_tags, start_ray, stop_detached
from cluster.router.grpc_server import (
    PDClusterServicer,
    complete_response,
    merge_response,
    to_generate_input,
    to_response,
)
from cluster.router.http_server import build_http_app
from cluster.router.tenants import Tenant
from cluster.router.types import RouterError

SERVE_MAX_QUEUED = 64  # requests Serve may hold before the replica takes them
# Config keys the router alone reads: changing them redeploys the replica, not the pools.
ROUTER_ONLY_KEYS = frozenset(
    {"router", "grpc", "http", "api_key", "auth_file", "tls", "served_model_name",
     "drain_timeout_s", "log_format", "autoscale"}
)  # fmt: skip
_SERVE_CALL_TIMEOUT_S = 10.0  # one question to the Serve controller
_STALE_POLL_S = 1.0  # how often a new replica looks whether the old one has gone

logger = logging.getLogger("ray.serve")  # (into the replica's log)


class _Denied(Exception):
    pass


@serve.ingress()
class PDClusterIngress:
    async def __init__(self, config: dict[str, Any]):
        self.config = DeploymentConfig.from_dict(config)
        context = serve.get_replica_context()
        self._app, self._deployment = context.app_name, context.deployment
        self.pool_tag = pool_tag(self._app, config)
        # Before this replica's pools start: an old config's may hold the GPUs they need.
        self._stale_pools = spawn(self._stop_stale_pools())
        self.auth = self.config.auth()  # tenants (or the one key): checked on both APIs
        self.router = await start_ray(self.config, detached_as=self.pool_tag)
        self._servicer = PDClusterServicer(self.router, self.auth)
        # Elastic pools: this replica's autoscaler sizes them (it re-attached to every
        # instance of the tag, whatever sizes an earlier replica left).
        self.autoscaler = None
        if self.config.autoscale is not None:
            self.autoscaler = start_autoscaler(self.router, self.config)

    def __serve_build_asgi_app__(self):
        return build_http_app(self.router, auth=self.auth)

    async def check_health(self) -> None:
        """Liveness only (see the module's docstring): Serve restarts a replica that fails it,
        and a restart cannot bring back an instance (Ray does) nor end a drain sooner."""
        problem = self.router.liveness_problem()
        if problem is not None:
            raise RuntimeError(problem)

    async def __del__(self) -> None:
        """Serve's graceful stop: drain, disconnect, and end the pools only if the application
        itself goes (a replica that is merely replaced leaves them to its successor)."""
        self._stale_pools.cancel()
        if self.autoscaler is not None:
            await self.autoscaler.stop()
        await self.router.drain(self.config.drain_timeout_s)
        await self.router.shutdown()
        if await _application_deleted(self._app):
            stopped = await asyncio.to_thread(stop_detached, self.pool_tag)
            logger.info("application %s deleted: stopped its instances %s", self._app, stopped)

    async def _stop_stale_pools(self) -> None:
        """End the pools an earlier config of this application left (a redeploy with other
        pool settings), once no other replica of this deployment is left to drain on them."""
        stale = await asyncio.to_thread(_stale_tags, self._app, self.pool_tag)
        if not stale:
            return
        while await asyncio.to_thread(_num_replicas, self._app, self._deployment) != 1:
            await asyncio.sleep(_STALE_POLL_S)
        for tag in sorted(stale):
            stopped = await asyncio.to_thread(stop_detached, tag)
            logger.info("stopped the instances of an earlier config of %s: %s", self._app, stopped)

    # -- PDCluster over Serve's gRPC proxy ------------------------------------------------------

    def _tenant(self, grpc_context) -> Tenant | None:
        """The caller's tenant (None: no auth); _Denied, with UNAUTHENTICATED set, for a key
        that is no tenant's."""
        tenant = self._servicer.tenant(grpc_context)
        if self.auth is not None and tenant is None:
            _fail(grpc_context, "UNAUTHENTICATED", "missing or wrong API key")
            raise _Denied
        return tenant

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None):
        try:
            tenant = self._tenant(grpc_context)
            inp = to_generate_input(request)
            inp.tenant = tenant
            async for chunk in self.router.generate(inp):
                yield to_response(chunk)
        except _Denied:
            return
        except RouterError as e:
            _fail(grpc_context, e.grpc_code, str(e))

    async def Complete(self, request: pb.GenerateRequest, grpc_context=None):
        choices: dict[int, pb.CompleteResponse] = {}
        async for part in self.Generate(request, grpc_context):
            merge_response(choices.setdefault(part.index, pb.CompleteResponse()), part)
        return complete_response(choices)

    async def Abort(self, request: pb.AbortRequest, grpc_context=None):
        return await self._unary("Abort", request, grpc_context, pb.AbortResponse)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, grpc_context=None):
        return await self._unary("GetModelInfo", request, grpc_context, pb.ModelInfo)

    async def GetClusterStatus(self, request: pb.GetClusterStatusRequest, grpc_context=None):
        return await self._unary("GetClusterStatus", request, grpc_context, pb.ClusterStatus)

    async def _unary(self, method: str, request, grpc_context, empty):
        try:
            tenant = self._tenant(grpc_context)
        except _Denied:
            return empty()
        if method == "GetClusterStatus" and tenant is not None and not tenant.admin:
            # (the servicer would abort(); Serve's context has none)
            message = f"tenant {tenant.name!r} may not read the cluster's status (needs admin)"
            _fail(grpc_context, "PERMISSION_DENIED", message)
            return empty()
        return await getattr(self._servicer, method)(request, grpc_context)


def pool_tag(app_name: str, config: dict[str, Any]) -> str:
    """The name of an application's pools in the Ray cluster (launch.start_ray's
    `detached_as`): the application's name, URL-quoted (one-to-one, and nothing an actor name
    or a metric label minds), and a digest of the config without its router-only keys. The
    same application with the same pool settings finds its pools again; other settings start
    new ones."""
    pools = {k: v for k, v in config.items() if k not in ROUTER_ONLY_KEYS}
    digest = hashlib.sha256(json.dumps(pools, sort_keys=True, default=str).encode())
    return f"{quote(app_name, safe='')}-{digest.hexdigest()[:8]}"


def _stale_tags(app_name: str, current: str) -> set[str]:
    """The tags of the application's pools other than `current` (pool_tag's form)."""
    app = quote(app_name, safe="")
    stale = set()
    for tag in pool_tags():
        name, _, digest = tag.rpartition("-")
        if name == app and len(digest) == 8 and tag != current:
            stale.add(tag)
    return stale


def _num_replicas(app_name: str, deployment: str) -> int:
    """Replicas of the deployment in any state, this one included (-1: Serve did not say)."""
    try:
        app = serve.status().applications[app_name]
        return sum(app.deployments[deployment].replica_states.values())
    except Exception:  # noqa: BLE001 - the controller restarting, the app being deleted
        return -1


async def _application_deleted(app_name: str) -> bool:
    """Whether Serve stops this replica because the application goes (deleted, or Serve shut
    down), not the replica alone (moved off a draining node, replaced by an update, found
    unhealthy). A controller that does not answer is Serve going down: the pools go too."""
    try:
        status = await asyncio.wait_for(asyncio.to_thread(serve.status), _SERVE_CALL_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - no controller to ask
        return True
    app = status.applications.get(app_name)
    return app is None or app.status == ApplicationStatus.DELETING


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
