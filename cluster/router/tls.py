"""TLS for the router's two front ends, and for the clients that call them.

    cluster serve --tls-cert server.crt --tls-key server.key [--tls-client-ca ca.crt]

Both APIs then accept only TLS (plaintext connections fail their handshake); with a client CA
both also require a client certificate signed by it (mutual TLS). Certificates and keys are
files (a Kubernetes Secret mounts them), named by flag, config (`tls: {cert, key, client_ca}`)
or environment (PD_CLUSTER_TLS_CERT, PD_CLUSTER_TLS_KEY, PD_CLUSTER_TLS_CLIENT_CA): never their
contents on the command line.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

ENV = {"cert": "PD_CLUSTER_TLS_CERT", "key": "PD_CLUSTER_TLS_KEY",
       "client_ca": "PD_CLUSTER_TLS_CLIENT_CA"}  # fmt: skip
CLIENT_CA_ENV = "PD_CLUSTER_TLS_CA"  # clients: the CA that signed the server's certificate


@dataclass(frozen=True, slots=True)
class TLSFiles:
    cert: str
    key: str
    client_ca: str | None = None

    @classmethod
    def from_config(cls, tls: dict[str, Any] | None) -> TLSFiles | None:
        """The config's `tls:` mapping, each missing entry from the environment; None when
        neither names a certificate."""
        tls = dict(tls or {})
        unknown = sorted(set(tls) - set(ENV))
        if unknown:
            raise ValueError(f"tls: unknown keys {unknown}; known: {sorted(ENV)}")
        for name, env in ENV.items():
            if not tls.get(name) and os.environ.get(env):
                tls[name] = os.environ[env]
        if not tls.get("cert") and not tls.get("key"):
            if tls.get("client_ca"):
                raise ValueError("tls: a client CA needs the server's cert and key too")
            return None
        if not tls.get("cert") or not tls.get("key"):
            raise ValueError("tls: give both cert and key (PEM files)")
        files = cls(str(tls["cert"]), str(tls["key"]), tls.get("client_ca") or None)
        for name in ("cert", "key", "client_ca"):
            path = getattr(files, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"tls: the {name} file {path} does not exist")
        return files

    def grpc_credentials(self) -> grpc.ServerCredentials:
        ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        pair = (Path(self.key).read_bytes(), Path(self.cert).read_bytes())
        return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                           require_client_auth=ca is not None)  # fmt: skip

    def uvicorn_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"ssl_certfile": self.cert, "ssl_keyfile": self.key}
        if self.client_ca:
            options |= {"ssl_ca_certs": self.client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return options


def client_channel(target: str, ca: str | None = None, aio: bool = False,
                   cert: str | None = None, key: str | None = None):  # fmt: skip
    """A gRPC channel to `target`: TLS when a CA file is given (argument or
    PD_CLUSTER_TLS_CA), with a client certificate for mutual TLS; else plaintext."""
    ca = ca or os.environ.get(CLIENT_CA_ENV)
    module = grpc.aio if aio else grpc
    if not ca:
        return module.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        Path(ca).read_bytes(),
        Path(key).read_bytes() if key else None,
        Path(cert).read_bytes() if cert else None,
    )
    return module.secure_channel(target, credentials)
