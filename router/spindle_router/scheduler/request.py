"""What crosses the boundary between the HTTP layer and the scheduler.

The HTTP layer turns a body into a `ValidRequest` (token ids, resolved parameters) and hands it to the
scheduler, which answers with a `RequestStream` of events:

    [PrefillEvent]  TokenEvent*  EndEvent        a request that finished
    [PrefillEvent]  TokenEvent*  ErrorEvent      a request the shards failed

`EndEvent` carries the last token itself (there is no separate TokenEvent for it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from spindle_router.grammar import Grammar


class TraceHook(Protocol):
    """A request's tracing, opaque to the scheduler (telemetry.RequestTrace implements it)."""

    def carrier(self) -> tuple[tuple[str, str], ...]:
        """W3C context for the shard RPCs that carry the request; the first call ends its queue span."""
        ...


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0: disabled
    top_p: float = 1.0  # 1.0: disabled
    typical_p: float = 1.0  # 1.0: disabled
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_p: float = 0.0  # 0.0: disabled
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), OpenAI's -100..100

    @property
    def is_sampling(self) -> bool:
        """True when the shard samples rather than taking the argmax (TGI's rule; min-p alone keeps the argmax)."""
        return (
            self.do_sample
            or self.temperature != 1.0
            or self.top_k != 0
            or self.top_p < 1.0
            or self.typical_p < 1.0
        )


@dataclass(frozen=True)
class StoppingParams:
    max_new_tokens: int
    stop_sequences: tuple[str, ...] = ()
    ignore_eos_token: bool = False
    min_new_tokens: int = 0  # EOS and stop_token_ids held back until this many tokens
    stop_token_ids: tuple[int, ...] = ()  # finish (as EOS) on any of these


@dataclass(frozen=True)
class ValidRequest:
    """A request that passed validation: what the scheduler needs, nothing it must re-derive."""

    input_ids: tuple[int, ...]  # tokenized and truncated prompt
    sampling: SamplingParams
    stopping: StoppingParams
    top_n_tokens: int = 0
    prefill_logprobs: bool = False  # decoder_input_details: also bypasses the prefix cache
    grammar: Grammar | None = None  # constrains every generated token (checked by validation)
    trace: TraceHook | None = field(default=None, compare=False)  # set when tracing is on

    @property
    def input_length(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float | None  # None where unknown (NaN on the wire)
    special: bool = False


@dataclass(frozen=True)
class PrefillEvent:
    tokens: list[Token]  # one per prompt token; the first has logprob None


@dataclass(frozen=True)
class TokenEvent:
    token: Token
    top_tokens: list[Token] = field(default_factory=list)


@dataclass(frozen=True)
class EndEvent:
    token: Token
    top_tokens: list[Token]
    generated_text: str
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    generated_tokens: int
    seed: int | None  # set when the request sampled
    queued_at: float  # time.monotonic() when submitted
    started_at: float  # time.monotonic() when first scheduled into a batch


@dataclass(frozen=True)
class ErrorEvent:
    message: str  # e.g. "Server error: ..." from the shard client


Event = PrefillEvent | TokenEvent | EndEvent | ErrorEvent


@dataclass(eq=False)
class ScheduledRequest:
    """The scheduler's record of one request: counters, not phases (STYLE 2).

        context:  | prompt (prompt_len)                 | generated (num_generated)      |
                  |<- cached_tokens ->|                  (blocks shared from the prefix cache)
                  |<------------ computed_tokens ------------>|                        K/V on the shards
                                                              |<- scheduled_tokens ->| this step

    Chunked prefill, prefix reuse, decode and resumption after preemption are all this arithmetic: a
    step computes `scheduled_tokens` more tokens, and a step that reaches the end of the context samples
    one more token. Owned by the scheduler task alone.
    """

    id: int  # the request id sent to the shards
    request: ValidRequest
    queued_at: float  # time.monotonic() at submit
    started_at: float | None = None  # first admission into a batch
    generated_ids: list[int] = field(default_factory=list)  # every token the client was sent
    blocks: list[int] = field(default_factory=list)  # block table on the shards (position order)
    cached_tokens: int = 0  # leading prompt tokens read from the prefix cache (never computed)
    computed_tokens: int = 0  # leading context tokens whose K/V are on the shards
    scheduled_tokens: int = 0  # tokens the step being planned computes
    resumed_len: int = 0  # generated tokens it was last admitted with (sent as generated_ids)
    prefix_node: object | None = None  # radix_cache.PrefixNode it keeps locked, if any
    shared_blocks: int = 0  # leading prompt blocks in the prefix cache (found there or put there), locked
    prefill_event_sent: bool = False

    @property
    def prompt_len(self) -> int:
        return self.request.input_length

    @property
    def num_generated(self) -> int:
        return len(self.generated_ids)

    @property
    def context_len(self) -> int:
        return self.prompt_len + self.num_generated

    @property
    def remaining_tokens(self) -> int:
        """Context tokens whose K/V are not on the shards yet (1 for a request that is decoding)."""
        return self.context_len - self.computed_tokens

    @property
    def max_total_tokens(self) -> int:
        """The most KV positions this request can ever need."""
        return self.prompt_len + self.request.stopping.max_new_tokens
