"""Triton paged attention vs the torch reference, on CPU under the Triton interpreter."""

from __future__ import annotations

import pytest
import torch
from spindle_kernels import reference

from tests.kernels.paged_inputs import PagedCase, make_paged_case

pytestmark = pytest.mark.triton_interpreter

ATOL = 2e-5  # fp32 both sides; only summation order differs

# (num_heads, num_kv_heads, head_dim): MHA, GQA 2 and 4, MQA, a non-power-of-two head_dim
HEADS = [(2, 2, 16), (4, 2, 16), (4, 1, 32), (8, 2, 16), (2, 1, 24)]


def _attention():
    from spindle_kernels import attention  # imported here: triton loads only once the env is set

    return attention


def _decode_case(context_lens: list[int], heads: tuple[int, int, int], block_size: int, seed: int = 0) -> PagedCase:
    num_heads, num_kv_heads, head_dim = heads
    return make_paged_case(
        [1] * len(context_lens), context_lens, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, block_size=block_size, seed=seed,
    )


def _expected_decode(c: PagedCase) -> torch.Tensor:
    return reference.paged_decode_attention(c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens, c.scale)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_reference(heads, block_size, num_splits):
    c = _decode_case([1, 5, 17, 33], heads, block_size)
    got = _attention().decode_attention_splits(
        c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens, c.scale, num_splits=num_splits, block_n=16
    )
    torch.testing.assert_close(got, _expected_decode(c), atol=ATOL, rtol=1e-5)


def test_decode_public_entry_point_matches_reference():
    c = _decode_case([7, 40, 2], (4, 2, 16), 4, seed=1)
    got = _attention().paged_decode_attention(c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens, c.scale)
    assert got.shape == c.q.shape and got.dtype == c.q.dtype
    torch.testing.assert_close(got, _expected_decode(c), atol=ATOL, rtol=1e-5)


def test_decode_splits_beyond_context_are_ignored():
    # A wide table (many splits) with short contexts: most splits are empty and must weigh nothing.
    c = _decode_case([3, 9], (4, 2, 16), 4, seed=2)
    wide = torch.cat([c.block_tables, c.block_tables.flip(1).repeat(1, 4)], dim=1).contiguous()
    got = _attention().decode_attention_splits(
        c.q, c.k_cache, c.v_cache, wide, c.context_lens, c.scale, num_splits=8, block_n=16
    )
    torch.testing.assert_close(got, _expected_decode(c), atol=ATOL, rtol=1e-5)


# Chunks over cached prefixes: a fresh prompt, a chunk after a prefix, a decode, an empty slot,
# a chunk longer than one query tile, and a chunk ending mid-block.
PREFILL_BATCHES = [
    ([5], [5]),
    ([7, 1, 0, 3], [7, 20, 6, 11]),
    ([19, 2, 21], [23, 2, 40]),
]


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("batch", PREFILL_BATCHES, ids=["one-prompt", "mixed", "long-chunks"])
def test_prefill_matches_reference(heads, block_size, batch):
    q_lens, context_lens = batch
    num_heads, num_kv_heads, head_dim = heads
    c = make_paged_case(
        q_lens, context_lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, seed=len(q_lens),
    )
    got = _attention().prefill_attention_tiles(
        c.q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.context_lens, c.block_tables, c.scale, block_m=16, block_n=16
    )
    want = reference.paged_attention(c.q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.context_lens, c.block_tables, c.scale)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


def test_prefill_public_entry_point_matches_reference():
    c = make_paged_case([9, 1, 30], [12, 70, 30], num_heads=4, num_kv_heads=2, head_dim=32, block_size=16, seed=5)
    args = (c.q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.context_lens, c.block_tables, c.scale)
    torch.testing.assert_close(
        _attention().paged_attention(*args), reference.paged_attention(*args), atol=ATOL, rtol=1e-5
    )


def test_prefill_of_decodes_equals_decode_kernel():
    c = _decode_case([4, 13, 29], (4, 2, 16), 4, seed=6)
    attention = _attention()
    via_prefill = attention.prefill_attention_tiles(
        c.q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.context_lens, c.block_tables, c.scale, block_m=16, block_n=16
    )
    via_decode = attention.decode_attention_splits(
        c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens, c.scale, num_splits=2, block_n=16
    )
    torch.testing.assert_close(via_prefill, via_decode, atol=ATOL, rtol=1e-5)


def test_attention_reads_a_strided_query_view():
    # q as a slice of a fused qkv projection: stride(0) spans q, k and v.
    c = make_paged_case([6, 3], [6, 9], num_heads=4, num_kv_heads=2, head_dim=16, block_size=4, seed=7)
    qkv = torch.randn(c.q.shape[0], (4 + 2 + 2) * 16)
    qkv[:, : 4 * 16] = c.q.flatten(1)
    q_view = qkv[:, : 4 * 16].view(-1, 4, 16)
    assert not q_view.is_contiguous()
    args = (c.k_cache, c.v_cache, c.cu_seqlens_q, c.context_lens, c.block_tables, c.scale)
    got = _attention().prefill_attention_tiles(q_view, *args, block_m=16, block_n=16)
    torch.testing.assert_close(got, reference.paged_attention(c.q, *args), atol=ATOL, rtol=1e-5)


def _bad_inputs(c: PagedCase) -> list[tuple[str, dict[str, object]]]:
    return [
        ("q head_dim", {"q": c.q[..., :8].contiguous()}),
        ("multiple of num_kv_heads", {"q": torch.randn(c.q.shape[0], 3, c.q.shape[2])}),
        ("int32", {"block_tables": c.block_tables.long()}),
        ("context_lens", {"context_lens": c.context_lens[:-1]}),
        ("contiguous", {"k_cache": c.k_cache.transpose(0, 1).contiguous().transpose(0, 1)}),
        ("share one dtype", {"q": c.q.half()}),
        ("scale", {"scale": -1.0}),
        ("4-D", {"v_cache": c.v_cache[0]}),
    ]


@pytest.mark.parametrize("case_index", range(8))
def test_decode_rejects_bad_inputs(case_index):
    c = _decode_case([3, 5], (4, 2, 16), 4)
    message, override = _bad_inputs(c)[case_index]
    kwargs = dict(q=c.q, k_cache=c.k_cache, v_cache=c.v_cache, block_tables=c.block_tables,
                  context_lens=c.context_lens, scale=c.scale)
    kwargs.update(override)
    with pytest.raises(ValueError, match=message):
        _attention().paged_decode_attention(**kwargs)


def test_prefill_rejects_bad_cu_seqlens():
    c = make_paged_case([2, 3], [4, 5], num_heads=4, num_kv_heads=2, head_dim=16, block_size=4)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        _attention().paged_attention(
            c.q, c.k_cache, c.v_cache, c.cu_seqlens_q[:-1], c.context_lens, c.block_tables, c.scale
        )
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        _attention().paged_attention(
            c.q, c.k_cache, c.v_cache, c.cu_seqlens_q.long(), c.context_lens, c.block_tables, c.scale
        )


# Windows: one token, shorter than a tile, a tile's edge inside a chunk, and longer than every context.
WINDOWS = [1, 5, 16, 23, 100]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_with_sliding_window_matches_reference(window, num_splits):
    c = _decode_case([1, 5, 17, 33, 70], (4, 2, 16), 4, seed=8)
    softcap = 0.7 if window == 16 else None  # one window with Gemma 2's soft cap on top
    got = _attention().decode_attention_splits(
        c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens, c.scale, num_splits=num_splits, block_n=16,
        window=window, softcap=softcap,
    )
    want = reference.paged_decode_attention(
        c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens, c.scale, window=window, softcap=softcap
    )
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("batch", PREFILL_BATCHES + [([70, 33, 1], [70, 90, 50])],
                         ids=["one-prompt", "mixed", "long-chunks", "beyond-windows"])
def test_prefill_with_sliding_window_matches_reference(window, batch):
    q_lens, context_lens = batch
    c = make_paged_case(q_lens, context_lens, num_heads=4, num_kv_heads=2, head_dim=16, block_size=4, seed=9)
    args = (c.q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.context_lens, c.block_tables, c.scale)
    got = _attention().prefill_attention_tiles(*args, block_m=16, block_n=16, window=window)
    torch.testing.assert_close(got, reference.paged_attention(*args, window=window), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 23])
def test_softcap_matches_reference(window):
    c = make_paged_case([70, 33, 1, 5], [70, 90, 50, 5], num_heads=4, num_kv_heads=2, head_dim=16, block_size=4,
                        seed=12)
    args = (c.q, c.k_cache, c.v_cache, c.cu_seqlens_q, c.context_lens, c.block_tables, c.scale)
    got = _attention().prefill_attention_tiles(*args, block_m=16, block_n=16, window=window, softcap=0.7)
    want = reference.paged_attention(*args, window=window, softcap=0.7)
    assert not torch.allclose(want, reference.paged_attention(*args, window=window), atol=1e-3)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


def test_decode_split_count_depends_on_batch_and_device_only():
    attention = _attention()
    splits = attention.decode_num_splits
    # About 16 programs per SM, a power of two, capped: 132 SMs (H100/H200), 8 kv heads (Llama 3 8B/1B).
    assert [splits(b, 8, 132) for b in (1, 16, 64, 256, 512)] == [64, 32, 8, 2, 1]
    for batch in range(1, 300, 7):
        n = splits(batch, 4, 132)
        assert 1 <= n <= attention.MAX_DECODE_SPLITS and n & (n - 1) == 0
        assert n == splits(batch, 4, 132)  # no hidden state: a graph of `batch` rows keeps its split count


@pytest.mark.parametrize("num_splits", [2, 5, 64])
def test_each_sequence_splits_its_own_length(num_splits):
    # Splits cut each sequence's own context: lengths from 1 (most splits empty) to many tiles per split,
    # in a table far wider than any of them; a window splits only the visible positions.
    c = _decode_case([1, 16, 17, 150, 300], (4, 2, 16), 4, seed=13)
    wide = torch.cat([c.block_tables, c.block_tables.flip(1).repeat(1, 3)], dim=1).contiguous()
    for window in (None, 40):
        got = _attention().decode_attention_splits(
            c.q, c.k_cache, c.v_cache, wide, c.context_lens, c.scale, num_splits=num_splits, block_n=16,
            window=window,
        )
        want = reference.paged_decode_attention(
            c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens, c.scale, window=window
        )
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


class _LaunchRecorder:
    """Stands in for a Triton kernel: records each launch's compile key, then launches the real one.

    The key is what Triton specializes a compiled kernel on: every constexpr, each integer argument not
    marked do_not_specialize (== 1, divisible by 16) and each tensor's 16-byte alignment.
    """

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.keys: set[tuple] = set()
        self.skip = set(kernel.kwargs.get("do_not_specialize") or ())

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            key = [tuple(sorted(kwargs.items()))]
            for name, arg in zip(self.kernel.arg_names, args, strict=False):
                if isinstance(arg, torch.Tensor):
                    key.append((name, arg.dtype, arg.data_ptr() % 16 == 0))
                elif isinstance(arg, int) and name not in self.skip:
                    key.append((name, arg == 1, arg % 16 == 0))
            self.keys.add(tuple(key))
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_no_compile_key_depends_on_batch_or_table_width(monkeypatch):
    # Eager steps vary the batch and the block-table width every step: one compile must serve them all
    # (point 5 of issue 15), so what a Warmup compiles is what serving runs.
    attention = _attention()
    recorders = {}
    for name in ("_decode_kernel", "_merge_splits_kernel", "_prefill_kernel"):
        recorders[name] = _LaunchRecorder(getattr(attention, name))
        monkeypatch.setattr(attention, name, recorders[name])
    for seed, context_lens in enumerate([[5], [3, 40, 7], [2] * 17]):  # 32, 16 and 2 splits
        for width_extra in (0, 3):
            c = _decode_case(context_lens, (4, 2, 16), 4, seed=seed)
            tables = torch.cat([c.block_tables, c.block_tables[:, :1].repeat(1, width_extra)], 1).contiguous()
            got = attention.paged_decode_attention(c.q, c.k_cache, c.v_cache, tables, c.context_lens, c.scale)
            torch.testing.assert_close(got, _expected_decode(c), atol=ATOL, rtol=1e-5)
            q_lens = [min(n, 5) for n in context_lens]
            p = make_paged_case(q_lens, context_lens, num_heads=4, num_kv_heads=2, head_dim=16, block_size=4,
                                seed=seed)
            tables = torch.cat([p.block_tables, p.block_tables[:, :1].repeat(1, width_extra)], 1).contiguous()
            attention.paged_attention(p.q, p.k_cache, p.v_cache, p.cu_seqlens_q, p.context_lens, tables, p.scale)
    assert {name: len(r.keys) for name, r in recorders.items()} == {name: 1 for name in recorders}
