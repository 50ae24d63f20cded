"""The router's tokenizer: `tokenizers.Tokenizer` from the model directory, run off the event loop.

Tokenization is CPU work of unbounded length (a 2 MB prompt takes a while), so every call runs on a pool
of `validation_workers` threads, each with its own `Tokenizer` instance (as TGI gives each worker its own),
and the asyncio loop only awaits the result.
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer


@dataclass(frozen=True)
class TokenSpan:
    """One token of /tokenize: its id, its text and its byte offsets in the input."""

    id: int
    text: str
    start: int
    stop: int


def _special_token(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": ...} form of older configs
        value = value.get("content")
    return value if isinstance(value, str) else None


class RouterTokenizer:
    def __init__(self, model_dir: str | Path, num_workers: int = 2) -> None:
        """Load `model_dir/tokenizer.json` (required) and the special tokens of `tokenizer_config.json`."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
        self._json = path.read_text(encoding="utf-8")
        self._main = Tokenizer.from_str(self._json)  # also used on the loop for cheap decodes
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="tokenizer")
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        self.bos_token = _special_token(config, "bos_token")
        self.eos_token = _special_token(config, "eos_token")

    @property
    def vocab_size(self) -> int:
        return self._main.get_vocab_size(with_added_tokens=True)

    def _worker_tokenizer(self) -> Tokenizer:
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            tok = self._local.tokenizer = Tokenizer.from_str(self._json)
        return tok

    def _encode_ids(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._worker_tokenizer().encode(text, add_special_tokens=add_special_tokens).ids

    def _encode_spans(self, text: str, add_special_tokens: bool) -> list[TokenSpan]:
        enc = self._worker_tokenizer().encode(text, add_special_tokens=add_special_tokens)
        # tokenizers reports character offsets; TGI (Rust) reports byte offsets into the UTF-8 input.
        byte_at = [0]
        for ch in text:
            byte_at.append(byte_at[-1] + len(ch.encode("utf-8")))
        spans = []
        for token_id, (start, stop) in zip(enc.ids, enc.offsets):
            spans.append(TokenSpan(token_id, text[start:stop], byte_at[start], byte_at[stop]))
        return spans

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, computed on the worker pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._encode_ids, text, add_special_tokens)

    async def encode_spans(self, text: str, add_special_tokens: bool = True) -> list[TokenSpan]:
        """Tokens of `text` with their text and byte offsets (for /tokenize), computed on the worker pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._encode_spans, text, add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (short sequences only: this runs on the caller's thread)."""
        return self._main.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """Decoded text of a single token, special tokens kept."""
        return self._main.decode([token_id], skip_special_tokens=False)

    def is_special(self, token_id: int) -> bool:
        token = self._main.id_to_token(token_id)
        return token is not None and any(
            t.special and t.content == token for t in self._main.get_added_tokens_decoder().values()
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
