"""`ops_for` picks flash-attn > Triton > torch; importing spindle_kernels pulls in neither triton nor flash_attn."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import types

import pytest
import spindle_kernels
import torch
from spindle_kernels import CPU_OPS, REFERENCE_OPS, KernelOps, ops_for, reference

OP_NAMES = [f for f, field in KernelOps.__dataclass_fields__.items() if field.type not in ("str", "bool")]


def test_cpu_gets_the_cpu_ops():
    assert ops_for(torch.device("cpu")) is CPU_OPS
    assert ops_for("cpu").name == "cpu"
    # The MoE is the reference's; the C++ kernels (the KV write among them) are built and loaded by ops_for.
    assert CPU_OPS.reshape_and_cache is spindle_kernels.cpu.reshape_and_cache
    assert inspect.signature(CPU_OPS.reshape_and_cache) == inspect.signature(reference.reshape_and_cache)
    assert CPU_OPS.takes_strided_qkv and not REFERENCE_OPS.takes_strided_qkv
    assert not CPU_OPS.splits_decode_rows and REFERENCE_OPS.splits_decode_rows
    assert CPU_OPS.fused_moe is REFERENCE_OPS.fused_moe
    assert CPU_OPS.silu_and_mul is spindle_kernels.cpu.silu_and_mul
    assert spindle_kernels.cpu_native.load()


_ISOLATION_SCRIPT = """
import json, sys
import spindle_kernels
result = {"triton_after_import": "triton" in sys.modules, "flash_after_import": "flash_attn" in sys.modules}
sys.modules["triton"] = None  # from here on, `import triton` fails as if it were not installed
sys.modules["flash_attn"] = None
result["cpu"] = spindle_kernels.ops_for("cpu").name
result["cuda_without_triton"] = spindle_kernels.ops_for("cuda").name
try:
    spindle_kernels.rms_norm
    result["lazy_export"] = "loaded"
except ImportError:
    result["lazy_export"] = "ImportError"
print(json.dumps(result))
"""


def test_import_is_lazy_and_works_without_triton():
    proc = subprocess.run(
        [sys.executable, "-c", _ISOLATION_SCRIPT], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {
        "triton_after_import": False,
        "flash_after_import": False,
        "cpu": "cpu",
        "cuda_without_triton": "torch",
        "lazy_export": "ImportError",
    }


def test_cuda_gets_triton_without_flash_attn(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # absent, whatever this machine has
    ops = ops_for("cuda")
    assert ops.name == "triton"
    from spindle_kernels import attention, kv_store, norm

    assert ops.paged_decode_attention is attention.paged_decode_attention
    assert ops.rms_norm is norm.rms_norm and ops.reshape_and_cache is kv_store.reshape_and_cache


def test_triton_ops_have_the_reference_signatures():
    ops = spindle_kernels.triton_ops()
    for op in OP_NAMES:
        got = inspect.signature(getattr(ops, op))
        want = inspect.signature(getattr(reference, op))
        assert list(got.parameters) == list(want.parameters), op
        assert [p.default for p in got.parameters.values()] == [p.default for p in want.parameters.values()], op


def test_triton_functions_are_exported_by_name():
    from spindle_kernels import activation, attention, rotary

    assert spindle_kernels.paged_decode_attention is attention.paged_decode_attention
    assert spindle_kernels.paged_attention is attention.paged_attention
    assert spindle_kernels.rotary_embedding is rotary.rotary_embedding
    assert spindle_kernels.silu_and_mul is activation.silu_and_mul
    with pytest.raises(AttributeError):
        spindle_kernels.no_such_kernel  # noqa: B018


class _FakeFlashAttn:
    """Stands in for flash_attn: records the calls and answers zeros of the right shape."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("flash_attn")
        mod.flash_attn_varlen_func = self.varlen
        mod.flash_attn_with_kvcache = self.with_kvcache
        return mod

    def varlen(self, q, *args, **kwargs):
        self.calls.append(("varlen", args, kwargs))
        return torch.zeros_like(q)

    def with_kvcache(self, q, *args, **kwargs):
        self.calls.append(("kvcache", args, kwargs))
        return torch.zeros_like(q)


@pytest.fixture
def fake_flash(monkeypatch):
    fake = _FakeFlashAttn()
    monkeypatch.setitem(sys.modules, "flash_attn", fake.module())
    sys.modules.pop("spindle_kernels.flash", None)
    yield fake
    sys.modules.pop("spindle_kernels.flash", None)  # the next import sees the real (or no) flash_attn
    if hasattr(spindle_kernels, "flash"):
        delattr(spindle_kernels, "flash")


def test_cuda_prefers_flash_attn_when_the_block_size_allows(fake_flash):
    assert ops_for("cuda").name == "flash_attn"
    assert ops_for("cuda", block_size=256).name == "flash_attn"
    assert ops_for("cuda", block_size=16).name == "triton"
    # flash-attn has no float32 path: a float32 shard runs (and reports) Triton
    assert ops_for("cuda", block_size=256, dtype=torch.bfloat16).name == "flash_attn"
    assert ops_for("cuda", block_size=256, dtype=torch.float32).name == "triton"
    ops = ops_for("cuda")
    assert ops.rms_norm is spindle_kernels.triton_ops().rms_norm  # only attention changes


def test_flash_wrappers_pass_paged_arguments_and_fall_back(fake_flash, monkeypatch):
    from spindle_kernels import flash

    calls: list[str] = []
    ops = spindle_kernels.flash_attn_ops(
        KernelOps(
            name="fallback",
            reshape_and_cache=REFERENCE_OPS.reshape_and_cache,
            paged_attention=lambda *a, window=None, softcap=None: calls.append(f"prefill {window}") or "fallback",
            paged_decode_attention=lambda *a, window=None, softcap=None: calls.append(f"decode {window}") or "fallback",
            rms_norm=REFERENCE_OPS.rms_norm,
            rotary_embedding=REFERENCE_OPS.rotary_embedding,
            silu_and_mul=REFERENCE_OPS.silu_and_mul,
            fused_moe=REFERENCE_OPS.fused_moe,
        )
    )
    q = torch.randn(5, 4, 16)
    k_cache = torch.randn(3, 256, 2, 16)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    lens = torch.tensor([300, 7], dtype=torch.int32)
    tables = torch.tensor([[2, 0], [1, 0]], dtype=torch.int32)
    # fp32 CPU tensors are beyond flash-attn: the fallback answers.
    assert ops.paged_attention(q, k_cache, k_cache, cu, lens, tables, 0.25) == "fallback"
    assert ops.paged_decode_attention(q[:2], k_cache, k_cache, tables, lens, 0.25, window=8) == "fallback"
    assert calls == ["prefill None", "decode 8"] and fake_flash.calls == []

    monkeypatch.setattr(flash, "can_serve", lambda q, k_cache: True)
    out = ops.paged_attention(q, k_cache, k_cache, cu, lens, tables, 0.25)
    assert out.shape == q.shape
    name, args, kwargs = fake_flash.calls[-1]
    assert name == "varlen"
    assert args[2].tolist() == cu.tolist() and args[3].tolist() == [0, 300, 307]  # cu_seqlens_q, cu_seqlens_k
    assert args[5] == 2 * 256  # max_seqlen_k bound from the table width
    assert kwargs["causal"] is True and kwargs["block_table"] is tables and kwargs["softmax_scale"] == 0.25
    assert kwargs["window_size"] == (-1, -1) and kwargs["softcap"] == 0.0
    ops.paged_attention(q, k_cache, k_cache, cu, lens, tables, 0.25, window=64)
    assert fake_flash.calls[-1][2]["window_size"] == (63, 0)  # flash-attn's left edge excludes the query

    out = ops.paged_decode_attention(q[:2], k_cache, k_cache, tables, lens, 0.25)
    assert out.shape == (2, 4, 16)
    name, args, kwargs = fake_flash.calls[-1]
    assert name == "kvcache" and kwargs["cache_seqlens"] is lens and kwargs["block_table"] is tables
    ops.paged_decode_attention(q[:2], k_cache, k_cache, tables, lens, 0.25, window=5, softcap=50.0)
    assert fake_flash.calls[-1][2]["window_size"] == (4, 0) and fake_flash.calls[-1][2]["softcap"] == 50.0
    with pytest.raises(ValueError, match="window"):
        ops.paged_decode_attention(q[:2], k_cache, k_cache, tables, lens, 0.25, window=0)
    with pytest.raises(ValueError, match="one query each"):
        ops.paged_decode_attention(q, k_cache, k_cache, tables, lens, 0.25)
