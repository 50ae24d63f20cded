"""Random logits and the comparison the sampling tests make against transformers' processors."""

from __future__ import annotations

import torch

VOCAB = 300


def random_logits(rows: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=g) * scale


def assert_same_filtering(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Same filtered set, and equal finite values."""
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    torch.testing.assert_close(ours[finite], ref[finite], rtol=1e-6, atol=1e-6)
