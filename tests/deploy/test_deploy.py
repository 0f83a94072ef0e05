"""`cluster deploy kuberay`: every object it writes (and the hand-written example) validates
against the Kubernetes schemas (kubernetes-validate), the KubeRay RayService CRD vendored in
tests/deploy/k8s/crds (its openAPIV3Schema, with jsonschema) and, for the PodMonitor, the Prometheus
Operator's schema (the @kubernetes-models npm package, run with node); heterogeneous, CPU-only
and oversized-TP plans; the Grafana dashboard's ConfigMap beside the PodMonitor; and the
embedded serveConfigV2, given to Ray Serve here with its tenants file, serves the same output
as the engine. The manifests' security is tested in test_deploy_security.py.

Ray runs here in its own process group and temp dir, stopped by killing that group: `ray stop`
would end every Ray on the machine, other sessions' too."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cluster.cli import main
from cluster.deploy.kuberay import generate, to_yaml
from cluster.engine.parallel import free_port
from cluster.launch import DeploymentConfig
from cluster.placement.hardware import load_catalog
from cluster.placement.plan import Plan, PlanError
from tests.helpers import REPO_ROOT, wait_until

K8S = Path(__file__).resolve().parent / "k8s"
CRDS = K8S / "crds"  # KubeRay v1.7.0, see its README.md
NPM = REPO_ROOT / "build" / "npm"
EXAMPLE = REPO_ROOT / "deploy" / "examples" / "rayservice-default.yaml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "pd-cluster.json"
K8S_VERSION = "1.33.0"
CATALOG = load_catalog()


@functools.cache
def _crd_schema(kind: str) -> dict:
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
            return version["schema"]["openAPIV3Schema"]
    raise LookupError(kind)


def _k8s(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def validate_objects(objects: list[dict]) -> None:
    monitors = []
    for obj in objects:
        if obj["kind"] == "RayService":
            jsonschema.validate(obj, _crd_schema("RayService"))
            cluster = obj["spec"]["rayClusterConfig"]
            groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
            for group in groups:  # the pod templates against the core schema, strictly
                _k8s(
                    {
                        "apiVersion": "v1",
                        "kind": "PodTemplate",
                        "metadata": {"name": "t"},
                        "template": group["template"],
                    }
                )
            service = obj["spec"]["serveService"]
            _k8s({"apiVersion": "v1", "kind": "Service", **service})
            yaml.safe_load(obj["spec"]["serveConfigV2"])
        elif obj["kind"] == "PodMonitor":
            monitors.append(obj)
        else:
            _k8s(obj)
    if monitors:
        _validate_pod_monitors(monitors)


def _validate_pod_monitors(monitors: list[dict]) -> None:
    if shutil.which("node") is None or not (NPM / "node_modules/@kubernetes-models").is_dir():
        pytest.skip(
            "PodMonitor schema: needs node and `npm install --prefix build/npm "
            "@kubernetes-models/prometheus-operator@6.0.0` (.ci/run does both)"
        )
    script = NPM / "validate-podmonitor.mjs"
    shutil.copy(K8S / "validate-podmonitor.mjs", script)
    done = subprocess.run(
        ["node", str(script)],
        input=json.dumps(monitors),
        text=True,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def _plan(tmp_path, pools: dict, hardware: list[str], placement=None) -> Plan:
    from cluster.placement.model_spec import PRESETS

    data = {
        "mode": "disaggregated" if "prefill" in pools else "colocated",
        "model": PRESETS["Llama-3-8B"].to_dict(),
        "hardware": {h: CATALOG[h].to_entry() for h in hardware},
        "slo": {"ttft_s": 0.5, "tpot_s": 0.05},
        "placement": placement or [],
    }
    for role, (hw, n, tp, *pp) in pools.items():
        data[role] = {"hardware": hw, "num_instances": n, "tensor_parallel_size": tp,
                      "pipeline_parallel_size": pp[0] if pp else 1}  # fmt: skip
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return Plan.load(path)


def test_heterogeneous_plan_gets_one_pinned_worker_group_per_gpu_type(tmp_path):
    plan = _plan(
        tmp_path,
        {"prefill": ("H100-80GB", 3, 1), "decode": ("A100-80GB", 10, 1)},
        ["H100-80GB", "A100-80GB"],
    )
    objects = generate(plan, name="llama", namespace="serving", model_path="/models/llama")
    validate_objects(objects)
    service = objects[0]
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"h100-80gb", "a100-80gb"}
    assert groups["a100-80gb"]["replicas"] == 2  # 10 one-GPU decode instances on 8-GPU nodes
    for name, product in [
        ("h100-80gb", "NVIDIA-H100-80GB-HBM3"),
        ("a100-80gb", "NVIDIA-A100-SXM4-80GB"),
    ]:
        pod = groups[name]["template"]["spec"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": product}
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "cluster.deploy.serve_app:build"
    args = app["args"]
    assert args["model"] == "/models/llama" and args["engine"]["device"] == "cuda"
    assert args["prefill"]["resources"] == {"pdc-H100-80GB": 1}
    assert args["decode"] == {
        "num_instances": 10,
        "num_gpus": 1,
        "num_cpus": 1,
        "resources": {"pdc-A100-80GB": 1},
    }
    # Each worker group advertises the resource its pool asks for.
    assert "pdc-A100-80GB" in groups["a100-80gb"]["rayStartParams"]["resources"]


def test_cpu_plan_asks_for_no_gpu(tmp_path):
    plan = _plan(tmp_path, {"colocated": ("CPU", 2, 1)}, ["CPU"])
    objects = generate(plan)
    validate_objects(objects)
    (group,) = objects[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert pod["containers"][0]["image"].endswith("-cpu")
    args = yaml.safe_load(objects[0]["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["engine"]["device"] == "cpu" and args["colocated"]["num_gpus"] == 0


def test_oversized_plans_are_refused(tmp_path, capsys):
    with pytest.raises(PlanError, match="must stay inside a node"):
        _plan(
            tmp_path,
            {"prefill": ("A100-80GB", 1, 16), "decode": ("A100-80GB", 1, 1)},
            ["A100-80GB"],
        )
    plan = _plan(  # TP4 x PP4 = 16 ranks: Plan accepts it (PP may span nodes), we cannot
        tmp_path, {"prefill": ("A100-80GB", 1, 4, 4), "decode": ("A100-80GB", 1, 1)},
        ["A100-80GB"],
    )  # fmt: skip
    with pytest.raises(PlanError, match="ranks on one node"):
        generate(plan)
    code = main(["deploy", "kuberay", "--plan", str(tmp_path / "plan.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "TP=4 x PP=4" in err and "Traceback" not in err


def test_prefill_and_decode_of_different_parallelism(tmp_path):
    """DistServe's OPT-66B shape: prefill TP4, decode TP2 x PP2."""
    plan = _plan(
        tmp_path, {"prefill": ("A100-80GB", 2, 4), "decode": ("A100-80GB", 2, 2, 2)},
        ["A100-80GB"],
    )  # fmt: skip
    objects = generate(plan)
    validate_objects(objects)
    args = yaml.safe_load(objects[0]["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["prefill"]["engine"] == {"tensor_parallel_size": 4}
    assert args["decode"]["engine"] == {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}
    assert args["prefill"]["resources"] == args["decode"]["resources"] == {"pdc-A100-80GB": 4}


def test_planner_output_round_trips_into_a_valid_manifest(tmp_path, capsys):
    from cluster.placement.cli import main as placement

    plan = tmp_path / "p.yaml"
    assert (
        placement(
            [
                "plan",
                "--model",
                "Llama-3-8B",
                "--hardware",
                "L40S",
                "--nodes",
                "2",
                "--ttft",
                "1",
                "--tpot",
                "0.1",
                "--tp",
                "1",
                "--pp",
                "1",
                "--num-requests",
                "300",
                "-o",
                str(plan),
            ]
        )
        == 0
    )
    out = tmp_path / "rs.yaml"
    assert (
        main(
            [
                "deploy",
                "kuberay",
                "--plan",
                str(plan),
                "-o",
                str(out),
                "--autoscale",
                "--model-pvc",
                "models",
                "--model-path",
                "/models/llama",
            ]
        )
        == 0
    )
    objects = list(yaml.safe_load_all(out.read_text()))
    validate_objects(objects)
    cluster = objects[0]["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    assert group["maxReplicas"] == 2 * group["minReplicas"]
    # The router's SLO autoscaler (elastic pools) may take what those nodes hold.
    serve = yaml.safe_load(objects[0]["spec"]["serveConfigV2"])
    args = serve["applications"][0]["args"]
    devices = DeploymentConfig.from_dict(args).autoscale
    assert devices.max_gpus == 2 * devices.min_gpus > 0
    volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}


def test_example_manifest_validates():
    objects = list(yaml.safe_load_all(EXAMPLE.read_text()))
    validate_objects(objects)
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
    # Regenerate the example when the dashboard changes.
    assert json.loads(config_map["data"]["pd-cluster.json"]) == json.loads(DASHBOARD.read_text())


def test_example_is_what_the_generator_writes(tmp_path):
    """The example is the default plan's output (1 prefill + 1 decode on CPU, every default),
    under its annotated header. After a change to the generator, rewrite it with
    `PD_CLUSTER_WRITE_EXAMPLE=1 pytest tests/deploy/test_deploy.py -k generator_writes`."""
    text = EXAMPLE.read_text()
    lines = text.splitlines(keepends=True)
    header = "".join(itertools.takewhile(lambda line: line.startswith("#"), lines))
    ray_version = next(yaml.safe_load_all(text))["spec"]["rayClusterConfig"]["rayVersion"]
    plan = _plan(tmp_path, {"prefill": ("CPU", 1, 1), "decode": ("CPU", 1, 1)}, ["CPU"])
    expected = header + to_yaml(generate(plan, ray_version=ray_version))
    if os.environ.get("PD_CLUSTER_WRITE_EXAMPLE"):
        EXAMPLE.write_text(text := expected)
    assert text == expected, "the example is stale: rewrite it (see this test's docstring)"


def test_dashboard_config_map_beside_the_pod_monitor(tmp_path):
    plan = _plan(tmp_path, {"prefill": ("L40S", 1, 1), "decode": ("L40S", 1, 1)}, ["L40S"])
    objects = generate(plan, name="llama", namespace="serving")
    validate_objects(objects)  # the ConfigMap against the core schema, strictly
    kinds = {o["kind"]: o for o in objects}
    monitor, config_map = kinds["PodMonitor"], kinds["ConfigMap"]
    meta = config_map["metadata"]
    assert meta["name"] == "llama-grafana-dashboard"
    assert meta["namespace"] == monitor["metadata"]["namespace"] == "serving"
    assert meta["labels"]["grafana_dashboard"] == "1"  # kube-prometheus-stack's sidecar label
    assert meta["labels"]["app.kubernetes.io/instance"] == "llama"
    (text,) = config_map["data"].values()
    assert json.loads(text) == json.loads(DASHBOARD.read_text())
    # The router's metrics once (the head's proxy), its `instance` label kept.
    serve = next(e for e in monitor["spec"]["podMetricsEndpoints"] if e["port"] == "serve")
    assert serve["honorLabels"] is True
    (keep,) = serve["relabelings"]
    assert keep["action"] == "keep" and keep["regex"] == "head"
    assert keep["sourceLabels"] == ["__meta_kubernetes_pod_label_ray_io_node_type"]


# --- the serveConfigV2, run by Ray Serve here ------------------------------------------------


def kuberay_flags(params: dict[str, str]) -> str:
    """rayStartParams as KubeRay v1.7 writes them into `ray start` (convertParamMap in
    ray-operator/controllers/ray/common/pod.go): sorted, ` --key=value `; "true" a bare flag,
    "false" dropped, except for the options that take an explicit boolean."""
    explicit = {"log-color", "include-dashboard", "include-log-monitor"}
    flags = []
    for key, value in sorted(params.items()):
        if value.lower() in ("true", "false") and key not in explicit:
            flags.append(f" --{key} " if value.lower() == "true" else "")
        else:
            flags.append(f" --{key}={value} ")
    return "".join(flags)


@contextlib.contextmanager
def ray_head(params: dict[str, str], env: dict[str, str]) -> Iterator[str]:
    """`ray start --head --block` with `params` (rayStartParams), run as KubeRay runs it: the
    flags written by kuberay_flags, under `bash -c`. In a new process group and its own temp
    dir, which it yields; it stops only what it started."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths
    flags = kuberay_flags({**params, "temp-dir": temp_dir, "block": "true"})
    bin_dir = Path(sys.executable).parent
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **env}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    head = subprocess.Popen(
        ["/bin/bash", "-c", "--", f"ray start --head {flags}"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield temp_dir
    finally:
        _stop_ray(head, temp_dir)


def _stop_ray(head: subprocess.Popen, temp_dir: str) -> None:
    import psutil

    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=30)
    # Anything that left the group (workers, Serve's actors) names the temp dir.
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in arg for arg in process.info["cmdline"] or ()):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _tenants_file(path: Path, key: str) -> Path:
    digest = hashlib.sha256(key.encode()).hexdigest()
    path.write_text(yaml.safe_dump({"tenants": {"tester": {"key_sha256": digest, "admin": True}}}))
    return path


@pytest.mark.slow
def test_serve_config_starts_the_application(tmp_path, tiny_model_dir):
    pytest.importorskip("ray.serve")
    from ray.serve.schema import ServeDeploySchema

    plan = _plan(tmp_path, {"prefill": ("CPU", 1, 1), "decode": ("CPU", 1, 1)}, ["CPU"])
    service = generate(plan, model_path=str(tiny_model_dir))[0]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)  # Serve's own schema for `serve deploy`
    http, grpc_port, gcs = free_port(), free_port(), free_port()
    config["http_options"].update(host="127.0.0.1", port=http)  # loopback here
    config["grpc_options"]["port"] = grpc_port
    # The Secret's file, at a path of this machine: the args name it, as in the pods.
    args = config["applications"][0]["args"]
    assert args["auth_file"] == "/etc/pd-cluster/auth/auth.yaml"
    key = "sk-test-serve"
    args["auth_file"] = str(_tenants_file(tmp_path / "auth.yaml", key))
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    # The worker group's `ray start`: the custom resource that pins the pools.
    params = {
        "port": str(gcs),
        "num-cpus": "8",
        "resources": "'{\"pdc-CPU\": 2}'",
        "include-dashboard": "false",
        "dashboard-agent-listen-port": str(free_port()),
        "metrics-export-port": str(free_port()),
    }
    bin_dir = Path(sys.executable).parent
    address = f"127.0.0.1:{gcs}"
    # Ray's token auth on, as KubeRay sets it for authOptions.mode token.
    ray_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_urlsafe(32),
               "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **ray_env}
    with ray_head(params, ray_env):
        wait_until(lambda: _ray_up(address, env), 60, interval_s=1, message="no Ray head came up")
        server = subprocess.Popen(
            [bin_dir / "serve", "run", "--address", address, str(path)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _check_served(http, grpc_port, tiny_model_dir, key)
        finally:
            server.terminate()
            server.wait(timeout=60)


def _ray_up(address: str, env: dict[str, str]) -> bool:
    status = [Path(sys.executable).parent / "ray", "status", "--address", address]
    return subprocess.run(status, env=env, capture_output=True).returncode == 0


def _check_served(http: int, grpc_port: int, model_dir: Path, key: str) -> None:
    import urllib.error
    import urllib.request

    import grpc

    from cluster.api.pdcluster.v1 import pdcluster_pb2 as pb
    from cluster.api.pdcluster.v1 import pdcluster_pb2_grpc as pb_grpc
    from cluster.engine.llm_engine import LLMEngine
    from cluster.engine.sampling_params import SamplingParams

    prompt = [5, 17, 42, 99, 7]
    engine = LLMEngine.from_model(str(model_dir))
    expected = engine.generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    )[0].token_ids
    body = json.dumps(
        {
            "model": model_dir.name,
            "prompt": prompt,
            "max_tokens": 12,
            "temperature": 0,
            "ignore_eos": True,
        }
    ).encode()

    def healthy() -> bool:
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{http}/health")
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    # the application deploys in the background
    wait_until(healthy, 240, interval_s=2, message="the Serve application never became healthy")
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.PDClusterStub(channel)
        reply = stub.Complete(
            pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=prompt),
                sampling_params=pb.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
            ),
            timeout=120,
            metadata=[("authorization", f"Bearer {key}")],
        )
        assert list(reply.token_ids) == list(expected)
        assert reply.timing.transfer_s > 0  # disaggregated: the KV moved
        with pytest.raises(grpc.RpcError) as denied:  # the tenants file holds under Serve
            stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
    keyless = urllib.request.Request(f"http://127.0.0.1:{http}/v1/models")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(keyless, timeout=30)
    assert refused.value.code == 401
    request = urllib.request.Request(
        f"http://127.0.0.1:{http}/v1/completions",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        text = json.load(response)["choices"][0]["text"]
    assert text == engine.tokenizer.decode(expected)


def test_colocated_tensor_parallel_plan(tmp_path):
    plan = _plan(tmp_path, {"colocated": ("A100-80GB", 4, 2)}, ["A100-80GB"])
    objects = generate(plan)
    validate_objects(objects)
    args = yaml.safe_load(objects[0]["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["colocated"]["engine"] == {"tensor_parallel_size": 2}
    assert args["colocated"]["num_gpus"] == 1  # rank 0; its follower ranks take one each
    (group,) = objects[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["replicas"] == 1  # 4 instances x 2 GPUs fill one 8-GPU node
