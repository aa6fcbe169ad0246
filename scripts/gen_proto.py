"""Regenerate scalebox_kernel/protocol/sandboxagent_pb2.py(i) from sandboxagent.proto (needs grpcio-tools)."""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

here = Path(__file__).resolve().parent.parent / "scalebox_kernel" / "protocol"
include = Path(protoc.__file__).parent / "_proto"
code = protoc.main(
    [
        "protoc",
        f"-I{here}",
        f"-I{include}",
        f"--python_out={here}",
        f"--pyi_out={here}",
        str(here / "sandboxagent.proto"),
    ]
)
sys.exit(code)
