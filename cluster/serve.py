"""`cluster serve`: start (or join) Ray, the prefill and decode pools, the router, and its gRPC
and HTTP front ends; run until SIGINT/SIGTERM, then drain and stop everything.

With no arguments: local Ray, the tiny default model, 1 prefill + 1 decode instance, gRPC on
127.0.0.1:50051, HTTP on 127.0.0.1:8000.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import ray

from cluster import logs, tracing
from cluster.client import API_KEY_ENV
from cluster.elastic.autoscaler import start_autoscaler
from cluster.elastic.settings import AutoscaleSettings
from cluster.emulate import EmulationSettings, describe, emulate
from cluster.launch import AUTH_FILE_ENV, DeploymentConfig, start_ray
from cluster.logs import FORMATS
from cluster.router.grpc_server import start_grpc_server
from cluster.router.http_server import start_http_server, stop_http_server
from cluster.router.tls import ENV as TLS_ENV


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="Hugging Face checkpoint folder (default: tiny model)")
    parser.add_argument("--config", help="deployment YAML (model, pools, engine, transfer...)")
    parser.add_argument("--mode", choices=["disaggregated", "colocated"])
    parser.add_argument("--plan", help="placement plan file (JSON/YAML) from `placement plan`")
    parser.add_argument(
        "--emulate",
        metavar="HARDWARE",
        help="rehearse on this machine: every instance emulates its TP x PP devices of this "
        "catalog hardware (e.g. A100-80GB) running --model (a preset such as OPT-13B, or a "
        "config.json) at the latency model's step times; numbers are emulated",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="with --emulate: run this many times slower than the emulated hardware so that "
        "this machine's CPUs keep up (>= 1)",
    )
    parser.add_argument("--address", help="join this Ray cluster (e.g. auto) instead of a new one")
    parser.add_argument("--host", help="listen address of both APIs (default 127.0.0.1)")
    parser.add_argument("--grpc-port", type=int)
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--served-model-name", help="the model name clients use")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on both APIs; prefer {API_KEY_ENV} or "
        "--api-key-file: a key on the command line shows in the process list",
    )
    parser.add_argument("--api-key-file", help="read the API key from this file")
    parser.add_argument(
        "--auth-file",
        help=f"tenants YAML (keys as SHA-256, limits, cache sharing; or set {AUTH_FILE_ENV}): "
        "each request runs as its key's tenant, in its own prefix cache",
    )
    parser.add_argument(
        "--tls-cert", help=f"PEM certificate: both APIs serve TLS only (or set {TLS_ENV['cert']})"
    )
    parser.add_argument("--tls-key", help=f"PEM private key of --tls-cert (or {TLS_ENV['key']})")
    parser.add_argument(
        "--tls-client-ca",
        help=f"PEM CA: require client certificates it signed, mutual TLS ({TLS_ENV['client_ca']})",
    )
    parser.add_argument(
        "--autoscale",
        action="store_true",
        help="elastic pools: an SLO autoscaler grows, shrinks and flips the prefill and decode "
        "pools while serving (settings: the config's autoscale section; docs/elastic.md)",
    )
    parser.add_argument("--min-gpus", type=int, help="with --autoscale: devices kept at least")
    parser.add_argument("--max-gpus", type=int, help="with --autoscale: devices taken at most")
    parser.add_argument("--num-prefill", type=int, help="prefill instances")
    parser.add_argument("--num-decode", type=int, help="decode instances")
    parser.add_argument("--num-colocated", type=int, help="colocated instances")
    parser.add_argument(
        "--failure-policy", choices=["fail", "recompute", "retry"], help="default policy"
    )
    parser.add_argument(
        "--drain-timeout", type=float, help="on SIGTERM: seconds to finish in-flight requests"
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        help="logs on stderr: JSON lines (one access line per request) or text (default: auto, "
        "text on a terminal)",
    )
    parser.add_argument(
        "--otlp-traces-endpoint",
        help="export OpenTelemetry traces over OTLP/gRPC to this endpoint (host:port)",
    )


def config_from_args(args: argparse.Namespace) -> DeploymentConfig:
    config = DeploymentConfig.from_yaml(args.config) if args.config else DeploymentConfig()
    if args.model:
        config.model = args.model
    if args.mode:
        config.mode = args.mode
    plan = load_plan(args.plan) if args.plan else {}
    if plan:
        apply_plan(config, plan)
    for role in ("prefill", "decode", "colocated"):
        count = getattr(args, f"num_{role}")
        if count is not None:
            getattr(config, role).num_instances = count
    if args.emulate:
        if not args.model:
            raise ValueError("--emulate needs --model: a preset (e.g. OPT-13B) or a config.json")
        emulate(config, emulation_settings(args.emulate, args.model, args.time_scale, plan))
    if args.address:
        config.ray_address = args.address
    if args.host:
        config.grpc["host"] = config.http["host"] = args.host
    if args.grpc_port is not None:
        config.grpc["port"] = args.grpc_port
    if args.http_port is not None:
        config.http["port"] = args.http_port
    if args.served_model_name:
        config.served_model_name = args.served_model_name
    if args.api_key_file:
        config.api_key = _read_secret(args.api_key_file)
    elif args.api_key:
        config.api_key = args.api_key
    if args.auth_file:
        config.auth_file = args.auth_file
    for name in ("cert", "key", "client_ca"):
        value = getattr(args, f"tls_{name}")
        if value:
            config.tls[name] = value
    if args.autoscale and config.autoscale is None:
        config.autoscale = AutoscaleSettings()
    for name in ("min_gpus", "max_gpus"):
        value = getattr(args, name)
        if value is not None:
            if config.autoscale is None:
                raise ValueError(f"--{name.replace('_', '-')} goes with --autoscale")
            setattr(config.autoscale, name, value)
    if config.autoscale is not None:
        config.autoscale.__post_init__()
    if args.failure_policy:
        config.router["failure_policy"] = args.failure_policy
    if args.drain_timeout is not None:
        config.drain_timeout_s = args.drain_timeout
    if args.log_format:
        config.log_format = args.log_format
    if args.otlp_traces_endpoint:
        config.otlp_traces_endpoint = args.otlp_traces_endpoint
    config.__post_init__()  # re-check after the overrides
    return config


def _read_secret(path: str) -> str:
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    if not value:
        raise ValueError(f"{path} is empty")
    return value


def load_plan(path: str) -> dict:
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


def apply_plan(config: DeploymentConfig, plan: dict) -> None:
    """Take the pools of a placement plan: mode and, per role, the instance count and the
    tensor/pipeline parallelism (prefill and decode may differ: their KV is re-sharded on
    transfer, kv_transfer/reshard.py)."""
    plan = plan.get("deployment", plan)
    if "mode" in plan:
        config.mode = plan["mode"]
    for role in ("prefill", "decode", "colocated"):
        pool = plan.get(role)
        if not pool:
            continue
        spec = getattr(config, role)
        spec.num_instances = int(pool.get("num_instances", 1))
        for key, short in (("tensor_parallel_size", "tp"), ("pipeline_parallel_size", "pp")):
            size = int(pool.get(key, pool.get(short, 1)))
            if size < 1:
                raise ValueError(f"the plan's {role} pool has {key}={size}; it must be >= 1")
            if size != 1:
                spec.engine[key] = size


def emulation_settings(hardware: str, model: str, time_scale: float, plan: dict):
    """What emulation takes from a plan: its affinity and its per-pool batch limits."""
    plan = plan.get("deployment", plan)
    batch = {role: int(plan[role]["max_batch_tokens"]) for role in ("prefill", "decode",
             "colocated") if isinstance(plan.get(role), dict) and plan[role].get(
             "max_batch_tokens")}  # fmt: skip
    return EmulationSettings(hardware, model, time_scale, plan.get("affinity") or "high",
                             batch_tokens=batch)  # fmt: skip


def _pool(config: DeploymentConfig, role: str) -> str:
    """'2 decode' or, for parallel instances, '2 decode (TP2 x PP2)'."""
    engine = config.engine_config(role)
    shape = f" (TP{engine.tensor_parallel_size} x PP{engine.pipeline_parallel_size})"
    count = f"{getattr(config, role).num_instances} {role}"
    return count + shape if engine.world_size > 1 else count


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    logs.configure(config.log_format)
    return asyncio.run(serve(config))


async def serve(config: DeploymentConfig, ready: asyncio.Event | None = None) -> int:
    if not ray.is_initialized():
        ray.init(
            address=config.ray_address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    # After ray.init: it installs its own SIGTERM handler (exit at once), and Kubernetes
    # stops pods with SIGTERM, which must drain instead.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    auth, tls = config.auth(), config.tls_files()  # a bad file fails before any pool starts
    router = await start_ray(config)
    autoscaler = None
    try:
        if config.autoscale is not None:
            autoscaler = start_autoscaler(router, config)
        grpc_server, grpc_port = await start_grpc_server(
            router, config.grpc["host"], config.grpc["port"], auth=auth, tls=tls
        )
        http_server, http_task, http_port = await start_http_server(
            router, config.http["host"], config.http["port"], auth=auth, tls=tls
        )
    except BaseException:
        if autoscaler is not None:
            await autoscaler.stop()
        await router.shutdown()
        raise
    pools = " + ".join(_pool(config, role) for role in config.roles())
    if config.engine_config(config.roles()[0]).emulation is not None:
        pools = describe(config)
    print(
        f"pd-cluster serving {router.model_info.name!r} ({config.mode}: {pools}): "
        f"gRPC {config.grpc['host']}:{grpc_port}, "
        f"HTTP {'https' if tls else 'http'}://{config.http['host']}:{http_port}/v1"
        + (f" ({len(auth.tenants)} tenant(s), API key required)" if auth else "")
        + (" (mutual TLS)" if tls and tls.client_ca else "")
        + (
            f" (autoscaled, up to {config.autoscale.max_gpus} devices)"
            if autoscaler is not None
            else ""
        )
        + "; Ctrl-C stops",
        flush=True,
    )
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        print(f"pd-cluster: draining (up to {config.drain_timeout_s:g} s)", file=sys.stderr,
              flush=True)  # fmt: skip
        if autoscaler is not None:
            await autoscaler.stop()
        left = await router.drain(config.drain_timeout_s)
        print(f"pd-cluster: stopping ({left} requests cut)", file=sys.stderr, flush=True)
        await grpc_server.stop(grace=2.0)
        await stop_http_server(http_server, http_task)
        await router.shutdown()
        tracing.shutdown()
    return 0
