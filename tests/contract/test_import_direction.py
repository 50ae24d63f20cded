"""The dependency direction of DESIGN.md, checked by tools/check_imports.py (also run by `make lint`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tools.check_imports import check

REPO = Path(__file__).resolve().parents[2]


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_repository_imports_point_the_right_way():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "check_imports.py"), str(REPO)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_forbidden_direction_is_reported(tmp_path: Path):
    _write(tmp_path, "router/spindle_router/a.py", "import torch\n")
    _write(tmp_path, "router/spindle_router/b.py", "def f():\n    from spindle_server.cli import main\n")
    _write(tmp_path, "router/spindle_router/api/c.py", "from transformers import AutoTokenizer\n")
    _write(tmp_path, "router/spindle_router/scheduler/radix.py", "import grpc\n")
    _write(tmp_path, "router/spindle_router/scheduler/alloc.py", "from .. import shards\n")
    _write(tmp_path, "router/spindle_router/scheduler/loop.py", "import grpc\nfrom spindle_proto import x\n")
    _write(tmp_path, "kernels/spindle_kernels/k.py", "import spindle_server.layers\n")
    _write(tmp_path, "server/spindle_server/s.py", "from spindle_router import config\n")
    _write(tmp_path, "server/spindle_server/ok.py", "import torch\nfrom spindle_kernels import ops_for\n")
    found = {(str(v.path), v.module, v.rule) for v in check(tmp_path)}
    assert found == {
        ("router/spindle_router/a.py", "torch", "router"),
        ("router/spindle_router/b.py", "spindle_server", "router"),
        ("router/spindle_router/api/c.py", "transformers", "router"),
        ("router/spindle_router/scheduler/radix.py", "grpc", "scheduler bookkeeping"),
        ("router/spindle_router/scheduler/alloc.py", "spindle_router.shards", "scheduler bookkeeping"),
        ("kernels/spindle_kernels/k.py", "spindle_server", "kernels"),
        ("server/spindle_server/s.py", "spindle_router", "server"),
    }


def test_cli_exits_nonzero_and_names_the_file(tmp_path: Path):
    _write(tmp_path, "router/spindle_router/bad.py", "import torch.nn as nn\n")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "check_imports.py"), str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "router/spindle_router/bad.py:1: router must not import torch" in proc.stdout
