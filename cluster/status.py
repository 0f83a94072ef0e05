"""`cluster status`: what a running cluster's router says about itself (`GetClusterStatus`
over gRPC): its pools, each instance's health, load and KV blocks, and the admission limits.
A table once, the same redrawn every N seconds like `top` (`--watch`), or JSON (`--json`).
The serving side is in docs/serving.md, "`cluster status`"; the numbers are the router's
latest poll of each instance (every 0.5 s), not a scrape of `/metrics`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

import grpc

from cluster.api.pdcluster.v1 import pdcluster_pb2 as pb
from cluster.api.pdcluster.v1 import pdcluster_pb2_grpc as pb_grpc
from cluster.client import API_KEY_ENV
from cluster.router.tls import client_channel

_CLEAR = "\033[H\033[2J"  # cursor home, clear screen
_COLUMNS = ("ROLE", "INSTANCE", "HEALTHY", "RUNNING", "WAITING", "PENDING_TOKENS",
            "KV_FREE/TOTAL", "KV_USAGE", "NODE")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="127.0.0.1:50051", help="gRPC address of the router")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"bearer token, if the server wants one (or set {API_KEY_ENV})",
    )
    parser.add_argument(
        "--tls-ca",
        help="PEM CA of the server's certificate: call it over TLS (or set PD_CLUSTER_TLS_CA)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="redraw every SECONDS (default 2) until Ctrl-C",
    )
    shown.add_argument("--json", action="store_true", help="print the status as JSON, once")


def run(args: argparse.Namespace) -> int:
    if args.watch is not None and args.watch <= 0:
        raise ValueError(f"--watch takes a positive number of seconds, got {args.watch}")
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    with client_channel(args.target, args.tls_ca) as channel:
        stub = pb_grpc.PDClusterStub(channel)
        fetch = lambda: stub.GetClusterStatus(
            pb.GetClusterStatusRequest(), metadata=metadata, timeout=args.timeout
        )
        try:
            status = fetch()
        except grpc.RpcError as e:
            print(_error_line(args.target, e), file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(plain(status), indent=2))
        elif args.watch is None:
            print(render(status, args.target))
        else:
            _watch(fetch, status, args.target, args.watch)
    return 0


def _watch(fetch, status: pb.ClusterStatus, target: str, interval_s: float) -> None:
    """Redraw until Ctrl-C (or SIGTERM). A failed poll is drawn in place of the table: the
    router may be restarting, and the next poll may find it again. The signal only sets a
    flag: a KeyboardInterrupt inside a blocking gRPC call can leave the channel unable to
    close, so the loop ends between polls instead (within one --timeout at worst)."""
    clear = _CLEAR if sys.stdout.isatty() else "\n"
    error = None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        frame = render(status, target) if error is None else _error_line(target, error)
        stamp = time.strftime("%H:%M:%S")
        print(f"{clear}{frame}\n\n{stamp}, every {interval_s:g} s; Ctrl-C to stop", flush=True)
        if stop.wait(interval_s):
            break
        try:
            status, error = fetch(), None
        except grpc.RpcError as e:
            status, error = None, e
    print()


def _error_line(target: str, error: grpc.RpcError) -> str:
    details = " ".join(str(error.details()).split())
    return (
        f"error: cannot get the status of {target}: {error.code().name}: {details} "
        "(is `cluster serve` running there? right --api-key?)"
    )


def plain(message) -> dict:
    """A status message as plain JSON values: every field (defaults included, so a consumer
    sees healthy: false and zero counts), integers as numbers, floats rounded."""
    out = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None:
            value = [plain(v) for v in value] if field.is_repeated else plain(value)
        elif field.is_repeated:
            value = list(value)
        elif isinstance(value, float):
            value = round(value, 6)
        out[field.name] = value
    return out


# --- the table ---------------------------------------------------------------------------------


def render(status: pb.ClusterStatus, target: str) -> str:
    head = (
        f"pd-cluster at {target}: mode {status.mode}, requests in flight "
        f"{status.num_requests_in_flight}/{status.max_requests_in_flight}, "
        f"queued max {status.max_queued_requests}"
    )
    pools = ", ".join(_pool_summary(pool) for pool in status.pools) or "none"
    rows = [_row(i) for pool in status.pools for i in pool.instances]
    return "\n".join([head, f"pools: {pools}", "", *_table([_COLUMNS, *rows])])


def _pool_summary(pool: pb.PoolStatus) -> str:
    num_healthy = sum(i.healthy for i in pool.instances)
    return f"{pool.role} {num_healthy}/{len(pool.instances)} healthy"


def _row(i: pb.InstanceStatus) -> tuple[str, ...]:
    return (
        i.role,
        i.instance_id,
        ("yes" if i.healthy else "NO") + (" (draining)" if i.draining else ""),
        str(i.num_running),
        str(i.num_waiting),
        str(i.pending_prompt_tokens),
        f"{i.num_free_kv_blocks}/{i.num_kv_blocks}",
        f"{100 * i.kv_cache_usage:.1f}%",
        i.node or "-",
    )


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    pad = lambda row: "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True))
    return [pad(row).rstrip() for row in rows]
