"""Tensor parallelism end to end: 2 gloo ranks produce the same logits as 1 rank (and as transformers).

One pair of rank processes loads every family in turn (process start-up is the expensive part).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from spindle_kernels import ops_for
from spindle_server.distributed import Distributed
from spindle_server.models.registry import load_model

from tests.helpers.paged_runner import PagedRunner
from tests.helpers.tiny_model import TinyModelSpec, load_reference, make_tiny_model
from tests.helpers.tp import free_port, set_rank_env
from tests.server.test_model import VARIANTS

CPU = torch.device("cpu")
WORLD = 2
SPECS = {
    # Qwen2 with tied embeddings: q/k/v biases, a vocabulary-parallel embedding shared with the LM head.
    "qwen2": TinyModelSpec(arch="qwen2", tie_word_embeddings=True, seed=7),
    # Per-head q/k norms on each rank's heads, explicit head_dim, a sliding layer (window 10 < prompts).
    "qwen3": VARIANTS["qwen3"],
    # Soft caps, sandwich norms, GeLU-tanh, alternating windows, tied embeddings.
    "gemma2": VARIANTS["gemma2"],
    # q/k norms, a local rope for sliding layers.
    "gemma3": VARIANTS["gemma3"],
    # Fused qkv_proj / gate_up_proj cut per part on each rank; longrope; a window.
    "phi3": VARIANTS["phi3"],
    # Qwen2-MoE: every expert's intermediate dim and the shared expert's split over the ranks.
    "qwen2_moe": TinyModelSpec(
        arch="qwen2_moe",
        seed=8,
        extra_config={"num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                      "shared_expert_intermediate_size": 64, "norm_topk_prob": True},
    ),
    # Mixtral with a window on every layer; Qwen3-MoE's q/k norms on each rank's heads.
    "mixtral": VARIANTS["mixtral"],
    "qwen3_moe": VARIANTS["qwen3_moe"],
}


def prompts(vocab_size: int) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(3)
    return (
        torch.randint(3, vocab_size, (30,), generator=g).tolist(),
        torch.randint(3, vocab_size, (20,), generator=g).tolist(),
    )


def run_steps(model, world_size: int) -> list[torch.Tensor]:
    """Prefill + chunked prefill mixed with decode, then a decode step; the logits of every step."""
    a, b = prompts(model.config.vocab_size)
    runner = PagedRunner(model, world_size=world_size)
    runner.add_sequence(0, len(a))
    runner.add_sequence(1, len(b))
    out = runner.step([(0, a[:-2]), (1, b[:7])])
    out += runner.step([(0, a[-2:-1]), (1, b[7:-1])])
    out += runner.step([(0, a[-1:]), (1, b[-1:])])
    return out


def _tp_worker(rank: int, port: int, root: str, bad_dir: str, out: str) -> None:
    set_rank_env(rank, WORLD, port)
    torch.set_num_threads(1)
    from spindle_server.distributed import init_distributed

    dist = init_distributed(CPU, timeout_s=60)
    results: dict[str, object] = {}
    for name in SPECS:
        model = load_model(Path(root) / name, torch.float32, CPU, dist, ops_for(CPU))
        kv_heads = model.layers[0].self_attn.num_kv_heads
        slices = None
        if name == "qwen2":  # each rank times the MLP's slices of 8, 16 and 32 rows and takes the slowest rank's times
            from spindle_server.models import llama

            for m in model.modules():
                if isinstance(m, llama.LlamaMLP):
                    m.byte_slice_rows = m.slice_rows = 8
            slices = llama.choose_mlp_slices(model, 32, dist)
        results[name] = {"logits": run_steps(model, WORLD), "kv_heads_per_rank": kv_heads, "slices": slices,
                         "intermediate_per_rank": getattr(model.layers[0].mlp, "intermediate_per_rank", None)}
    try:
        load_model(bad_dir, torch.float32, CPU, dist, ops_for(CPU))
        results["bad_error"] = "loaded"
    except ValueError as exc:
        results["bad_error"] = str(exc)
    dist.barrier()
    torch.save(results, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_model")
    for name, spec in SPECS.items():
        make_tiny_model(root / name, spec)
    # Same model but 1 KV head: fewer KV heads than ranks is rejected before any weight is read.
    bad_dir = root / "one_kv_head"
    bad_dir.mkdir()
    config = json.loads((root / "qwen2" / "config.json").read_text())
    config["num_key_value_heads"] = 1
    (bad_dir / "config.json").write_text(json.dumps(config))
    mp.spawn(_tp_worker, args=(free_port(), str(root), str(bad_dir), str(root)), nprocs=WORLD, join=True)
    return root, [torch.load(root / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_two_ranks_match_one_rank(tp_results, name) -> None:
    root, results = tp_results
    single = load_model(root / name, torch.float32, CPU, Distributed(0, 1, None), ops_for(CPU))
    expected = run_steps(single, 1)
    for r in results:
        assert r[name]["kv_heads_per_rank"] == 1
        if single.config.moe is not None:
            assert r[name]["intermediate_per_rank"] == single.config.moe.intermediate_size // WORLD
        assert len(r[name]["logits"]) == len(expected)
        for ours, ref in zip(r[name]["logits"], expected):
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_two_ranks_match_transformers(tp_results, name) -> None:
    root, results = tp_results
    ref, _ = load_reference(root / name)
    a, b = prompts(ref.config.vocab_size)
    with torch.no_grad():
        ref_a = ref(torch.tensor([a])).logits[0]
        ref_b = ref(torch.tensor([b])).logits[0]
    logits = results[0][name]["logits"]  # [a[:-2], b[:7], a[-2], b[7:-1], a[-1], b[-1]]
    torch.testing.assert_close(torch.cat(logits[0::2]), ref_a, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(logits[1::2]), ref_b, atol=1e-4, rtol=0)


def test_fewer_kv_heads_than_ranks_is_a_clear_error(tp_results) -> None:
    _, results = tp_results
    for r in results:
        assert "num_heads=4 and num_kv_heads=1 must both be divisible by the world size 2" in r["bad_error"]


def test_ranks_agree_on_the_mlp_slices(tp_results) -> None:
    # Each slice all-reduces: ranks slicing differently would hang. The qwen2 logits above ran with the choice.
    _, results = tp_results
    assert results[0]["qwen2"]["slices"] in (8, 16, 32)
    assert results[0]["qwen2"]["slices"] == results[1]["qwen2"]["slices"]
