"""Generate the Python stubs for proto/generate.proto into a package directory.

`make proto` writes them into proto/spindle_proto/; tests/contract regenerates them into a temp
directory and fails if they differ from the committed ones.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
STUB_NAMES = ("generate_pb2.py", "generate_pb2.pyi", "generate_pb2_grpc.py")


def build(out_dir: Path) -> None:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO_DIR / "generate.proto"),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in STUB_NAMES:
            text = (Path(tmp) / name).read_text()
            # protoc writes a top-level import; the stubs live in the spindle_proto package.
            text = re.sub(r"^import generate_pb2 as", "from spindle_proto import generate_pb2 as", text, flags=re.M)
            (out_dir / name).write_text(text)


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR / "spindle_proto")
