"""Per-request token-selection parameters, validated once when a request reaches the shard."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spindle_proto import generate_pb2

_MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request turns logits into its next token (TGI's NextTokenChooser parameters).

    Defaults disable everything: a request with default parameters is decoded greedily.
    """

    temperature: float = 1.0  # scores are divided by it; 1.0: no scaling
    top_k: int = 0  # keep the k best tokens; 0: disabled
    top_p: float = 1.0  # nucleus mass; 1.0: disabled
    typical_p: float = 1.0  # typical-decoding mass; 1.0: disabled
    do_sample: bool = False  # sample even when no warper is active
    seed: int = 0  # with the step, seeds this request's generator
    repetition_penalty: float = 1.0  # HF semantics over prompt + generated ids; 1.0: disabled
    frequency_penalty: float = 0.0  # subtracted once per occurrence in prompt + generated ids; 0.0: disabled
    presence_penalty: float = 0.0  # subtracted once from every id present in prompt + generated ids; 0.0: disabled
    min_p: float = 0.0  # drop tokens below min_p x the best token's probability (after top-p); 0.0: disabled
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logit (OpenAI)
    # Stopping parameters that act on the scores: until `min_new_tokens` tokens are generated the ids in
    # `min_tokens_banned_ids` (EOS unless ignored, and the stop token ids) cannot be chosen.
    min_new_tokens: int = 0
    min_tokens_banned_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        def finite(name: str, value: float) -> None:
            if not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value}")

        for name in ("temperature", "top_p", "typical_p", "repetition_penalty", "frequency_penalty",
                     "presence_penalty", "min_p"):
            finite(name, getattr(self, name))
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be strictly positive, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"`top_k` must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` must be > 0.0 and <= 1.0, got {self.top_p}")
        if not 0 < self.typical_p <= 1:
            raise ValueError(f"`typical_p` must be > 0.0 and <= 1.0, got {self.typical_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"`repetition_penalty` must be strictly positive, got {self.repetition_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"`frequency_penalty` must be >= -2.0 and <= 2.0, got {self.frequency_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"`presence_penalty` must be >= -2.0 and <= 2.0, got {self.presence_penalty}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"`min_p` must be >= 0.0 and <= 1.0, got {self.min_p}")
        for token_id, bias in self.logit_bias:
            if not (math.isfinite(bias) and -100.0 <= bias <= 100.0):
                raise ValueError(f"`logit_bias` of token {token_id} must be >= -100 and <= 100, got {bias}")
        if not 0 <= self.seed <= _MAX_SEED:
            raise ValueError(f"`seed` must fit in an unsigned 64-bit integer, got {self.seed}")

    @classmethod
    def from_proto(cls, pb: generate_pb2.NextTokenChooserParameters) -> SamplingParams:
        """Convert and validate; raises ValueError naming the offending field."""
        return cls(
            temperature=float(pb.temperature),
            top_k=int(pb.top_k),
            top_p=float(pb.top_p),
            typical_p=float(pb.typical_p),
            do_sample=bool(pb.do_sample),
            seed=int(pb.seed),
            repetition_penalty=float(pb.repetition_penalty),
            frequency_penalty=float(pb.frequency_penalty),
            presence_penalty=float(pb.presence_penalty),
            min_p=float(pb.min_p),
            logit_bias=tuple(sorted((int(k), float(v)) for k, v in pb.logit_bias.items())),
        )

    @property
    def has_warpers(self) -> bool:
        """Any of temperature / top-k / top-p / typical-p / min-p changes the scores."""
        return (self.temperature != 1.0 or self.top_k != 0 or self.top_p < 1.0 or self.typical_p < 1.0
                or self.min_p > 0.0)

    @property
    def has_penalties(self) -> bool:
        """Anything that edits this row's scores before the warpers (penalties, biases, min-tokens mask)."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or bool(self.logit_bias) or (self.min_new_tokens > 0 and bool(self.min_tokens_banned_ids)))

    @property
    def is_sampling(self) -> bool:
        """TGI: sample when asked to or when any warper is active; otherwise take the argmax. min-p alone does
        not make a request sample: it never removes the best token, so the argmax stays the same."""
        return self.do_sample or self.temperature != 1.0 or self.top_k != 0 or self.top_p < 1.0 or self.typical_p < 1.0
