"""When a request stops generating: length, then (once min_new_tokens are out) stop token ids, EOS, then a
stop sequence (TGI's order)."""

from __future__ import annotations

import enum
from collections.abc import Collection, Sequence

# TGI keeps the last 300 characters of output for stop-sequence matching; we keep at least that,
# and more when a stop sequence is longer, so every stop sequence can match.
_MIN_TAIL_CHARS = 300


class FinishReason(enum.IntEnum):
    """Values equal the proto's spindle.v1.FinishReason."""

    LENGTH = 1
    EOS_TOKEN = 2
    STOP_SEQUENCE = 3


class StoppingCriteria:
    """Fed every generated token in order (including tokens replayed after a preemption)."""

    def __init__(
        self,
        max_new_tokens: int,
        stop_sequences: Sequence[str],
        eos_token_ids: Collection[int],
        ignore_eos_token: bool,
        min_new_tokens: int = 0,
        stop_token_ids: Collection[int] = (),
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens
        self.stop_sequences = tuple(s for s in stop_sequences if s)  # "" would stop on every token
        self.eos_token_ids = frozenset(eos_token_ids)
        self.ignore_eos_token = ignore_eos_token
        self.min_new_tokens = min_new_tokens
        self.stop_token_ids = frozenset(stop_token_ids)
        self.num_generated = 0
        self._tail = ""  # the end of the output text, for stop-sequence matching
        self._tail_chars = max([_MIN_TAIL_CHARS, *(len(s) for s in self.stop_sequences)])

    def __call__(self, token_id: int, token_text: str) -> FinishReason | None:
        """Account for one generated token and its incremental text; the reason to stop, if any."""
        self.num_generated += 1
        if self.stop_sequences:
            self._tail = (self._tail + token_text)[-self._tail_chars :]
        if self.num_generated >= self.max_new_tokens:
            return FinishReason.LENGTH
        if self.num_generated < self.min_new_tokens:
            return None
        if token_id in self.stop_token_ids:  # per-request EOS tokens: reported as EOS
            return FinishReason.EOS_TOKEN
        if not self.ignore_eos_token and token_id in self.eos_token_ids:
            return FinishReason.EOS_TOKEN
        if token_text and any(self._tail.endswith(s) for s in self.stop_sequences):
            return FinishReason.STOP_SEQUENCE
        return None
