"""Greedy decoding through real shard processes equals transformers' generate, token for token.

Each model gets one `spindle-server serve` process for the module; the test plays the router
(MiniRouter assigns the blocks). Batches mix very different prompt lengths, chunked prefill, requests
joining a running batch, prefix-cache reuse and resumption after preemption.
"""

from __future__ import annotations

import pytest
from spindle_proto import generate_pb2 as pb

from tests.helpers.tiny_model import TinyModelSpec, load_reference, make_tiny_model, reference_greedy
from tests.server.shard_harness import MiniRouter, Req, ShardGroup, warmup
from tests.server.test_model import VARIANTS

pytestmark = pytest.mark.slow

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # small, so the scaling changes short contexts too
}
SPECS = {
    # head_dim 64: decode attention through the C++ CPU kernel (the others' 16 take the torch path)
    "llama3": TinyModelSpec(arch="llama", rope_scaling=LLAMA3_ROPE, hidden_size=256, num_heads=4, num_kv_heads=2,
                            seed=11),
    "mistral": TinyModelSpec(arch="mistral", seed=12),
    "qwen2": TinyModelSpec(arch="qwen2", seed=13),
    # 12-token windows, shorter than most prompts here; Gemma 2 adds soft caps and alternating layers.
    # (The other families are held to transformers at the model level: test_model.py, test_model_tp.py.)
    "mistral_window": VARIANTS["mistral_window"],
    "gemma2": VARIANTS["gemma2"],
    "mixtral": VARIANTS["mixtral"],  # 8 experts, top-2, a 12-token window
    "qwen2_moe": TinyModelSpec(  # routed top-3 (not renormalised) + the gated shared expert
        arch="qwen2_moe",
        seed=15,
        extra_config={"num_experts": 6, "num_experts_per_tok": 3, "moe_intermediate_size": 32,
                      "shared_expert_intermediate_size": 64, "norm_topk_prob": False},
    ),
}
NEW_TOKENS = 8


def prompts(lengths: tuple[int, ...], offset: int = 0) -> list[list[int]]:
    """Deterministic, distinct prompts of the given lengths (BOS first, ids inside the tiny vocab)."""
    return [[1] + [(7 * i + 13 * k + offset) % 500 + 3 for i in range(n - 1)] for k, n in enumerate(lengths)]


class Served:
    def __init__(self, tmp_dir, name: str) -> None:
        self.path = make_tiny_model(tmp_dir / name, SPECS[name])
        self.reference, self.tokenizer = load_reference(self.path)
        self.group = ShardGroup(self.path)
        self.num_blocks = warmup(self.group).num_blocks
        self._refs: dict[tuple[int, ...], list[int]] = {}

    def ref(self, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
        key = (*prompt, -n)
        if key not in self._refs:
            self._refs[key] = reference_greedy(self.reference, prompt, n)
        return self._refs[key]

    def router(self) -> MiniRouter:
        self.group.call("ClearCache", pb.ClearCacheRequest())
        return MiniRouter(self.group, self.num_blocks)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    started: dict[str, Served] = {}

    def get(name: str) -> Served:
        if name not in started:
            started[name] = Served(tmp_path_factory.mktemp("models"), name)
        return started[name]

    yield get
    for s in started.values():
        s.group.close()


MODELS = list(SPECS)
LENGTHS = (3, 47, 1, 20, 33)


@pytest.mark.parametrize("name", MODELS)
def test_batch_of_very_different_lengths(served, name):
    s = served(name)
    reqs = [Req(i, p, NEW_TOKENS) for i, p in enumerate(prompts(LENGTHS))]
    s.router().run(reqs)
    for r in reqs:
        assert r.tokens == s.ref(r.prompt), f"request {r.id} (prompt of {len(r.prompt)})"
        assert r.finished.generated_tokens == NEW_TOKENS
        assert r.finished.text == s.tokenizer.decode(r.tokens, skip_special_tokens=True)
        assert not r.finished.HasField("seed")  # greedy


@pytest.mark.parametrize("name", MODELS)
def test_chunked_prefill_of_seven_tokens(served, name):
    s = served(name)
    reqs = [Req(i, p, NEW_TOKENS, chunk=7) for i, p in enumerate(prompts(LENGTHS))]
    router = s.router()
    router.step(reqs)
    # Only prompts that fit in one chunk produced a token on the first step.
    assert sorted(len(r.generations) for r in reqs) == sorted(int(len(p) <= 7) for p in prompts(LENGTHS))
    while router.is_running:
        router.decode()
    for r in reqs:
        assert r.tokens == s.ref(r.prompt), f"request {r.id} (prompt of {len(r.prompt)})"


def test_request_joins_a_decoding_batch(served):
    s = served("llama3")
    first = [Req(i, p, NEW_TOKENS) for i, p in enumerate(prompts((9, 30)))]
    late = [Req(10, prompts((26,), offset=5)[0], NEW_TOKENS, chunk=7),
            Req(11, prompts((5,), offset=9)[0], NEW_TOKENS)]
    router = s.router()
    router.step(first)
    for _ in range(3):
        router.decode()
    router.step(late)  # merged with the running batch: its decodes advance in the same forward
    assert sorted(router.active) == [0, 1, 10, 11]
    while router.is_running:
        router.decode()
    for r in first + late:
        assert r.tokens == s.ref(r.prompt), f"request {r.id}"


@pytest.mark.parametrize("name", ["llama3", "gemma2", "mixtral", "qwen2_moe"])
def test_prompt_reusing_another_requests_cached_blocks(served, name):
    s = served(name)
    base = prompts((40,))[0]
    router = s.router()
    owner = Req(0, base, NEW_TOKENS)
    router.run([owner])
    # Same first 32 tokens (two full blocks), different tail: those blocks are reused, not recomputed.
    reuse = Req(1, base[:32] + prompts((9,), offset=77)[0][1:], NEW_TOKENS, cache_len=32,
                shared_blocks=owner.blocks[:2], prefill_logprobs=True)
    router.run([reuse])
    assert reuse.tokens == s.ref(reuse.prompt)
    assert reuse.blocks[:2] == owner.blocks[:2]
    prefill = reuse.generations[0].prefill_tokens
    assert list(prefill.ids) == reuse.prompt
    nan = [lp != lp for lp in prefill.logprobs]
    assert nan == [True] * 33 + [False] * (len(reuse.prompt) - 33)


def test_resumed_request_recomputes_generated_tokens(served):
    s = served("llama3")
    prompt = prompts((21,), offset=3)[0]
    ref = s.ref(prompt)
    resumed = Req(5, prompt, NEW_TOKENS, resumed=ref[:3], chunk=7)
    s.router().run([resumed])
    assert resumed.tokens == ref[3:]
    assert resumed.finished.generated_tokens == NEW_TOKENS
    assert resumed.finished.text == s.tokenizer.decode(ref, skip_special_tokens=True)


@pytest.mark.parametrize("name", ["llama3", "mixtral", "qwen2_moe"])
def test_world_size_two_matches_world_size_one(served, tmp_path_factory, name):
    s = served(name)
    reqs1 = [Req(i, p, NEW_TOKENS, chunk=7) for i, p in enumerate(prompts(LENGTHS))]
    s.router().run(reqs1)
    group = ShardGroup(s.path, world_size=2)
    try:
        info = group.call("Info", pb.InfoRequest())
        assert info.world_size == 2
        num_blocks = warmup(group).num_blocks
        reqs2 = [Req(i, p, NEW_TOKENS, chunk=7) for i, p in enumerate(prompts(LENGTHS))]
        MiniRouter(group, num_blocks).run(reqs2)
        # Only rank 0 answers generations; rank 1 sampled the same tokens, or the next step's inputs would
        # differ between the ranks and the all-reduced logits (so the tokens below) with them.
        assert group.last_results[0].forward_ns > 0 and group.last_results[1].forward_ns > 0
        assert not group.last_results[1].generations
    finally:
        group.close()
    for r1, r2 in zip(reqs1, reqs2):
        assert r2.tokens == r1.tokens == s.ref(r1.prompt)
