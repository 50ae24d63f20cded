"""Paged self-attention of one layer: qkv projection -> rotary -> write K/V to the paged cache -> attend.

The engine builds one `AttentionMetadata` per forward and every layer reads it. Tokens of all sequences are
flattened into one varlen batch:

    tokens:        | seq 0 chunk (3) | seq 1 decode (1) | seq 2 chunk (4)   |
    cu_seqlens_q:  0                 3                  4                   8
    context_lens:  [cached_0 + 3,      cached_1 + 1,      cached_2 + 4]
    slot_mapping:  one KV slot per token = block_tables[b, pos // block_size] * block_size + pos % block_size

A mixed step (some sequences with one new token, some with more) puts its single-token sequences first
and runs them on the decode kernel (`DecodeRows`); the prefill kernel would spend a whole query tile on
each of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from spindle_kernels import KernelOps

from spindle_server.distributed import Distributed
from spindle_server.layers.linear import QKVParallelLinear, RowParallelLinear
from spindle_server.layers.norm import RMSNorm
from spindle_server.layers.rotary import RotaryEmbedding
from spindle_server.weights import Weights


@dataclass
class DecodeRows:
    """A mixed step's leading single-token sequences, which attend through `paged_decode_attention`:

        sequences:  0 .. n-1: one new token each (rows 0 .. n-1)  |  n .. B-1: chunks (rows n .. T-1)

    Fresh tensors, not views into the step's metadata: kernels see aligned pointers (no extra compiles).
    """

    num_seqs: int  # n >= 1
    context_lens: torch.Tensor  # [n] int32
    block_tables: torch.Tensor  # [n, max_blocks] int32
    rest_cu_seqlens_q: torch.Tensor  # [B-n+1] int32, rows counted from row n
    rest_context_lens: torch.Tensor  # [B-n] int32
    rest_block_tables: torch.Tensor  # [B-n, max_blocks] int32


@dataclass
class AttentionMetadata:
    """Where this forward's tokens live in the paged KV cache; built once per forward by the engine."""

    slot_mapping: torch.Tensor  # [T] int64: KV slot each new token is written to
    cu_seqlens_q: torch.Tensor  # [B+1] int32: sequence b's new tokens are rows cu[b]:cu[b+1]
    context_lens: torch.Tensor  # [B] int32: tokens in the cache for b INCLUDING this step's
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    max_q_len: int
    is_decode: bool  # every sequence has exactly one new token -> ops.paged_decode_attention
    decode_rows: DecodeRows | None = None  # mixed steps with leading single-token sequences (see above)


def split_decode_rows(meta: AttentionMetadata, num_seqs: int) -> DecodeRows:
    """The `DecodeRows` of `meta` whose first `num_seqs` sequences have one new token each (device ops only)."""
    n = num_seqs
    return DecodeRows(
        num_seqs=n,
        context_lens=meta.context_lens[:n].clone(),
        block_tables=meta.block_tables[:n].clone(),
        rest_cu_seqlens_q=meta.cu_seqlens_q[n:] - n,
        rest_context_lens=meta.context_lens[n:].clone(),
        rest_block_tables=meta.block_tables[n:].clone(),
    )


class PagedAttention(torch.nn.Module):
    """Self-attention over this rank's heads (num_heads / world, num_kv_heads / world) with a paged KV cache."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: RotaryEmbedding,
        dist: Distributed,
        ops: KernelOps,
        qkv_bias: bool,
        o_bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        window: int | None = None,
        scale: float | None = None,
        softcap: float | None = None,
        qk_norm_eps: float | None = None,
        norm_weight_offset: float = 0.0,
    ) -> None:
        """window: this layer's sliding window (a query sees its last `window` positions); None = full.
        scale: of the attention logits (None: head_dim ** -0.5); softcap: logits = softcap * tanh(logits /
        softcap) (Gemma 2); qk_norm_eps: RMSNorm each head of q and k before rotary (Qwen3, Gemma 3)."""
        super().__init__()
        ws = dist.world_size  # divisibility: ModelConfig.check_world_size, and QKVParallelLinear below
        self.num_heads = num_heads // ws
        self.num_kv_heads = num_kv_heads // ws
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.window = window
        self.softcap = softcap
        self.q_norm = self.k_norm = None
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps, ops, dtype, device, weight_offset=norm_weight_offset)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps, ops, dtype, device, weight_offset=norm_weight_offset)
        self.rotary = rotary
        self.ops = ops
        # q/k/v stay views of the QKV output where every kernel on the way takes strides (CPU: saves three
        # copies per layer); the per-head q/k norms need them contiguous.
        self.strided_qkv = ops.takes_strided_qkv and qk_norm_eps is None
        self.qkv_proj = QKVParallelLinear(
            hidden_size, head_dim, num_heads, num_kv_heads, dist, bias=qkv_bias, dtype=dtype, device=device
        )
        self.o_proj = RowParallelLinear(
            num_heads * head_dim, hidden_size, dist, bias=o_bias, dtype=dtype, device=device
        )

    def load(self, weights: Weights, prefix: str, fused: bool = False) -> None:
        """prefix: e.g. "model.layers.3.self_attn" (q_proj, k_proj, v_proj, o_proj below it; with `fused`,
        one qkv_proj as Phi-3 stores it; q_norm, k_norm where the layer has them)."""
        if fused:
            self.qkv_proj.load_fused(weights, f"{prefix}.qkv_proj")
        else:
            self.qkv_proj.load(weights, [f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"])
        self.o_proj.load(weights, f"{prefix}.o_proj")
        if self.q_norm is not None and self.k_norm is not None:
            self.q_norm.load(weights, f"{prefix}.q_norm.weight")
            self.k_norm.load(weights, f"{prefix}.k_norm.weight")

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """hidden [T, hidden_size] -> [T, hidden_size] (all-reduced over ranks). cos_sin: `self.rotary.cos_sin`
        of this forward, when the model computed it once for all its layers (else computed here)."""
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if not self.strided_qkv:  # these kernels take contiguous [T, heads, head_dim]; the views are strided
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if self.q_norm is not None and self.k_norm is not None:
            # per head: the norms see [T * heads, head_dim] rows
            q = self.q_norm(q.view(-1, self.head_dim))[0].view(num_tokens, self.num_heads, self.head_dim)
            k = self.k_norm(k.view(-1, self.head_dim))[0].view(num_tokens, self.num_kv_heads, self.head_dim)
        self.rotary(positions, q, k, meta.cu_seqlens_q, meta.context_lens, cos_sin)

        k_cache, v_cache = kv_cache
        self.ops.reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:
            out = self.ops.paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.context_lens, self.scale,
                window=self.window, softcap=self.softcap,
            )
        elif meta.decode_rows is not None and self.ops.splits_decode_rows:
            d = meta.decode_rows
            n = d.num_seqs
            head = self.ops.paged_decode_attention(
                q[:n], k_cache, v_cache, d.block_tables, d.context_lens, self.scale,
                window=self.window, softcap=self.softcap,
            )
            tail = self.ops.paged_attention(
                q[n:], k_cache, v_cache, d.rest_cu_seqlens_q, d.rest_context_lens, d.rest_block_tables,
                self.scale, window=self.window, softcap=self.softcap,
            )
            out = torch.cat([head, tail])
        else:
            out = self.ops.paged_attention(
                q, k_cache, v_cache, meta.cu_seqlens_q, meta.context_lens, meta.block_tables, self.scale,
                window=self.window, softcap=self.softcap,
            )
        return self.o_proj(out.reshape(num_tokens, q_size))
