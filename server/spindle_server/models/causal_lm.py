"""The interface every served model implements: one varlen forward over the paged cache, then logits."""

from __future__ import annotations

import torch

from spindle_server.layers.attention import AttentionMetadata
from spindle_server.models.registry import ModelConfig
from spindle_server.weights import Weights


class CausalLM(torch.nn.Module):
    """A decoder-only LM sharded over a tensor-parallel group; every rank returns identical results."""

    config: ModelConfig

    def load(self, weights: Weights) -> None:
        """Copy this rank's slices of every parameter from `weights`."""
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [T, hidden_size] of the flattened new tokens.

        input_ids [T] int64 (all sequences' new tokens, flattened); positions [T] int64 (absolute position
        in its sequence); kv_caches: per layer (k, v), each [num_blocks, block_size, kv_heads_per_rank,
        head_dim]; this forward's K/V are written into them at meta.slot_mapping.
        """
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden_size] -> float32 logits [N, vocab_size], full vocabulary, same on every rank."""
        raise NotImplementedError
