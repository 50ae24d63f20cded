"""The shard's batch: the requests it holds, and how one Step call changes them.

`request_from_proto` validates one new request before building it; `ShardBatch.check_step` validates a
whole step (ids, blocks, chunks, coverage) before `apply_step` changes anything. Both raise
`InvalidArgumentError`, so a bad call changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import tokenizers
from spindle_proto import generate_pb2

from spindle_server.engine.errors import InvalidArgumentError
from spindle_server.engine.request import RequestState
from spindle_server.sampling import grammar as grammars
from spindle_server.sampling.detokenizer import IncrementalDetokenizer
from spindle_server.sampling.params import SamplingParams
from spindle_server.sampling.stopping import StoppingCriteria


@dataclass(frozen=True)
class BatchContext:
    """What building requests needs beyond the message: the model's facts and the KV cache's extent."""

    tokenizer: tokenizers.Tokenizer
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    block_size: int
    num_blocks: int  # block ids must lie in [0, num_blocks)
    # A fresh matcher for a grammar (ValueError when invalid); None: this shard takes no grammar.
    grammar_matcher: Callable[[grammars.GrammarSpec], Any] | None = None


@dataclass(frozen=True)
class RequestUpdate:
    """Per-step instructions for a request the shard holds (proto RequestUpdate)."""

    request_id: int
    blocks: tuple[int, ...] = ()
    chunk_len: int | None = None

    @classmethod
    def from_proto(cls, pb: generate_pb2.RequestUpdate) -> RequestUpdate:
        return cls(
            request_id=pb.request_id,
            blocks=tuple(pb.blocks),
            chunk_len=pb.chunk_len if pb.HasField("chunk_len") else None,
        )


def _check_blocks(request_id: int, blocks: Iterable[int], num_blocks: int) -> None:
    for block in blocks:
        if block >= num_blocks:
            raise InvalidArgumentError(
                f"request {request_id}: block {block} out of range (the cache has {num_blocks} blocks)"
            )


def _check_chunk(request_id: int, chunk_len: int | None, remaining_len: int) -> None:
    if chunk_len is not None and not 1 <= chunk_len <= remaining_len:
        raise InvalidArgumentError(
            f"request {request_id}: chunk_len {chunk_len} must be in [1, {remaining_len}] "
            f"(tokens not yet computed)"
        )


def _check_coverage(request_id: int, num_blocks_in_table: int, num_tokens: int, block_size: int) -> None:
    needed = math.ceil(num_tokens / block_size)
    if num_blocks_in_table < needed:
        raise InvalidArgumentError(
            f"request {request_id}: {num_tokens} tokens need {needed} blocks, its block table has "
            f"{num_blocks_in_table}"
        )


def request_from_proto(pb: generate_pb2.Request, ctx: BatchContext) -> RequestState:
    """Validate one Request message and build its state (replaying tokens it was resumed with)."""
    rid = pb.id
    prompt = list(pb.input_ids)
    generated = list(pb.generated_ids)
    all_ids = prompt + generated
    if not prompt:
        raise InvalidArgumentError(f"request {rid}: input_ids is empty")
    bad = [t for t in all_ids if t >= ctx.vocab_size]
    if bad:
        raise InvalidArgumentError(f"request {rid}: token id {bad[0]} outside the vocabulary ({ctx.vocab_size})")
    try:
        params = SamplingParams.from_proto(pb.parameters)
    except ValueError as exc:
        raise InvalidArgumentError(f"request {rid}: {exc}") from None
    stop = pb.stopping_parameters
    if stop.max_new_tokens < 1:
        raise InvalidArgumentError(f"request {rid}: max_new_tokens must be at least 1")
    if len(generated) >= stop.max_new_tokens:
        raise InvalidArgumentError(
            f"request {rid}: resumed with {len(generated)} generated tokens, max_new_tokens is {stop.max_new_tokens}"
        )
    bad = [t for t in (*(t for t, _ in params.logit_bias), *stop.stop_token_ids) if t >= ctx.vocab_size]
    if bad:
        raise InvalidArgumentError(f"request {rid}: token id {bad[0]} outside the vocabulary ({ctx.vocab_size})")
    if stop.min_new_tokens > stop.max_new_tokens:
        raise InvalidArgumentError(f"request {rid}: min_new_tokens {stop.min_new_tokens} exceeds max_new_tokens")
    banned = set(stop.stop_token_ids) | (set() if stop.ignore_eos_token else set(ctx.eos_token_ids))
    params = replace(params, min_new_tokens=stop.min_new_tokens, min_tokens_banned_ids=tuple(sorted(banned)))
    if pb.top_n_tokens > ctx.vocab_size:
        raise InvalidArgumentError(f"request {rid}: top_n_tokens {pb.top_n_tokens} exceeds the vocabulary")
    if pb.cache_len > len(prompt) or pb.cache_len >= len(all_ids):
        raise InvalidArgumentError(
            f"request {rid}: cache_len {pb.cache_len} must leave at least one of its "
            f"{len(all_ids)} tokens to compute and cover only prompt tokens ({len(prompt)})"
        )
    chunk_len = pb.chunk_len if pb.HasField("chunk_len") else None
    _check_chunk(rid, chunk_len, len(all_ids) - pb.cache_len)
    _check_blocks(rid, pb.blocks, ctx.num_blocks)
    first_len = chunk_len if chunk_len is not None else len(all_ids) - pb.cache_len
    _check_coverage(rid, len(pb.blocks), pb.cache_len + first_len, ctx.block_size)

    if pb.HasField("grammar") and stop.min_new_tokens:
        # min_new_tokens bans EOS where the grammar may force it: no token would be left to pick.
        raise InvalidArgumentError(f"request {rid}: min_new_tokens cannot be combined with a grammar")
    matcher = _grammar_matcher(pb, ctx, generated) if pb.HasField("grammar") else None
    stopping = StoppingCriteria(
        max_new_tokens=stop.max_new_tokens,
        stop_sequences=list(stop.stop_sequences),
        eos_token_ids=ctx.eos_token_ids,
        ignore_eos_token=stop.ignore_eos_token,
        min_new_tokens=stop.min_new_tokens,
        stop_token_ids=stop.stop_token_ids,
    )
    detokenizer = IncrementalDetokenizer(ctx.tokenizer, prompt)
    for token in generated:  # bring stop-sequence text and detokenizer offsets up to date
        stopping(token, detokenizer.step(token))
    # Position 0 has no predecessor; a cached position's logits, and so the first computed token's
    # log-prob (its predecessor is cached), were never computed here.
    prompt_logprobs = [math.nan] * min(pb.cache_len + 1, len(prompt)) if pb.prefill_logprobs else []
    return RequestState(
        id=rid,
        prompt_len=len(prompt),
        all_ids=all_ids,
        block_table=list(pb.blocks),
        cache_len=pb.cache_len,
        computed_len=pb.cache_len,
        chunk_len=chunk_len,
        num_resumed=len(generated),
        params=params,
        stopping=stopping,
        detokenizer=detokenizer,
        prefill_logprobs=pb.prefill_logprobs,
        top_n_tokens=pb.top_n_tokens,
        prompt_logprobs=prompt_logprobs,
        grammar=matcher,
    )


def _grammar_matcher(pb: generate_pb2.Request, ctx: BatchContext, generated: list[int]) -> Any:
    """The request's matcher, advanced over the tokens it was resumed with."""
    if ctx.grammar_matcher is None:
        raise InvalidArgumentError(f"request {pb.id}: this shard does not support grammars")
    try:
        spec = grammars.GrammarSpec(grammars.GrammarType(pb.grammar.type), pb.grammar.value)
    except ValueError:
        raise InvalidArgumentError(f"request {pb.id}: unknown grammar type {pb.grammar.type}") from None
    try:
        matcher = ctx.grammar_matcher(spec)
        grammars.replay(matcher, generated)
    except ValueError as exc:
        raise InvalidArgumentError(f"request {pb.id}: {exc}") from None
    return matcher


@dataclass(frozen=True)
class StepCall:
    """One Step RPC in domain terms: drops, then updates, then admissions, then one forward over all."""

    dropped_ids: tuple[int, ...] = ()
    updates: tuple[RequestUpdate, ...] = ()
    requests: tuple[RequestState, ...] = ()  # new, built (and each checked) by request_from_proto
    num_requests: int = 0  # requests the forward computes, as the router counts them
    seq: int = 0  # the router's step counter; 0: unchecked


class ShardBatch:
    """The requests a shard holds, in admission order, and the KV block size their tables use."""

    def __init__(self, requests: list[RequestState], block_size: int) -> None:
        self.requests = requests
        self.block_size = block_size

    @property
    def request_ids(self) -> list[int]:
        return [r.id for r in self.requests]

    def __len__(self) -> int:
        return len(self.requests)

    def check_step(self, call: StepCall, num_blocks: int) -> None:
        """Raise InvalidArgumentError unless `apply_step(call)` leaves a non-empty batch, every request ready
        to step. Checks the whole call; nothing changes here."""
        held = {r.id: r for r in self.requests}
        dropped = _distinct("drops", call.dropped_ids)
        unknown = [i for i in call.dropped_ids if i not in held]
        if unknown:
            raise InvalidArgumentError(f"drop of request {unknown[0]}, which the shard does not hold")
        new_ids = _distinct("new requests", [r.id for r in call.requests])
        again = [i for i in new_ids if i in held and i not in dropped]
        if again:
            raise InvalidArgumentError(f"new request {again[0]} is already held (drop it first)")
        updated = _distinct("updates", [u.request_id for u in call.updates])
        for u in call.updates:
            if u.request_id not in held or u.request_id in dropped:
                what = "dropped by this step" if u.request_id in dropped else "which the shard does not hold"
                raise InvalidArgumentError(f"update for request {u.request_id}, {what}")
        num_requests = len(held) - len(dropped) + len(new_ids)
        if num_requests == 0:
            raise InvalidArgumentError("an empty step: no request is left to compute")
        if call.num_requests != num_requests:
            raise InvalidArgumentError(
                f"the step names {call.num_requests} requests to compute, the shard would compute "
                f"{num_requests} (held {len(held)} - dropped {len(dropped)} + new {len(new_ids)})"
            )
        by_id = {u.request_id: u for u in call.updates}
        for rid in updated:
            r, u = held[rid], by_id[rid]
            _check_blocks(rid, u.blocks, num_blocks)
            _check_chunk(rid, u.chunk_len, r.remaining_len)
        for r in self.requests:
            if r.id in dropped:
                continue
            u = by_id.get(r.id)
            if u is None:
                blocks, next_len = len(r.block_table), r.next_len
            else:
                blocks = len(r.block_table) + len(u.blocks)
                next_len = r.remaining_len if u.chunk_len is None else u.chunk_len
            _check_coverage(r.id, blocks, r.computed_len + next_len, self.block_size)

    def apply_step(self, call: StepCall, num_blocks: int) -> None:
        """Drop, update, admit; validates everything first (a bad call changes nothing)."""
        self.check_step(call, num_blocks)
        if call.dropped_ids:
            gone = set(call.dropped_ids)
            self.requests = [r for r in self.requests if r.id not in gone]
        held = {r.id: r for r in self.requests}
        for u in call.updates:
            r = held[u.request_id]
            r.block_table.extend(u.blocks)
            r.chunk_len = u.chunk_len
        self.requests.extend(call.requests)


def _distinct(what: str, ids: Sequence[int]) -> set[int]:
    seen: set[int] = set()
    for i in ids:
        if i in seen:
            raise InvalidArgumentError(f"request {i} appears twice in the step's {what}")
        seen.add(i)
    return seen
