"""The shard's engine: the model, its KV cache and the one batch of requests it holds, driven by the RPCs.

Every method checks the whole call before touching state, so a call rejected with an
`InvalidArgumentError` / `NotReadyError` leaves the shard exactly as it was. All ranks receive identical
calls, so they take identical branches and run the same collectives; only rank 0 reports generations.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import tokenizers
import torch

from spindle_server.distributed import Distributed
from spindle_server.engine.batch import BatchContext, ShardBatch, StepCall
from spindle_server.engine.cuda_graphs import DecodeGraphs, DecodeGraphSettings
from spindle_server.engine.errors import InvalidArgumentError, NotReadyError
from spindle_server.engine.generation import Generation
from spindle_server.engine.request import RequestState
from spindle_server.engine.runner import ModelRunner
from spindle_server.heap import return_freed_heap
from spindle_server.kv_cache import (
    KVCache,
    KVCacheShape,
    activation_reserve_bytes,
    agree_num_blocks,
    cache_budget_bytes,
)
from spindle_server.layers.linear import warm_packed_linears
from spindle_server.models.llama import choose_mlp_slices
from spindle_server.models.registry import ModelConfig
from spindle_server.sampling.detokenizer import IncrementalDetokenizer
from spindle_server.sampling.grammar import GrammarCompiler, GrammarSpec
from spindle_server.sampling.params import SamplingParams
from spindle_server.sampling.stopping import StoppingCriteria

log = logging.getLogger("spindle_server.engine")
# Prefill length Warmup times for the per-token cost of a step (CPU, CUDA): on an H200 128 tokens cost what
# one does (launch-bound), so the GPU probe must be long enough to be compute-bound.
PROBE_TOKENS = (128, 2048)


@dataclass(frozen=True)
class CacheSettings:
    block_size: int = 16
    kv_cache_bytes: int | None = None  # CPU: per rank, None: min(25% of RAM, 4 GiB); CUDA: a cap, None: none
    cuda_memory_fraction: float = 0.9  # share of the GPU this process may use in total

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if not 0.0 < self.cuda_memory_fraction <= 1.0:
            raise ValueError(f"cuda_memory_fraction must be in (0, 1], got {self.cuda_memory_fraction}")


@dataclass(frozen=True)
class ShardInfo:
    model_type: str
    dtype: str
    device_type: str
    block_size: int
    world_size: int
    attention_impl: str
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    support_chunking: bool = True


@dataclass(frozen=True)
class WarmupSpec:
    max_input_tokens: int
    max_prefill_tokens: int
    max_total_tokens: int
    max_batch_size: int = 0  # 0: no limit given


@dataclass(frozen=True)
class WarmupResult:
    num_blocks: int
    block_size: int
    forward_base_ns: int = 0  # a one-token forward
    forward_token_ns: int = 0  # each further token of a prefill forward
    forward_context_ns: float = 0.0  # each (prefill token, earlier position) pair it attends

    @property
    def max_supported_total_tokens(self) -> int:
        return self.num_blocks * self.block_size


@dataclass
class StepOutcome:
    generations: list[Generation]  # empty on ranks other than 0
    forward_ns: int
    decode_ns: int
    total_ns: int
    prepare_ns: int  # validating the call, applying drops / updates / admissions
    grammar_compile_ns: int = 0  # compiling grammars of requests admitted by this call (cache misses)
    grammar_mask_ns: int = 0


class ShardEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        config: ModelConfig,
        tokenizer: tokenizers.Tokenizer,
        dist: Distributed,
        device: torch.device,
        dtype: torch.dtype,
        attention_impl: str,
        settings: CacheSettings,
        graphs: DecodeGraphSettings | None = None,  # None: no CUDA graphs
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.dist = dist
        self.device = device
        self.dtype = dtype
        self.attention_impl = attention_impl
        self.settings = settings
        graphs = graphs or DecodeGraphSettings()
        self.graph_settings = graphs
        if graphs.sizes and device.type != "cuda" and not graphs.eager_replay:
            log.info("CUDA graphs are off on %s: every step runs eagerly", device.type)
        self.runner = ModelRunner(model, tokenizer, device)
        self.kv_shape = KVCacheShape(
            num_layers=config.num_layers,
            block_size=settings.block_size,
            kv_heads_per_rank=config.kv_heads_per_rank(dist.world_size),
            head_dim=config.head_dim,
            dtype=dtype,
        )
        self.kv_cache: KVCache | None = None  # allocated by warmup
        self.batch = ShardBatch([], settings.block_size)  # every request held, in admission order
        self._last_seq = 0  # seq of the last step run (0: none since start or ClearCache)
        self.reports = dist.rank == 0  # only rank 0 detokenizes and answers generations
        self._grammars: GrammarCompiler | None = None  # built on the first grammar (wraps the vocabulary once)

    # ---- static facts -------------------------------------------------------------------------
    def info(self) -> ShardInfo:
        return ShardInfo(
            model_type=self.config.model_type,
            dtype=str(self.dtype).removeprefix("torch."),
            device_type=self.device.type,
            block_size=self.settings.block_size,
            world_size=self.dist.world_size,
            attention_impl=self.attention_impl,
            vocab_size=self.config.vocab_size,
            max_position_embeddings=self.config.max_position_embeddings,
            eos_token_ids=self.config.eos_token_ids,
        )

    def health(self) -> None:
        torch.zeros(1, device=self.device).add_(1).item()

    def batch_context(self) -> BatchContext:
        """What `ShardBatch.from_proto` checks new requests against; needs the KV cache."""
        return BatchContext(
            tokenizer=self.tokenizer,
            eos_token_ids=self.config.eos_token_ids,
            vocab_size=self.config.vocab_size,
            block_size=self.settings.block_size,
            num_blocks=self._cache().num_blocks,
            grammar_matcher=self._grammar_matcher,
        )

    def _grammar_matcher(self, spec: GrammarSpec):  # type: ignore[no-untyped-def]
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.config.vocab_size, self.config.eos_token_ids)
        return self._grammars.matcher(spec)

    def _cache(self) -> KVCache:
        if self.kv_cache is None:
            raise NotReadyError("the KV cache is not allocated yet: call Warmup first")
        return self.kv_cache

    # ---- warmup ---------------------------------------------------------------------------------
    def warmup(self, spec: WarmupSpec) -> WarmupResult:
        """Run the largest forward the router may send, then size the KV cache with what is left."""
        if spec.max_prefill_tokens < 1:
            raise InvalidArgumentError("max_prefill_tokens must be at least 1")
        bs = self.settings.block_size
        self.clear()
        self.kv_cache = None
        self.runner.decode_graphs = None  # they point into the old cache
        # CPU: every packed matmul's primitives built (memory flat from here), its row buckets and the MLP's row slices
        # timed, before the step-cost probes below time forwards that use them.
        start = time.perf_counter()
        if primitives := warm_packed_linears(self.runner.model, spec.max_prefill_tokens):
            log.info("oneDNN: %d packed matmul primitives built and timed (every row bucket up to %d rows) in %.1f s",
                     primitives, spec.max_prefill_tokens, time.perf_counter() - start)
        choose_mlp_slices(self.runner.model, spec.max_prefill_tokens, self.dist)
        seq_cap = min(spec.max_input_tokens or spec.max_prefill_tokens, self.config.max_position_embeddings)
        lengths = _split(spec.max_prefill_tokens, max(1, seq_cap), spec.max_batch_size)
        temp = KVCache(self.kv_shape, sum(math.ceil(n / bs) for n in lengths), self.device)
        batch = ShardBatch(self._dummy_requests(lengths), bs)
        is_cuda, resident = self.device.type == "cuda", 0
        if is_cuda:  # the activations of the largest forward: held back from the KV cache below
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            resident = torch.cuda.memory_allocated(self.device)
        try:
            self.runner.step(batch, temp)
            prefill_peak = torch.cuda.max_memory_allocated(self.device) - resident if is_cuda else 0
            probe = min(PROBE_TOKENS[self.device.type == "cuda"], spec.max_prefill_tokens, seq_cap)
            depth = min(seq_cap, temp.num_blocks * bs) - probe  # as deep as the temporary cache holds
            base_ns, token_ns, context_ns = self._measure_step_cost(temp, probe, depth)
        except torch.OutOfMemoryError as exc:
            raise RuntimeError(
                f"not enough memory to handle {spec.max_prefill_tokens} prefill tokens: decrease "
                "max_prefill_tokens"
            ) from exc
        del temp, batch
        return_freed_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        # CUDA graphs are captured below, after the cache exists (they hold its addresses), so their pool is
        # estimated from the prefill's peak (the real size is logged at capture).
        graph_sizes = self.graph_settings.sizes if is_cuda and not self.graph_settings.eager_replay else ()
        reserve = activation_reserve_bytes(prefill_peak, sum(lengths), max(graph_sizes, default=0))
        budget = cache_budget_bytes(self.device, self.settings.kv_cache_bytes, self.settings.cuda_memory_fraction,
                                    reserve)
        if is_cuda:
            log.info("activations: %.1f MiB at the largest prefill; %.1f MiB held back from the KV cache "
                     "(with the decode graphs' pool)", prefill_peak / 2**20, reserve / 2**20)
        num_blocks = agree_num_blocks(budget // self.kv_shape.bytes_per_block, self.dist, self.device)
        needed = math.ceil(max(spec.max_total_tokens, 1) / bs)
        if num_blocks < needed:
            raise RuntimeError(
                f"the KV cache fits {num_blocks} blocks of {bs} tokens ({budget} bytes on this rank), fewer "
                f"than one request of max_total_tokens={spec.max_total_tokens} needs ({needed})"
            )
        self.kv_cache = KVCache(self.kv_shape, num_blocks, self.device)
        log.info(
            "KV cache: %d blocks x %d tokens, %.1f MiB on this rank",
            num_blocks, bs, self.kv_cache.num_bytes / 2**20,
        )
        try:
            self.runner.decode_graphs = self._decode_graphs(spec, self.kv_cache)
        except BaseException:
            self.kv_cache = None  # a failed Warmup leaves the shard not ready
            raise
        return WarmupResult(num_blocks=num_blocks, block_size=bs, forward_base_ns=base_ns, forward_token_ns=token_ns,
                            forward_context_ns=context_ns)

    def _measure_step_cost(self, kv_cache: KVCache, probe: int, depth: int) -> tuple[int, int, float]:
        """(ns of a one-token forward, ns per further token, ns per (token, earlier position) pair) from the
        best of a few timed forwards: one token, `probe` tokens from position 0, and the same `probe` tokens
        after `depth` cached positions (the price of a late chunk of a long prompt; 0 when depth < probe)."""

        def best_ns(n: int, after: int = 0) -> int:
            times = []
            for _ in range(3):
                batch = ShardBatch(self._dummy_requests([n], after), self.settings.block_size)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                start = time.perf_counter_ns()
                self.runner.step(batch, kv_cache)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                times.append(time.perf_counter_ns() - start)
            return min(times)

        if probe <= 1:
            return self.dist.agree([best_ns(1)], "max", self.device)[0], 0, 0.0
        deep = depth >= probe
        timed = [best_ns(1), best_ns(probe), best_ns(probe, depth) if deep else 0]
        base, shallow, late = self.dist.agree(timed, "max", self.device)  # every rank: the slowest rank's
        token = max(0, shallow - base) // (probe - 1)  # with the probe's attention among its own tokens
        context = max(0.0, (late - shallow) / (probe * depth)) if deep else 0.0
        log.info("step cost: %.1f ms for one token, +%.3f ms per prefill token, +%.3f us per token for each "
                 "1000 positions of context (probes of %d tokens at 0 and %d)",
                 base / 1e6, token / 1e6, context * 1000 / 1e3, probe, max(depth, 0))
        return base, token, context

    def _decode_graphs(self, spec: WarmupSpec, kv_cache: KVCache) -> DecodeGraphs | None:
        """Capture (CUDA) or set up for eager replay the decode graphs, or None when they are off."""
        g = self.graph_settings
        capture = self.device.type == "cuda" and not g.eager_replay
        if not g.sizes or not (capture or g.eager_replay):
            return None
        if capture and self.attention_impl == "torch":
            log.warning("CUDA graphs are off: the torch reference kernels read values on the host (install "
                        "triton); every step runs eagerly")
            return None
        # Block tables are as wide as the longest request the router may send; a wider one runs eagerly.
        max_tokens = spec.max_total_tokens or self.config.max_position_embeddings
        max_blocks = min(math.ceil(max_tokens / kv_cache.block_size), kv_cache.num_blocks)
        try:
            return DecodeGraphs(self.runner.model, kv_cache, g.sizes, max_blocks, self.device, capture=capture)
        except torch.OutOfMemoryError as exc:
            raise RuntimeError(
                f"not enough memory to capture CUDA graphs for decode batch sizes {g.sizes}: lower "
                "--cuda-memory-fraction, or capture fewer sizes (--cuda-graphs)"
            ) from exc

    def _dummy_requests(self, lengths: Sequence[int], start: int = 0) -> list[RequestState]:
        """Requests prefilling `lengths` tokens each, after `start` positions already in the cache."""
        bs = self.settings.block_size
        requests, next_block = [], 0
        for i, n in enumerate(lengths):
            ids = [(3 + j) % self.config.vocab_size for j in range(start + n)]
            num = math.ceil((start + n) / bs)
            requests.append(
                RequestState(
                    id=i, prompt_len=start + n, all_ids=ids, block_table=list(range(next_block, next_block + num)),
                    cache_len=start, computed_len=start, chunk_len=None, num_resumed=0, params=SamplingParams(),
                    stopping=StoppingCriteria(1, [], self.config.eos_token_ids, False),
                    detokenizer=IncrementalDetokenizer(self.tokenizer, ids),
                    prefill_logprobs=False, top_n_tokens=0,
                )
            )
            next_block += num
        return requests

    # ---- steps ----------------------------------------------------------------------------------
    def step(self, call: StepCall) -> StepOutcome:
        """Drop, update and admit as `call` says (all checked first), then advance every held request."""
        start = time.perf_counter_ns()
        kv_cache = self._cache()
        if call.seq and call.seq != self._last_seq + 1:
            raise InvalidArgumentError(
                f"step {call.seq} arrived after step {self._last_seq}: steps must run in the order sent"
            )
        self.batch.apply_step(call, kv_cache.num_blocks)
        self._last_seq = call.seq
        prepare_ns = time.perf_counter_ns() - start
        try:
            result = self.runner.step(self.batch, kv_cache, report=self.reports)
        except BaseException:
            # Half-advanced requests cannot be trusted: forget them all (the router fails them and clears).
            self.clear()
            raise
        return StepOutcome(
            generations=result.generations,
            forward_ns=result.forward_ns,
            decode_ns=result.decode_ns,
            total_ns=time.perf_counter_ns() - start,
            prepare_ns=prepare_ns,
            grammar_compile_ns=self._grammars.take_compile_ns() if self._grammars is not None else 0,
            grammar_mask_ns=result.grammar_mask_ns,
        )

    @property
    def last_seq(self) -> int:
        """The seq of the last step run: 0 since start or ClearCache, when the next is 1."""
        return self._last_seq

    def clear(self) -> None:
        """Forget every held request."""
        self.batch = ShardBatch([], self.settings.block_size)
        self._last_seq = 0


def _split(total: int, cap: int, max_batch_size: int) -> list[int]:
    """`total` tokens as sequences of at most `cap` tokens (at most `max_batch_size` of them when given)."""
    lengths = [cap] * (total // cap) + ([total % cap] if total % cap else [])
    if max_batch_size > 0:
        lengths = lengths[:max_batch_size]
    return lengths
