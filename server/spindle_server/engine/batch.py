"""The shard's batch: the requests one cached batch id stands for, and their conversions.

`from_proto` validates a whole `Batch` message before building anything; `apply` validates every
update before changing any request. Both raise `InvalidArgumentError`, so a bad call changes nothing.
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


class ShardBatch:
    """A cached batch: its id, its requests in order, and the KV block size their tables use."""

    def __init__(self, batch_id: int, requests: list[RequestState], block_size: int) -> None:
        self.id = batch_id
        self.requests = requests
        self.block_size = block_size

    @classmethod
    def from_proto(cls, pb: generate_pb2.Batch, ctx: BatchContext) -> ShardBatch:
        if not pb.requests:
            raise InvalidArgumentError(f"batch {pb.id} is empty")
        ids = [r.id for r in pb.requests]
        if len(set(ids)) != len(ids):
            raise InvalidArgumentError(f"batch {pb.id} names a request id twice")
        return cls(pb.id, [request_from_proto(r, ctx) for r in pb.requests], ctx.block_size)

    @property
    def request_ids(self) -> list[int]:
        return [r.id for r in self.requests]

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def current_tokens(self) -> int:
        """Tokens the next forward computes."""
        return sum(r.next_len for r in self.requests)

    @property
    def max_tokens(self) -> int:
        """KV slots covered by the block tables."""
        return sum(len(r.block_table) for r in self.requests) * self.block_size

    def filter(self, keep_ids: Sequence[int]) -> ShardBatch | None:
        """The same batch id with only `keep_ids` (every one must be held); None when none is kept."""
        held = {r.id: r for r in self.requests}
        unknown = [i for i in keep_ids if i not in held]
        if unknown:
            raise InvalidArgumentError(f"batch {self.id} holds no request {unknown[0]}")
        keep = set(keep_ids)
        if not keep:
            return None
        return ShardBatch(self.id, [r for r in self.requests if r.id in keep], self.block_size)

    @staticmethod
    def concatenate(batches: Sequence[ShardBatch], batch_id: int) -> ShardBatch:
        """One batch holding every request of `batches` in order; request ids must be distinct."""
        if not batches:
            raise InvalidArgumentError("no batch to concatenate")
        requests = [r for b in batches for r in b.requests]
        ids = [r.id for r in requests]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise InvalidArgumentError(f"request {dup} appears in two batches")
        block_sizes = {b.block_size for b in batches}
        if len(block_sizes) != 1:
            raise InvalidArgumentError(f"batches use different block sizes {sorted(block_sizes)}")
        return ShardBatch(batch_id, requests, batches[0].block_size)

    def check_updates(self, updates: Sequence[RequestUpdate], num_blocks: int) -> None:
        """Raise InvalidArgumentError unless `apply(updates)` would leave every request ready to step."""
        held = {r.id: r for r in self.requests}
        seen: set[int] = set()
        for u in updates:
            if u.request_id not in held:
                raise InvalidArgumentError(f"update for request {u.request_id}, which batch {self.id} does not hold")
            if u.request_id in seen:
                raise InvalidArgumentError(f"two updates for request {u.request_id}")
            seen.add(u.request_id)
            r = held[u.request_id]
            _check_blocks(r.id, u.blocks, num_blocks)
            _check_chunk(r.id, u.chunk_len, r.remaining_len)
        by_id = {u.request_id: u for u in updates}
        for r in self.requests:
            u = by_id.get(r.id)
            extra = len(u.blocks) if u else 0
            if u is None:
                next_len = r.next_len
            else:
                next_len = r.remaining_len if u.chunk_len is None else u.chunk_len
            _check_coverage(r.id, len(r.block_table) + extra, r.computed_len + next_len, self.block_size)

    def apply(self, updates: Sequence[RequestUpdate], num_blocks: int) -> None:
        """Append blocks and set next chunks; validates everything first (a bad update changes nothing)."""
        self.check_updates(updates, num_blocks)
        held = {r.id: r for r in self.requests}
        for u in updates:
            r = held[u.request_id]
            r.block_table.extend(u.blocks)
            r.chunk_len = u.chunk_len

    def remove(self, request_ids: Iterable[int]) -> None:
        gone = set(request_ids)
        self.requests = [r for r in self.requests if r.id not in gone]

    def to_proto(self) -> generate_pb2.CachedBatch:
        return generate_pb2.CachedBatch(
            id=self.id,
            request_ids=self.request_ids,
            size=len(self.requests),
            current_tokens=self.current_tokens,
            max_tokens=self.max_tokens,
        )
