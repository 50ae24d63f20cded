"""Train the demo model `make run` serves: a small Llama on Python standard-library source.

    python models/train_demo.py --out models/demo --minutes 20

The corpus is the running interpreter's own standard library (no download), so the model learns to
write something that looks like Python. The result is a few MB in Hugging Face layout
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json with a chat template,
generation_config.json) that both Spindle and `transformers` load.

Training is single-threaded on purpose (the CPU is shared) and bounded by wall time, not steps, so
`make demo-model` takes the same time on any machine; the seed is fixed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sysconfig
import time
from pathlib import Path

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
BOS_ID, EOS_ID = 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '</s>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# Subpackages worth reading besides the top-level modules; tests and vendored code are left out.
_PACKAGES = ("asyncio", "json", "email", "http", "concurrent", "importlib", "unittest", "logging", "xml")


def stdlib_sources(max_bytes: int) -> list[str]:
    """Source texts of the interpreter's standard library, in a fixed order, up to `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(root.glob("*.py"))
    for pkg in _PACKAGES:
        paths += sorted(p for p in (root / pkg).rglob("*.py") if "test" not in p.parts)
    texts, total = [], 0
    for p in paths:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if total + len(text) > max_bytes:
            break
        texts.append(text)
        total += len(text)
    if not texts:
        raise SystemExit(f"no Python sources found under {root}")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
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
    tok.train_from_iterator(texts, trainer=trainer)
    # The BOS token is prepended by the tokenizer itself, as Llama tokenizers do.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return tok


def write_tokenizer(tok, out: Path, max_positions: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": max_positions,
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def build_model(vocab_size: int, args: argparse.Namespace):
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=args.max_positions,
        # Tied embeddings keep the file small: the vocabulary matrix is most of a model this size.
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        dtype="float32",
    )
    return transformers.LlamaForCausalLM(config).to(torch.float32)


def encode_corpus(tok, texts: list[str]):
    import torch

    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)  # starts with BOS (post-processor)
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


def lr_at(elapsed_frac: float, peak: float, warmup_frac: float = 0.03) -> float:
    """Linear warmup then cosine decay to 10% of peak, over the wall-time budget."""
    if elapsed_frac < warmup_frac:
        return peak * max(elapsed_frac / warmup_frac, 0.01)
    progress = min((elapsed_frac - warmup_frac) / (1 - warmup_frac), 1.0)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save(model, out: Path) -> None:
    import transformers

    model.generation_config = transformers.GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, max_new_tokens=64
    )
    model.save_pretrained(out, safe_serialization=True)


def greedy_sample(model, tok, prompt: str, n: int) -> str:
    import torch

    ids = torch.tensor([tok.encode(prompt).ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=EOS_ID)
    return tok.decode(out[0].tolist(), skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("models/demo"))
    p.add_argument("--minutes", type=float, default=20.0, help="wall-time budget for training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--max-positions", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--corpus-bytes", type=int, default=8_000_000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.monotonic()
    texts = stdlib_sources(args.corpus_bytes)
    tok = train_tokenizer(texts, args.vocab_size)
    write_tokenizer(tok, args.out, args.max_positions)
    data = encode_corpus(tok, texts)
    held_out = data[-50_000:]  # the tail of the corpus, never trained on
    data = data[:-50_000]
    print(f"corpus: {len(texts)} files, {len(data)} train tokens, vocab {tok.get_vocab_size()} "
          f"({time.monotonic() - t0:.0f}s)", flush=True)

    model = build_model(tok.get_vocab_size(), args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def batch(source: torch.Tensor) -> torch.Tensor:
        starts = [rng.randrange(0, len(source) - args.seq_len - 1) for _ in range(args.batch_size)]
        return torch.stack([source[s : s + args.seq_len] for s in starts])

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            x = held_out[: (len(held_out) // args.seq_len) * args.seq_len].view(-1, args.seq_len)[:32]
            loss = model(input_ids=x, labels=x).loss.item()
        model.train()
        return loss

    budget_s = args.minutes * 60
    start = time.monotonic()
    step, last_log, last_save = 0, start, start
    model.train()
    while (elapsed := time.monotonic() - start) < budget_s:
        for group in opt.param_groups:
            group["lr"] = lr_at(elapsed / budget_s, args.lr)
        x = batch(data)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        now = time.monotonic()
        if step == 1 or now - last_log > 30:
            print(f"step {step} t={now - start:.0f}s loss {loss.item():.3f} "
                  f"lr {opt.param_groups[0]['lr']:.2e}", flush=True)
            last_log = now
        if now - last_save > 300:  # a crash late in training still leaves a usable model
            save(model, args.out)
            last_save = now

    model.eval()
    save(model, args.out)
    print(f"done: {step} steps, held-out loss {eval_loss():.3f}", flush=True)
    print("greedy sample:\n" + greedy_sample(model, tok, "def ", 60), flush=True)
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    print(f"saved to {args.out} ({size:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
