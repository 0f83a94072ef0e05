"""Regenerate the gRPC stubs of the public API: proto/pdcluster/v1/*.proto ->
cluster/api/pdcluster/v1/*_pb2{.py,.pyi,_grpc.py}.

The stubs are checked in, so that installing the package needs no protoc; a test regenerates
them and compares bytes, so grpcio-tools is pinned. protoc writes imports relative to the
proto root (``from pdcluster.v1 import ...``); they, and the module name the message classes
report, are rewritten to ``cluster.api.pdcluster`` so the package imports (and its messages
pickle) without touching sys.path.

    python -m cluster.api.generate
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
API_DIR = Path(__file__).resolve().parent  # the stubs live under API_DIR / "pdcluster"
PACKAGE = "cluster.api"
_IMPORT = re.compile(rb"^from (pdcluster(?:\.\w+)*) import ", re.MULTILINE)
# The module name the message classes report (their __module__): must be importable, or the
# classes do not pickle (Ray Serve pickles requests between its gRPC proxy and the replica).
_MODULE = re.compile(rb"BuildTopDescriptorsAndMessages\(DESCRIPTOR, '(pdcluster(?:\.\w+)*)'")


def generate(out_dir: Path = API_DIR) -> list[Path]:
    """Write the stubs of every .proto under proto/ into ``out_dir``/pdcluster/...; returns the
    files written (stubs and the packages' __init__.py), sorted."""
    protos = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        _protoc(f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *protos)
        return _install(Path(tmp), Path(out_dir))


def _protoc(*args: str) -> None:
    """grpcio-tools' protoc, in a child process: its bundled protobuf C++ library and nixl's
    crash each other when both are loaded into one process."""
    include = resources.files("grpc_tools") / "_proto"
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed ({result.returncode}): {result.stderr.strip()}")


def _install(tmp: Path, out_dir: Path) -> list[Path]:
    """Copy protoc's output into out_dir with imports rewritten, adding package __init__s."""
    written = set()
    for src in sorted(p for p in tmp.rglob("*") if p.suffix in (".py", ".pyi")):
        rel = src.relative_to(tmp)
        dest = out_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        text = _IMPORT.sub(rb"from %s.\1 import " % PACKAGE.encode(), src.read_bytes())
        text = _MODULE.sub(
            rb"BuildTopDescriptorsAndMessages(DESCRIPTOR, '%s.\1'" % PACKAGE.encode(), text
        )
        dest.write_bytes(text)
        written.add(dest)
        for package in rel.parents[:-1]:  # pdcluster/v1, pdcluster
            init = out_dir / package / "__init__.py"
            init.write_bytes(b"")
            written.add(init)
    return sorted(written)


def main() -> None:
    for path in generate():
        print(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)


if __name__ == "__main__":
    main()
