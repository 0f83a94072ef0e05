"""`cluster deploy kuberay --plan PLAN`: a placement plan → the Kubernetes objects that run it
under KubeRay, with no hand editing.

    RayService  <name>
      serveConfigV2     the Serve application cluster.deploy.serve_app:build, its args the
                        deployment (mode, instances per pool, the devices and the custom
                        resource that pins each pool to its GPU type), gRPC options with
                        the PDCluster servicer; HTTP :8000, gRPC :9000 on every node's proxy
      rayClusterConfig  head group (Serve controller, proxies, the router replica; no GPUs);
                        one worker group per GPU type: replicas = the plan's nodes of that
                        type, nvidia.com/gpu = GPUs per node, a nodeSelector on the
                        nvidia.com/gpu.product label and a toleration for the GPU taint, and
                        the custom resource pdc-<type> = GPUs per node
      serveService      the API Service (http 8000, grpc 9000); KubeRay points it at the
                        pods whose Serve proxy is healthy
    PodMonitor  <name>  Prometheus Operator: Ray's metrics (:8080) of every pod and the router's
                        vLLM-named metrics (/metrics through the head's Serve proxy, :8000)
    ConfigMap   <name>-grafana-dashboard
                        the Grafana dashboard deploy/grafana/pd-cluster.json, labelled
                        grafana_dashboard: "1" for kube-prometheus-stack's dashboard sidecar
    NetworkPolicy <name>
                        ingress: every port between the cluster's own pods; HTTP 8000 and gRPC
                        9000 from anywhere (or --api-from); the dashboard 8265 (and the Serve
                        proxy's health check on 8000) from the KubeRay operator's namespace;
                        metrics 8080 (and the router's /metrics on 8000) from the monitoring
                        namespace. egress: the cluster's own pods and DNS (--egress any: open)

Secure by default (docs/kubernetes.md#security): the API key file comes from a Secret
(<name>-auth, key auth.yaml) mounted read-only at /etc/pd-cluster/auth, named in the args by
path only, never inlined; Ray's token authentication is on (authOptions.mode: token, the token in
a Secret KubeRay generates); the dashboard listens on the pod IP, not 0.0.0.0; every pod runs
as uid 1000 with no capabilities, no privilege escalation, RuntimeDefault seccomp, a read-only
root filesystem (emptyDirs for /tmp and a memory-backed /dev/shm) and no service-account token
(the head keeps it with --autoscale: KubeRay's autoscaler sidecar calls the Kubernetes API).

An instance's ranks never span nodes: its rank 0 is its pool's actor and the other ranks
are started in its STRICT_PACK placement group on the same node. Every role may be TP x PP;
a plan whose instance needs more GPUs than one node has is refused here (check_plan), as by
`cluster serve --plan`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cluster.deploy import APP_NAME, SERVICER_FUNCTION
from cluster.placement.plan import Plan, PlanError, PoolPlan

HTTP_PORT, GRPC_PORT, METRICS_PORT, DASHBOARD_PORT = 8000, 9000, 8080, 8265
DEFAULT_IMAGE = "ghcr.io/pd-cluster/pd-cluster:0.1.0"
DEFAULT_CPU_IMAGE = "ghcr.io/pd-cluster/pd-cluster:0.1.0-cpu"
MODEL_MOUNT = "/models"
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pd-cluster.json"

# The images' user (deploy/Dockerfile*: `useradd --uid 1000 ray`, KubeRay's default user too).
RUN_AS = 1000
AUTH_MOUNT, AUTH_KEY = "/etc/pd-cluster/auth", "auth.yaml"
# With a read-only root filesystem these are the only writable paths: Ray's session directory
# (/tmp/ray), Python's and torch's temporary files, and HOME's caches (triton, CUDA's JIT,
# matplotlib), moved under /tmp so that the image's own ~/.cache/pd-cluster (the CPU image's
# tiny model) stays visible.
TMP_MOUNT, HOME_DIR = "/tmp", "/tmp/home"
# /dev/shm: Ray's object store takes 30% of the container's memory by default and falls back
# to disk when /dev/shm is smaller; the rest is room for NCCL's and UCX's shared-memory
# transports. Memory-backed: what is written counts against the container's memory limit.
SHM_FRACTION = 0.4
MIN_TOKEN_AUTH_RAY = (2, 52)  # Ray token auth (and KubeRay's authOptions) start at 2.52.0
DASHBOARD_HOSTS = {"pod": "${POD_IP}", "all": "0.0.0.0"}  # `ray start --dashboard-host`
EGRESS = ("cluster", "any")
_NAMESPACE_LABEL = "kubernetes.io/metadata.name"  # every namespace has it (Kubernetes >= 1.22)


@dataclass(frozen=True, slots=True)
class Hardening:
    """What protects the deployment; the defaults are the safe ones (docs/kubernetes.md#security).

    auth_secret        the Secret holding the tenants file (key auth.yaml); None: `--no-auth`
    ray_auth           Ray token authentication (KubeRay authOptions.mode: token)
    ray_token_secret   a Secret with key auth_token to use; None: KubeRay generates one
    dashboard_host     pod (the pod IP) or all (0.0.0.0)
    operator_namespace the KubeRay operator's namespace: it alone reaches the dashboard
    api_from           who may call HTTP/gRPC: `namespace=NS` or a CIDR each; (): anyone
    metrics_from       the namespace Prometheus scrapes from
    egress             cluster (own pods + DNS) or any
    """

    auth_secret: str | None
    ray_auth: bool = True
    ray_token_secret: str | None = None
    dashboard_host: str = "pod"
    operator_namespace: str = "kuberay"
    api_from: tuple[str, ...] = ()
    metrics_from: str = "monitoring"
    egress: str = "cluster"

    def __post_init__(self) -> None:
        if self.dashboard_host not in DASHBOARD_HOSTS:
            raise ValueError(f"dashboard host must be one of {sorted(DASHBOARD_HOSTS)}")
        if self.egress not in EGRESS:
            raise ValueError(f"egress must be one of {list(EGRESS)}")
        if self.ray_token_secret and not self.ray_auth:
            raise ValueError("a Ray token secret needs Ray token auth on")
        for source in self.api_from:
            _peer(source)  # raises on a bad one

    @classmethod
    def default(cls, name: str) -> Hardening:
        return cls(auth_secret=f"{name}-auth")


def _resource_name(hardware: str) -> str:
    return f"pdc-{hardware}"


def _group_name(hardware: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in hardware.lower()).strip("-")


def check_plan(plan: Plan) -> None:
    for pool in plan.pools:
        tp, pp = pool.tensor_parallel_size, pool.pipeline_parallel_size
        hw = plan.hardware[pool.hardware]
        if tp > hw.gpus_per_node:
            raise PlanError(
                f"the {pool.role} pool's TP={tp} exceeds the {hw.gpus_per_node} GPUs of a "
                f"{hw.name} node: a tensor-parallel group must stay inside one node"
            )
        if tp * pp > hw.gpus_per_node:
            raise PlanError(
                f"the {pool.role} pool's TP={tp} x PP={pp} instance needs {tp * pp} GPUs, more "
                f"than a {hw.name} node's {hw.gpus_per_node}: this build keeps an instance's "
                "ranks on one node (one STRICT_PACK placement group); plan with a smaller "
                "--pp or --tp"
            )


def _nodes_per_type(plan: Plan) -> dict[str, int]:
    """Worker nodes of each device type: the plan's placement, else enough for its pools."""
    nodes: dict[str, int] = {}
    for node in plan.placement:
        nodes[node["hardware"]] = nodes.get(node["hardware"], 0) + 1
    for pool in plan.pools:
        if pool.hardware not in nodes:
            per_node = plan.hardware[pool.hardware].gpus_per_node
            need = sum(p.num_gpus for p in plan.pools if p.hardware == pool.hardware)
            nodes[pool.hardware] = math.ceil(need / per_node)
    return nodes


def deployment_args(plan: Plan, model_path: str | None, extra: dict | None = None) -> dict:
    """The Serve application's args: a `cluster serve --config` mapping."""
    is_gpu = any(plan.hardware[p.hardware].kind == "gpu" for p in plan.pools)
    args: dict[str, Any] = {"mode": plan.mode, "engine": {"device": "cuda" if is_gpu else "cpu"}}
    if model_path:
        args["model"] = model_path
    for pool in plan.pools:
        args[pool.role] = _pool_args(plan, pool)
    args.update(extra or {})
    return args


def _pool_args(plan: Plan, pool: PoolPlan) -> dict:
    """Each instance's rank 0 is the pool's actor (one device); its other tensor/pipeline-
    parallel ranks are actors in the instance's placement group on the same node
    (cluster/workers/ranks.py)."""
    gpu = plan.hardware[pool.hardware].kind == "gpu"
    args = {
        "num_instances": pool.num_instances,
        "num_gpus": 1 if gpu else 0,
        "num_cpus": 1,
        # The whole instance's share of the node: the node then has the GPUs its follower
        # ranks need beside rank 0.
        "resources": {
            _resource_name(pool.hardware): pool.tensor_parallel_size * pool.pipeline_parallel_size
        },
    }
    engine = {
        key: size
        for key, size in (("tensor_parallel_size", pool.tensor_parallel_size),
                          ("pipeline_parallel_size", pool.pipeline_parallel_size))
        if size > 1
    }  # fmt: skip
    if engine:
        args["engine"] = engine
    return args


def autoscale_settings(plan: Plan) -> dict:
    """The router's autoscaler (cluster/elastic/) for a plan: its SLOs, and as many devices as
    the worker groups' maxReplicas hold (twice the plan's), at least the plan's own."""
    devices = sum(p.num_gpus for p in plan.pools)
    slo = plan.slo
    return {"min_gpus": devices, "max_gpus": 2 * devices, "ttft_s": slo["ttft_s"],
            "tpot_s": slo["tpot_s"], "attainment": slo.get("attainment", 0.9)}  # fmt: skip


def serve_config(plan: Plan, model_path: str | None, extra: dict | None = None) -> dict:
    return {
        "proxy_location": "EveryNode",
        # 0.0.0.0: KubeRay probes each worker's proxy on localhost:8000 and the head's on the
        # pod IP; the NetworkPolicy decides who else reaches it.
        "http_options": {"host": "0.0.0.0", "port": HTTP_PORT},
        "grpc_options": {"port": GRPC_PORT, "grpc_servicer_functions": [SERVICER_FUNCTION]},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "cluster.deploy.serve_app:build",
                "args": deployment_args(plan, model_path, extra),
            }
        ],
    }


# --- pods -------------------------------------------------------------------------------------


def _container(name: str, image: str, resources: dict, ports: list[dict], env=None) -> dict:
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "ports": ports,
        "env": [
            {"name": "HOME", "value": HOME_DIR},
            {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},  # no telemetry leaves the pod
            *(env or []),
        ],
        "securityContext": container_security_context(),
    }


def container_security_context() -> dict:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }


def pod_security_context() -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        # Mounted Secrets are group-readable by RUN_AS; OnRootMismatch spares a writable
        # volume's recursive chown at every start (read-only volumes are never chowned).
        "fsGroup": RUN_AS,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _shm_size(memory: str) -> str:
    gib = int(memory.removesuffix("Gi"))
    return f"{max(1, math.floor(gib * SHM_FRACTION))}Gi"


def _volumes(container: dict, model_pvc: str | None, auth_secret: str | None) -> list[dict]:
    """The pod's volumes, mounted into `container`: the models (read-only), the writable
    emptyDirs, the tenants file (read-only)."""
    memory = container["resources"]["limits"]["memory"]
    volumes = []
    mounts = []
    if model_pvc:
        claim = {"claimName": model_pvc, "readOnly": True}
        volumes.append({"name": "models", "persistentVolumeClaim": claim})
        mounts.append({"name": "models", "mountPath": MODEL_MOUNT, "readOnly": True})
    volumes.append({"name": "tmp", "emptyDir": {}})
    mounts.append({"name": "tmp", "mountPath": TMP_MOUNT})
    shm = {"medium": "Memory", "sizeLimit": _shm_size(memory)}
    volumes.append({"name": "dshm", "emptyDir": shm})
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if auth_secret:
        # 0440 with fsGroup: readable by the Ray user's group, by nobody else.
        secret = {"secretName": auth_secret, "defaultMode": 0o440}
        volumes.append({"name": "auth", "secret": secret})
        mounts.append({"name": "auth", "mountPath": AUTH_MOUNT, "readOnly": True})
    container["volumeMounts"] = mounts
    return volumes


def _pod(container: dict, labels: dict, model_pvc: str | None, auth_secret: str | None,
         extra: dict | None = None, needs_api: bool = False) -> dict:  # fmt: skip
    spec: dict[str, Any] = {
        "securityContext": pod_security_context(),
        # No pod here calls the Kubernetes API, except KubeRay's autoscaler sidecar (head).
        "automountServiceAccountToken": needs_api,
        "containers": [container],
        "volumes": _volumes(container, model_pvc, auth_secret),
        "terminationGracePeriodSeconds": 60,
    }
    spec.update(extra or {})
    return {"metadata": {"labels": dict(labels)}, "spec": spec}


def head_group(image: str, labels: dict, model_pvc: str | None,
               hardening: Hardening, autoscale: bool = False) -> dict:  # fmt: skip
    ports = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": DASHBOARD_PORT, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
        {"containerPort": HTTP_PORT, "name": "serve"},
        {"containerPort": GRPC_PORT, "name": "grpc"},
        {"containerPort": METRICS_PORT, "name": "metrics"},
    ]
    # The dashboard binds the pod IP: KubeRay's `ray start` runs under `bash -c`, which expands
    # ${POD_IP} (the downward API's status.podIP) in the flag.
    pod_ip = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    env = [pod_ip] if hardening.dashboard_host == "pod" else []
    container = _container("ray-head", image, {"cpu": "4", "memory": "16Gi"}, ports, env)
    return {
        # The head runs the Serve controller, a proxy and the router replica; no engine.
        "rayStartParams": {
            "dashboard-host": DASHBOARD_HOSTS[hardening.dashboard_host],
            "num-cpus": "4",
            "metrics-export-port": str(METRICS_PORT),
        },  # fmt: skip
        "template": _pod(container, labels, model_pvc, hardening.auth_secret, needs_api=autoscale),
    }


def worker_group(plan: Plan, hardware: str, nodes: int, image: str, labels: dict,
                 model_pvc: str | None, autoscale: bool,
                 auth_secret: str | None = None) -> dict:  # fmt: skip
    hw = plan.hardware[hardware]
    gpus = hw.gpus_per_node
    # Requests per node: 4 CPUs and 32 GiB per GPU (engine process, tokenizer, KV staging);
    # a CPU node runs its engines in 4 cores and 8 GiB.
    resources: dict[str, Any] = {"cpu": "4", "memory": "8Gi"}
    extra: dict[str, Any] = {}
    if hw.kind == "gpu":
        resources = {"cpu": str(4 * gpus), "memory": f"{32 * gpus}Gi"}
        resources["nvidia.com/gpu"] = gpus
        extra["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
        if hw.gpu_product:
            extra["nodeSelector"] = {"nvidia.com/gpu.product": hw.gpu_product}
    ports = [
        {"containerPort": HTTP_PORT, "name": "serve"},
        {"containerPort": GRPC_PORT, "name": "grpc"},
        {"containerPort": METRICS_PORT, "name": "metrics"},
    ]
    container = _container("ray-worker", image, resources, ports)
    custom = json.dumps({_resource_name(hardware): gpus})
    return {
        "groupName": _group_name(hardware),
        "replicas": nodes,
        "minReplicas": nodes,
        "maxReplicas": 2 * nodes if autoscale else nodes,
        "numOfHosts": 1,
        # KubeRay passes the value to `ray start --resources=...` as written: JSON in quotes.
        "rayStartParams": {"resources": f"'{custom}'", "metrics-export-port": str(METRICS_PORT)},
        # Serve places the router replica on any node (SPREAD), so every pod has the tenants
        # file (key hashes, no keys).
        "template": _pod(container, labels, model_pvc, auth_secret, extra),
    }


def _autoscaler_options() -> dict:
    """KubeRay's autoscaler sidecar (head pod): hardened like the Ray container; it writes its
    logs to /tmp/ray, which KubeRay mounts for it."""
    return {
        "securityContext": container_security_context(),
        "env": [{"name": "HOME", "value": HOME_DIR}],
        "volumeMounts": [{"name": "tmp", "mountPath": TMP_MOUNT}],
    }


def _auth_options(hardening: Hardening) -> dict:
    if not hardening.ray_auth:
        return {"mode": "disabled"}
    options = {"mode": "token"}
    if hardening.ray_token_secret:
        options["secretName"] = hardening.ray_token_secret
    return options


def _check_ray_version(version: str, hardening: Hardening) -> None:
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if hardening.ray_auth and parts < MIN_TOKEN_AUTH_RAY:
        raise PlanError(
            f"Ray token authentication needs Ray >= 2.52 (KubeRay refuses authOptions.mode "
            f"token below it); this rayVersion is {version}: use a newer image, or "
            "--no-ray-auth on a network no one else can reach"
        )


# --- the objects --------------------------------------------------------------------------------


def generate(
    plan: Plan,
    name: str = "pd-cluster",
    namespace: str = "default",
    image: str | None = None,
    model_path: str | None = None,
    model_pvc: str | None = None,
    autoscale: bool = False,
    ray_version: str | None = None,
    hardening: Hardening | None = None,
) -> list[dict]:
    """The RayService, its NetworkPolicy, the PodMonitor and the Grafana dashboard's ConfigMap
    for `plan`."""
    import ray

    check_plan(plan)
    hardening = hardening or Hardening.default(name)
    ray_version = ray_version or ray.__version__
    _check_ray_version(ray_version, hardening)
    is_gpu = any(plan.hardware[p.hardware].kind == "gpu" for p in plan.pools)
    image = image or (DEFAULT_IMAGE if is_gpu else DEFAULT_CPU_IMAGE)
    labels = {"app.kubernetes.io/name": "pd-cluster", "app.kubernetes.io/instance": name}
    if model_pvc and model_path and not model_path.startswith(MODEL_MOUNT):
        raise PlanError(f"--model-path must be under {MODEL_MOUNT} when --model-pvc is given")
    workers = [
        worker_group(plan, hw, n, image, labels, model_pvc, autoscale, hardening.auth_secret)
        for hw, n in sorted(_nodes_per_type(plan).items())
    ]
    # Paths only: the secrets stay in their Secrets, out of the CR and the dashboard.
    extra = {"auth_file": f"{AUTH_MOUNT}/{AUTH_KEY}"} if hardening.auth_secret else {}
    if autoscale:  # the SLO autoscaler sizes the pools; Ray's brings the nodes they ask for
        extra["autoscale"] = autoscale_settings(plan)
    cluster: dict[str, Any] = {
        "rayVersion": ray_version,
        "authOptions": _auth_options(hardening),
        "enableInTreeAutoscaling": autoscale,
    }
    if autoscale:
        cluster["autoscalerOptions"] = _autoscaler_options()
    cluster["headGroupSpec"] = head_group(image, labels, model_pvc, hardening, autoscale)
    cluster["workerGroupSpecs"] = workers
    if is_gpu and not model_path:  # the CUDA image has no tiny model: built where it can write
        cache = {"name": "PD_CLUSTER_CACHE", "value": f"{HOME_DIR}/.cache/pd-cluster"}
        for group in [cluster["headGroupSpec"], *workers]:
            group["template"]["spec"]["containers"][0]["env"].append(dict(cache))
    service = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "serveConfigV2": yaml.dump(
                serve_config(plan, model_path, extra), Dumper=_Dumper, sort_keys=False, width=100
            ),
            # On an upgrade KubeRay moves traffic to the new cluster, then deletes the old one
            # after this delay: the old router's in-flight requests finish meanwhile.
            "rayClusterDeletionDelaySeconds": 60,
            "serviceUnhealthySecondThreshold": 900,
            "deploymentUnhealthySecondThreshold": 300,
            "serveService": _serve_service(name, namespace, labels),
            "rayClusterConfig": cluster,
        },
    }
    policy = network_policy(name, namespace, labels, hardening, autoscale)
    dashboard = dashboard_config_map(name, namespace, labels, DASHBOARD.read_text())
    return [service, policy, pod_monitor(name, namespace, labels), dashboard]


def _serve_service(name: str, namespace: str, labels: dict) -> dict:
    return {
        "metadata": {"name": f"{name}-api", "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "type": "ClusterIP",
            "ports": [
                {"name": "http", "port": HTTP_PORT, "targetPort": HTTP_PORT},
                {
                    "name": "grpc",
                    "port": GRPC_PORT,
                    "targetPort": GRPC_PORT,
                    "appProtocol": "kubernetes.io/h2c",
                },
            ],  # fmt: skip
        },
    }


def _peer(source: str) -> dict:
    """A NetworkPolicy peer from `namespace=NS` or a CIDR."""
    if source.startswith("namespace="):
        namespace = source.removeprefix("namespace=")
        if not namespace:
            raise ValueError("--api-from namespace= needs a namespace name")
        return _namespace(namespace)
    try:
        return {"ipBlock": {"cidr": str(ipaddress.ip_network(source, strict=False))}}
    except ValueError:
        raise ValueError(f"--api-from takes namespace=NS or a CIDR, got {source!r}") from None


def _namespace(namespace: str) -> dict:
    return {"namespaceSelector": {"matchLabels": {_NAMESPACE_LABEL: namespace}}}


def _ports(*ports: int, protocol: str = "TCP") -> list[dict]:
    return [{"port": port, "protocol": protocol} for port in ports]


def network_policy(name: str, namespace: str, labels: dict, hardening: Hardening,
                   autoscale: bool = False) -> dict:  # fmt: skip
    """Who may reach the cluster's pods, and what they may reach. Policies add up: another
    NetworkPolicy selecting these pods can open more (an OTLP collector, say), never less.
    Traffic from the node itself (kubelet probes) is always allowed."""
    own = {"podSelector": {"matchLabels": dict(labels)}}
    api = {"ports": _ports(HTTP_PORT, GRPC_PORT)}
    if hardening.api_from:
        api["from"] = [_peer(source) for source in hardening.api_from]
    ingress = [
        {"from": [own]},  # Ray (GCS, raylets, object transfer), NIXL, Serve: every port
        api,
        # The RayService controller submits the Serve app through the dashboard and checks
        # the head's Serve proxy (GET :8000/-/healthz) from the operator's pod.
        {"from": [_namespace(hardening.operator_namespace)],
         "ports": _ports(DASHBOARD_PORT, HTTP_PORT)},
        # Ray's metrics, and the router's /metrics on the Serve proxy.
        {"from": [_namespace(hardening.metrics_from)], "ports": _ports(METRICS_PORT, HTTP_PORT)},
    ]  # fmt: skip
    spec: dict[str, Any] = {
        "podSelector": {"matchLabels": dict(labels)},
        "policyTypes": ["Ingress"],
        "ingress": ingress,
    }
    if hardening.egress == "cluster":
        # Weights come from the PVC and nothing is downloaded: the pods need each other and
        # DNS (any resolver: CoreDNS, or a node-local cache on a link-local address).
        egress = [{"to": [own]}, {"ports": _ports(53, protocol="UDP") + _ports(53)}]
        if autoscale:  # the autoscaler sidecar: the Kubernetes API (443, or 6443 behind DNAT)
            egress.append({"ports": _ports(443, 6443)})
        spec["policyTypes"].append("Egress")
        spec["egress"] = egress
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": spec,
    }


def pod_monitor(name: str, namespace: str, labels: dict) -> dict:
    """Ray's metrics from every pod; the router's from the head's Serve proxy only. Every
    node's proxy answers /metrics with the same router's exposition, so scraping each would
    count every request once per pod. honorLabels keeps the exposition's `instance` label (the
    pd-cluster instance id) instead of renaming it to `exported_instance`."""
    head_only = {
        "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_node_type"],
        "regex": "head",
        "action": "keep",
    }
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "selector": {"matchLabels": dict(labels)},
            "podMetricsEndpoints": [
                {"port": "metrics", "path": "/metrics", "interval": "15s"},
                {
                    "port": "serve",
                    "path": "/metrics",
                    "interval": "15s",
                    "honorLabels": True,
                    "relabelings": [head_only],
                },
            ],
        },
    }


def dashboard_config_map(name: str, namespace: str, labels: dict, dashboard_json: str) -> dict:
    """kube-prometheus-stack's Grafana sidecar loads every ConfigMap labelled
    grafana_dashboard=1 in the namespaces it watches (its searchNamespace)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"{name}-grafana-dashboard",
            "namespace": namespace,
            "labels": {**labels, "grafana_dashboard": "1"},
        },
        "data": {DASHBOARD.name: dashboard_json},
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the embedded serveConfigV2) as literal blocks, readable in review;
    a value used twice written out twice, never as a YAML anchor and alias."""

    def ignore_aliases(self, data) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[dict]) -> str:
    dump = lambda o: yaml.dump(o, Dumper=_Dumper, sort_keys=False, width=100)  # noqa: E731
    return "".join("---\n" + dump(o) for o in objects)


# --- the command -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", required=True, help="plan YAML/JSON from `placement plan`")
    parser.add_argument("--name", default="pd-cluster", help="RayService name")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--image", help=f"container image (default {DEFAULT_IMAGE}, or the "
                        "-cpu tag for a CPU plan)")  # fmt: skip
    parser.add_argument("--model-path", help="checkpoint folder inside the pods (default: the "
                        "tiny model, for trying it out)")  # fmt: skip
    parser.add_argument("--model-pvc", help=f"PersistentVolumeClaim mounted at {MODEL_MOUNT}")
    parser.add_argument(
        "--autoscale", action="store_true", help="KubeRay may add worker nodes up to 2x the plan"
    )
    _add_security_arguments(parser.add_argument_group("security (docs/kubernetes.md#security)"))
    parser.add_argument("--output", "-o", default="-", help="file to write ('-': stdout)")


def _add_security_arguments(group) -> None:
    auth = group.add_mutually_exclusive_group()
    auth.add_argument(
        "--auth-secret",
        metavar="NAME",
        help=f"Secret with the tenants file (key {AUTH_KEY}), mounted at {AUTH_MOUNT} "
        "(default: <name>-auth)",
    )
    auth.add_argument(
        "--no-auth",
        action="store_true",
        help="no API keys: anyone who reaches :8000/:9000 may call the APIs",
    )
    token = group.add_mutually_exclusive_group()
    token.add_argument(
        "--ray-token-secret",
        metavar="NAME",
        help="Secret with key auth_token for Ray's token auth (default: KubeRay generates one "
        "per Ray cluster)",
    )
    token.add_argument(
        "--no-ray-auth",
        action="store_true",
        help="Ray without token auth: anyone who reaches the pods may run code in them",
    )
    group.add_argument(
        "--dashboard-host",
        choices=sorted(DASHBOARD_HOSTS),
        default="pod",
        help="the Ray dashboard listens on the pod IP (default) or on 0.0.0.0 (all)",
    )
    group.add_argument(
        "--operator-namespace",
        default="kuberay",
        metavar="NS",
        help="the KubeRay operator's namespace, the only one that reaches the dashboard "
        "(default: kuberay)",
    )
    group.add_argument(
        "--api-from",
        action="append",
        default=[],
        metavar="SOURCE",
        help="who may call HTTP :8000 and gRPC :9000: namespace=NS or a CIDR; repeatable "
        "(default: any pod or address)",
    )
    group.add_argument(
        "--metrics-from",
        default="monitoring",
        metavar="NS",
        help="the namespace Prometheus scrapes from (default: monitoring)",
    )
    group.add_argument(
        "--egress",
        choices=EGRESS,
        default="cluster",
        help="cluster: the pods reach only each other and DNS (default); any: no limit",
    )


def hardening_from_args(args: argparse.Namespace) -> Hardening:
    return Hardening(
        auth_secret=None if args.no_auth else (args.auth_secret or f"{args.name}-auth"),
        ray_auth=not args.no_ray_auth,
        ray_token_secret=args.ray_token_secret,
        dashboard_host=args.dashboard_host,
        operator_namespace=args.operator_namespace,
        api_from=tuple(args.api_from),
        metrics_from=args.metrics_from,
        egress=args.egress,
    )


def run(args: argparse.Namespace) -> int:
    try:
        plan = Plan.load(args.plan)
        objects = generate(plan, args.name, args.namespace, args.image, args.model_path,
                           args.model_pvc, args.autoscale,
                           hardening=hardening_from_args(args))  # fmt: skip
    except (PlanError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = to_yaml(objects)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        kinds = ", ".join(f"{o['kind']} {o['metadata']['name']}" for o in objects)
        print(f"wrote {kinds} to {args.output}; apply with: kubectl apply -f {args.output}",
              file=sys.stderr)  # fmt: skip
    return 0
