"""One step of a batch: forward -> prompt log-probs -> sample -> stop -> detokenize -> Generations.

Requests whose chunk does not reach the end of their tokens only advance `computed_len`: their logits
are not even computed, and they produce no Generation. A request that finishes stays in the batch until
the router drops it. A runner that does not report (ranks other than 0) samples and appends the token (its
next input), and skips everything only a reader needs: prompt log-probs, top tokens, detokenization,
stopping and Generations.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import tokenizers
import torch

from spindle_server.engine.batch import ShardBatch
from spindle_server.engine.cuda_graphs import DecodeGraphs
from spindle_server.engine.generation import FinishedText, Generation, TokenList
from spindle_server.engine.inputs import HostStaging, StepInputs, build_step_inputs
from spindle_server.engine.request import RequestState
from spindle_server.kv_cache import KVCache
from spindle_server.sampling import grammar as grammars
from spindle_server.sampling.detokenizer import decode_generated
from spindle_server.sampling.sampler import sample


@dataclass
class StepResult:
    generations: list[Generation]  # empty when the step does not report
    forward_ns: int
    decode_ns: int
    grammar_mask_ns: int = 0  # worker-thread time computing token masks (overlaps the forward)


class ModelRunner:
    """Runs steps of batches through one model and one KV cache."""

    def __init__(self, model: torch.nn.Module, tokenizer: tokenizers.Tokenizer, device: torch.device) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.staging = HostStaging(device)  # pinned buffers the step inputs travel through (CUDA)
        # Set by the shard's Warmup once the KV cache exists; decode steps they can serve replay a graph.
        self.decode_graphs: DecodeGraphs | None = None
        # Prompt tokens whose K/V the forwards computed (prefix-cache hits are not): what in-flight prefix
        # sharing saves, counted where the work happens.
        self.num_prompt_tokens_computed = 0

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, kv_cache: KVCache) -> torch.Tensor | None:
        """Logits [N, vocab] float32 of `inputs.logit_rows`, or None when no row needs them."""
        graphs = self.decode_graphs
        if graphs is not None and graphs.can_run(inputs, kv_cache):
            hidden = graphs.run(inputs)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, kv_cache.layers, inputs.meta)
        if inputs.logit_rows.numel() == 0:
            return None
        return self.model.compute_logits(hidden.index_select(0, inputs.logit_rows)).float()

    @torch.inference_mode()  # sampling may write into the logits (grammar masks), inference tensors
    def step(self, batch: ShardBatch, kv_cache: KVCache, report: bool = True) -> StepResult:
        """Advance every request of `batch` by its next chunk; Generations only when `report`."""
        start = time.perf_counter_ns()
        requests = list(batch.requests)
        inputs = build_step_inputs(requests, batch.block_size, self.device, self.staging)
        masks = self._start_masks(requests, inputs)  # on a worker thread, while the forward runs
        logits = self.forward(inputs, kv_cache)
        forward_ns = time.perf_counter_ns() - start

        start = time.perf_counter_ns()
        if report:
            self._record_prompt_logprobs(requests, inputs, logits)
        for r in requests:  # the chunk is in the cache now; the next chunk comes with the next call
            end = min(r.computed_len + r.next_len, r.prompt_len)
            self.num_prompt_tokens_computed += max(0, end - r.computed_len)
            r.computed_len += r.next_len
            r.chunk_len = None
        generations = self._sample_and_stop(requests, inputs, logits, masks, report)
        mask_ns = masks.mask_ns if masks is not None else 0
        return StepResult(generations, forward_ns, time.perf_counter_ns() - start, mask_ns)

    def _start_masks(self, requests: list[RequestState], inputs: StepInputs) -> grammars.MaskJob | None:
        """Token masks for the rows that sample this step, one per sampling row in order (unconstrained rows
        allow everything); None when no sampling row has a grammar."""
        matchers = [r.grammar for r, row in zip(requests, inputs.sample_row) if row is not None]
        if all(m is None for m in matchers):
            return None
        config = self.model.config
        return grammars.MaskJob(matchers, config.vocab_size, config.eos_token_ids[0],
                                host_bias=self.device.type == "cpu")

    def _record_prompt_logprobs(
        self, requests: list[RequestState], inputs: StepInputs, logits: torch.Tensor | None
    ) -> None:
        """Row i of a chunk starting at position a predicts the token at a + i + 1 (if it is a prompt token)."""
        if logits is None or all(rows is None for rows in inputs.prompt_rows):
            return
        # log_softmax of the raw logits: prompt log-probs ignore sampling parameters.
        log_probs = torch.log_softmax(logits, dim=-1)
        picks: list[tuple[RequestState, int]] = []  # (request, how many of its prompt log-probs this step)
        rows_all: list[int] = []
        targets_all: list[int] = []
        for r, rows in zip(requests, inputs.prompt_rows):
            if rows is None:
                continue
            a = r.computed_len
            last = min(a + r.next_len, r.prompt_len - 1)  # the last prompt position this chunk predicts
            if last < a + 1:
                continue
            rows_all.extend(rows[: last - a])
            targets_all.extend(r.all_ids[a + 1 : last + 1])
            picks.append((r, last - a))
        if not picks:
            return
        # One gather and one device-to-host read for the whole step (not one sync per request).
        row_idx = torch.tensor(rows_all, dtype=torch.int64, device=log_probs.device)
        targets = torch.tensor(targets_all, dtype=torch.int64, device=log_probs.device)
        picked = log_probs[row_idx, targets].tolist()  # advanced indexing: index_select is slow on CPU
        offset = 0
        for r, count in picks:
            r.prompt_logprobs.extend(picked[offset : offset + count])
            offset += count

    def _sample_and_stop(
        self, requests: list[RequestState], inputs: StepInputs, logits: torch.Tensor | None,
        masks: grammars.MaskJob | None = None, report: bool = True,
    ) -> list[Generation]:
        chosen = [(r, row) for r, row in zip(requests, inputs.sample_row) if row is not None]
        if not chosen:
            return []
        assert logits is not None
        sample_rows = [row for _, row in chosen]
        if sample_rows == list(range(logits.shape[0])):  # every logit row samples, in order (decode): no copy
            scores = logits
        else:
            # Advanced indexing: torch 2.13's CPU index_select took ~300 ms for 32 rows of a 49k vocabulary.
            scores = logits[torch.tensor(sample_rows, dtype=torch.int64, device=logits.device)]
        if masks is not None:  # before penalties and warpers: greedy and sampled rows both obey it
            masks.apply(scores)
        out = sample(
            scores,
            [r.params for r, _ in chosen],
            [r.all_ids for r, _ in chosen],
            [r.num_generated for r, _ in chosen],
            [r.top_n_tokens if report else 0 for r, _ in chosen],
        )
        if not report:
            for (r, _), token in zip(chosen, out.next_ids):
                r.all_ids.append(token)
                if r.grammar is not None:
                    grammars.advance(r.grammar, token)
            return []
        generations: list[Generation] = []
        for i, (r, _) in enumerate(chosen):
            token = out.next_ids[i]
            prefill = self._prefill_tokens(r) if r.prefill_logprobs and r.num_generated == r.num_resumed else None
            r.all_ids.append(token)
            if r.grammar is not None:
                grammars.advance(r.grammar, token)
            text = r.detokenizer.step(token)
            reason = r.stopping(token, text)
            if reason is not None:  # no later token can complete a held-back character: send it now
                text += r.detokenizer.flush()
            gen = Generation(
                request_id=r.id,
                tokens=TokenList([token], [out.logprobs[i]], [text], [r.detokenizer.is_special(token)]),
                prefill_tokens=prefill,
            )
            if r.top_n_tokens > 0:
                gen.top_tokens = [self._token_list(out.top_ids[i], out.top_logprobs[i], r)]
            if reason is not None:
                gen.generated_text = FinishedText(
                    text=decode_generated(self.tokenizer, r.generated_ids),
                    generated_tokens=r.num_generated,
                    finish_reason=reason,
                    seed=r.params.seed if r.params.is_sampling else None,
                )
            generations.append(gen)
        return generations

    def _prefill_tokens(self, r: RequestState) -> TokenList | None:
        if r.num_resumed > 0:  # its prompt log-probs went out before it was preempted
            return None
        prompt = r.all_ids[: r.prompt_len]
        logprobs = r.prompt_logprobs + [math.nan] * (r.prompt_len - len(r.prompt_logprobs))
        return self._token_list(prompt, logprobs, r)

    def _token_list(self, ids: list[int], logprobs: list[float], r: RequestState) -> TokenList:
        texts = self.tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)
        return TokenList(list(ids), list(logprobs), texts, [r.detokenizer.is_special(i) for i in ids])
