"""The Llama family (Llama 2/3, Mistral, Qwen2, and the sparse Mixtral and Qwen2-MoE) as one graph built
from parallel layers.

Differences between them are config: q/k/v bias (Qwen2), rope scaling (Llama 3), tied embeddings, and a
mixture-of-experts MLP in the layers ModelConfig.moe makes sparse (layers/moe.py).
Mistral's sliding window is not applied (see ModelConfig.sliding_window).
"""

from __future__ import annotations

import torch
from spindle_kernels import KernelOps

from spindle_server.distributed import Distributed
from spindle_server.layers.activation import SiluAndMul
from spindle_server.layers.attention import AttentionMetadata, PagedAttention
from spindle_server.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from spindle_server.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from spindle_server.layers.moe import SparseMoeBlock
from spindle_server.layers.norm import RMSNorm
from spindle_server.layers.rotary import RotaryEmbedding
from spindle_server.models.causal_lm import CausalLM
from spindle_server.models.registry import ModelConfig
from spindle_server.weights import Weights


class LlamaMLP(torch.nn.Module):
    def __init__(
        self, config: ModelConfig, dist: Distributed, ops: KernelOps, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [size, size], dist, bias=config.mlp_bias, dtype=dtype, device=device
        )
        self.act = SiluAndMul(ops)
        self.down_proj = RowParallelLinear(
            size, config.hidden_size, dist, bias=config.mlp_bias, dtype=dtype, device=device
        )

    def load(self, weights: Weights, prefix: str) -> None:
        self.gate_up_proj.load(weights, [f"{prefix}.gate_proj", f"{prefix}.up_proj"])
        self.down_proj.load(weights, f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


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
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype, device)
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
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype, device)
        self.mlp: LlamaMLP | SparseMoeBlock
        if config.moe is not None and config.moe.is_sparse(layer):
            self.mlp = SparseMoeBlock(config.moe, config.hidden_size, dist, ops, dtype, device)
            self.mlp_name = config.moe.names.block  # Mixtral's experts are "block_sparse_moe"
        else:
            self.mlp = LlamaMLP(config, dist, ops, dtype, device)
            self.mlp_name = "mlp"

    def load(self, weights: Weights, prefix: str) -> None:
        self.input_layernorm.load(weights, f"{prefix}.input_layernorm.weight")
        self.self_attn.load(weights, f"{prefix}.self_attn")
        self.post_attention_layernorm.load(weights, f"{prefix}.post_attention_layernorm.weight")
        self.mlp.load(weights, f"{prefix}.{self.mlp_name}")

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block; the residual stream is carried separately so each norm fuses its add."""
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


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
        rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings, ops, device)
        self.layers = torch.nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary, dist, ops, dtype, device) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype, device)
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
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
