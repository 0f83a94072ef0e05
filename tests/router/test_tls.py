"""TLS on both front ends (cluster/router/tls.py): a throwaway CA signs a server certificate
for 127.0.0.1 and a client certificate; real gRPC and uvicorn servers over one in-process
router answer TLS clients, refuse plaintext, and with a client CA refuse clients without a
certificate it signed (mutual TLS)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
from types import SimpleNamespace

import grpc
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cluster.api.pdcluster.v1 import pdcluster_pb2 as pb
from cluster.api.pdcluster.v1 import pdcluster_pb2_grpc as pb_grpc
from cluster.client import generate
from cluster.engine.sampling_params import SamplingParams
from cluster.launch import create_local
from cluster.router.grpc_server import start_grpc_server
from cluster.router.http_server import start_http_server, stop_http_server
from cluster.router.tls import ENV, TLSFiles, client_channel
from tests.helpers import LoopThread

REQUEST = pb.GenerateRequest(text="hi", sampling_params=pb.SamplingParams(max_tokens=2))


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer=None, issuer_key=None, ca=False, server=False):
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(path, cert=None, key=None):
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        pkcs8, plain = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, pkcs8, plain))
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key, server_key, client_key = _key(), _key(), _key()
    ca = _cert("pd-cluster test CA", ca_key, ca=True)
    server = _cert("127.0.0.1", server_key, ca, ca_key, server=True)
    client = _cert("a client", client_key, ca, ca_key)
    return SimpleNamespace(
        ca=_write(d / "ca.crt", ca),
        cert=_write(d / "server.crt", server),
        key=_write(d / "server.key", key=server_key),
        client_cert=_write(d / "client.crt", client),
        client_key=_write(d / "client.key", key=client_key),
    )


@pytest.fixture(scope="module")
def router(tiny_model_dir):
    loop = LoopThread()
    router = loop.run(create_local(model_dir=str(tiny_model_dir)))
    yield SimpleNamespace(router=router, call=loop.run)
    loop.run(router.shutdown())
    loop.close()


@pytest.fixture(scope="module", params=["tls", "mtls"])
def served(request, router, pki):
    mutual = request.param == "mtls"
    tls = TLSFiles(pki.cert, pki.key, pki.ca if mutual else None)
    call = router.call
    grpc_server, grpc_port = call(start_grpc_server(router.router, port=0, tls=tls))
    http, task, http_port = call(start_http_server(router.router, port=0, tls=tls))
    yield SimpleNamespace(mutual=mutual, grpc_port=grpc_port, http_port=http_port)
    call(grpc_server.stop(None))
    call(stop_http_server(http, task))


def _grpc(served, pki, with_cert: bool):
    cert = dict(cert=pki.client_cert, key=pki.client_key) if with_cert else {}
    return client_channel(f"127.0.0.1:{served.grpc_port}", pki.ca, **cert)


def _openai(served, pki, with_cert: bool, scheme: str = "https") -> openai.OpenAI:
    context = ssl.create_default_context(cafile=pki.ca)
    if with_cert:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return openai.OpenAI(base_url=f"{scheme}://127.0.0.1:{served.http_port}/v1", api_key="x",
                         max_retries=0, timeout=30,
                         http_client=openai.DefaultHttpxClient(verify=context))  # fmt: skip


def test_tls_clients_are_served(served, pki):
    with _grpc(served, pki, with_cert=True) as channel:
        out = pb_grpc.PDClusterStub(channel).Complete(REQUEST, timeout=30)
    assert len(out.token_ids) == 2
    client = _openai(served, pki, with_cert=True)
    assert client.completions.create(model="", prompt="hi", max_tokens=2).usage.completion_tokens


def test_plaintext_is_refused(served, pki):
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.PDClusterStub(channel).Complete(REQUEST, timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(openai.APIConnectionError):
        _openai(served, pki, with_cert=True, scheme="http").models.list()


def test_a_client_without_a_certificate_is_refused_only_under_mutual_tls(served, pki):
    with _grpc(served, pki, with_cert=False) as channel:
        stub = pb_grpc.PDClusterStub(channel)
        if served.mutual:
            with pytest.raises(grpc.RpcError) as refused:
                stub.Complete(REQUEST, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        else:
            assert len(stub.Complete(REQUEST, timeout=30).token_ids) == 2
    client = _openai(served, pki, with_cert=False)
    if served.mutual:
        with pytest.raises(openai.APIConnectionError):
            client.models.list()
    else:
        assert client.models.list().data


def test_a_server_the_ca_did_not_sign_is_refused(served, tmp_path):
    other_key = _key()
    other = _write(tmp_path / "other.crt", _cert("other CA", other_key, ca=True))
    with client_channel(f"127.0.0.1:{served.grpc_port}", other) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.PDClusterStub(channel).Complete(REQUEST, timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_cluster_generate_speaks_tls(served, pki, capsys):
    if served.mutual:
        pytest.skip("`cluster generate` sends no client certificate")
    target = f"127.0.0.1:{served.grpc_port}"
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    assert generate(target, ["hi"], params, None, True, 30.0, pki.ca) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 3


def test_tls_files_come_from_config_or_environment(pki, monkeypatch, tmp_path):
    assert TLSFiles.from_config({}) is None
    monkeypatch.setenv(ENV["cert"], pki.cert)
    monkeypatch.setenv(ENV["key"], pki.key)
    assert TLSFiles.from_config({}) == TLSFiles(pki.cert, pki.key)
    assert TLSFiles.from_config({"client_ca": pki.ca}).client_ca == pki.ca
    monkeypatch.delenv(ENV["key"])
    with pytest.raises(ValueError, match="both cert and key"):
        TLSFiles.from_config({})
    with pytest.raises(ValueError, match="does not exist"):
        TLSFiles.from_config({"key": str(tmp_path / "missing.key")})
    with pytest.raises(ValueError, match="unknown keys"):
        TLSFiles.from_config({"certificate": pki.cert})
