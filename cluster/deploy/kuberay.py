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

An instance's ranks never span nodes: its rank 0 is its pool's actor and the other ranks
are started in its STRICT_PACK placement group on the same node. Every role may be TP x PP;
a plan whose instance needs more GPUs than one node has is refused here (check_plan), as by
`cluster serve --plan`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml

from cluster.deploy import APP_NAME, SERVICER_FUNCTION
from cluster.placement.plan import Plan, PlanError, PoolPlan

HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 9000, 8080
DEFAULT_IMAGE = "ghcr.io/pd-cluster/pd-cluster:0.1.0"
DEFAULT_CPU_IMAGE = "ghcr.io/pd-cluster/pd-cluster:0.1.0-cpu"
MODEL_MOUNT = "/models"
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pd-cluster.json"


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


def serve_config(plan: Plan, model_path: str | None, extra: dict | None = None) -> dict:
    return {
        "proxy_location": "EveryNode",
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


def _container(name: str, image: str, resources: dict, ports: list[dict], env=None) -> dict:
    container = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "ports": ports,
    }
    if env:
        container["env"] = env
    return container


def _pod(container: dict, labels: dict, model_pvc: str | None, extra: dict | None = None) -> dict:
    spec: dict[str, Any] = {"containers": [container], "terminationGracePeriodSeconds": 60}
    if model_pvc:
        claim = {"claimName": model_pvc, "readOnly": True}
        spec["volumes"] = [{"name": "models", "persistentVolumeClaim": claim}]
        container["volumeMounts"] = [{"name": "models", "mountPath": MODEL_MOUNT, "readOnly": True}]
    spec.update(extra or {})
    return {"metadata": {"labels": dict(labels)}, "spec": spec}


def head_group(image: str, labels: dict, model_pvc: str | None) -> dict:
    ports = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
        {"containerPort": HTTP_PORT, "name": "serve"},
        {"containerPort": GRPC_PORT, "name": "grpc"},
        {"containerPort": METRICS_PORT, "name": "metrics"},
    ]
    container = _container("ray-head", image, {"cpu": "4", "memory": "16Gi"}, ports)
    return {
        # The head runs the Serve controller, a proxy and the router replica; no engine.
        "rayStartParams": {
            "dashboard-host": "0.0.0.0",
            "num-cpus": "4",
            "metrics-export-port": str(METRICS_PORT),
        },  # fmt: skip
        "template": _pod(container, labels, model_pvc),
    }


def worker_group(plan: Plan, hardware: str, nodes: int, image: str, labels: dict,
                 model_pvc: str | None, autoscale: bool) -> dict:  # fmt: skip
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
        "template": _pod(container, labels, model_pvc, extra),
    }


def generate(
    plan: Plan,
    name: str = "pd-cluster",
    namespace: str = "default",
    image: str | None = None,
    model_path: str | None = None,
    model_pvc: str | None = None,
    autoscale: bool = False,
    ray_version: str | None = None,
) -> list[dict]:
    """The RayService, the PodMonitor and the Grafana dashboard's ConfigMap for `plan`."""
    import ray

    check_plan(plan)
    is_gpu = any(plan.hardware[p.hardware].kind == "gpu" for p in plan.pools)
    image = image or (DEFAULT_IMAGE if is_gpu else DEFAULT_CPU_IMAGE)
    labels = {"app.kubernetes.io/name": "pd-cluster", "app.kubernetes.io/instance": name}
    if model_pvc and model_path and not model_path.startswith(MODEL_MOUNT):
        raise PlanError(f"--model-path must be under {MODEL_MOUNT} when --model-pvc is given")
    workers = [
        worker_group(plan, hw, n, image, labels, model_pvc, autoscale)
        for hw, n in sorted(_nodes_per_type(plan).items())
    ]
    service = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "serveConfigV2": yaml.dump(
                serve_config(plan, model_path), Dumper=_Dumper, sort_keys=False, width=100
            ),
            # On an upgrade KubeRay moves traffic to the new cluster, then deletes the old one
            # after this delay: the old router's in-flight requests finish meanwhile.
            "rayClusterDeletionDelaySeconds": 60,
            "serviceUnhealthySecondThreshold": 900,
            "deploymentUnhealthySecondThreshold": 300,
            "serveService": _serve_service(name, namespace, labels),
            "rayClusterConfig": {
                "rayVersion": ray_version or ray.__version__,
                "enableInTreeAutoscaling": autoscale,
                "headGroupSpec": head_group(image, labels, model_pvc),
                "workerGroupSpecs": workers,
            },
        },
    }
    dashboard = dashboard_config_map(name, namespace, labels, DASHBOARD.read_text())
    return [service, pod_monitor(name, namespace, labels), dashboard]


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
    """Multi-line strings (the embedded serveConfigV2) as literal blocks, readable in review."""


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
    parser.add_argument("--output", "-o", default="-", help="file to write ('-': stdout)")


def run(args: argparse.Namespace) -> int:
    try:
        plan = Plan.load(args.plan)
        objects = generate(plan, args.name, args.namespace, args.image, args.model_path,
                           args.model_pvc, args.autoscale)  # fmt: skip
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
