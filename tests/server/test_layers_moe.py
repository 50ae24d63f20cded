"""The sparse MoE block from a hand-written checkpoint: one rank against the definition written out here
(router softmax, top-k, renormalising, the sigmoid-gated shared expert), and 2 real gloo ranks, each
reading only its half of every expert, whose outputs equal the one-rank result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import save_file
from spindle_kernels import ops_for
from spindle_server.distributed import Distributed
from spindle_server.layers.moe import MIXTRAL_NAMES, QWEN_NAMES, MoeConfig, SparseMoeBlock
from spindle_server.weights import Weights

from tests.helpers.tp import free_port, set_rank_env

CPU = torch.device("cpu")
WORLD = 2
HIDDEN, INTER, SHARED, EXPERTS = 8, 6, 10, 4
CONFIGS = {
    "mixtral": MoeConfig(num_experts=EXPERTS, top_k=2, intermediate_size=INTER, norm_topk_prob=True,
                         names=MIXTRAL_NAMES),
    "qwen2_moe": MoeConfig(num_experts=EXPERTS, top_k=3, intermediate_size=INTER, norm_topk_prob=False,
                           names=QWEN_NAMES, shared_expert_intermediate_size=SHARED, round_weights=True),
}


def _checkpoint(root: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    tensors = {}
    for name, cfg in CONFIGS.items():
        n = cfg.names
        tensors[f"{name}.gate.weight"] = rand(EXPERTS, HIDDEN)
        for e in range(EXPERTS):
            tensors[f"{name}.experts.{e}.{n.gate}.weight"] = rand(INTER, HIDDEN)
            tensors[f"{name}.experts.{e}.{n.up}.weight"] = rand(INTER, HIDDEN)
            tensors[f"{name}.experts.{e}.{n.down}.weight"] = rand(HIDDEN, INTER)
        if cfg.shared_expert_intermediate_size:
            for part, shape in (("gate_proj", (SHARED, HIDDEN)), ("up_proj", (SHARED, HIDDEN)),
                                ("down_proj", (HIDDEN, SHARED))):
                tensors[f"{name}.shared_expert.{part}.weight"] = rand(*shape)
            tensors[f"{name}.shared_expert_gate.weight"] = rand(1, HIDDEN)
    tensors["x"] = rand(7, HIDDEN)
    save_file(tensors, str(root / "model.safetensors"))
    return tensors


def _definition(t: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert."""
    cfg = CONFIGS[name]
    n = cfg.names

    def mlp(prefix: str, gate: str, up: str, down: str, v: torch.Tensor) -> torch.Tensor:
        h = F.silu(t[f"{prefix}.{gate}.weight"] @ v) * (t[f"{prefix}.{up}.weight"] @ v)
        return t[f"{prefix}.{down}.weight"] @ h

    out = torch.zeros_like(x)
    for i, v in enumerate(x):
        probs = torch.softmax(t[f"{name}.gate.weight"] @ v, dim=-1)
        weights, ids = torch.topk(probs, cfg.top_k)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum()
        for w, e in zip(weights, ids.tolist()):
            out[i] += w * mlp(f"{name}.experts.{e}", n.gate, n.up, n.down, v)
        if cfg.shared_expert_intermediate_size:
            gate = torch.sigmoid(t[f"{name}.shared_expert_gate.weight"] @ v)
            out[i] += gate * mlp(f"{name}.shared_expert", "gate_proj", "up_proj", "down_proj", v)
    return out


def _run_blocks(dist: Distributed, ckpt: str) -> dict[str, object]:
    results: dict[str, object] = {}
    for name, cfg in CONFIGS.items():
        weights = Weights(ckpt, torch.float32, CPU)
        x = weights.get("x")
        before = weights.bytes_read
        block = SparseMoeBlock(cfg, HIDDEN, dist, ops_for(CPU), torch.float32, CPU)
        block.load(weights, name)
        results[f"{name}_bytes_read"] = weights.bytes_read - before
        results[name] = block(x)
    return results


def _tp_worker(rank: int, port: int, ckpt: str) -> None:
    set_rank_env(rank, WORLD, port)
    torch.set_num_threads(1)
    from spindle_server.distributed import init_distributed

    dist = init_distributed(CPU, timeout_s=60)
    results = _run_blocks(dist, ckpt)
    dist.barrier()
    torch.save(results, Path(ckpt) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_block")
    tensors = _checkpoint(root)
    single = _run_blocks(Distributed(0, 1, None), str(root))
    mp.spawn(_tp_worker, args=(free_port(), str(root)), nprocs=WORLD, join=True)
    return tensors, single, [torch.load(root / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_one_rank_matches_the_definition(runs, name) -> None:
    tensors, single, _ = runs
    torch.testing.assert_close(single[name], _definition(tensors, name, tensors["x"]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_two_ranks_each_read_half_and_match_one_rank(runs, name) -> None:
    _, single, ranks = runs
    replicated = 4 * (EXPERTS * HIDDEN + (HIDDEN if CONFIGS[name].shared_expert_intermediate_size else 0))
    split = single[f"{name}_bytes_read"] - replicated
    for r in ranks:
        torch.testing.assert_close(r[name], single[name], atol=1e-5, rtol=1e-5)
        assert r[f"{name}_bytes_read"] == replicated + split // WORLD


def test_intermediate_not_divisible_is_refused() -> None:
    with pytest.raises(ValueError, match="moe intermediate size=6 is not divisible by the world size 4"):
        CONFIGS["mixtral"].check_world_size(4)
    with pytest.raises(ValueError, match="num_experts_per_tok=5 must be in 1..num_experts=4"):
        MoeConfig(num_experts=4, top_k=5, intermediate_size=8, norm_topk_prob=True, names=QWEN_NAMES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_experts_equal_plain_ones(runs, tmp_path_factory, dtype) -> None:
    from spindle_server.layers.linear import pack_linear_weights

    tensors, _, _ = runs
    root = tmp_path_factory.mktemp("moe_packed")
    save_file(tensors, str(root / "model.safetensors"))
    weights = Weights(root, dtype, CPU)
    block = SparseMoeBlock(CONFIGS["qwen2_moe"], HIDDEN, Distributed(0, 1, None), ops_for(CPU), dtype, CPU)
    block.load(weights, "qwen2_moe")
    x = weights.get("x")
    plain = block(x)
    assert pack_linear_weights(block) == 3  # the experts, the shared expert's two linears
    assert block.w13.numel() == block.w2.numel() == 0  # freed
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(block(x), plain, **tolerance)


def _transformers_block(name: str, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.nn.Module:
    """transformers' own sparse MoE block with the checkpoint's tensors (its experts fused as 3-D tensors)."""
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg, n = CONFIGS[name], CONFIGS[name].names
    common = dict(hidden_size=HIDDEN, num_experts_per_tok=cfg.top_k)
    if name == "mixtral":
        block = MixtralSparseMoeBlock(
            transformers.MixtralConfig(**common, intermediate_size=INTER, num_local_experts=EXPERTS)
        )
    else:
        block = Qwen2MoeSparseMoeBlock(transformers.Qwen2MoeConfig(
            **common, moe_intermediate_size=INTER, num_experts=EXPERTS, norm_topk_prob=cfg.norm_topk_prob,
            shared_expert_intermediate_size=SHARED,
        ))
    state = {"gate.weight": t[f"{name}.gate.weight"]}
    experts = range(EXPERTS)
    state["experts.gate_up_proj"] = torch.stack(
        [torch.cat([t[f"{name}.experts.{e}.{n.gate}.weight"], t[f"{name}.experts.{e}.{n.up}.weight"]]) for e in experts]
    )
    state["experts.down_proj"] = torch.stack([t[f"{name}.experts.{e}.{n.down}.weight"] for e in experts])
    if cfg.shared_expert_intermediate_size:
        for key in ("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight",
                    "shared_expert.down_proj.weight", "shared_expert_gate.weight"):
            state[key] = t[f"{name}.{key}"]
    block.load_state_dict(state)
    return block.to(dtype).eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_equals_transformers_block(runs, tmp_path_factory, name, dtype) -> None:
    """Also in bfloat16, where Qwen rounds its routing weights to bfloat16 and Mixtral does not."""
    tensors, _, _ = runs
    root = tmp_path_factory.mktemp("moe_vs_hf")
    save_file(tensors, str(root / "model.safetensors"))
    weights = Weights(root, dtype, CPU)
    ours = SparseMoeBlock(CONFIGS[name], HIDDEN, Distributed(0, 1, None), ops_for(CPU), dtype, CPU)
    ours.load(weights, name)
    x = weights.get("x")
    with torch.no_grad():
        want = _transformers_block(name, tensors, dtype)(x[None])[0]
    # Outputs reach ~30, where a float32 ulp is 2e-6: a few ulps apart where oneDNN and MKL sum in
    # different orders (seen on Sapphire Rapids), bit-equal elsewhere.
    torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-6)
