"""The real client libraries against the real stack (launcher, 2 tensor-parallel shards, router).

TGI's `text_generation` (sync and async), the `openai` SDK and `huggingface_hub.InferenceClient` each talk
to one module-wide stack. Every request is greedy, so every answer is checked against transformers' own
argmax continuation of the same prompt ids (tokens where the client exposes ids, text otherwise), and
every streamed answer is checked against the non-streamed one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from huggingface_hub import InferenceClient
from text_generation import AsyncClient, Client

from tests.helpers.tiny_model import EOS_ID

N = 16  # max new tokens of every request
PROMPTS = [
    "the quick brown fox jumps over",
    "hello world Spindle router shard batch",
    "def return import class self value list dict",
]
CHAT = [{"role": "system", "content": "a server streams tokens"}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def stack(start_launcher, tiny_model_dir: Path) -> Iterator:
    with start_launcher(tiny_model_dir, num_shard=2) as s:
        yield s


def finish_reason(expected: list[int]) -> str:
    return "eos_token" if expected[-1] == EOS_ID else "length"


def expected_for(greedy, prompt: str) -> list[int]:
    return greedy.continuation(greedy.encode(prompt), N)


def chat_expected(greedy) -> tuple[list[int], list[int]]:
    """(prompt ids, continuation) for CHAT, the prompt rendered by transformers' apply_chat_template."""
    prompt_ids = greedy.encode(greedy.chat_prompt(CHAT), add_special_tokens=False)
    return prompt_ids, greedy.continuation(prompt_ids, N)


def test_tiny_model_has_a_chat_template(greedy):
    # The chat tests below expect answers, not the 422 a template-less model gets.
    assert greedy.chat_tokenizer.chat_template


@pytest.mark.parametrize("prompt", PROMPTS)
def test_text_generation_client_generate_and_stream(stack, greedy, prompt):
    expected = expected_for(greedy, prompt)
    client = Client(stack.base_url, timeout=60)

    resp = client.generate(prompt, max_new_tokens=N)  # the client always asks for details
    assert [t.id for t in resp.details.tokens] == expected
    assert resp.generated_text == greedy.text(expected)
    assert resp.details.generated_tokens == len(expected)
    assert resp.details.finish_reason.value == finish_reason(expected)

    events = list(client.generate_stream(prompt, max_new_tokens=N))
    assert [e.token.id for e in events] == expected
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    assert events[-1].generated_text == resp.generated_text
    assert "".join(e.token.text for e in events if not e.token.special) == resp.generated_text
    assert events[-1].details.generated_tokens == len(expected)
    assert events[-1].details.finish_reason.value == finish_reason(expected)


def test_text_generation_async_client_concurrent(stack, greedy):
    expected = {p: expected_for(greedy, p) for p in PROMPTS}

    async def run() -> tuple[list, list]:
        client = AsyncClient(stack.base_url, timeout=60)

        async def stream(prompt: str) -> list:
            return [e async for e in client.generate_stream(prompt, max_new_tokens=N)]

        answers = asyncio.gather(*(client.generate(p, max_new_tokens=N) for p in PROMPTS))
        streams = asyncio.gather(*(stream(p) for p in PROMPTS))
        return tuple(await asyncio.gather(answers, streams))

    answers, streams = asyncio.run(run())
    for prompt, resp, events in zip(PROMPTS, answers, streams):
        assert [t.id for t in resp.details.tokens] == expected[prompt], prompt
        assert resp.generated_text == greedy.text(expected[prompt])
        assert [e.token.id for e in events] == expected[prompt], prompt
        assert events[-1].generated_text == resp.generated_text


@pytest.fixture(scope="module")
def oai(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", timeout=60, max_retries=0)


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_openai_completions(oai, greedy, prompt):
    prompt_ids, expected = greedy.encode(prompt), expected_for(greedy, prompt)

    r = oai.completions.create(model="tgi", prompt=prompt, max_tokens=N, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == greedy.text(expected)
    assert r.choices[0].finish_reason == ("stop" if expected[-1] == EOS_ID else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt_ids), len(expected))
    assert r.usage.total_tokens == len(prompt_ids) + len(expected)

    chunks = list(oai.completions.create(model="tgi", prompt=prompt, max_tokens=N, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert len(chunks) == len(expected) + 1  # one chunk per token, then OpenAI's usage chunk (no choices)
    assert "".join(c.choices[0].text for c in chunks[:-1]) == r.choices[0].text
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and chunks[-1].usage is not None and chunks[-1].choices == []
    assert (usage[0].prompt_tokens, usage[0].completion_tokens) == (len(prompt_ids), len(expected))


def test_openai_chat_completions(oai, greedy):
    prompt_ids, expected = chat_expected(greedy)

    r = oai.chat.completions.create(model="tgi", messages=CHAT, max_tokens=N, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == greedy.text(expected)
    assert r.choices[0].finish_reason == ("stop" if expected[-1] == EOS_ID else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt_ids), len(expected))

    chunks = list(oai.chat.completions.create(model="tgi", messages=CHAT, max_tokens=N, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    token_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert len(token_chunks) == len(expected)
    assert all(c.usage is None and len(c.choices) == 1 for c in token_chunks)
    assert "".join(c.choices[0].delta.content for c in token_chunks) == r.choices[0].message.content
    assert token_chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert usage_chunk.choices == []  # the include_usage chunk: usage only
    assert usage_chunk.usage.prompt_tokens == len(prompt_ids)
    assert usage_chunk.usage.completion_tokens == len(expected)
    assert usage_chunk.usage.total_tokens == len(prompt_ids) + len(expected)


def test_huggingface_hub_text_generation(stack, greedy):
    prompt = PROMPTS[0]
    expected = expected_for(greedy, prompt)
    client = InferenceClient(base_url=stack.base_url, timeout=60)

    # A base_url client posts to `POST /`, where TGI (and Spindle) default return_full_text to true.
    out = client.text_generation(prompt, max_new_tokens=N, details=True)
    assert [t.id for t in out.details.tokens] == expected
    assert out.generated_text == prompt + greedy.text(expected)
    assert out.details.generated_tokens == len(expected)
    assert out.details.finish_reason == finish_reason(expected)
    answer = client.text_generation(prompt, max_new_tokens=N, return_full_text=False)
    assert answer == greedy.text(expected)

    events = list(client.text_generation(prompt, max_new_tokens=N, details=True, stream=True,
                                         return_full_text=False))
    assert [e.token.id for e in events] == expected
    assert events[-1].generated_text == answer
    assert "".join(e.token.text for e in events if not e.token.special) == answer
    streamed = client.text_generation(prompt, max_new_tokens=N, stream=True, return_full_text=False)
    assert "".join(streamed) == "".join(e.token.text for e in events)  # every token's text, as it came


def test_huggingface_hub_chat_completion(stack, greedy):
    prompt_ids, expected = chat_expected(greedy)
    client = InferenceClient(base_url=stack.base_url, timeout=60)

    r = client.chat_completion(CHAT, max_tokens=N, temperature=0)
    assert r.choices[0].message.content == greedy.text(expected)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt_ids), len(expected))

    chunks = list(client.chat_completion(CHAT, max_tokens=N, temperature=0, stream=True))
    assert len(chunks) == len(expected)
    assert "".join(c.choices[0].delta.content for c in chunks) == r.choices[0].message.content
