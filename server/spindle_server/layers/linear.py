"""Tensor-parallel linear layers. Each owns how its weight is cut and loads only its rank's slice.

    Column-parallel (output features split):      Row-parallel (input features split):
        W [out, in]                                   W [out, in]
        rank r holds rows   r*out/N : (r+1)*out/N     rank r holds columns r*in/N : (r+1)*in/N
        y_r = x @ W_r.T      (no communication)       y = all_reduce(sum_r x_r @ W_r.T) + b

A merged column layer stacks several column-parallel matrices (q|k|v, gate|up) so one matmul serves them;
each part is split across ranks on its own, so rank r holds [q_r | k_r | v_r].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from spindle_server.distributed import Distributed
from spindle_server.weights import Weights, shard_range


def _check_divisible(what: str, size: int, world_size: int) -> int:
    if size % world_size:
        raise ValueError(f"{what} ({size}) is not divisible by the tensor-parallel world size {world_size}")
    return size // world_size


def _copy_checked(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(
            f"weight {name!r}: expected shape {tuple(param.shape)}, checkpoint gives {tuple(value.shape)}"
        )
    with torch.no_grad():
        param.copy_(value)


class MergedColumnParallelLinear(torch.nn.Module):
    """Several column-parallel linears sharing one input, computed as one matmul.

    Output on rank r: [part_0 slice r | part_1 slice r | ...], widths `output_sizes_per_rank`.
    """

    def __init__(
        self,
        in_features: int,
        output_sizes: Sequence[int],
        dist: Distributed,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.dist = dist
        self.in_features = in_features
        self.output_sizes = tuple(output_sizes)
        self.output_sizes_per_rank = tuple(
            _check_divisible(f"output part {i} size", size, dist.world_size)
            for i, size in enumerate(output_sizes)
        )
        out_per_rank = sum(self.output_sizes_per_rank)
        self.weight = torch.nn.Parameter(
            torch.empty(out_per_rank, in_features, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = (
            torch.nn.Parameter(torch.empty(out_per_rank, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    def load(self, weights: Weights, names: Sequence[str]) -> None:
        """names: one checkpoint prefix per part, e.g. ["...q_proj", "...k_proj", "...v_proj"]."""
        if len(names) != len(self.output_sizes):
            raise ValueError(f"expected {len(self.output_sizes)} weight names, got {list(names)}")
        rank, ws = self.dist.rank, self.dist.world_size
        offset = 0
        for name, size, size_per_rank in zip(names, self.output_sizes, self.output_sizes_per_rank):
            start, stop = shard_range(size, rank, ws)
            rows = slice(offset, offset + size_per_rank)
            w_name = f"{name}.weight"
            _check_shape(weights, w_name, (size, self.in_features))
            _copy_checked(self.weight[rows], weights.get_rows(w_name, 0, start, stop), w_name)
            if self.bias is not None:
                b_name = f"{name}.bias"
                _check_shape(weights, b_name, (size,))
                _copy_checked(self.bias[rows], weights.get_rows(b_name, 0, start, stop), b_name)
            offset += size_per_rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(MergedColumnParallelLinear):
    """One column-parallel linear: output features split across ranks, no communication."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dist: Distributed,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(in_features, [out_features], dist, bias=bias, dtype=dtype, device=device)

    def load(self, weights: Weights, name: str) -> None:  # type: ignore[override]
        super().load(weights, [name])


class QKVParallelLinear(MergedColumnParallelLinear):
    """q|k|v projections; rank r gets heads r*H/N:(r+1)*H/N of q and the matching KV heads."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        dist: Distributed,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        # Split whole heads: checked on head counts so the error names heads, not feature sizes.
        _check_divisible("num_heads", num_heads, dist.world_size)
        _check_divisible("num_kv_heads", num_kv_heads, dist.world_size)
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        super().__init__(hidden_size, sizes, dist, bias=bias, dtype=dtype, device=device)


class RowParallelLinear(torch.nn.Module):
    """Input features split across ranks; partial products are summed with an all-reduce.

    The bias is replicated and added once, after the reduction.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dist: Distributed,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.dist = dist
        self.in_features = in_features
        self.out_features = out_features
        self.in_features_per_rank = _check_divisible("in_features", in_features, dist.world_size)
        self.weight = torch.nn.Parameter(
            torch.empty(out_features, self.in_features_per_rank, dtype=dtype, device=device),
            requires_grad=False,
        )
        self.bias = (
            torch.nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    def load(self, weights: Weights, name: str) -> None:
        w_name = f"{name}.weight"
        _check_shape(weights, w_name, (self.out_features, self.in_features))
        start, stop = shard_range(self.in_features, self.dist.rank, self.dist.world_size)
        _copy_checked(self.weight, weights.get_rows(w_name, 1, start, stop), w_name)
        if self.bias is not None:
            b_name = f"{name}.bias"
            _copy_checked(self.bias, weights.get(b_name), b_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in_features / N] (this rank's slice) -> [T, out_features], identical on every rank."""
        y = self.dist.all_reduce(F.linear(x, self.weight))
        if self.bias is not None:
            y = y + self.bias
        return y


def _check_shape(weights: Weights, name: str, expected: tuple[int, ...]) -> None:
    shape = weights.shape(name)
    if shape != expected:
        raise ValueError(f"weight {name!r} has shape {shape}, the model config expects {expected}")
