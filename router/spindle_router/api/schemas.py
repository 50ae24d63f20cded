"""TGI's response shapes (`/generate`, `/generate_stream`) and response headers, as plain dicts.

Rules kept from TGI: `details` only when asked; inside it `prefill` always present, `top_tokens` omitted when
empty, `best_of_sequences` only for best_of > 1; unknown (NaN) logprobs are JSON null.
"""

from __future__ import annotations

import math
from typing import Any

from spindle_router.infer import Generation, GenerationResult, StreamItem, Timings
from spindle_router.scheduler.request import Token


def _logprob(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def token_json(t: Token) -> dict[str, Any]:
    return {"id": t.id, "text": t.text, "logprob": _logprob(t.logprob), "special": t.special}


def prefill_token_json(t: Token) -> dict[str, Any]:
    return {"id": t.id, "text": t.text, "logprob": _logprob(t.logprob)}


def _sequence_details(r: GenerationResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "finish_reason": r.end.finish_reason,
        "generated_tokens": r.end.generated_tokens,
        "seed": r.end.seed,
        "prefill": [prefill_token_json(t) for t in r.prefill] if r.valid.decoder_input_details else [],
        "tokens": [token_json(t) for t in r.tokens],
    }
    if any(r.top_tokens):
        out["top_tokens"] = [[token_json(t) for t in step] for step in r.top_tokens]
    return out


def generate_response(gen: Generation) -> dict[str, Any]:
    best = gen.best
    out: dict[str, Any] = {"generated_text": best.generated_text}
    if best.valid.details:
        details = _sequence_details(best)
        if gen.others:
            details["best_of_sequences"] = [
                {"generated_text": r.generated_text, **_sequence_details(r)} for r in gen.others
            ]
        out["details"] = details
    return out


def stream_event(item: StreamItem, details: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"index": item.index, "token": token_json(item.token)}
    if item.top_tokens:
        out["top_tokens"] = [token_json(t) for t in item.top_tokens]
    out["generated_text"] = item.generated_text
    out["details"] = None
    if item.end is not None and details:
        out["details"] = {
            "finish_reason": item.end.finish_reason,
            "generated_tokens": item.end.generated_tokens,
            "seed": item.end.seed,
            "input_length": item.valid.input_length,
        }
    return out


def _ms(seconds: float) -> str:
    return str(int(seconds * 1000))


def timing_headers(
    timings: Timings, prompt_tokens: int, generated_tokens: int, compute_type: str, compute_characters: int
) -> dict[str, str]:
    """TGI's non-streaming headers: times in integer milliseconds, x-compute-time in float seconds."""
    per_token = timings.inference_s / generated_tokens if generated_tokens else 0.0
    return {
        "x-compute-type": compute_type,
        "x-compute-time": repr(timings.total_s),
        "x-compute-characters": str(compute_characters),
        "x-total-time": _ms(timings.total_s),
        "x-validation-time": _ms(timings.validation_s),
        "x-queue-time": _ms(timings.queue_s),
        "x-inference-time": _ms(timings.inference_s),
        "x-time-per-token": _ms(per_token),
        "x-prompt-tokens": str(prompt_tokens),
        "x-generated-tokens": str(generated_tokens),
    }


def result_headers(r: GenerationResult, compute_type: str) -> dict[str, str]:
    return timing_headers(
        r.timings, r.valid.input_length, r.end.generated_tokens, compute_type, len(r.valid.inputs)
    )


def stream_headers(compute_type: str, compute_characters: int) -> dict[str, str]:
    return {"x-compute-type": compute_type, "x-compute-characters": str(compute_characters)}
