"""Regenerates the protobuf and gRPC Python modules beside the .proto files.

Run by `make proto`; tests/unit/test_protogen.py fails when the committed
modules differ from what this produces.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"
PROTO_FILES = ("shardwire/v1/inference.proto", "shardwire/v1/shard.proto")


def generate(out_dir: Path) -> None:
    """Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto into out_dir."""
    import importlib.resources

    from grpc_tools import protoc  # test/dev dependency only

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTO_FILES,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")


def main() -> int:
    generate(PROTO_ROOT)
    print(f"generated Python modules under {PROTO_ROOT / 'shardwire' / 'v1'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
