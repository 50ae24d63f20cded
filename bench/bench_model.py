"""The benchmark model: a random Llama in SmolLM2-135M's shape, with a word-level tokenizer.

The tokenizer maps "w<i>" to id i, so a prompt of N words is exactly N tokens (plus BOS) and the
figures count precisely what the model computed. Built once into a cache directory; nothing downloaded.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
)
BOS_ID, EOS_ID = 1, 2
DEFAULT_DIR = Path(__file__).resolve().parent / ".cache" / "smollm2-135m-random"


def build_word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": BOS_ID, "</s>": EOS_ID}
    for i in range(3, vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return tok


def num_parameters(config: dict) -> int:
    h, i, v, n = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["num_hidden_layers"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    return n * per_layer + v * h * (1 if config["tie_word_embeddings"] else 2) + h


def build(out: Path = DEFAULT_DIR, **overrides) -> Path:
    """Write the model (once) and return its directory."""
    import torch
    import transformers

    config = {**SMOLLM2_135M, **overrides}
    marker = out / "spindle-bench.json"
    if marker.exists() and json.loads(marker.read_text()) == config:
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        **config, bos_token_id=BOS_ID, eos_token_id=EOS_ID, initializer_range=0.02, dtype="float32"
    )
    model = transformers.LlamaForCausalLM(hf_config).eval()
    model.save_pretrained(out, safe_serialization=True)
    build_word_tokenizer(config["vocab_size"]).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "model_max_length": config["max_position_embeddings"]})
    )
    marker.write_text(json.dumps(config))
    return out


def prompt(num_tokens: int, seed: int, vocab_size: int = SMOLLM2_135M["vocab_size"]) -> str:
    """A prompt of exactly `num_tokens` tokens (BOS is added by the tokenizer)."""
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(3, vocab_size)}" for _ in range(num_tokens))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args()
    path = build(args.out)
    print(path, f"{num_parameters(SMOLLM2_135M) / 1e6:.1f}M parameters")
