"""The decoder families (Llama 2/3, Mistral, Qwen2/3, Gemma 2/3, Phi-3, and the mixture-of-experts Mixtral,
Qwen2-MoE and Qwen3-MoE) as one graph of parallel layers.

Differences between them are config (ModelConfig and its ArchTraits): q/k/v bias (Qwen2), q/k norms (Qwen3,
Gemma 3), sliding windows per layer (Mistral, Qwen, Gemma), rope scaling (Llama 3, yarn, Phi-3's longrope),
a local rope for sliding layers (Gemma 3), tied embeddings, fused checkpoint tensors (Phi-3), a sparse
mixture-of-experts MLP in the layers ModelConfig.moe names (layers/moe.py), and Gemma's shape: `1 + w`
norms, a norm after attention and after the MLP as well as before, embeddings scaled by sqrt(hidden),
GeLU-tanh, soft-capped attention and final logits (Gemma 2).

    Llama-style layer:                         Gemma-style layer (sandwich norms):
      x = x + attn(norm(x))                      x = x + post_attn_norm(attn(norm(x)))
      x = x + mlp(norm(x))                       x = x + post_ff_norm(mlp(pre_ff_norm(x)))
"""

from __future__ import annotations

import logging
import time

import torch
from spindle_kernels import KernelOps

from spindle_server.distributed import Distributed
from spindle_server.layers.activation import gated_activation
from spindle_server.layers.attention import AttentionMetadata, PagedAttention
from spindle_server.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from spindle_server.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from spindle_server.layers.moe import SparseMoeBlock
from spindle_server.layers.norm import RMSNorm
from spindle_server.layers.rotary import RopeConfig, RotaryEmbedding
from spindle_server.models.causal_lm import CausalLM
from spindle_server.models.registry import ModelConfig
from spindle_server.weights import Weights

log = logging.getLogger(__name__)

# On CPU a long prefill's gate/up activation ([rows, 2 x intermediate]) can outgrow the last-level cache (float32
# SmolLM2-135M at 4096 rows: 50 MB against 32 MB of L3) and every op around the matmuls then streams it from
# DRAM: rows may go through the MLP in slices (a 4096-token float32 prefill 5.8 -> 4.8 s on 2 Zen 4 cores).
# Whether slices pay depends on the host and dtype as much as on the cache (Sapphire Rapids, bfloat16: oneDNN's
# down projection ran at half its rate at 1024 rows, and unsliced 4096-row prefills took 0.81 s against 0.99 s
# in 1024-row slices), so Warmup times the candidates (`choose_mlp_slices`): slices whose activation fits in
# MLP_SLICE_BYTES, then twice, four times ... as many rows, then none.
MLP_SLICE_BYTES = 6 << 20
# Warmup times the MLPs of this many layers (distinct weights, as a forward streams them), best of MLP_SLICE_REPEATS.
MLP_SLICE_LAYERS = 2
MLP_SLICE_REPEATS = 3
# ... and moves off the byte-sized slices only for a candidate that took at most this fraction of their time.
MLP_SLICE_MARGIN = 0.9


class LlamaMLP(torch.nn.Module):
    def __init__(
        self, config: ModelConfig, dist: Distributed, ops: KernelOps, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        size = config.intermediate_size
        row_bytes = 2 * (size // dist.world_size) * dtype.itemsize
        # CPU: rows per slice of a long forward (None: never sliced); `choose_mlp_slices` may raise it at Warmup.
        self.byte_slice_rows = max(256, MLP_SLICE_BYTES // row_bytes) if device.type == "cpu" else None
        self.slice_rows = self.byte_slice_rows
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [size, size], dist, bias=config.mlp_bias, dtype=dtype, device=device
        )
        self.act = gated_activation(config.traits.hidden_act, ops)
        self.down_proj = RowParallelLinear(
            size, config.hidden_size, dist, bias=config.mlp_bias, dtype=dtype, device=device
        )
        self.fused_checkpoint = config.traits.fused_checkpoint

    def load(self, weights: Weights, prefix: str) -> None:
        if self.fused_checkpoint:
            self.gate_up_proj.load_fused(weights, f"{prefix}.gate_up_proj")
        else:
            self.gate_up_proj.load(weights, [f"{prefix}.gate_proj", f"{prefix}.up_proj"])
        self.down_proj.load(weights, f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.slice_rows
        if rows is None or x.shape[0] <= rows:
            return self.down_proj(self.act(self.gate_up_proj(x)))
        return torch.cat([self.down_proj(self.act(self.gate_up_proj(x[i : i + rows])))
                          for i in range(0, x.shape[0], rows)])


def choose_mlp_slices(model: torch.nn.Module, max_rows: int, dist: Distributed) -> int | None:
    """Time a `max_rows`-row forward through the first MLP_SLICE_LAYERS MLPs with each candidate slice size (the
    byte-sized one, then doubling, then unsliced; in alternating order, best of MLP_SLICE_REPEATS) and give every MLP
    the fastest, where it beats the byte-sized slices by MLP_SLICE_MARGIN. Every rank times, and takes the
    slowest rank's times, so all ranks slice alike (each slice all-reduces). Returns the rows chosen, or None
    where no MLP slices at `max_rows`."""
    mlps = [m for m in model.modules() if isinstance(m, LlamaMLP) and m.byte_slice_rows is not None]
    if not mlps or max_rows <= mlps[0].byte_slice_rows:
        return None
    base = mlps[0].byte_slice_rows
    candidates = [base << i for i in range((max_rows // base).bit_length()) if base << i < max_rows] + [max_rows]
    probe = mlps[:MLP_SLICE_LAYERS]
    weight = probe[0].gate_up_proj
    gen = torch.Generator().manual_seed(0)
    x = (0.1 * torch.randn(max_rows, weight.in_features, generator=gen)).to(weight.weight.dtype)
    best_ns = dict.fromkeys(candidates, float("inf"))
    with torch.inference_mode():
        for repeat in range(MLP_SLICE_REPEATS):  # the order alternates: a burst of load elsewhere hits all alike
            for rows in candidates[:: 1 if repeat % 2 == 0 else -1]:
                for m in probe:
                    m.slice_rows = rows
                start = time.perf_counter_ns()
                for m in probe:
                    m(x)
                best_ns[rows] = min(best_ns[rows], time.perf_counter_ns() - start)
    agreed = dict(zip(candidates, dist.agree([int(best_ns[r]) for r in candidates], "max", x.device)))
    fastest = min(candidates, key=agreed.__getitem__)
    chosen = fastest if agreed[fastest] <= MLP_SLICE_MARGIN * agreed[base] else base
    for m in mlps:
        m.slice_rows = chosen
    log.info("MLP at %d rows: %s; %s", max_rows,
             ", ".join(f"{'unsliced' if r == max_rows else f'{r}-row slices'} {agreed[r] / 1e6:.1f} ms"
                       for r in candidates),
             "unsliced" if chosen == max_rows else f"{chosen}-row slices")
    return chosen


class LlamaDecoderLayer(torch.nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        rotary: RotaryEmbedding,
        dist: Distributed,
        ops: KernelOps,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        traits = config.traits
        offset = 1.0 if traits.gemma else 0.0
        self.fused_checkpoint = traits.fused_checkpoint

        def norm(size: int = config.hidden_size) -> RMSNorm:
            return RMSNorm(size, config.rms_norm_eps, ops, dtype, device, weight_offset=offset)

        self.input_layernorm = norm()
        self.self_attn = PagedAttention(
            config.hidden_size,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            rotary,
            dist,
            ops,
            qkv_bias=config.qkv_bias,
            o_bias=config.o_bias,
            dtype=dtype,
            device=device,
            window=config.window_of(layer),
            scale=config.attn_scale,
            softcap=config.attn_softcap,
            qk_norm_eps=config.rms_norm_eps if traits.qk_norm else None,
            norm_weight_offset=offset,
        )
        self.post_attention_layernorm = norm()
        # Gemma: post_attention_layernorm norms the attention output; these two wrap the MLP.
        self.pre_feedforward_layernorm = norm() if traits.gemma else None
        self.post_feedforward_layernorm = norm() if traits.gemma else None
        self.mlp: LlamaMLP | SparseMoeBlock
        if config.moe is not None and config.moe.is_sparse(layer):
            self.mlp = SparseMoeBlock(config.moe, config.hidden_size, dist, ops, dtype, device)
            self.mlp_name = config.moe.names.block  # Mixtral's experts are "block_sparse_moe"
        else:
            self.mlp = LlamaMLP(config, dist, ops, dtype, device)
            self.mlp_name = "mlp"

    def load(self, weights: Weights, prefix: str) -> None:
        self.input_layernorm.load(weights, f"{prefix}.input_layernorm.weight")
        self.self_attn.load(weights, f"{prefix}.self_attn", fused=self.fused_checkpoint)
        self.post_attention_layernorm.load(weights, f"{prefix}.post_attention_layernorm.weight")
        if self.pre_feedforward_layernorm is not None and self.post_feedforward_layernorm is not None:
            self.pre_feedforward_layernorm.load(weights, f"{prefix}.pre_feedforward_layernorm.weight")
            self.post_feedforward_layernorm.load(weights, f"{prefix}.post_feedforward_layernorm.weight")
        self.mlp.load(weights, f"{prefix}.{self.mlp_name}")

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block; the residual stream is carried separately so each norm fuses its add. cos_sin:
        this forward's rotary cos/sin for the layer's rope (None: the attention computes them)."""
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta, cos_sin)
        if self.pre_feedforward_layernorm is None or self.post_feedforward_layernorm is None:
            hidden, residual = self.post_attention_layernorm(hidden, residual)
            return self.mlp(hidden), residual
        hidden, _ = self.post_attention_layernorm(hidden)
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        hidden, _ = self.post_feedforward_layernorm(self.mlp(hidden))
        return hidden, residual


class LlamaForCausalLM(CausalLM):
    def __init__(
        self,
        config: ModelConfig,
        dist: Distributed,
        ops: KernelOps,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        config.check_world_size(dist.world_size)
        device = device or torch.device("cpu")
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dist, dtype, device)
        # Gemma scales embeddings by sqrt(hidden) rounded to the activations' dtype, as transformers does.
        self.embed_scale = (
            torch.tensor(config.hidden_size**0.5, dtype=dtype).item() if config.traits.gemma else None
        )
        rotaries: dict[RopeConfig, RotaryEmbedding] = {}  # one table per distinct rope (Gemma 3: two)
        for rope in {config.rope_of(i) for i in range(config.num_layers)}:
            rotaries[rope] = RotaryEmbedding(rope, config.head_dim, config.max_position_embeddings, ops, device)
        self.rotaries = list(rotaries.values())
        self.layers = torch.nn.ModuleList(
            LlamaDecoderLayer(config, i, rotaries[config.rope_of(i)], dist, ops, dtype, device)
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, ops, dtype, device,
            weight_offset=1.0 if config.traits.gemma else 0.0,
        )
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            dist,
            dtype,
            device,
            tied_to=self.embed_tokens if config.tie_word_embeddings else None,
        )

    def load(self, weights: Weights) -> None:
        self.embed_tokens.load(weights, "model.embed_tokens.weight")
        for i, layer in enumerate(self.layers):
            layer.load(weights, f"model.layers.{i}")
        self.norm.load(weights, "model.norm.weight")
        self.lm_head.load(weights, "lm_head.weight")

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} per-layer KV caches, got {len(kv_caches)}")
        hidden = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            hidden = hidden * self.embed_scale
        residual = None
        # cos/sin depend only on the positions (and lengths): once per forward and rope, not once per layer
        tables = {id(rotary): rotary.cos_sin(positions, meta.cu_seqlens_q, meta.context_lens)
                  for rotary in self.rotaries}
        for layer, kv_cache in zip(self.layers, kv_caches):
            cos_sin = tables[id(layer.self_attn.rotary)]
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta, cos_sin)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcap
        if cap is not None:  # Gemma 2
            logits = torch.tanh(logits / cap) * cap
        return logits
