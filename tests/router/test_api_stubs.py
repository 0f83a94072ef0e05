"""The checked-in gRPC stubs (cluster/api/pdcluster) match proto/ as grpcio-tools compiles it."""

from __future__ import annotations

from cluster.api.generate import API_DIR, generate


def test_checked_in_stubs_match_proto(tmp_path):
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in generate(tmp_path)}
    stub_dir = API_DIR / "pdcluster"
    checked_in = {
        p.relative_to(API_DIR): p.read_bytes()
        for p in stub_dir.rglob("*")
        if p.suffix in (".py", ".pyi")
    }
    stale = sorted(str(p) for p in fresh if checked_in.get(p) != fresh[p])
    extra = sorted(str(p) for p in checked_in if p not in fresh)
    assert not stale and not extra, (
        f"cluster/api stubs are out of date with proto/ (differ or missing: {stale}, "
        f"no longer generated: {extra}); run `python -m cluster.api.generate` "
        "(with the pinned grpcio-tools) and commit the result"
    )


def test_stubs_import_as_package():
    from cluster.api.pdcluster.v1 import pdcluster_pb2, pdcluster_pb2_grpc

    assert pdcluster_pb2.DESCRIPTOR.package == "pdcluster.v1"
    assert pdcluster_pb2_grpc.PDClusterStub
