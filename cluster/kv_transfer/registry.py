"""Handshake: how a decode instance finds a prefill agent's `KVAgentInfo` by name, with no
fixed port convention.

Inside one Ray cluster a named actor holds the infos (`workers/registry.py`, which owns the
Ray side: this package has none); a
puller fetches an agent's info once and again only when a `KVHandle` shows a new epoch (the
agent restarted). Outside Ray, `AgentInfoServer` answers on a plain TCP address with the
info as one JSON line and `fetch_agent_info(host, port)` reads it.
"""

from __future__ import annotations

import base64
import json
import socket
import socketserver
import threading
from dataclasses import asdict

from cluster.kv_transfer.agent_info import KVAgentInfo
from cluster.kv_transfer.layout import KVLayout

REGISTRY_ACTOR = "pd-cluster-kv-registry"


def info_to_json(info: KVAgentInfo) -> str:
    data = asdict(info)
    data["metadata"] = base64.b64encode(info.metadata).decode()
    return json.dumps(data)


def info_from_json(text: str) -> KVAgentInfo:
    data = json.loads(text)
    data["metadata"] = base64.b64decode(data["metadata"])
    data["layout"] = KVLayout(**data["layout"])
    return KVAgentInfo(**data)


class AgentRegistry:
    """The named actor's state: agent name -> info."""

    def __init__(self) -> None:
        self._infos: dict[str, KVAgentInfo] = {}

    def publish(self, info: KVAgentInfo) -> None:
        self._infos[info.agent_name] = info

    def lookup(self, agent_name: str) -> KVAgentInfo | None:
        return self._infos.get(agent_name)

    def remove(self, agent_name: str) -> None:
        self._infos.pop(agent_name, None)

    def names(self) -> list[str]:
        return sorted(self._infos)


class LocalKVRegistry(AgentRegistry):
    """The same registry in one process (engines without Ray, e.g. `Router.create_local`)."""

    def lookup(self, agent_name: str, timeout_s: float = 0.0) -> KVAgentInfo:
        info = super().lookup(agent_name)
        if info is None:
            raise KeyError(f"no KV agent named {agent_name!r} is registered")
        return info


class AgentInfoServer:
    """Plain-address fallback: answers every TCP connection with the info as one JSON line."""

    def __init__(self, info: KVAgentInfo, host: str = "127.0.0.1", port: int = 0):
        payload = (info_to_json(info) + "\n").encode()

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.sendall(payload)

        self._server = socketserver.ThreadingTCPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.address = self._server.server_address
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def fetch_agent_info(host: str, port: int, timeout_s: float = 5.0) -> KVAgentInfo:
    """Read an AgentInfoServer; ConnectionError with the address if it cannot."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            chunks = []
            while chunk := conn.recv(1 << 16):
                chunks.append(chunk)
    except OSError as e:
        raise ConnectionError(f"no KV agent info at {host}:{port}: {e}") from e
    return info_from_json(b"".join(chunks).decode())
