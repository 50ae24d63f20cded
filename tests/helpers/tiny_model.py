"""Tiny random-weight models in Hugging Face layout, built offline for tests and benchmarks.

Every model comes with a byte-level BPE tokenizer trained in memory on a fixed corpus, a
`tokenizer_config.json` with a chat template, and safetensors weights (optionally split into shards
with an index). Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '</s>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
BOS_ID, EOS_ID = 1, 2

_CORPUS_WORDS = (
    "the quick brown fox jumps over lazy dog while a server streams tokens to every client "
    "def return import class self value list dict for in if else print range len with as "
    "hello world Spindle router shard batch block cache prefix decode prefill token model "
    "über café naïve 東京 日本語 emoji 🙂 ünïcödé"
).split()


def _corpus() -> list[str]:
    lines = []
    for i in range(400):
        words = [_CORPUS_WORDS[(i * 7 + j * 13) % len(_CORPUS_WORDS)] for j in range(12)]
        lines.append(" ".join(words))
    return lines


@dataclass
class TinyModelSpec:
    arch: str = "llama"  # llama | mistral | qwen2 | qwen3 | gemma2 | gemma3_text | phi3
    num_layers: int = 2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = None
    # Large enough that random logits have clear winners: greedy comparisons must not hinge on ties.
    initializer_range: float = 0.15
    seed: int = 0
    max_shard_size: str | None = None  # e.g. "100KB" to write several safetensors files + index
    extra_config: dict[str, Any] = field(default_factory=dict)


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return tok


def _hf_config(spec: TinyModelSpec, vocab_size: int):
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        initializer_range=spec.initializer_range,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        dtype="float32",
    )
    if spec.rope_scaling is not None:
        common["rope_scaling"] = spec.rope_scaling
    common.update(spec.extra_config)
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma2": transformers.Gemma2Config,
        "gemma3_text": transformers.Gemma3TextConfig,
        "phi3": transformers.Phi3Config,
    }[spec.arch]
    if spec.arch in ("qwen3", "gemma2", "gemma3_text"):
        # these take head_dim explicitly (their defaults are for real sizes)
        common.setdefault("head_dim", spec.hidden_size // spec.num_heads)
    if spec.arch in ("gemma2", "gemma3_text"):
        common.setdefault("query_pre_attn_scalar", spec.hidden_size // spec.num_heads)
    if spec.arch == "phi3":
        common.setdefault("pad_token_id", 0)
    return cls(**common)


def make_tiny_model(path: Path, spec: TinyModelSpec | None = None) -> Path:
    """Write a random-weight model with its tokenizer to `path` and return `path`."""
    import torch
    import transformers

    spec = spec or TinyModelSpec()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer(spec.vocab_size)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": spec.max_position_embeddings,
                "chat_template": CHAT_TEMPLATE,
                "tokenizer_class": "PreTrainedTokenizerFast",
            },
            indent=2,
        )
    )

    torch.manual_seed(spec.seed)
    config = _hf_config(spec, tok.get_vocab_size())
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if spec.max_shard_size:
        kwargs["max_shard_size"] = spec.max_shard_size
    model.save_pretrained(path, **kwargs)
    # generation_config from save_pretrained can carry sampling defaults; tests always pass their own.
    return path


def load_reference(path: Path):
    """The transformers model and fast tokenizer for `path`, float32, eval mode."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(Path(path) / "tokenizer.json"))
    return model, tokenizer


def reference_greedy(model, input_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy choice, step by step, with no logits processor: the new token ids.

    Not `generate(min_new_tokens=n)`, which masks EOS: a request with ignore_eos_token may pick EOS
    like any other token and go on.
    """
    import torch

    ids = list(input_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(input_ids):]
