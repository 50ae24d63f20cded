"""The OpenAI (and vLLM) parameters through the `openai` SDK, TGI's `adapter_id` through huggingface_hub,
against the real stack (launcher, one shard, router): each one changes the answer the way it says, and an
out-of-range value is a 4xx that changes nothing."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError as HubValidationError

from tests.helpers.tiny_model import EOS_ID

PROMPT = "the quick brown fox jumps over"
N = 8


@pytest.fixture(scope="module")
def stack(start_launcher, tiny_model_dir: Path) -> Iterator:
    with start_launcher(tiny_model_dir, num_shard=1, args=["--max-best-of", "3"]) as s:  # n <= max_best_of
        yield s


@pytest.fixture(scope="module")
def oai(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", timeout=120, max_retries=0)


def _forced_token(greedy) -> int:
    """A token the model would not pick greedily first, and not a special one."""
    first = greedy.continuation(greedy.encode(PROMPT), 1)[0]
    return next(t for t in range(100, 200) if t != first)


def test_logit_bias_of_100_forces_its_token(oai, greedy):
    forced = _forced_token(greedy)
    r = oai.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0,
                               logit_bias={str(forced): 100})
    assert r.choices[0].text == greedy.text([forced] * 4)
    r = oai.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.choices[0].text != greedy.text([forced] * 4)  # without the bias: the model's own choice


def test_n_gives_n_choices_and_echo_starts_with_the_prompt(oai, greedy):
    r = oai.completions.create(model="m", prompt=PROMPT, max_tokens=N, n=3, seed=7, temperature=1.0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1  # three draws (seeds 7, 8, 9), not one answer three times
    assert r.usage.prompt_tokens == len(greedy.encode(PROMPT))  # the prompt counts once
    chat = oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       n=3, temperature=0)
    assert len(chat.choices) == 3 and len({c.message.content for c in chat.choices}) == 1  # greedy: identical

    expected = greedy.text(greedy.continuation(greedy.encode(PROMPT), N))
    r = oai.completions.create(model="m", prompt=PROMPT, max_tokens=N, temperature=0, echo=True)
    assert r.choices[0].text == PROMPT + expected


def test_completions_logprobs_with_echo_cover_prompt_and_answer(oai, greedy):
    prompt_ids = greedy.encode(PROMPT)
    r = oai.completions.create(model="m", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    n_answer = r.usage.completion_tokens
    assert len(lp.tokens) == len(prompt_ids) + n_answer == len(lp.token_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None  # the first prompt token has no predecessor
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    answer_tops = lp.top_logprobs[len(prompt_ids):]
    assert all(len(top) == 2 for top in answer_tops)
    for top, chosen in zip(answer_tops, lp.token_logprobs[len(prompt_ids):]):
        assert math.isclose(max(top.values()), chosen, abs_tol=1e-4)  # greedy: the best alternative
    chunks = list(oai.completions.create(model="m", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2,
                                         echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    streamed = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and len(streamed) == len(lp.token_logprobs)
    for a, b in zip(streamed[1:], lp.token_logprobs[1:]):
        assert math.isclose(a, b, abs_tol=1e-4)


def test_min_tokens_holds_eos_back_and_ignore_eos_runs_past_it(oai):
    push_eos = {str(EOS_ID): 100}
    r = oai.completions.create(model="m", prompt=PROMPT, max_tokens=N, temperature=0, logit_bias=push_eos)
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "stop"
    r = oai.completions.create(model="m", prompt=PROMPT, max_tokens=N, temperature=0, logit_bias=push_eos,
                               extra_body={"min_tokens": 5})
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "stop"  # EOS right after the 5th
    r = oai.completions.create(model="m", prompt=PROMPT, max_tokens=N, temperature=0, logit_bias=push_eos,
                               extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == N and r.choices[0].finish_reason == "length"


def test_stop_token_ids_and_stop_as_a_string(oai, greedy):
    expected = greedy.continuation(greedy.encode(PROMPT), N)
    third = expected[2]
    r = oai.completions.create(model="m", prompt=PROMPT, max_tokens=N, temperature=0,
                               extra_body={"stop_token_ids": [third]})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "stop"
    stop_text = greedy.text(expected[1:2]).strip()
    if stop_text:
        r = oai.completions.create(model="m", prompt=PROMPT, max_tokens=N, temperature=0, stop=stop_text)
        assert r.usage.completion_tokens <= 2


def test_sampling_parameters_change_nothing_greedy_and_are_range_checked(oai, greedy):
    expected = greedy.text(greedy.continuation(greedy.encode(PROMPT), N))
    r = oai.completions.create(model="m", prompt=PROMPT, max_tokens=N, temperature=0, extra_body={"min_p": 0.5})
    assert r.choices[0].text == expected  # min-p never removes the argmax
    r = oai.completions.create(model="m", prompt=PROMPT, max_tokens=N, temperature=0.7, seed=3, top_p=0.9,
                               presence_penalty=1.5, frequency_penalty=0.5, extra_body={"min_p": 0.05})
    again = oai.completions.create(model="m", prompt=PROMPT, max_tokens=N, temperature=0.7, seed=3, top_p=0.9,
                                   presence_penalty=1.5, frequency_penalty=0.5, extra_body={"min_p": 0.05})
    assert r.choices[0].text == again.choices[0].text  # seeded: reproducible
    for bad in ({"presence_penalty": 2.5}, {"logit_bias": {"5": -101}}, {"n": 0},
                {"extra_body": {"min_p": 1.5}}, {"extra_body": {"min_tokens": N + 1}},
                {"logit_bias": {"999999": 1}}):
        with pytest.raises(openai.UnprocessableEntityError):
            oai.completions.create(model="m", prompt=PROMPT, max_tokens=N, **bad)


def test_unknown_adapter_is_422(stack):
    client = InferenceClient(stack.base_url, timeout=60)
    with pytest.raises(HubValidationError, match="unknown adapter `my-lora`"):  # its mapping of our 422
        client.text_generation(PROMPT, max_new_tokens=2, adapter_id="my-lora")


def test_n_prefills_the_shared_prompt_once(oai, stack, greedy, metrics_of):
    """The copies of an n request take the prompt's full KV blocks from the prefix cache (block size 16)."""
    prompt = " ".join(["spindle router shard batch token stream"] * 12)  # a fresh prompt of several blocks
    full_blocks = len(greedy.encode(prompt)) // 16
    assert full_blocks >= 3
    before = metrics_of(stack.base_url).get("spindle_prefix_cache_hit_tokens", 0.0)
    r = oai.completions.create(model="m", prompt=prompt, max_tokens=2, n=3, temperature=0)
    assert len(r.choices) == 3
    hit = metrics_of(stack.base_url)["spindle_prefix_cache_hit_tokens"] - before
    # The first copy computes the prompt; the other two reuse every full block but the one holding the last
    # prompt token (at least one token is computed to sample from).
    assert hit >= 2 * (full_blocks - 1) * 16
