"""Rotary frequencies against transformers' own rotary embedding, for every supported rope type."""

from __future__ import annotations

import pytest
import torch
import transformers
from spindle_kernels import ops_for
from spindle_server.layers.rotary import RopeConfig, RotaryEmbedding

HEAD_DIM, MAX_POS = 16, 64
LLAMA3 = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", **LLAMA3},
}


def hf_cos_sin(rope_scaling, positions: torch.Tensor, theta: float = 500000.0):
    config = transformers.LlamaConfig(
        hidden_size=HEAD_DIM * 2,
        num_attention_heads=2,
        max_position_embeddings=MAX_POS,
        rope_theta=theta,
        rope_scaling=rope_scaling,
    )
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    cos, sin = rotary(torch.zeros(1, 1, HEAD_DIM), positions[None])
    return config, cos[0, :, : HEAD_DIM // 2], sin[0, :, : HEAD_DIM // 2]


@pytest.mark.parametrize("name", sorted(ROPES))
def test_matches_transformers_within_trained_length(name: str) -> None:
    positions = torch.arange(MAX_POS)
    config, cos, sin = hf_cos_sin(ROPES[name], positions)
    rope = RopeConfig.from_hf_config(config.to_dict())
    assert rope.rope_type == name and rope.theta == 500000.0
    ours = RotaryEmbedding(rope, HEAD_DIM, MAX_POS, ops_for(torch.device("cpu")))
    cu = torch.tensor([0, MAX_POS], dtype=torch.int32)
    our_cos, our_sin = ours.cos_sin(positions, cu, torch.tensor([MAX_POS], dtype=torch.int32))
    torch.testing.assert_close(our_cos, cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(our_sin, sin, atol=1e-6, rtol=0)


def test_dynamic_rescales_beyond_trained_length() -> None:
    """A 100-token sequence (trained length 64): transformers rescales the base from the length."""
    positions = torch.arange(100)
    config, cos, sin = hf_cos_sin(ROPES["dynamic"], positions)
    ours = RotaryEmbedding(
        RopeConfig.from_hf_config(config.to_dict()), HEAD_DIM, MAX_POS, ops_for(torch.device("cpu"))
    )
    # The same sequence, as two chunks of a varlen batch beside a short sequence that must stay unscaled.
    cu = torch.tensor([0, 10, 110], dtype=torch.int32)
    ctx = torch.tensor([10, 100], dtype=torch.int32)
    our_cos, our_sin = ours.cos_sin(torch.cat([torch.arange(10), positions]), cu, ctx)
    torch.testing.assert_close(our_cos[10:], cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(our_sin[10:], sin, atol=1e-5, rtol=0)
    torch.testing.assert_close(our_cos[:10], ours.cos_table[:10])
    assert not torch.allclose(cos, ours.cos_table[positions.clamp(max=MAX_POS - 1)])  # scaling did something


def test_old_and_new_config_formats_agree() -> None:
    old = {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA3}}
    new = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}}
    assert RopeConfig.from_hf_config(old) == RopeConfig.from_hf_config(new)
    assert RopeConfig.from_hf_config({}) == RopeConfig(rope_type="default", theta=10000.0)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"rope_scaling": {"rope_type": "mrope", "factor": 4.0}}, "rope type 'mrope' is not supported"),
        ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0]}}, "short_factor and long_factor"),
        ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "partial rotary"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 0}}, "must be positive"),
    ],
)
def test_unsupported_rope_is_rejected(cfg, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RopeConfig.from_hf_config(cfg)
