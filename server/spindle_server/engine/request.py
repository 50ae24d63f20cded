"""One request on the shard: counters over its token list, not phases (STYLE 2).

    all_ids:  | prompt (prompt_len)                     | generated ...        |
              |<- cache_len ->|                          |                      |
              |<------------- computed_len ------------->|  (KV in the cache)   |
                                                         |<- next_len ->|        (the next forward)

Chunked prefill, prefix reuse, resumption after preemption and decode are the same arithmetic:
the next forward computes `all_ids[computed_len : computed_len + next_len]`, and when that reaches
the end of `all_ids` the step samples one more token. A decode is the case `next_len == 1`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import llguidance

    from spindle_server.sampling.detokenizer import IncrementalDetokenizer
    from spindle_server.sampling.params import SamplingParams
    from spindle_server.sampling.stopping import StoppingCriteria


@dataclass
class RequestState:
    id: int
    prompt_len: int
    all_ids: list[int]  # prompt + every generated token (including those it was resumed with)
    block_table: list[int]  # KV blocks in position order; slot of p = table[p // bs] * bs + p % bs
    cache_len: int  # leading prompt tokens that came from the prefix cache (never computed here)
    computed_len: int  # leading tokens of all_ids whose K/V are in the cache
    chunk_len: int | None  # cap on the next forward's tokens; None: everything remaining
    num_resumed: int  # generated tokens it arrived with (preempted before); numbering continues after them
    params: SamplingParams
    stopping: StoppingCriteria
    detokenizer: IncrementalDetokenizer
    prefill_logprobs: bool
    top_n_tokens: int
    # Log-prob of each prompt token given its predecessors, filled chunk by chunk; NaN where unknown.
    prompt_logprobs: list[float] = field(default_factory=list)
    # Constrains every generated token (sampling/grammar.py); its state has consumed generated_ids.
    grammar: llguidance.LLMatcher | None = None

    @property
    def generated_ids(self) -> list[int]:
        return self.all_ids[self.prompt_len :]

    @property
    def num_generated(self) -> int:
        return len(self.all_ids) - self.prompt_len

    @property
    def remaining_len(self) -> int:
        """Tokens of all_ids not yet in the KV cache."""
        return len(self.all_ids) - self.computed_len

    @property
    def next_len(self) -> int:
        """Tokens the next forward computes."""
        if self.chunk_len is None:
            return self.remaining_len
        return min(self.chunk_len, self.remaining_len)

    @property
    def completes_context(self) -> bool:
        """Whether the next forward reaches the end of all_ids, so the step samples a token."""
        return self.next_len == self.remaining_len

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs are reported once, by the step completing the prompt of a fresh request."""
        return self.prefill_logprobs and self.num_resumed == 0 and self.computed_len < self.prompt_len

    def covers(self, num_tokens: int, block_size: int) -> bool:
        """Whether the block table holds slots for the first `num_tokens` positions."""
        return len(self.block_table) * block_size >= num_tokens
