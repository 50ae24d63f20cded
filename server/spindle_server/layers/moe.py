"""Sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): a router picks top-k experts per token;
Qwen2-MoE adds a shared expert behind a sigmoid gate.

    x [T, H] -> router logits [T, E] -> softmax (float32) -> top-k (renormalised if norm_topk_prob)
             -> ops.fused_moe(x, w13, w2, weights, ids)        routed experts, grouped by expert
             (+ sigmoid(x @ g) * shared_expert(x))             Qwen2-MoE
             -> all_reduce                                     once, over routed + shared partial sums

Tensor parallelism splits every expert's intermediate dimension (as the dense MLP splits its own): rank r
holds rows r*I/N:(r+1)*I/N of each expert's gate and up projections ([gate_r | up_r] in w13) and the same
columns of its down projection, so each rank's output is a partial sum. The router and the shared gate
are replicated (every rank routes identically).

On CPU, `pack` (called by layers/linear.py's `pack_linear_weights`) reorders each expert's matrices for
oneDNN as the dense layers are; the experts then run through the reference's grouping with packed matmuls
instead of `ops.fused_moe` (one Zen 4 thread, H=1024, I=1408, 8 experts, top-2, float32, best of 40:
16 tokens 28 -> 15 ms, 64 tokens 41 -> 22 ms; one token 2.6 ms either way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from spindle_kernels import KernelOps, reference

from spindle_server.distributed import Distributed
from spindle_server.layers.activation import SiluAndMul
from spindle_server.layers.linear import (
    MergedColumnParallelLinear,
    RowParallelLinear,
    can_pack,
    pack_weight,
    packed_linear,
)
from spindle_server.weights import Weights, shard_range


@dataclass(frozen=True)
class ExpertNames:
    """Checkpoint names of a layer's MoE block: `{layer}.{block}.experts.{e}.{gate|up|down}.weight`."""

    block: str
    gate: str
    up: str
    down: str


MIXTRAL_NAMES = ExpertNames(block="block_sparse_moe", gate="w1", up="w3", down="w2")
QWEN_NAMES = ExpertNames(block="mlp", gate="gate_proj", up="up_proj", down="down_proj")


@dataclass(frozen=True)
class MoeConfig:
    """The experts of a sparse model. Sizes are totals over all ranks."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of one expert
    norm_topk_prob: bool  # renormalise the top-k probabilities to sum to 1
    names: ExpertNames
    # Round the routing weights to the activations' dtype before they scale the experts (Qwen; Mixtral
    # keeps them in float32), as transformers does: only bfloat16/float16 results differ.
    round_weights: bool = False
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    sparse_step: int = 1  # layer i is sparse when (i + 1) % sparse_step == 0 ...
    dense_layers: tuple[int, ...] = ()  # ... and i is not listed here (those use the dense MLP)

    def __post_init__(self) -> None:
        if self.num_experts <= 0 or self.intermediate_size <= 0 or self.sparse_step <= 0:
            raise ValueError(
                f"MoE config needs positive num_experts ({self.num_experts}), expert intermediate size "
                f"({self.intermediate_size}) and sparse step ({self.sparse_step})"
            )
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} must be in 1..num_experts={self.num_experts}")
        if self.shared_expert_intermediate_size < 0:
            raise ValueError(f"shared_expert_intermediate_size must be >= 0, got {self.shared_expert_intermediate_size}")

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], model_type: str) -> MoeConfig | None:
        """The experts described by a Hugging Face config.json, or None for a dense model_type.

        A field the file leaves out takes transformers' default for that model_type, as transformers would.
        """
        if model_type not in _HF_DEFAULTS:
            return None
        if model_type != "mixtral" and "num_experts" not in cfg and "num_local_experts" in cfg:
            cfg = {**cfg, "num_experts": cfg["num_local_experts"]}  # transformers 5 writes Qwen3-MoE's so
        cfg = {**_HF_DEFAULTS[model_type], **cfg}
        if model_type == "mixtral":
            return cls(
                num_experts=int(cfg["num_local_experts"]),
                top_k=int(cfg["num_experts_per_tok"]),
                intermediate_size=int(cfg["intermediate_size"]),
                norm_topk_prob=True,  # Mixtral always renormalises its top-k
                names=MIXTRAL_NAMES,
            )
        return cls(
            num_experts=int(cfg["num_experts"]),
            top_k=int(cfg["num_experts_per_tok"]),
            intermediate_size=int(cfg["moe_intermediate_size"]),
            norm_topk_prob=bool(cfg["norm_topk_prob"]),
            names=QWEN_NAMES,
            round_weights=True,
            shared_expert_intermediate_size=(
                int(cfg["shared_expert_intermediate_size"]) if model_type == "qwen2_moe" else 0
            ),
            sparse_step=int(cfg["decoder_sparse_step"]),
            dense_layers=tuple(int(i) for i in cfg["mlp_only_layers"] or ()),
        )

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer `layer` uses the experts (else the dense MLP), as transformers decides."""
        return layer not in self.dense_layers and (layer + 1) % self.sparse_step == 0

    def check_world_size(self, world_size: int) -> None:
        """Raise ValueError unless every expert's (and the shared expert's) intermediate size splits evenly."""
        for name, size in (
            ("moe intermediate size", self.intermediate_size),
            ("shared_expert_intermediate_size", self.shared_expert_intermediate_size),
        ):
            if size % world_size:
                raise ValueError(f"cannot shard the experts: {name}={size} is not divisible by the world size {world_size}")


_QWEN_MOE_DEFAULTS = {"norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": []}
# model_type -> transformers' config defaults for the MoE fields (Qwen3-MoE has no shared expert).
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen2_moe": {
        **_QWEN_MOE_DEFAULTS,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
    },
    "qwen3_moe": {**_QWEN_MOE_DEFAULTS, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768},
}


class _PartialRowParallelLinear(RowParallelLinear):
    """Row-parallel without its all-reduce: the MoE block adds its routed and shared parts, then reduces once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, None)


class SparseMoeBlock(torch.nn.Module):
    """This rank's slice of a sparse MoE MLP; forward returns the full (reduced) output on every rank."""

    packed: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per expert (w13, w2) in oneDNN's layout

    def __init__(
        self,
        config: MoeConfig,
        hidden_size: int,
        dist: Distributed,
        ops: KernelOps,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        config.check_world_size(dist.world_size)
        self.config = config
        self.dist = dist
        self.ops = ops
        self.hidden_size = hidden_size
        self.intermediate_per_rank = config.intermediate_size // dist.world_size
        experts, inter = config.num_experts, self.intermediate_per_rank

        def param(*shape: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.router = param(experts, hidden_size)  # replicated
        self.w13 = param(experts, 2 * inter, hidden_size)  # [gate_r | up_r] per expert
        self.w2 = param(experts, hidden_size, inter)
        self.shared_gate_up: MergedColumnParallelLinear | None = None
        self.shared_down: _PartialRowParallelLinear | None = None
        self.shared_gate: torch.nn.Parameter | None = None
        shared = config.shared_expert_intermediate_size
        if shared:
            self.shared_gate_up = MergedColumnParallelLinear(
                hidden_size, [shared, shared], dist, dtype=dtype, device=device
            )
            self.shared_act = SiluAndMul(ops)
            self.shared_down = _PartialRowParallelLinear(shared, hidden_size, dist, dtype=dtype, device=device)
            self.shared_gate = param(1, hidden_size)  # replicated

    def load(self, weights: Weights, block: str) -> None:
        """block: the MoE block's checkpoint prefix, e.g. "model.layers.3.block_sparse_moe"."""
        names, hidden, experts = self.config.names, self.hidden_size, self.config.num_experts
        size, inter = self.config.intermediate_size, self.intermediate_per_rank
        _copy(self.router, weights, f"{block}.gate.weight", (experts, hidden))
        start, stop = shard_range(size, self.dist.rank, self.dist.world_size)
        for e in range(experts):
            expert = f"{block}.experts.{e}"
            _copy(self.w13[e, :inter], weights, f"{expert}.{names.gate}.weight", (size, hidden), (0, start, stop))
            _copy(self.w13[e, inter:], weights, f"{expert}.{names.up}.weight", (size, hidden), (0, start, stop))
            _copy(self.w2[e], weights, f"{expert}.{names.down}.weight", (hidden, size), (1, start, stop))
        if self.shared_gate_up is not None and self.shared_down is not None and self.shared_gate is not None:
            self.shared_gate_up.load(weights, [f"{block}.shared_expert.gate_proj", f"{block}.shared_expert.up_proj"])
            self.shared_down.load(weights, f"{block}.shared_expert.down_proj")
            _copy(self.shared_gate, weights, f"{block}.shared_expert_gate.weight", (1, hidden))

    def pack(self) -> None:
        """Swap the expert weights for per-expert oneDNN-packed copies (CPU), freeing the plain ones."""
        if self.packed is None and can_pack(self.w13):
            self.packed = [(pack_weight(self.w13[e]), pack_weight(self.w2[e])) for e in range(self.config.num_experts)]
            self.w13.data = self.w13.data.new_empty(0)
            self.w2.data = self.w2.data.new_empty(0)

    def _packed_expert(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        assert self.packed is not None
        w13, w2 = self.packed[e]
        return packed_linear(self.ops.silu_and_mul(packed_linear(rows, w13)), w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden], identical on every rank."""
        logits = F.linear(x, self.router)
        probs = torch.softmax(logits.float(), dim=-1)
        topk_weights, topk_ids = torch.topk(probs, self.config.top_k, dim=-1)
        if self.config.norm_topk_prob:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        if self.config.round_weights:
            topk_weights = topk_weights.to(x.dtype).float()
        if self.packed is not None:
            out = reference.moe_by_expert(x, topk_weights, topk_ids, self._packed_expert)
        else:
            out = self.ops.fused_moe(x, self.w13, self.w2, topk_weights, topk_ids)
        if self.shared_gate_up is not None and self.shared_down is not None and self.shared_gate is not None:
            shared = self.shared_down(self.shared_act(self.shared_gate_up(x)))
            out = out + torch.sigmoid(F.linear(x, self.shared_gate)) * shared
        return self.dist.all_reduce(out)


def _copy(
    param: torch.Tensor,
    weights: Weights,
    name: str,
    expected: tuple[int, ...],
    rows: tuple[int, int, int] | None = None,
) -> None:
    """Copy checkpoint tensor `name` (whole shape `expected`), or its slice start:stop along dim `rows[0]`."""
    shape = weights.shape(name)
    if shape != expected:
        raise ValueError(f"weight {name!r} has shape {shape}, the model config expects {expected}")
    value = weights.get(name) if rows is None else weights.get_rows(name, *rows)
    with torch.no_grad():
        param.copy_(value)
