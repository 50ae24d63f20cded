"""The committed gRPC stubs are exactly what proto/build_stubs.py generates from generate.proto."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"


def _load_build_stubs():
    spec = importlib.util.spec_from_file_location("build_stubs", PROTO_DIR / "build_stubs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stubs")
    _load_build_stubs().build(out)
    return out


@pytest.mark.parametrize("name", ["generate_pb2.py", "generate_pb2.pyi", "generate_pb2_grpc.py"])
def test_committed_stub_matches_regenerated(regenerated: Path, name: str) -> None:
    committed = (PROTO_DIR / "spindle_proto" / name).read_bytes()
    fresh = (regenerated / name).read_bytes()
    assert fresh == committed, f"proto/spindle_proto/{name} is stale: run `make proto` and commit the result"


def test_build_stubs_names_every_committed_stub() -> None:
    # A stub the builder no longer writes would go stale unnoticed.
    committed = {p.name for p in (PROTO_DIR / "spindle_proto").glob("generate_pb2*.py*")}
    assert committed == set(_load_build_stubs().STUB_NAMES)
