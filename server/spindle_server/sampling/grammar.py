"""Grammar-constrained decoding: per-request matchers and the token masks they give, with llguidance.

Why llguidance (measured, bench/bench_grammar_libs.py, 32k-token byte-level BPE, 20-property schema): it
compiles in ~2 ms (xgrammar ~10 ms, outlines-core ~1.7 s), masks in tens of microseconds per token,
supports JSON Schema, regex and Lark CFGs, and has no dependencies (xgrammar pulls torch, transformers and
triton), so the router validates with the very library the shard compiles with.

Life of a constrained request on a shard:

    compile (cached by grammar)  ->  replay generated_ids (after preemption)  ->  per step:
        mask = matcher state      (computed on a worker thread while the forward runs)
        logits[~mask] = -inf      (before penalties and warpers, so greedy and sampling both obey it)
        token = sample(...);  matcher.consume(token)

The mask depends only on the grammar and the tokens so far, so every tensor-parallel rank computes the
same mask from the same logits and picks the same token.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import numpy as np
import tokenizers
import torch

log = logging.getLogger("spindle_server.grammar")

_JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: fewer tokens, and tool-call streaming relies on it


class GrammarType(enum.IntEnum):
    """Values equal the proto's spindle.v1.GrammarType."""

    JSON_SCHEMA = 1
    REGEX = 2
    LARK = 3


@dataclass(frozen=True)
class GrammarSpec:
    type: GrammarType
    value: str


def to_llguidance(spec: GrammarSpec) -> str:
    """The llguidance grammar text for `spec` (not yet checked). Raises ValueError on malformed JSON."""
    if spec.type == GrammarType.JSON_SCHEMA:
        return llguidance.LLMatcher.grammar_from_json_schema(spec.value, defaults=_JSON_OPTIONS)
    if spec.type == GrammarType.REGEX:
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    if spec.type == GrammarType.LARK:
        return llguidance.LLMatcher.grammar_from_lark(spec.value)
    raise ValueError(f"unknown grammar type {spec.type}")


class GrammarCompiler:
    """Compiles grammars against one tokenizer; compiled matchers are cached (LRU) by grammar and handed out
    as copies in their initial state. Counts compile time until `take_compile_ns` reads it."""

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, vocab_size: int, eos_token_ids: Sequence[int], cache_size: int = 64
    ) -> None:
        if not eos_token_ids:
            raise ValueError("grammar support needs the model's EOS token id")
        # n_vocab: the logits' width (the model's vocabulary may be padded beyond the tokenizer's).
        self.tokenizer = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self._cache: OrderedDict[GrammarSpec, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._compile_ns = 0

    def matcher(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """A fresh matcher for `spec`; raises ValueError with the reason when the grammar is invalid."""
        cached = self._cache.get(spec)
        if cached is None:
            start = time.perf_counter_ns()
            try:
                grammar = to_llguidance(spec)
            except ValueError as exc:
                raise ValueError(f"invalid grammar: {exc}") from None
            cached = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
            self._compile_ns += time.perf_counter_ns() - start
            if cached.is_error():
                raise ValueError(f"invalid grammar: {cached.get_error()}")
            self._cache[spec] = cached
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(spec)
        return cached.deep_copy()

    def take_compile_ns(self) -> int:
        ns, self._compile_ns = self._compile_ns, 0
        return ns


def replay(matcher: llguidance.LLMatcher, token_ids: Sequence[int]) -> None:
    """Advance a fresh matcher over tokens generated before a preemption; ValueError if the grammar rejects them."""
    if token_ids and not matcher.consume_tokens(list(token_ids)):
        raise ValueError(f"the generated tokens do not follow the grammar: {matcher.get_error()}")


def advance(matcher: llguidance.LLMatcher, token_id: int) -> None:
    """Account for the token just chosen. A masked choice is always accepted; when the matcher is already
    stopped (EOS consumed, ignore_eos_token) further tokens are EOS and change nothing."""
    if matcher.is_stopped():
        return
    if not matcher.consume_token(token_id):
        log.error("grammar rejected token %d: %s", token_id, matcher.get_error())


# Byte -> the 8 additive biases of the tokens its bits stand for (bit b of byte i: token 8 i + b; 0 or -inf).
# Reading the int32 words as bytes in that order assumes a little-endian host (x86, ARM).
_BYTE_BIAS = np.where(
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little") == 1, 0.0, -np.inf
).astype(np.float32)


class MaskJob:
    """Token masks of some rows, computed on a worker thread while the forward runs (the mask and the bias are
    native code: llguidance, numpy; torch's forward ops release the GIL too).

    `bitmask` [rows, ceil(vocab / 32)] int32 (bit j of word w: token 32 w + j allowed); rows without a
    matcher allow every token. With `host_bias` the worker also expands it into `bias` [rows, 32 * words]
    float32 (0 allowed, -inf not): on CPU one add applies it, where masked_fill over the vocabulary costs
    ~30x more (measured: 32 rows x 128k tokens, 1.5 ms vs 40-60 ms).
    """

    _pool: ThreadPoolExecutor | None = None
    _pool_lock = threading.Lock()

    def __init__(
        self, matchers: Sequence[llguidance.LLMatcher | None], vocab_size: int, eos_token_id: int,
        host_bias: bool = True,
    ) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.bitmask = torch.full((len(matchers), (vocab_size + 31) // 32), -1, dtype=torch.int32)
        self.bias: torch.Tensor | None = None
        self.mask_ns = 0
        self._future: Future[None] = self._executor().submit(self._fill, list(matchers), host_bias)

    @classmethod
    def _executor(cls) -> ThreadPoolExecutor:
        with cls._pool_lock:
            if cls._pool is None:
                cls._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
            return cls._pool

    def _fill(self, matchers: list[llguidance.LLMatcher | None], host_bias: bool) -> None:
        start = time.perf_counter_ns()
        row_bytes = self.bitmask.shape[1] * 4
        base = self.bitmask.data_ptr()
        for i, m in enumerate(matchers):
            if m is None:
                continue
            m.unsafe_compute_mask_ptr(base + i * row_bytes, row_bytes)
            if m.is_error():  # cannot happen after masked choices; never leave a row with no token at all
                log.error("grammar matcher failed, ending the request with EOS: %s", m.get_error())
                eos = self.eos_token_id
                self.bitmask[i].zero_()
                self.bitmask[i, eos // 32] = torch.tensor(1 << (eos % 32), dtype=torch.int64).to(torch.int32)
        if host_bias:
            as_bytes = self.bitmask.numpy().view(np.uint8)
            self.bias = torch.from_numpy(np.take(_BYTE_BIAS, as_bytes, axis=0).reshape(len(matchers), -1))
        self.mask_ns = time.perf_counter_ns() - start

    def wait(self) -> torch.Tensor:
        self._future.result()
        return self.bitmask

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        """Disallowed tokens of `scores` [rows, V] (and any beyond the mask) get -inf, in place."""
        bitmask = self.wait()
        if self.bias is None or scores.device.type != "cpu":
            return apply_bitmask(scores, bitmask)
        width = min(scores.shape[1], self.bias.shape[1])
        scores[:, :width].add_(self.bias[:, :width])  # + 0 leaves allowed scores bit for bit
        if scores.shape[1] > width:
            scores[:, width:] = float("-inf")
        return scores


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_bitmask(scores: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """scores [n, V] float: disallowed tokens (bit 0, or beyond the mask) get -inf, in place (unpacked on
    the scores' device: the way for CUDA, where only the packed mask crosses the bus)."""
    n, vocab = scores.shape
    device = scores.device
    shifts = _SHIFTS.get(device)
    if shifts is None:
        shifts = _SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    words = bitmask.to(device, non_blocking=True)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).view(n, -1).bool()
    width = min(vocab, allowed.shape[1])
    scores[:, :width].masked_fill_(~allowed[:, :width], float("-inf"))
    if vocab > width:
        scores[:, width:] = float("-inf")
    return scores
