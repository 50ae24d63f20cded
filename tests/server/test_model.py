"""Every dense family against transformers (eager, float32) on CPU, through the paged KV cache.

Every scenario compares Spindle's logits with the reference's for the same positions: a whole prompt,
the prompt in chunks of 7, two sequences of very different lengths in one varlen forward, and decode
steps after a prefill. Windowed variants use windows (10-12 tokens) far shorter than the prompts (33-50).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from spindle_kernels import ops_for
from spindle_server.distributed import Distributed
from spindle_server.models.registry import load_model, read_model_config
from spindle_server.weights import MissingWeightError

from tests.helpers.paged_runner import PagedRunner
from tests.helpers.tiny_model import TinyModelSpec, load_reference, make_tiny_model

CPU = torch.device("cpu")
ATOL = 1e-4
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
QWEN2_MOE = {
    "num_experts": 6,
    "num_experts_per_tok": 3,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 96,
    "norm_topk_prob": False,
}
PHI3_CONFIG = {
    "original_max_position_embeddings": 64,
    "sliding_window": 12,
    "rope_scaling": {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.1 * i for i in range(8)],
        "long_factor": [2.0 + 0.3 * i for i in range(8)],
    },
}
VARIANTS = {
    "llama3": TinyModelSpec(arch="llama", rope_scaling=LLAMA3_ROPE),
    "mistral": TinyModelSpec(arch="mistral", seed=1),
    "qwen2": TinyModelSpec(arch="qwen2", seed=2),
    "tied": TinyModelSpec(arch="llama", tie_word_embeddings=True, seed=3),
    "sharded": TinyModelSpec(arch="llama", max_shard_size="100KB", seed=4),
    "linear": TinyModelSpec(arch="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}, seed=5),
    # Every layer slides (Mistral's rule).
    "mistral_window": TinyModelSpec(arch="mistral", seed=6, extra_config={"sliding_window": 12}),
    # q/k norms, an explicit head_dim (24, not 64 / 4), and only layers >= max_window_layers slide.
    "qwen3": TinyModelSpec(
        arch="qwen3", seed=8,
        extra_config={"head_dim": 24, "use_sliding_window": True, "sliding_window": 10, "max_window_layers": 1},
    ),
    "yarn": TinyModelSpec(
        arch="qwen2", seed=9, max_position_embeddings=128,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    ),
    # Sliding and global layers alternate; soft-capped attention (50) and final logits (30).
    "gemma2": TinyModelSpec(arch="gemma2", seed=10, tie_word_embeddings=True, extra_config={"sliding_window": 12}),
    # q/k norms; the sliding layer has its own rope base, the global one a linear-scaled rope.
    "gemma3": TinyModelSpec(
        arch="gemma3_text", seed=11,
        extra_config={
            "sliding_window": 12,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        },
    ),
    # Fused qkv_proj / gate_up_proj, a window, longrope (prompts stay under the original length here:
    # test_longrope_past_the_original_length goes past it).
    "phi3": TinyModelSpec(arch="phi3", seed=12, max_position_embeddings=128, extra_config=PHI3_CONFIG),
    # Mixture of experts: Mixtral's 8 experts, top-2 (renormalised), with a 12-token window on every layer;
    # Qwen2-MoE's top-k without renormalising plus a gated shared expert; one with renormalised top-k and
    # a dense layer; one whose even layers slide; Qwen3-MoE (q/k norms, no shared expert).
    "mixtral": TinyModelSpec(arch="mixtral", intermediate_size=48, seed=6, extra_config={"sliding_window": 12}),
    "qwen2_moe": TinyModelSpec(arch="qwen2_moe", seed=7, extra_config=QWEN2_MOE),
    "qwen2_moe_dense_layer": TinyModelSpec(
        arch="qwen2_moe", num_layers=3, seed=8,
        extra_config={**QWEN2_MOE, "norm_topk_prob": True, "mlp_only_layers": [1], "num_experts_per_tok": 2},
    ),
    "qwen2_moe_window": TinyModelSpec(
        arch="qwen2_moe", num_layers=4, seed=14,
        extra_config={**QWEN2_MOE, "use_sliding_window": True, "sliding_window": 10, "max_window_layers": 3},
    ),
    "qwen3_moe": TinyModelSpec(
        arch="qwen3_moe", seed=15,
        extra_config={"head_dim": 24, "num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                      "norm_topk_prob": True},
    ),
}


class Models:
    """Tiny checkpoints built on first use and shared by the module's tests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, tuple] = {}

    def get(self, name: str):
        if name not in self._built:
            path = make_tiny_model(self.root / name, VARIANTS[name])
            ours = load_model(path, torch.float32, CPU, Distributed(0, 1, None), ops_for(CPU))
            ref, _ = load_reference(path)
            self._built[name] = (path, ours, ref)
        return self._built[name]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    return Models(tmp_path_factory.mktemp("models"))


def prompt(length: int, vocab_size: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (length,), generator=g).tolist()


def ref_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()


def assert_close(ours: torch.Tensor, expected: torch.Tensor) -> None:
    assert ours.dtype == torch.float32
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_whole_prompt(models: Models, variant: str) -> None:
    _, model, ref = models.get(variant)
    ids = prompt(45, model.config.vocab_size, seed=10)
    runner = PagedRunner(model)
    runner.add_sequence(0, len(ids))
    (logits,) = runner.step([(0, ids)])
    assert_close(logits, ref_logits(ref, ids))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prompt_in_chunks_of_7(models: Models, variant: str) -> None:
    _, model, ref = models.get(variant)
    ids = prompt(45, model.config.vocab_size, seed=11)
    runner = PagedRunner(model)
    runner.add_sequence(0, len(ids))
    chunks = [runner.step([(0, ids[i : i + 7])])[0] for i in range(0, len(ids), 7)]
    assert_close(torch.cat(chunks), ref_logits(ref, ids))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_varlen_batch_of_short_and_long(models: Models, variant: str) -> None:
    _, model, ref = models.get(variant)
    short = prompt(5, model.config.vocab_size, seed=12)
    long = prompt(50, model.config.vocab_size, seed=13)
    runner = PagedRunner(model)
    runner.add_sequence(0, len(short))
    runner.add_sequence(1, len(long))
    out_short, out_long = runner.step([(0, short), (1, long)])
    assert_close(out_short, ref_logits(ref, short))
    assert_close(out_long, ref_logits(ref, long))


@pytest.mark.parametrize("variant", ["llama3", "gemma2"])
def test_mlp_in_row_slices(models: Models, variant: str) -> None:
    # A long CPU prefill goes through the MLP in row slices (llama.MLP_SLICE_BYTES); tiny models never reach
    # the real slice size, so slices of 16 rows here: a 50-row prompt beside a 5-row one is cut mid-sequence.
    from spindle_server.models.llama import LlamaMLP

    _, model, ref = models.get(variant)
    mlps = [m for m in model.modules() if isinstance(m, LlamaMLP)]
    assert mlps and all(m.slice_rows is not None and m.slice_rows >= 256 for m in mlps)
    short = prompt(5, model.config.vocab_size, seed=16)
    long = prompt(50, model.config.vocab_size, seed=17)
    saved = [m.slice_rows for m in mlps]
    try:
        for m in mlps:
            m.slice_rows = 16
        runner = PagedRunner(model)
        runner.add_sequence(0, len(short))
        runner.add_sequence(1, len(long))
        out_short, out_long = runner.step([(0, short), (1, long)])
    finally:
        for m, rows in zip(mlps, saved, strict=True):
            m.slice_rows = rows
    assert_close(out_short, ref_logits(ref, short))
    assert_close(out_long, ref_logits(ref, long))


@pytest.mark.parametrize(("costs", "expected"), [
    ({16: 100, 32: 60, 64: 80}, 32),  # the fastest candidate, past the margin
    ({16: 100, 32: 95, 64: 120}, 16),  # 0.95 of the byte-sized slices' time: within the margin, stays
    ({16: 100, 32: 70, 64: 50}, 64),  # unsliced
])
def test_warmup_times_the_mlp_slices(models: Models, monkeypatch, costs: dict[int, int], expected: int) -> None:
    # The clock advances by `costs[slice rows]` per MLP call, so the choice is the test's, not the host's.
    from spindle_server.models import llama

    _, model, ref = models.get("llama3")
    mlps = [m for m in model.modules() if isinstance(m, llama.LlamaMLP)]
    saved = [(m.byte_slice_rows, m.slice_rows) for m in mlps]
    clock, timed = [0], []
    real_forward = llama.LlamaMLP.forward

    def costed_forward(self, x):
        clock[0] += costs[self.slice_rows]
        timed.append((self.slice_rows, x.shape[0]))
        return real_forward(self, x)

    monkeypatch.setattr(llama.time, "perf_counter_ns", lambda: clock[0])
    monkeypatch.setattr(llama.LlamaMLP, "forward", costed_forward)
    try:
        for m in mlps:
            m.byte_slice_rows = m.slice_rows = 16
        assert llama.choose_mlp_slices(model, 64, Distributed(0, 1, None)) == expected
        # each candidate timed over 64 rows through the first MLP_SLICE_LAYERS MLPs, MLP_SLICE_REPEATS times
        assert sorted(set(timed)) == [(16, 64), (32, 64), (64, 64)]
        assert len(timed) == 3 * llama.MLP_SLICE_LAYERS * llama.MLP_SLICE_REPEATS
        assert [m.slice_rows for m in mlps] == [expected] * len(mlps)
        monkeypatch.setattr(llama.LlamaMLP, "forward", real_forward)
        ids = prompt(50, model.config.vocab_size, seed=18)
        runner = PagedRunner(model)
        runner.add_sequence(0, len(ids))
        assert_close(runner.step([(0, ids)])[0], ref_logits(ref, ids))
        # nothing to choose where the longest forward fits in one byte-sized slice
        timed.clear()
        assert llama.choose_mlp_slices(model, 16, Distributed(0, 1, None)) is None
        assert not timed and [m.slice_rows for m in mlps] == [expected] * len(mlps)
    finally:
        for m, (byte_rows, rows) in zip(mlps, saved, strict=True):
            m.byte_slice_rows, m.slice_rows = byte_rows, rows


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decode_steps_after_prefill(models: Models, variant: str) -> None:
    _, model, ref = models.get(variant)
    a = prompt(20, model.config.vocab_size, seed=14)  # the last two tokens are fed as decode steps
    b = prompt(33, model.config.vocab_size, seed=15)
    runner = PagedRunner(model)
    runner.add_sequence(0, len(a))
    runner.add_sequence(1, len(b))
    runner.step([(0, a[:-2]), (1, b[:-2])])
    ref_a, ref_b = ref_logits(ref, a), ref_logits(ref, b)
    for back in (2, 1):  # feed a[-2], b[-2], then a[-1], b[-1]
        pa, pb = len(a) - back, len(b) - back
        out_a, out_b = runner.step([(0, [a[pa]]), (1, [b[pb]])])
        assert_close(out_a, ref_a[pa : pa + 1])
        assert_close(out_b, ref_b[pb : pb + 1])


def test_sharded_checkpoint_is_really_sharded(models: Models) -> None:
    path, _, _ = models.get("sharded")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 1


def test_tied_model_has_no_lm_head_tensor(models: Models) -> None:
    path, model, _ = models.get("tied")
    assert model.lm_head.is_tied
    assert "lm_head.weight" not in load_file(str(path / "model.safetensors"))


def assert_prefill_then_decode_match(model, ref, ids: list[int]) -> None:
    """All but the last token as one prefill, then the last as a decode step, against transformers with its
    own KV cache (its keys keep the positions' scaling they were made with)."""
    runner = PagedRunner(model)
    runner.add_sequence(0, len(ids))
    (prefill,) = runner.step([(0, ids[:-1])])
    (decode,) = runner.step([(0, ids[-1:])])
    with torch.no_grad():
        first = ref(torch.tensor([ids[:-1]]), use_cache=True)
        second = ref(torch.tensor([ids[-1:]]), past_key_values=first.past_key_values, use_cache=True)
    assert_close(prefill, first.logits[0])
    assert_close(decode, second.logits[0])


def test_dynamic_rope_beyond_trained_length(tmp_path: Path) -> None:
    """Dynamic NTK rescales with the sequence length: a prompt longer than max_position_embeddings, then a
    decode step, against transformers with its own KV cache (its keys keep the scale they were made with)."""
    spec = TinyModelSpec(max_position_embeddings=32, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    path = make_tiny_model(tmp_path / "dynamic", spec)
    model = load_model(path, torch.float32, CPU, Distributed(0, 1, None), ops_for(CPU))
    ref, _ = load_reference(path)
    ids = prompt(41, model.config.vocab_size, seed=16)
    assert_prefill_then_decode_match(model, ref, ids)


def test_heads_not_divisible_by_world_size(models: Models) -> None:
    path, _, _ = models.get("llama3")
    config = read_model_config(path)  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match=r"num_heads=4 and num_kv_heads=2 .* world size 3"):
        config.check_world_size(3)
    with pytest.raises(ValueError, match=r"num_kv_heads=2 .* world size 4"):
        config.kv_heads_per_rank(4)
    assert config.kv_heads_per_rank(2) == 1


def test_config_reading(models: Models) -> None:
    path, _, _ = models.get("qwen2")
    config = read_model_config(path)
    assert (config.model_type, config.num_layers, config.hidden_size) == ("qwen2", 2, 64)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
    assert config.qkv_bias and not config.o_bias
    assert config.eos_token_ids == (2,)
    llama3 = read_model_config(models.get("llama3")[0])
    assert llama3.rope.rope_type == "llama3" and llama3.rope.factor == 8.0
    assert llama3.rope.original_max_position_embeddings == 64


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(models: Models, tmp_path: Path) -> None:
    path = _copy_model(models.get("llama3")[0], tmp_path / "broken")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(MissingWeightError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(path, torch.float32, CPU, Distributed(0, 1, None), ops_for(CPU))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model_type", "gpt2", "model_type 'gpt2' is not supported"),
        ("hidden_act", "gelu", "hidden_act 'gelu' is not supported"),
        ("rope_parameters", {"rope_type": "mrope", "factor": 2.0}, "rope type 'mrope' is not supported"),
        ("model_type", "gpt_neox", r"model_type 'gpt_neox' .* Spindle serves: gemma2, gemma3_text, llama"),
        ("layer_types", ["chunked_attention", "full_attention"], r"layer types \['chunked_attention'\]"),
        ("sliding_window", -4, "sliding_window must be a positive integer"),
        ("use_bidirectional_attention", True, "use_bidirectional_attention is not supported"),
    ],
)
def test_unsupported_config_is_rejected(models: Models, tmp_path: Path, field, value, message) -> None:
    path = tmp_path / "m"
    path.mkdir()
    config = json.loads((models.get("llama3")[0] / "config.json").read_text())
    config[field] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        read_model_config(path)


def test_index_naming_a_missing_shard_file(models: Models, tmp_path: Path) -> None:
    path = _copy_model(models.get("sharded")[0], tmp_path / "sharded")
    victim = sorted(path.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_model(path, torch.float32, CPU, Distributed(0, 1, None), ops_for(CPU))


def test_directory_without_weights(models: Models, tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.mkdir()
    shutil.copy(models.get("llama3")[0] / "config.json", path)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_model(path, torch.float32, CPU, Distributed(0, 1, None), ops_for(CPU))


def test_weight_shape_disagreeing_with_config(models: Models, tmp_path: Path) -> None:
    path = _copy_model(models.get("llama3")[0], tmp_path / "wrong_shape")
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"gate_proj\.weight' has shape \(128, 64\), the model config expects \(96, 64\)"
    ):
        load_model(path, torch.float32, CPU, Distributed(0, 1, None), ops_for(CPU))


def test_windows_are_read_per_layer(models: Models) -> None:
    assert read_model_config(models.get("mistral_window")[0]).layer_windows == (12, 12)
    assert read_model_config(models.get("qwen3")[0]).layer_windows == (None, 10)
    gemma2 = read_model_config(models.get("gemma2")[0])
    assert gemma2.layer_windows == (12, None) and gemma2.attn_softcap == 50.0 and gemma2.final_logit_softcap == 30.0
    gemma3 = read_model_config(models.get("gemma3")[0])
    assert gemma3.rope_of(0).theta == 1e4 and gemma3.rope_of(1).rope_type == "linear"
    assert read_model_config(models.get("mistral")[0]).layer_windows == (4096, 4096)  # transformers default
    assert read_model_config(models.get("llama3")[0]).layer_windows == ()


def test_mistral_window_greedy_past_the_window(models: Models) -> None:
    """Greedy tokens past a 12-token window, prefilled in chunks of 7 then decoded, equal transformers'."""
    from tests.helpers.tiny_model import reference_greedy

    _, model, ref = models.get("mistral_window")
    ids = prompt(30, model.config.vocab_size, seed=17)
    expected = reference_greedy(ref, ids, 12)
    runner = PagedRunner(model)
    runner.add_sequence(0, len(ids) + 12)
    for i in range(0, len(ids), 7):
        (logits,) = runner.step([(0, ids[i : i + 7])])
    tokens = [int(logits[-1].argmax())]
    while len(tokens) < 12:
        (logits,) = runner.step([(0, tokens[-1:])])
        tokens.append(int(logits[-1].argmax()))
    assert tokens == expected
    # and the window matters: the same model attending fully predicts differently somewhere
    full = load_model(models.get("mistral_window")[0], torch.float32, CPU, Distributed(0, 1, None), ops_for(CPU))
    for layer in full.layers:
        layer.self_attn.window = None
    full_runner = PagedRunner(full)
    full_runner.add_sequence(0, len(ids))
    (full_logits,) = full_runner.step([(0, ids)])
    assert not torch.allclose(full_logits, ref_logits(ref, ids), atol=1e-2)


def test_longrope_past_the_original_length(tmp_path: Path) -> None:
    """A prompt longer than longrope's original length (64) takes the long factors, then decodes."""
    spec = TinyModelSpec(arch="phi3", seed=13, max_position_embeddings=128, extra_config=PHI3_CONFIG)
    path = make_tiny_model(tmp_path / "phi3_long", spec)
    model = load_model(path, torch.float32, CPU, Distributed(0, 1, None), ops_for(CPU))
    ref, _ = load_reference(path)
    ids = prompt(71, model.config.vocab_size, seed=18)
    assert_prefill_then_decode_match(model, ref, ids)


@pytest.mark.parametrize(
    ("variant", "extra", "expected"),
    [
        ("mistral_window", {}, (12, 12)),
        ("qwen3", {"num_hidden_layers": 3, "max_window_layers": 1}, (None, 10, 10)),
        ("qwen3", {"use_sliding_window": False}, ()),
        ("gemma2", {"num_hidden_layers": 3}, (12, None, 12)),
        ("gemma3", {"num_hidden_layers": 4, "sliding_window_pattern": 2}, (12, None, 12, None)),
        ("gemma3", {"num_hidden_layers": 7}, (12, 12, 12, 12, 12, None, 12)),  # transformers' default of 6
    ],
)
def test_window_rules_of_configs_without_layer_types(models: Models, tmp_path: Path, variant, extra, expected) -> None:
    """Older config.json files list no layer_types: each family's own rule decides which layers slide."""
    path = tmp_path / "m"
    path.mkdir()
    config = json.loads((models.get(variant)[0] / "config.json").read_text())
    config.pop("layer_types", None)
    config.update(extra)
    (path / "config.json").write_text(json.dumps(config))
    assert read_model_config(path).layer_windows == expected


def test_phi3_reads_a_yarn_rope_type_as_longrope(models: Models, tmp_path: Path) -> None:
    """transformers' Phi-3 maps rope types "su" and "yarn" to longrope; a yarn table would be different rope."""
    path = tmp_path / "m"
    path.mkdir()
    config = json.loads((models.get("phi3")[0] / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_scaling"] = {**params, "type": "yarn"}
    config["rope_scaling"].pop("rope_type")
    (path / "config.json").write_text(json.dumps(config))
    rope = read_model_config(path).rope
    assert rope.rope_type == "longrope" and rope.short_factor == tuple(params["short_factor"])


def test_moe_config_reading(models: Models) -> None:
    from spindle_server.layers.moe import SparseMoeBlock
    from spindle_server.models.llama import LlamaMLP

    mixtral = read_model_config(models.get("mixtral")[0]).moe
    assert mixtral is not None
    assert (mixtral.num_experts, mixtral.top_k, mixtral.intermediate_size) == (8, 2, 48)
    assert mixtral.norm_topk_prob and mixtral.shared_expert_intermediate_size == 0
    assert mixtral.names.block == "block_sparse_moe"
    qwen = read_model_config(models.get("qwen2_moe")[0])
    assert qwen.qkv_bias and qwen.moe is not None and not qwen.moe.norm_topk_prob
    assert (qwen.moe.num_experts, qwen.moe.top_k, qwen.moe.shared_expert_intermediate_size) == (6, 3, 96)
    _, model, _ = models.get("qwen2_moe_dense_layer")
    assert [type(layer.mlp) for layer in model.layers] == [SparseMoeBlock, LlamaMLP, SparseMoeBlock]
    assert read_model_config(models.get("llama3")[0]).moe is None


def test_moe_intermediate_not_divisible_by_world_size(models: Models) -> None:
    config = read_model_config(models.get("qwen2_moe")[0])  # 4 heads, 2 KV heads: those split over 2
    config.check_world_size(2)
    for moe, message in (
        (dataclasses.replace(config.moe, intermediate_size=31), "moe intermediate size=31"),
        (dataclasses.replace(config.moe, shared_expert_intermediate_size=33), "shared_expert_intermediate_size=33"),
    ):
        with pytest.raises(ValueError, match=f"{message} is not divisible by the world size 2"):
            dataclasses.replace(config, moe=moe).check_world_size(2)


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    path = _copy_model(src, dst)
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_moe_windows_are_read_per_layer(models: Models) -> None:
    assert read_model_config(models.get("mixtral")[0]).layer_windows == (12, 12)  # Mixtral: every layer
    # Qwen2-MoE: even-indexed layers below max_window_layers, and only when use_sliding_window
    assert read_model_config(models.get("qwen2_moe_window")[0]).layer_windows == (10, None, 10, None)
    assert read_model_config(models.get("qwen2_moe")[0]).layer_windows == ()


def test_moe_missing_expert_and_wrong_expert_count_are_named(models: Models, tmp_path: Path) -> None:
    path = _copy_model(models.get("mixtral")[0], tmp_path / "missing")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(MissingWeightError, match=r"model\.layers\.1\.block_sparse_moe\.experts\.5\.w3\.weight"):
        load_model(path, torch.float32, CPU, Distributed(0, 1, None), ops_for(CPU))
    path = _edit_config(models.get("mixtral")[0], tmp_path / "four_experts", num_local_experts=4)
    with pytest.raises(ValueError, match=r"gate\.weight' has shape \(8, 64\), the model config expects \(4, 64\)"):
        load_model(path, torch.float32, CPU, Distributed(0, 1, None), ops_for(CPU))


def test_moe_fields_left_out_take_transformers_defaults() -> None:
    import transformers
    from spindle_server.layers.moe import MoeConfig

    for model_type, hf_class in (("mixtral", transformers.MixtralConfig), ("qwen2_moe", transformers.Qwen2MoeConfig),
                                 ("qwen3_moe", transformers.Qwen3MoeConfig)):
        hf = hf_class()
        moe = MoeConfig.from_hf_config({"intermediate_size": hf.intermediate_size}, model_type)
        assert moe is not None
        assert moe.num_experts == (getattr(hf, "num_local_experts", None) or hf.num_experts)
        assert moe.top_k == hf.num_experts_per_tok
        assert moe.norm_topk_prob == getattr(hf, "norm_topk_prob", True)
        assert moe.intermediate_size == getattr(hf, "moe_intermediate_size", hf.intermediate_size)
        assert moe.shared_expert_intermediate_size == getattr(hf, "shared_expert_intermediate_size", 0)
    assert MoeConfig.from_hf_config({"num_experts": 4}, "qwen2") is None


def test_qwen3_moe_expert_count_under_either_name() -> None:
    # The Hub's Qwen3-MoE configs say num_experts; transformers 5 writes num_local_experts.
    from spindle_server.layers.moe import MoeConfig

    for key in ("num_experts", "num_local_experts"):
        moe = MoeConfig.from_hf_config({key: 6, "num_experts_per_tok": 2, "moe_intermediate_size": 32}, "qwen3_moe")
        assert moe is not None and moe.num_experts == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_views_and_copies_give_identical_logits(tmp_path: Path, dtype: torch.dtype) -> None:
    # The CPU ops take q/k/v as strided views of the QKV output (KernelOps.takes_strided_qkv); handing them
    # contiguous copies instead must not change a bit, at a head_dim the C++ kernels serve (64).
    spec = TinyModelSpec(arch="llama", hidden_size=256, num_heads=4, num_kv_heads=2, seed=16)
    model = load_model(make_tiny_model(tmp_path / "m", spec), dtype, CPU, Distributed(0, 1, None), ops_for(CPU))
    assert all(layer.self_attn.strided_qkv for layer in model.layers)
    ids = prompt(30, model.config.vocab_size, seed=17)
    outputs = []
    for strided in (True, False):
        for layer in model.layers:
            layer.self_attn.strided_qkv = strided
        runner = PagedRunner(model)
        runner.kv_caches = [(k.to(dtype), v.to(dtype)) for k, v in runner.kv_caches]
        runner.add_sequence(0, len(ids))
        runner.add_sequence(1, len(ids))
        prefill = runner.step([(0, ids[:-2]), (1, ids[:20])])
        decodes = [runner.step([(0, [ids[i]]), (1, [ids[i - 8]])]) for i in (-2, -1)]
        outputs.append(torch.cat([t for step in [prefill, *decodes] for t in step]))
    assert torch.equal(outputs[0], outputs[1])
