"""The real clients people use against TGI parse our answers: text_generation (sync and async), the openai SDK,
huggingface_hub.InferenceClient. The backend is the deterministic test double (tests/router/api_harness.py)."""

from __future__ import annotations

import asyncio

import pytest

from tests.router.api_harness import MODEL_ID, start_server, write_tokenizer_dir

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(write_tokenizer_dir(tmp_path_factory.mktemp("tok")))
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _reset(server):
    server.reset()


def _expected_text(server, n: int) -> str:
    """What the double generates greedily for the last submitted request (ids cycle from sum(prompt))."""
    req = server.backend.submitted[-1]
    ids = server.backend.clean_ids
    return server.tokenizer.decode([ids[(sum(req.input_ids) + i) % len(ids)] for i in range(1, n + 1)])


def test_text_generation_client_generate(server):
    from text_generation import Client

    client = Client(server.base_url)
    resp = client.generate("hello world", max_new_tokens=6, decoder_input_details=True, top_n_tokens=2)
    assert resp.generated_text == _expected_text(server, 6)
    assert resp.details.finish_reason.value == "length"
    assert resp.details.generated_tokens == 6
    assert len(resp.details.tokens) == 6
    assert all(len(step) == 2 for step in resp.details.top_tokens)
    # decoder_input_details: one prefill token per prompt token, the first without a logprob
    req = server.backend.submitted[-1]
    assert [t.id for t in resp.details.prefill] == list(req.input_ids)
    assert resp.details.prefill[0].logprob is None
    assert req.sampling.do_sample is False and req.stopping.max_new_tokens == 6


def test_text_generation_client_stream_and_stop(server):
    from text_generation import Client

    client = Client(server.base_url)
    events = list(client.generate_stream("hello world", max_new_tokens=5))
    assert [e.generated_text is None for e in events] == [True] * 4 + [False]
    assert events[-1].details.generated_tokens == 5
    assert events[-1].generated_text == "".join(e.token.text for e in events)
    # a stop sequence taken from what the double will say ends the stream with stop_sequence
    stop = events[2].token.text
    short = client.generate("hello world", max_new_tokens=5, stop_sequences=[stop])
    assert short.details.finish_reason.value == "stop_sequence"
    assert short.generated_text.endswith(stop)


def test_text_generation_async_client(server):
    from text_generation import AsyncClient

    async def run():
        client = AsyncClient(server.base_url)
        resp = await client.generate("the quick brown fox", max_new_tokens=4, seed=7, do_sample=True)
        tokens = [r async for r in client.generate_stream("the quick brown fox", max_new_tokens=4)]
        return resp, tokens

    resp, tokens = asyncio.run(run())
    assert resp.details.seed == 7 and resp.details.generated_tokens == 4
    assert len(tokens) == 4 and tokens[-1].details.finish_reason.value == "length"


def test_text_generation_client_errors_map(server):
    from text_generation import Client
    from text_generation.errors import GenerationError, ValidationError

    client = Client(server.base_url)
    with pytest.raises(ValidationError, match="`inputs` tokens \\+ `max_new_tokens` must be <= 512"):
        client.generate("hello", max_new_tokens=5000)
    server.call(lambda: setattr(server.backend.knobs, "fail_after", 1))
    with pytest.raises(GenerationError, match="the test double failed"):
        client.generate("hello", max_new_tokens=5)
    with pytest.raises(GenerationError):  # in-stream error event, parsed by error_type
        list(client.generate_stream("hello", max_new_tokens=5))


def test_openai_completions(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    out = client.completions.create(model="tgi", prompt="hello world", max_tokens=5, temperature=0)
    assert out.choices[0].text == _expected_text(server, 5)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 5 and out.model == MODEL_ID
    chunks = list(client.completions.create(model="tgi", prompt=["a b", "c d"], max_tokens=3, stream=True))
    by_index: dict[int, str] = {}
    for c in chunks:
        by_index[c.choices[0].index] = by_index.get(c.choices[0].index, "") + c.choices[0].text
    assert set(by_index) == {0, 1} and all(by_index.values())


def test_openai_chat(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "hello"}]
    out = client.chat.completions.create(
        model="tgi", messages=messages, max_tokens=4, temperature=0, logprobs=True
    )
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == _expected_text(server, 4)
    assert len(out.choices[0].logprobs.content) == 4
    assert out.usage.prompt_tokens == len(server.backend.submitted[-1].input_ids)
    stream = client.chat.completions.create(
        model="tgi",
        messages=messages,
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content for c in chunks if c.choices)
    assert text == out.choices[0].message.content  # greedy: same answer streamed
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_openai_chat_eos_is_stop_and_errors(server):
    import openai

    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    server.call(lambda: setattr(server.backend.knobs, "eos_at", 2))
    out = client.chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": "x"}], max_tokens=9
    )
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 2
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="tgi", messages=[{"role": "user", "content": "x"}], top_p=1.0)
    assert err.value.body["message"] == "Input validation error: `top_p` must be > 0.0 and < 1.0"


def test_huggingface_hub_inference_client(server):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.base_url)
    # It posts to `/`, where return_full_text defaults to true for a local model (TGI's rule).
    assert client.text_generation("hello world", max_new_tokens=5) == "hello world" + _expected_text(
        server, 5
    )
    text = client.text_generation("hello world", max_new_tokens=5, return_full_text=False)
    assert text == _expected_text(server, 5)
    details = client.text_generation("hello world", max_new_tokens=5, details=True, return_full_text=False)
    assert details.generated_text == text and details.details.generated_tokens == 5
    streamed = list(client.text_generation("hello world", max_new_tokens=5, stream=True))
    assert "".join(streamed) == text

    chat_client = InferenceClient(base_url=server.base_url + "/v1/chat/completions")
    out = chat_client.chat_completion([{"role": "user", "content": "hi"}], max_tokens=3, temperature=0)
    assert out.choices[0].message.content == _expected_text(server, 3)
    pieces = chat_client.chat_completion(
        [{"role": "user", "content": "hi"}], max_tokens=3, temperature=0, stream=True
    )
    assert "".join(p.choices[0].delta.content for p in pieces if p.choices) == out.choices[0].message.content
