"""What `cluster serve` starts: the deployment config (YAML or flags), the pools of workers
(Ray actors, or objects in this process for tests), and the router over them.

    model: /models/llama-3-8b          # a Hugging Face folder; absent: the tiny default
    mode: disaggregated                # or colocated
    engine: {dtype: auto, block_size: 16}          # every pool
    prefill: {num_instances: 1, engine: {max_num_batched_tokens: 4096}}
    decode: {num_instances: 1, engine: {max_num_seqs: 256}}
    colocated: {num_instances: 1}
    transfer: {lease_s: 30, grace_s: 1, deadline_s: 10}
    router: {max_in_flight: 256, max_queued: 1024, failure_policy: retry}
    grpc: {host: 127.0.0.1, port: 50051}
    http: {host: 127.0.0.1, port: 8000}
    auth_file: /etc/pd-cluster/auth.yaml   # tenants (router/tenants.py); api_key: one tenant
    tls: {cert: tls.crt, key: tls.key, client_ca: ca.crt}    # PEM files (router/tls.py)
    autoscale: {min_gpus: 2, max_gpus: 16, ttft_s: 1.0, tpot_s: 0.1}  # elastic/settings.py
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import yaml
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster import tracing
from cluster.elastic.hardware import pool_hardware
from cluster.elastic.settings import AutoscaleSettings
from cluster.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from cluster.engine.parallel import check_parallel
from cluster.engine.tokenizer import Tokenizer
from cluster.kv_transfer.layout import LayoutMismatchError
from cluster.kv_transfer.registry import REGISTRY_ACTOR, AgentRegistry, LocalKVRegistry
from cluster.router.router import Instance, Router
from cluster.router.settings import RouterSettings
from cluster.router.tenants import Auth
from cluster.router.tls import TLSFiles
from cluster.workers.base import TransferSettings
from cluster.workers.clients import LocalClient, RayClient
from cluster.workers.decode import ColocatedWorker, DecodeWorker
from cluster.workers.elastic import ElasticWorker
from cluster.workers.prefill import PrefillWorker
from cluster.workers.protocol import InstanceInfo
from cluster.workers.ranks import RAY_NAMESPACE
from cluster.workers.registry import RayKVRegistry

AUTH_FILE_ENV = "PD_CLUSTER_AUTH_FILE"
_CACHE_KEYS = {f.name for f in dataclasses.fields(CacheConfig)}
_SCHEDULER_KEYS = {f.name for f in dataclasses.fields(SchedulerConfig)}
_ENGINE_KEYS = {
    "emulation",
    "device",
    "dtype",
    "max_model_len",
    "seed",
    "attention_backend",
    "model_runner",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "pipeline_microbatches",
    "pipeline_microbatch_min_tokens",
    "dist_timeout_s",
    "fault_injection",
}
ENGINE_OPTIONS = sorted(_CACHE_KEYS | _SCHEDULER_KEYS | _ENGINE_KEYS)


@dataclass(slots=True)
class PoolSpec:
    num_instances: int = 1
    engine: dict[str, Any] = field(default_factory=dict)  # overrides of the shared engine
    num_cpus: float = 0.0  # Ray resources per instance
    num_gpus: float | None = None  # None: 1 when the engine's device is cuda, else 0
    # Custom Ray resources per instance: pins a pool to nodes that advertise them (the
    # KubeRay generator gives each GPU type's worker group one, e.g. {"pdc-A100-80GB": 1}).
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.num_instances, bool) or not isinstance(self.num_instances, int):
            raise ValueError(f"num_instances must be an integer, got {self.num_instances!r}")
        if self.num_instances < 0:
            raise ValueError(f"num_instances must be >= 0, got {self.num_instances}")
        _check_engine_keys(self.engine)


@dataclass(slots=True)
class DeploymentConfig:
    model: str | None = None
    mode: str = "disaggregated"
    served_model_name: str | None = None
    engine: dict[str, Any] = field(default_factory=dict)
    prefill: PoolSpec = field(default_factory=PoolSpec)
    decode: PoolSpec = field(default_factory=PoolSpec)
    colocated: PoolSpec = field(default_factory=PoolSpec)
    transfer: TransferSettings = field(default_factory=TransferSettings)
    router: dict[str, Any] = field(default_factory=dict)  # RouterSettings fields
    grpc: dict[str, Any] = field(default_factory=lambda: {"host": "127.0.0.1", "port": 50051})
    http: dict[str, Any] = field(default_factory=lambda: {"host": "127.0.0.1", "port": 8000})
    api_key: str | None = None  # one tenant; or auth_file for several (router/tenants.py)
    auth_file: str | None = None  # tenants YAML; else $PD_CLUSTER_AUTH_FILE
    tls: dict[str, Any] = field(default_factory=dict)  # {cert, key, client_ca}: PEM files
    ray_address: str | None = None
    drain_timeout_s: float = 30.0  # on SIGTERM/SIGINT: finish in-flight requests this long
    log_format: str = "auto"  # json | text | auto (cluster/logs.py)
    # OTLP/gRPC endpoint (host:port) for OpenTelemetry traces; None: no tracing.
    otlp_traces_endpoint: str | None = None
    # Elastic pools (cluster/elastic/): an SLO autoscaler sizes them while it serves.
    autoscale: AutoscaleSettings | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.drain_timeout_s, int | float) or self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0 seconds, got {self.drain_timeout_s!r}")
        if self.mode not in ("disaggregated", "colocated"):
            raise ValueError(f"mode must be disaggregated or colocated, got {self.mode!r}")
        _check_engine_keys(self.engine)
        if isinstance(self.autoscale, dict):
            self.autoscale = _build(AutoscaleSettings, self.autoscale, "autoscale")
        if self.autoscale is not None and self.mode != "disaggregated":
            raise ValueError("autoscale sizes prefill and decode pools: use mode disaggregated")
        roles = ("prefill", "decode") if self.mode == "disaggregated" else ("colocated",)
        for role in roles:
            if getattr(self, role).num_instances < 1:
                raise ValueError(f"{self.mode} mode needs at least one {role} instance")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeploymentConfig:
        if not isinstance(data, dict):
            raise ValueError("a deployment config is a mapping (YAML object) at the top level")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {sorted(known)}")
        data = dict(data)
        for role in ("prefill", "decode", "colocated"):
            if role in data:
                data[role] = _build(PoolSpec, data[role], role)
        if "transfer" in data:
            data["transfer"] = _build(TransferSettings, data["transfer"], "transfer")
        if data.get("autoscale") is not None:
            data["autoscale"] = _build(AutoscaleSettings, data["autoscale"], "autoscale")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> DeploymentConfig:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read config {path}: {e}") from e
        return cls.from_dict(data)

    def auth(self) -> Auth | None:
        """Who may call the APIs: the auth file's tenants, or the one API key's, or nobody
        named (no auth)."""
        path = self.auth_file or os.environ.get(AUTH_FILE_ENV)
        if path and self.api_key:
            raise ValueError("give an auth file or an API key, not both (the key is one tenant)")
        if path:
            return Auth.from_file(path)
        return Auth.single_key(self.api_key) if self.api_key else None

    def tls_files(self) -> TLSFiles | None:
        return TLSFiles.from_config(self.tls)

    def flips_roles(self) -> bool:
        """Whether the autoscaler may flip instances between prefill and decode: both roles'
        instances are one process (TP = PP = 1, or emulated) with the same KV cache."""
        if self.autoscale is None or not self.autoscale.flip or self.mode != "disaggregated":
            return False
        prefill, decode = self.engine_config("prefill"), self.engine_config("decode")
        return prefill.world_size == decode.world_size == 1 and prefill.cache == decode.cache

    def roles(self) -> tuple[str, ...]:
        return ("prefill", "decode") if self.mode == "disaggregated" else ("colocated",)

    def engine_config(self, role: str) -> EngineConfig:
        options = {**self.engine, **getattr(self, role).engine}
        cache = CacheConfig(**{k: v for k, v in options.items() if k in _CACHE_KEYS})
        scheduler = SchedulerConfig(**{k: v for k, v in options.items() if k in _SCHEDULER_KEYS})
        engine = {k: v for k, v in options.items() if k in _ENGINE_KEYS}
        world = engine.get("tensor_parallel_size", 1) * engine.get("pipeline_parallel_size", 1)
        if world > 1:  # the worker picks the real address
            engine["dist_init_method"] = "auto"
        return EngineConfig(model=self.model, role=role, cache=cache, scheduler=scheduler, **engine)

    def router_settings(self):
        known = {f.name for f in dataclasses.fields(RouterSettings)} - {"mode", "served_model_name"}
        unknown = sorted(set(self.router) - known)
        if unknown:
            raise ValueError(f"unknown router settings {unknown}; known: {sorted(known)}")
        return RouterSettings(
            mode=self.mode, served_model_name=self.served_model_name, **self.router
        )


def _check_engine_keys(options: dict[str, Any]) -> None:
    if not isinstance(options, dict):
        raise ValueError("engine settings are a mapping of option: value")
    unknown = sorted(set(options) - set(ENGINE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown engine settings {unknown}; known: {ENGINE_OPTIONS}")


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in {where}; known: {sorted(known)}")
    return cls(**data)


_WORKERS = {"prefill": PrefillWorker, "decode": DecodeWorker, "colocated": ColocatedWorker}


def _worker_class(config: DeploymentConfig, role: str):
    """An ElasticWorker where the autoscaler may flip a role (workers/elastic.py)."""
    return ElasticWorker if config.flips_roles() else _WORKERS[role]


def _worker_args(config: DeploymentConfig, role: str, instance_id: str, registry,
                 hardware: str | None = None) -> tuple:  # fmt: skip
    if config.flips_roles():
        engines = {r: _engine(config, r, hardware) for r in ("prefill", "decode")}
        return (instance_id, engines, config.transfer, registry)
    engine = _engine(config, role, hardware)
    if role == "colocated":
        return (instance_id, engine)
    return (instance_id, engine, config.transfer, registry)


def _engine(config: DeploymentConfig, role: str, hardware: str | None) -> EngineConfig:
    """`role`'s engine config; an emulated one on `hardware` (a catalog name) when given. (A
    real engine's device type is where Ray places it: the accelerator_type option.)"""
    engine = config.engine_config(role)
    if hardware is None or engine.emulation is None:
        return engine
    emulation = dataclasses.replace(engine.emulation, hardware=hardware)
    return dataclasses.replace(engine, emulation=emulation)


def _start_types(config: DeploymentConfig) -> dict[str, str | None]:
    """The device type each role's first instances start on: under autoscale with mixed
    pools, the role's first listed type (checked here, before anything starts); else None,
    the config's own."""
    if config.autoscale is None or config.mode != "disaggregated":
        return dict.fromkeys(config.roles())
    kinds = pool_hardware(config)
    return {role: kinds.start_type(role) for role in config.roles()}


async def create_local(model_dir: str | None = None, mode: str = "colocated", **settings: Any
                       ) -> Router:  # fmt: skip
    """Real engines in this process, no Ray: 1 colocated instance, or 1 prefill + 1 decode
    (KV over NIXL between two agents of this process; the data plane over loopback)."""
    config = DeploymentConfig(model=model_dir, mode=mode)
    return await start_local(config, RouterSettings(mode=mode, **settings))


async def start_local(config: DeploymentConfig, settings=None):
    """Every instance as an object in this process (no Ray): tests and quick local runs."""
    types = _start_types(config)
    launcher = LocalLauncher(config)
    clients = [await launcher.start(role, types[role]) for role in config.roles()
               for _ in range(getattr(config, role).num_instances)]  # fmt: skip
    return await _router(config, settings, clients, launcher)


class LocalLauncher:
    """Starts and stops the instances of one deployment in this process (elastic pools:
    cluster/elastic/; under autoscale, disaggregated instances are ElasticWorkers)."""

    def __init__(self, config: DeploymentConfig):
        self.config = config
        self.registry = LocalKVRegistry()
        self.clients: list = []
        self._numbers = collections.defaultdict(itertools.count)  # per role

    def new_id(self, role: str) -> str:
        return f"{role}-{next(self._numbers[role])}"

    async def start(self, role: str, hardware: str | None = None) -> tuple[str, LocalClient]:
        """One instance of `role`; emulated, on `hardware` (a catalog name) when given."""
        if hardware is not None and self.config.engine_config(role).emulation is None:
            raise ValueError(f"a {role} instance in this process runs on this machine: device "
                             f"type {hardware} needs an emulated deployment or Ray")  # fmt: skip
        args = _worker_args(self.config, role, self.new_id(role), self.registry, hardware)
        worker = await asyncio.to_thread(_worker_class(self.config, role), *args)
        self.clients.append(client := LocalClient(worker))
        return role, client

    async def stop(self, client: LocalClient) -> None:
        self.clients.remove(client)
        await client.kill()

    async def shutdown(self) -> None:
        for client in list(self.clients):
            await self.stop(client)


def _check_parallel(config: DeploymentConfig) -> None:
    """Refuse, before any actor starts, a pool whose TP/PP the model cannot take (when the
    checkpoint is readable here; the engine checks again wherever it runs)."""
    if config.model is None or not (Path(config.model) / "config.json").is_file():
        return
    model = ModelConfig.from_pretrained(config.model)
    for role in config.roles():
        engine = config.engine_config(role)
        try:
            check_parallel(model, engine.tensor_parallel_size, engine.pipeline_parallel_size)
        except ValueError as e:
            raise ValueError(f"the {role} pool: {e}") from None


async def start_ray(config: DeploymentConfig, settings=None, ready_timeout_s: float = 600.0,
                    detached_as: str | None = None):  # fmt: skip
    """Every instance as a Ray actor (restarted by Ray if it dies) in the current Ray
    cluster; call ray.init() first.

    The actors belong to this process and die with it (`cluster serve`), unless `detached_as`
    tags the pools (a tag stable for one deployment: deploy/serve_app.py makes it from the
    Serve application and its config). Then they are detached actors named by the tag and
    outlive this process: a later start_ray with the same tag re-attaches to the live ones
    (and starts those that are gone), the router's shutdown only disconnects from them, and
    `stop_detached(tag)` ends them. Elastic pools (`autoscale`) re-attach to every instance
    that runs under the tag, in the role it serves now, whatever the pools' sizes became."""
    _check_parallel(config)
    types = _start_types(config)
    launcher = RayLauncher(config, detached_as)
    try:
        if detached_as is not None and config.autoscale is not None:
            clients = await launcher.attach()  # elastic: whatever runs under the tag now
        else:
            clients = [await launcher.start(role, types[role]) for role in config.roles()
                       for _ in range(getattr(config, role).num_instances)]  # fmt: skip
        return await asyncio.wait_for(_router(config, settings, clients, launcher),
                                      ready_timeout_s)  # fmt: skip
    except BaseException:
        await launcher.shutdown()
        if detached_as is not None:  # no one else would end them: the caller never got a router
            await asyncio.to_thread(stop_detached, detached_as)
        raise


class RayLauncher:
    """Starts and stops the instances of one deployment on Ray, at start-up and, for elastic
    pools (cluster/elastic/), while it serves. `detached_as`: see start_ray."""

    def __init__(self, config: DeploymentConfig, detached_as: str | None = None):
        self.config = config
        self.detached = detached_as is not None
        # The KV registry actor is the deployment's, not whichever worker's would create it
        # first (and take it down when it dies): this process's, or, detached, the cluster's.
        self.registry = (_detached_registry() if self.detached
                         else RayKVRegistry(namespace=RAY_NAMESPACE).actor)  # fmt: skip
        self.deployment_id = detached_as if self.detached else uuid.uuid4().hex[:6]
        self.clients: list = []
        self._groups: dict[int, Any] = {}  # id(client) -> its placement group
        self._next: dict[str, int] = collections.defaultdict(int)  # per role

    def new_id(self, role: str) -> str:
        n = self._next[role]
        self._next[role] += 1
        return f"{role}-{n}-{self.deployment_id}"

    async def attach(self) -> list[tuple[str, RayClient]]:
        """Detached elastic pools: a client of every instance running under this tag (each
        found by its actor's name, made for its first role), connected, in the role it serves
        now; then one instance more of a role none serves, or the config's pools when none
        runs at all. New ids continue after every id in use."""
        names = sorted(i for i, tag in await asyncio.to_thread(_instances)
                       if tag == self.deployment_id)  # fmt: skip
        clients = []
        for instance_id in names:
            first_role = instance_id.partition("-")[0]
            self._reserve(instance_id)
            actor_cls = ray.remote(_worker_class(self.config, first_role))
            client, pg = await _start_instance(self.config, first_role, instance_id, actor_cls,
                                               detached=True)  # fmt: skip
            self.clients.append(client)
            if pg is not None:
                self._groups[id(client)] = pg
            info = await client.connect()
            self._reserve(info.instance_id)
            clients.append((info.role, client))
        for role in self.config.roles():
            if not any(r == role for r, _ in clients):
                for _ in range(1 if clients else getattr(self.config, role).num_instances):
                    clients.append(await self.start(role))
        return clients

    def _reserve(self, instance_id: str) -> None:
        role, _, rest = instance_id.partition("-")
        n = rest.partition("-")[0]
        if n.isdigit():
            self._next[role] = max(self._next[role], int(n) + 1)

    async def start(self, role: str, hardware: str | None = None) -> tuple[str, RayClient]:
        """One instance of `role` as an actor: on `hardware` when given (emulated: the
        catalog type it emulates; real: Ray's accelerator_type)."""
        actor_cls = ray.remote(_worker_class(self.config, role))
        client, pg = await _start_instance(self.config, role, self.new_id(role), actor_cls,
                                           self.detached, hardware)  # fmt: skip
        self.clients.append(client)
        if pg is not None:
            self._groups[id(client)] = pg
        return role, client

    async def stop(self, client: RayClient) -> None:
        """End one instance (its actor, its placement group): the caller drained it."""
        self.clients.remove(client)
        client.close()
        await asyncio.to_thread(ray.kill, client.actor, no_restart=True)
        pg = self._groups.pop(id(client), None)
        if pg is not None:
            await asyncio.to_thread(ray.util.remove_placement_group, pg)
        if client.info is not None:  # (a killed worker cannot remove its agents itself)
            await asyncio.to_thread(_forget_agents, {client.info.instance_id})

    async def shutdown(self) -> None:
        for client in self.clients:
            client.close()
        if self.detached:
            return  # the pools outlive this router: stop_detached(tag) ends them
        for client in list(self.clients):
            await self.stop(client)
        ray.kill(self.registry, no_restart=True)


async def _start_instance(config: DeploymentConfig, role: str, instance_id: str, actor_cls,
                          detached: bool, hardware: str | None = None):  # fmt: skip
    """One instance's worker actor (rank 0; its placement group first when it has more ranks)
    and the router's client of it. Detached, both are found by name when they run already.
    `hardware`: see RayLauncher.start."""
    pool, engine = getattr(config, role), _engine(config, role, hardware)
    num_gpus = pool.num_gpus
    if num_gpus is None:
        num_gpus = 1 if engine.device.startswith("cuda") else 0
    name = f"pd-cluster-{instance_id}"
    pg, options = None, {}
    resources = dict(pool.resources)
    if hardware is not None and engine.emulation is None:  # a real device of that type
        if engine.world_size > 1:  # (the bundle holds it: Ray's accelerator_type resource)
            resources[f"accelerator_type:{hardware}"] = _ACCELERATOR_SHARE
        else:
            options["accelerator_type"] = hardware
    if engine.world_size > 1:
        pg = await _instance_placement_group(engine, pool, num_gpus, name if detached else None,
                                             resources)  # fmt: skip
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, 0)
    if detached:
        options.update(lifetime="detached", get_if_exists=True)
    actor = actor_cls.options(
        runtime_env=_runtime_env(config),
        name=name,
        namespace=RAY_NAMESPACE,
        num_cpus=pool.num_cpus,
        num_gpus=num_gpus,
        resources=resources,
        max_restarts=-1,
        max_task_retries=0,
        **options,
    )
    args = _worker_args(config, role, instance_id, "ray", hardware)
    if not detached:
        return RayClient(actor.remote(*args)), pg
    return _NamedClient(name, lambda: actor.remote(*args)), pg


logger = logging.getLogger(__name__)


class _NamedClient(RayClient):
    """The client of a detached instance. Ray restarts a crashed one under its name; one
    killed for good (`ray.kill(..., no_restart=True)`, or an old Serve replica's teardown
    racing a new one's start) is started again here, at the router's next reconnect, so that
    a pool does not stay short while its router lives."""

    def __init__(self, name: str, start):
        super().__init__(start())
        self.name, self._start = name, start

    async def connect(self, timeout: float | None = None) -> InstanceInfo:
        try:
            return await super().connect(timeout)
        except Exception:
            if not await asyncio.to_thread(_is_named_actor, self.name):
                logger.warning("instance actor %s is gone for good: starting it again", self.name)
                self.actor = await asyncio.to_thread(self._start)
            raise


def _is_named_actor(name: str) -> bool:
    """Whether an actor of that name lives (or is restarting) in RAY_NAMESPACE."""
    try:
        ray.get_actor(name, namespace=RAY_NAMESPACE)
    except ValueError:
        return False
    return True


def _detached_registry():
    """The cluster's KV registry actor, created detached unless it runs already: pools that
    outlive their router must not lose their registry with it. It stays up while the Ray
    cluster does (an idle actor of no resources): every deployment in the cluster shares it,
    keyed by agent name."""
    registry = ray.remote(num_cpus=0, max_restarts=-1)(AgentRegistry)
    return registry.options(
        name=REGISTRY_ACTOR, namespace=RAY_NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()


def pool_tags() -> set[str]:
    """The tags of the pools that run in this Ray cluster (start_ray's `detached_as`, or the
    random id of a pool that belongs to its process)."""
    return {tag for _, tag in _instances()}


def stop_detached(tag: str) -> list[str]:
    """End the pools that start_ray(detached_as=tag) started: their actors, placement groups
    and entries in the KV registry (which stays: it is the cluster's). Returns their instance
    ids."""
    instance_ids = sorted(instance_id for instance_id, t in _instances() if t == tag)
    for instance_id in instance_ids:
        name = f"pd-cluster-{instance_id}"
        try:
            ray.kill(ray.get_actor(name, namespace=RAY_NAMESPACE), no_restart=True)
        except ValueError:
            pass  # gone already (or only its placement group was left)
        pg = _named_placement_group(name)
        if pg is not None:
            ray.util.remove_placement_group(pg)
    _forget_agents(set(instance_ids))
    return instance_ids


def _instances() -> set[tuple[str, str]]:
    """(instance id, pool tag) of every instance named in this cluster: by its worker actor,
    or by its placement group alone."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == RAY_NAMESPACE]  # fmt: skip
    names += [
        pg["name"]
        for pg in ray.util.placement_group_table().values()
        if pg.get("name") and pg.get("state") != "REMOVED"
    ]
    return {parsed for name in names if (parsed := _parse_instance_name(name)) is not None}


def _parse_instance_name(name: str) -> tuple[str, str] | None:
    """`pd-cluster-{role}-{n}-{tag}` -> (instance id, tag); None for any other name (a
    follower rank's `pd-cluster-{instance id}-rank{r}` included: it goes with its worker)."""
    if name.rpartition("-rank")[2].isdigit():
        return None
    for role in _WORKERS:
        head = f"pd-cluster-{role}-"
        if name.startswith(head):
            n, _, tag = name[len(head) :].partition("-")
            if n.isdigit() and tag:
                return name.removeprefix("pd-cluster-"), tag
    return None


def _named_placement_group(name: str):
    try:
        return ray.util.get_placement_group(name)
    except ValueError:
        return None


def _forget_agents(instance_ids: set[str]) -> None:
    """Remove the KV agents of stopped instances from the registry (a killed worker cannot)."""
    try:
        registry = ray.get_actor(REGISTRY_ACTOR, namespace=RAY_NAMESPACE)
        names = ray.get(registry.names.remote(), timeout=10)
    except (ValueError, ray.exceptions.RayError):
        return
    for agent in names:  # rank 0's is the instance id; rank r's "{instance id}/rank{r}"
        if agent.partition("/")[0] in instance_ids:
            registry.remove.remote(agent)


def _runtime_env(config: DeploymentConfig) -> dict | None:
    """What a worker process needs from its environment: the trace endpoint (tracing.py)."""
    if not config.otlp_traces_endpoint:
        return None
    return {"env_vars": {tracing.ENDPOINT_ENV: config.otlp_traces_endpoint}}


async def _instance_placement_group(engine: EngineConfig, pool: PoolSpec, num_gpus: float,
                                    name: str | None = None,
                                    resources: dict[str, float] | None = None):  # fmt: skip
    """One bundle per rank of a parallel instance, all on one node (STRICT_PACK: the ranks'
    process group and, on GPUs, NVLink); the worker (rank 0) goes in bundle 0 with the pool's
    resources (or `resources`), its follower ranks in the others (ranks.py). Named: detached,
    and the one of that name if it exists already."""
    pg = _named_placement_group(name) if name else None
    if pg is None:
        first = {"CPU": max(pool.num_cpus, _BUNDLE_CPU), **(resources or pool.resources)}
        rank = {"CPU": _BUNDLE_CPU}
        if num_gpus:
            first["GPU"] = num_gpus
            rank["GPU"] = 1
        bundles = [first] + [rank] * (engine.world_size - 1)
        lifetime = "detached" if name else None
        pg = ray.util.placement_group(bundles, "STRICT_PACK", name=name or "", lifetime=lifetime)
    await asyncio.wrap_future(pg.ready().future())
    return pg


_BUNDLE_CPU = 0.01  # a bundle needs some resource; ranks use what their engines need
_ACCELERATOR_SHARE = 0.001  # what Ray's accelerator_type option asks of a node's type resource


def _check_kv_compatible(infos: list[InstanceInfo]) -> None:
    """Refuse, at start-up, pools whose KV cannot move between them (dtype, block size,
    model...): otherwise every request would fail its pull, three times."""
    layouts = [(info.role, info.kv_layout) for info in infos if info.kv_layout is not None]
    for role, layout in layouts[1:]:
        try:
            layouts[0][1].check_compatible(layout)
        except LayoutMismatchError as e:
            raise ValueError(
                f"the {layouts[0][0]} and {role} pools cannot exchange KV ({e}): give both "
                "the same model, dtype and block_size"
            ) from None


async def _router(config: DeploymentConfig, settings, clients, launcher):
    tracing.init(config.otlp_traces_endpoint, "pd-cluster-router")
    infos = await asyncio.gather(*(client.connect() for _, client in clients))
    _check_kv_compatible(infos)
    instances = [  # (info.role: an elastic instance may serve another role than it began in)
        Instance(info.instance_id, info.role, client)
        for (_, client), info in zip(clients, infos, strict=True)
    ]
    tokenizer = await asyncio.to_thread(Tokenizer.from_pretrained, infos[0].model_path)
    settings = settings or config.router_settings()
    router = Router(instances, settings, tokenizer, on_shutdown=launcher.shutdown)
    router.launcher = launcher  # (elastic pools start and stop instances through it)
    return router
