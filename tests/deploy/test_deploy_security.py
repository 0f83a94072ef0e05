"""The manifests of `cluster deploy kuberay` are secure by default (docs/kubernetes.md#security).

checkov (Bridgecrew's Kubernetes policies) scans what a cluster would run: it does not look
inside custom resources, so each pod template (head, every worker group) is scanned as a Pod,
with the NetworkPolicy, the API Service and the ConfigMap beside it. Every check passes except
SKIPPED, each for the reason given there (the same list is in docs/kubernetes.md). checkov lives
in its own virtualenv, build/checkov (.ci/run makes it): its pins would downgrade packages the
project's environment uses.

Then directly: no secret in the manifest, only Secret names and file paths; the NetworkPolicy
selects every pod and admits what KubeRay needs; every container's securityContext; Ray token
auth on; the dashboard off 0.0.0.0, and that head's `ray start`, run here as KubeRay runs it,
serves the dashboard on the pod IP only and only with the token.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import urllib.error
import urllib.request

import pytest
import yaml

from cluster.cli import main
from cluster.deploy.kuberay import Hardening, generate
from cluster.engine.parallel import free_port
from cluster.placement.plan import PlanError
from tests.deploy.test_deploy import _plan, ray_head, validate_objects
from tests.helpers import REPO_ROOT, wait_until

CHECKOV_VENV = REPO_ROOT / "build" / "checkov" / "bin" / "checkov"

SKIPPED = {
    "CKV_K8S_8": "liveness probe: KubeRay injects it (HTTP on the dashboard agent, :52365)",
    "CKV_K8S_9": "readiness probe: KubeRay injects it (raylet, plus the Serve proxy on workers)",
    "CKV_K8S_15": "pull policy IfNotPresent: multi-GB images, fixed tags; AlwaysPullImages "
    "admission re-checks credentials cluster-wide where nodes are shared",
    "CKV_K8S_40": "uid 1000, not >= 10000: the images' user (KubeRay's default user too)",
    "CKV_K8S_43": "tag, not digest, by default: `--image REPO@sha256:...` pins one",
}
# With --autoscale the head mounts its service-account token: KubeRay's autoscaler sidecar
# calls the Kubernetes API with it (to scale the worker groups).
SKIPPED_AUTOSCALE_HEAD = {"CKV_K8S_38": "the autoscaler sidecar calls the Kubernetes API"}

SECRET_ENV = {"RAY_AUTH_TOKEN", "PD_CLUSTER_API_KEY", "PD_CLUSTER_TLS_KEY"}


def _heterogeneous(tmp_path):
    return _plan(
        tmp_path,
        {"prefill": ("H100-80GB", 3, 1), "decode": ("A100-80GB", 10, 1)},
        ["H100-80GB", "A100-80GB"],
    )


def _cpu(tmp_path):
    return _plan(tmp_path, {"colocated": ("CPU", 2, 1)}, ["CPU"])


def _groups(objects: list[dict]) -> list[dict]:
    cluster = objects[0]["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def as_scanned(objects: list[dict]) -> list[dict]:
    """What runs: each pod template as a Pod, the API Service, and the other core objects."""
    scanned = []
    for obj in objects:
        if obj["kind"] == "RayService":
            meta = obj["metadata"]
            for group in _groups(objects):
                template = group["template"]
                name = f"{meta['name']}-{group.get('groupName', 'head')}"
                pod_meta = {**template["metadata"], "name": name, "namespace": meta["namespace"]}
                scanned.append({"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta,
                                "spec": template["spec"]})  # fmt: skip
            scanned.append({"apiVersion": "v1", "kind": "Service", **obj["spec"]["serveService"]})
        elif obj["apiVersion"] in ("v1", "networking.k8s.io/v1"):
            scanned.append(obj)
    return scanned


def checkov(objects: list[dict], tmp_path) -> list[dict]:
    """checkov's failed checks on `objects`, run offline."""
    binary = CHECKOV_VENV if CHECKOV_VENV.exists() else shutil.which("checkov")
    if binary is None:
        pytest.skip("checkov: needs `python3 -m venv build/checkov && build/checkov/bin/pip "
                    "install 'checkov>=3.3.30,<3.4'` (.ci/run does it)")  # fmt: skip
    path = tmp_path / "scanned.yaml"
    path.write_text(yaml.safe_dump_all(as_scanned(objects)))
    done = subprocess.run(
        [binary, "-f", str(path), "--framework", "kubernetes", "--skip-download",
         "-o", "json", "--quiet", "--compact"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr[-2000:]  # 1: some check failed
    report = json.loads(done.stdout)
    report = report[0] if isinstance(report, list) else report
    summary = report["summary"]
    assert summary["parsing_errors"] == 0 and summary["resource_count"] == len(as_scanned(objects))
    return report["results"]["failed_checks"]


def _unexpected(failed: list[dict], skipped_on: dict[str, dict]) -> list[str]:
    unexpected = []
    for check in failed:
        allowed = {**SKIPPED, **skipped_on.get(check["resource"], {})}
        if check["check_id"] not in allowed:
            unexpected.append(f"{check['check_id']} {check['resource']}: {check['check_name']}")
    return unexpected


@pytest.mark.parametrize("plan_of", [_heterogeneous, _cpu])
def test_checkov_finds_nothing_but_the_skipped_checks(tmp_path, plan_of):
    objects = generate(plan_of(tmp_path), name="llama", namespace="serving",
                       model_path="/models/llama", model_pvc="models")  # fmt: skip
    failed = checkov(objects, tmp_path)
    assert _unexpected(failed, {}) == []
    # Each skip is still needed: a check that now passes leaves the list.
    assert {c["check_id"] for c in failed} == set(SKIPPED)


def test_checkov_with_the_autoscaler(tmp_path):
    objects = generate(_heterogeneous(tmp_path), name="llama", namespace="serving",
                       autoscale=True)  # fmt: skip
    failed = checkov(objects, tmp_path)
    assert _unexpected(failed, {"Pod.serving.llama-head": SKIPPED_AUTOSCALE_HEAD}) == []
    assert {c["check_id"] for c in failed} == set(SKIPPED) | set(SKIPPED_AUTOSCALE_HEAD)


def test_no_secret_in_the_manifest_only_names_and_paths(tmp_path):
    hardening = Hardening(auth_secret="llama-keys", ray_token_secret="llama-ray-token")
    objects = generate(_heterogeneous(tmp_path), name="llama", hardening=hardening)
    validate_objects(objects)
    assert "Secret" not in {o["kind"] for o in objects}
    service = objects[0]
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["auth_file"] == "/etc/pd-cluster/auth/auth.yaml"
    assert not {"api_key", "tls"} & set(args)
    assert service["spec"]["rayClusterConfig"]["authOptions"] == {
        "mode": "token",
        "secretName": "llama-ray-token",
    }
    for group in _groups(objects):
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        for env in container["env"]:
            assert env["name"] not in SECRET_ENV
            assert "secretKeyRef" not in env.get("valueFrom", {})  # files, not environment
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["auth"]["secret"] == {"secretName": "llama-keys", "defaultMode": 0o440}
        mount = next(m for m in container["volumeMounts"] if m["name"] == "auth")
        assert mount == {"name": "auth", "mountPath": "/etc/pd-cluster/auth", "readOnly": True}
    text = yaml.safe_dump_all(objects)
    assert "key_sha256" not in text and "auth_token:" not in text


def test_auth_is_on_unless_refused_explicitly(tmp_path, capsys):
    plan = _cpu(tmp_path)
    (service, *_) = generate(plan, name="llama")
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["auth_file"] == "/etc/pd-cluster/auth/auth.yaml"
    volume = next(v for v in _groups([service])[0]["template"]["spec"]["volumes"]
                  if v["name"] == "auth")  # fmt: skip
    assert volume["secret"]["secretName"] == "llama-auth"  # <name>-auth

    out = tmp_path / "open.yaml"
    assert main(["deploy", "kuberay", "--plan", str(tmp_path / "plan.yaml"), "--no-auth",
                 "--no-ray-auth", "-o", str(out)]) == 0  # fmt: skip
    service = next(yaml.safe_load_all(out.read_text()))
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert "auth_file" not in args
    assert service["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "disabled"}
    for group in _groups([service]):
        assert "auth" not in {v["name"] for v in group["template"]["spec"]["volumes"]}
    # Both at once is refused: one names a Secret, the other says there is none.
    with pytest.raises(SystemExit):
        main(["deploy", "kuberay", "--plan", str(tmp_path / "plan.yaml"), "--no-auth",
              "--auth-secret", "x"])  # fmt: skip
    capsys.readouterr()


def test_ray_token_auth_needs_ray_2_52(tmp_path):
    plan = _cpu(tmp_path)
    with pytest.raises(PlanError, match="Ray >= 2.52"):
        generate(plan, ray_version="2.51.1")
    (service, *_) = generate(plan, ray_version="2.52.0")
    assert service["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    validate_objects(generate(plan, ray_version="2.40.0",
                              hardening=Hardening(auth_secret="a", ray_auth=False)))  # fmt: skip


def test_every_pod_and_container_is_hardened(tmp_path):
    objects = generate(_heterogeneous(tmp_path), name="llama", model_pvc="models",
                       model_path="/models/llama")  # fmt: skip
    validate_objects(objects)
    for group in _groups(objects):
        spec = group["template"]["spec"]
        assert spec["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        assert spec["automountServiceAccountToken"] is False
        assert "hostNetwork" not in spec and "hostIPC" not in spec and "hostPID" not in spec
        (container,) = spec["containers"]
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        }
        # With a read-only root: /tmp (Ray's session dir, HOME's caches) and /dev/shm write.
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert volumes[mounts["/tmp"]["name"]]["emptyDir"] == {}
        shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
        memory_gi = int(container["resources"]["limits"]["memory"].removesuffix("Gi"))
        assert shm["medium"] == "Memory"
        # Ray's object store (30% of the memory) fits, within the memory limit.
        assert 0.3 * memory_gi < int(shm["sizeLimit"].removesuffix("Gi")) < memory_gi
        assert mounts["/models"]["readOnly"] and mounts["/etc/pd-cluster/auth"]["readOnly"]
        env = {e["name"]: e for e in container["env"]}
        assert env["HOME"]["value"].startswith("/tmp/")
        assert env["RAY_USAGE_STATS_ENABLED"]["value"] == "0"


def test_the_tiny_model_is_built_where_a_read_only_root_lets_it(tmp_path):
    """The CUDA image has no tiny model: a GPU plan without --model-path builds it in /tmp;
    the CPU image carries it, at the image's own PD_CLUSTER_CACHE."""

    def caches(objects):
        return {
            env.get("value")
            for group in _groups(objects)
            for env in group["template"]["spec"]["containers"][0]["env"]
            if env["name"] == "PD_CLUSTER_CACHE"
        }

    assert caches(generate(_heterogeneous(tmp_path))) == {"/tmp/home/.cache/pd-cluster"}
    assert caches(generate(_heterogeneous(tmp_path), model_path="/models/llama")) == set()
    assert caches(generate(_cpu(tmp_path))) == set()


def test_the_autoscaler_keeps_the_head_token_and_is_hardened(tmp_path):
    objects = generate(_cpu(tmp_path), autoscale=True)
    validate_objects(objects)
    cluster = objects[0]["spec"]["rayClusterConfig"]
    head, *workers = _groups(objects)
    assert head["template"]["spec"]["automountServiceAccountToken"] is True
    assert all(w["template"]["spec"]["automountServiceAccountToken"] is False for w in workers)
    options = cluster["autoscalerOptions"]
    assert options["securityContext"]["readOnlyRootFilesystem"] is True
    assert options["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]
    ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
    assert {443, 6443} <= ports  # the Kubernetes API


def _rules(policy: dict, port: int) -> list[dict]:
    return [r for r in policy["spec"]["ingress"]
            if "ports" not in r or port in {p["port"] for p in r["ports"]}]  # fmt: skip


def _namespaces(rules: list[dict]) -> set[str | None]:
    """The namespaces a port is open to: None for anywhere, "own" for the cluster's pods."""
    found: set[str | None] = set()
    for rule in rules:
        if "from" not in rule:
            found.add(None)
        for peer in rule.get("from", []):
            if "podSelector" in peer:
                found.add("own")
            elif "namespaceSelector" in peer:
                found.add(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
            else:
                found.add(peer["ipBlock"]["cidr"])
    return found


def test_network_policy_selects_every_pod_and_admits_only_what_kuberay_needs(tmp_path):
    objects = generate(_heterogeneous(tmp_path), name="llama", namespace="serving")
    validate_objects(objects)  # the NetworkPolicy against the core schema, strictly
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert policy["metadata"]["namespace"] == "serving"
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for group in _groups(objects):
        assert selector.items() <= group["template"]["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert _namespaces(_rules(policy, 8265)) == {"own", "kuberay"}  # the dashboard
    assert _namespaces(_rules(policy, 6379)) == {"own"}  # GCS: Ray's own pods only
    assert _namespaces(_rules(policy, 10001)) == {"own"}  # Ray client: nobody else
    assert None in _namespaces(_rules(policy, 8000)) and None in _namespaces(_rules(policy, 9000))
    assert _namespaces(_rules(policy, 8080)) == {"own", "monitoring"}
    egress = policy["spec"]["egress"]
    assert egress[0] == {"to": [{"podSelector": {"matchLabels": selector}}]}
    assert egress[1] == {
        "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    }
    assert len(egress) == 2  # nothing else leaves: weights come from the PVC


def test_network_policy_flags(tmp_path):
    _cpu(tmp_path)
    out = tmp_path / "rs.yaml"
    code = main(["deploy", "kuberay", "--plan", str(tmp_path / "plan.yaml"), "-o", str(out),
                 "--api-from", "namespace=gateway", "--api-from", "10.0.0.0/8",
                 "--operator-namespace", "ray-system", "--metrics-from", "prometheus",
                 "--egress", "any", "--dashboard-host", "all"])  # fmt: skip
    assert code == 0
    objects = list(yaml.safe_load_all(out.read_text()))
    validate_objects(objects)
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert _namespaces(_rules(policy, 9000)) == {"own", "gateway", "10.0.0.0/8"}
    assert _namespaces(_rules(policy, 8000)) == {"own", "gateway", "10.0.0.0/8", "ray-system",
                                                 "prometheus"}  # fmt: skip
    assert _namespaces(_rules(policy, 8265)) == {"own", "ray-system"}
    assert _namespaces(_rules(policy, 8080)) == {"own", "prometheus"}
    assert policy["spec"]["policyTypes"] == ["Ingress"] and "egress" not in policy["spec"]
    head = objects[0]["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert main(["deploy", "kuberay", "--plan", str(tmp_path / "plan.yaml"),
                 "--api-from", "nowhere"]) == 2  # fmt: skip


def test_dashboard_binds_the_pod_ip_by_default(tmp_path):
    (service, *_) = generate(_cpu(tmp_path))
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "${POD_IP}"
    env = {e["name"]: e for e in head["template"]["spec"]["containers"][0]["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert service["spec"]["rayClusterConfig"]["authOptions"]["mode"] == "token"


def _pod_ip() -> str | None:
    """An address of this machine on a non-loopback interface (a pod's eth0)."""
    import psutil

    up = {name for name, stats in psutil.net_if_stats().items() if stats.isup}
    for name, addresses in psutil.net_if_addrs().items():
        for address in addresses:
            if name in up and address.family == socket.AF_INET and address.address[:4] != "127.":
                return address.address
    return None


def _get(url: str, token: str | None = None) -> int | str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError as e:
        return type(getattr(e, "reason", e)).__name__


def test_head_ray_start_serves_the_dashboard_on_the_pod_ip_with_the_token(tmp_path):
    """The head's rayStartParams, run as KubeRay runs them (`bash -c "ray start --head ..."`,
    POD_IP from the downward API, RAY_AUTH_MODE/RAY_AUTH_TOKEN as KubeRay injects them for
    authOptions.mode token): the dashboard answers on the pod IP with the token, 401 without,
    and not at all on localhost."""
    pod_ip = _pod_ip()
    if pod_ip is None:
        pytest.skip("no non-loopback interface here")
    (service, *_) = generate(_cpu(tmp_path))
    params = dict(service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"])
    port = free_port()
    params.update({  # free ports: another Ray may run on this machine
        "port": str(free_port()), "dashboard-port": str(port), "num-cpus": "1",
        "dashboard-agent-listen-port": str(free_port()), "metrics-export-port": str(free_port()),
        "ray-client-server-port": str(free_port()), "node-ip-address": pod_ip,
    })  # fmt: skip
    token = secrets.token_urlsafe(32)
    env = {"POD_IP": pod_ip, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    dashboard = f"http://{pod_ip}:{port}"
    with ray_head(params, env):
        wait_until(lambda: _get(f"{dashboard}/api/version", token) == 200, 90, interval_s=0.5,
                   message="the dashboard never answered on the pod IP")  # fmt: skip
        assert _get(f"{dashboard}/api/version") == 401
        assert _get(f"{dashboard}/api/serve/applications/") == 401  # what KubeRay calls
        assert _get(f"{dashboard}/api/serve/applications/", token) == 200
        assert _get(f"{dashboard}/api/gcs_healthz") == 200  # probes need no token
        assert _get(f"http://127.0.0.1:{port}/api/version", token) == "ConnectionRefusedError"
