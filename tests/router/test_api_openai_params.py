"""The OpenAI parameters through the `openai` SDK against the router over the test-double backend: what
reaches the scheduler, the response shapes (n choices, echo, legacy logprobs, usage chunks), streaming, and
422 for what is out of range. (Their effect on real tokens: integration-tests/test_openai_params.py.)"""

from __future__ import annotations

import openai
import pytest
import requests
from spindle_router.config import LimitsConfig

from tests.router.api_harness import start_server, write_tokenizer_dir

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
CHAT = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    limits = LimitsConfig(max_concurrent_requests=16, max_best_of=3, max_input_tokens=256, max_total_tokens=512,
                          payload_limit=100_000)
    s = start_server(write_tokenizer_dir(tmp_path_factory.mktemp("tok")), limits=limits)
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _reset(server):
    server.reset()


@pytest.fixture
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", timeout=30, max_retries=0)


def test_parameters_reach_the_scheduler(server, oai):
    oai.completions.create(model="m", prompt="abc", max_tokens=6, temperature=0.5, seed=9, presence_penalty=0.5,
                           frequency_penalty=-0.25, logit_bias={"7": 3, "5": -100}, stop="zz",
                           extra_body={"min_p": 0.1, "min_tokens": 2, "ignore_eos": True, "stop_token_ids": [4, 8]})
    r = server.backend.submitted[-1]
    s, st = r.sampling, r.stopping
    assert (s.presence_penalty, s.frequency_penalty, s.min_p, s.seed) == (0.5, -0.25, 0.1, 9)
    assert s.logit_bias == ((5, -100.0), (7, 3.0)) and s.repetition_penalty == 1.0
    assert (st.stop_sequences, st.min_new_tokens, st.ignore_eos_token, st.stop_token_ids) == (("zz",), 2, True, (4, 8))


def test_n_fans_out_with_distinct_seeds(server, oai):
    r = oai.chat.completions.create(model="m", messages=CHAT, max_tokens=4, n=3, seed=100)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert sorted(req.sampling.seed for req in server.backend.submitted) == [100, 101, 102]
    prompt_len = server.backend.submitted[0].input_length
    assert r.usage.prompt_tokens == prompt_len and r.usage.completion_tokens == 12
    r = oai.completions.create(model="m", prompt=["a b", "c d"], max_tokens=3, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]


def test_streamed_n_and_usage_chunks(oai):
    chunks = list(oai.chat.completions.create(model="m", messages=CHAT, max_tokens=3, n=2, stream=True,
                                              stream_options={"include_usage": True}))
    by_index: dict[int, str] = {}
    for c in chunks[:-1]:
        by_index[c.choices[0].index] = by_index.get(c.choices[0].index, "") + c.choices[0].delta.content
    assert sorted(by_index) == [0, 1]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    chunks = list(oai.completions.create(model="m", prompt="abc", max_tokens=3, n=2, stream=True,
                                         stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def test_echo_and_legacy_logprobs(server, oai):
    r = oai.completions.create(model="m", prompt="abc", max_tokens=3, echo=True, temperature=0)
    streamed = list(oai.completions.create(model="m", prompt="abc", max_tokens=3, echo=True, temperature=0,
                                           stream=True))
    assert r.choices[0].text.startswith("abc") and "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    r = oai.completions.create(model="m", prompt="abc", max_tokens=3, logprobs=2, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 and all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == len("abc") and "".join(lp.tokens) == r.choices[0].text
    assert server.backend.submitted[-1].top_n_tokens == 2
    r = oai.completions.create(model="m", prompt="abc", max_tokens=3, logprobs=1, echo=True, temperature=0)
    lp = r.choices[0].logprobs
    n_prompt = server.backend.submitted[-1].input_length
    assert len(lp.tokens) == n_prompt + 3 and lp.token_logprobs[0] is None and lp.text_offset[0] == 0
    streamed = list(oai.completions.create(model="m", prompt="abc", max_tokens=3, logprobs=1, stream=True))
    assert [len(c.choices[0].logprobs.tokens) for c in streamed] == [1, 1, 1]
    streamed = list(oai.completions.create(model="m", prompt="abc", max_tokens=3, logprobs=1, echo=True,
                                           temperature=0, stream=True))
    assert [len(c.choices[0].logprobs.tokens) for c in streamed] == [n_prompt + 1, 1, 1]
    joined = [t for c in streamed for t in c.choices[0].logprobs.tokens]
    assert joined == lp.tokens and streamed[0].choices[0].logprobs.token_logprobs[0] is None
    offsets = [o for c in streamed for o in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset


@pytest.mark.parametrize(
    "path, extra, message",
    [
        ("/v1/completions", {"n": 4}, "`n` must be > 0 and <= 3. Given: 4"),
        ("/v1/completions", {"n": 0}, "`n` must be > 0"),
        ("/v1/chat/completions", {"presence_penalty": -2.5}, "`presence_penalty` must be >= -2.0 and <= 2.0"),
        ("/v1/chat/completions", {"min_p": 1.5}, "`min_p` must be >= 0.0 and <= 1.0"),
        ("/v1/chat/completions", {"logit_bias": [1.0]}, "logit_bias: invalid type"),
        ("/v1/chat/completions", {"logit_bias": {"x": 1}}, "logit_bias: key `x` is not a token id"),
        ("/v1/chat/completions", {"logit_bias": {"100000": 1}}, "`logit_bias` token ids must be >= 0 and <"),
        ("/v1/chat/completions", {"stop_token_ids": [-1]}, "`stop_token_ids` token ids must be >= 0"),
        ("/v1/chat/completions", {"min_tokens": 9}, "`min_tokens` must be <= `max_new_tokens`. Given: 9 and 4"),
        ("/v1/completions", {"logprobs": 6}, "`logprobs` must be >= 0 and <= 5. Given: 6"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 6}, "`top_logprobs` must be >= 0 and <= 5"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "`top_logprobs` requires `logprobs` to be true"),
    ],
)
def test_out_of_range_is_422_and_submits_nothing(server, path, extra, message):
    body = {"model": "m", "max_tokens": 4, **extra}
    body.update({"messages": CHAT} if "chat" in path else {"prompt": "abc"})
    r = requests.post(server.base_url + path, json=body, timeout=10)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]["message"]
    assert server.backend.submitted == []
