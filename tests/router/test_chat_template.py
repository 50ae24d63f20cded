"""Chat templates: where they are found, how they render (compared with transformers), and their errors."""

from __future__ import annotations

import json

import pytest
import requests
from spindle_router.chat_template import ChatTemplate, TemplateError, find_template_source

from tests.helpers.tiny_model import CHAT_TEMPLATE
from tests.router.api_harness import start_server, write_tokenizer_dir

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {
        "role": "user",
        "content": [{"type": "text", "text": "look: "}, {"type": "image_url", "image_url": {"url": "u"}}],
    },
]


def test_renders_like_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast

    d = write_tokenizer_dir(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), bos_token="<s>", eos_token="</s>")
    hf.chat_template = CHAT_TEMPLATE
    flat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "look: ![](u)"}]
    expected = hf.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate.from_model_dir(d, "<s>", "</s>").render(MESSAGES) == expected
    # the assistant's last message is continued, not closed (TGI / transformers continue_final_message)
    cont = [*flat, {"role": "assistant", "content": "Sure, "}]
    expected = hf.apply_chat_template(cont, tokenize=False, continue_final_message=True)
    assert ChatTemplate(CHAT_TEMPLATE).render(cont) == expected
    assert expected.endswith("Sure, ")


def test_template_sources(tmp_path):
    d = write_tokenizer_dir(tmp_path, chat_template=None)
    assert find_template_source(d) is None
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert find_template_source(d) == "D"
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert find_template_source(d) == "J"
    (d / "chat_template.jinja").write_text("JINJA")
    assert find_template_source(d) == "JINJA"


def test_helpers_and_variables():
    t = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}{{ m.role }}:{{ m.content }}{% endfor %}"
        "{{ strftime_now('%Y') | length }}{{ tools | tojson }}{{ eos_token }}",
        bos_token="<s>",
        eos_token="</s>",
    )
    out = t.render([{"role": "user", "content": "hi"}], tools=[{"name": "f"}])
    assert out == '<s>user:hi4[{"name": "f"}]</s>'
    strict = ChatTemplate(
        "{% if messages[0].role != 'system' %}{{ raise_exception('need a system message') }}{% endif %}"
    )
    with pytest.raises(TemplateError, match="need a system message"):
        strict.render([{"role": "user", "content": "x"}])
    with pytest.raises(TemplateError):
        ChatTemplate("{% for %}")
    sandboxed = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(TemplateError):
        sandboxed.render([{"role": "user", "content": "x"}])


def test_chat_routes_template_errors(tmp_path):
    d = write_tokenizer_dir(
        tmp_path / "strict", chat_template="{{ raise_exception('no ' + messages[0].role) }}"
    )
    s = start_server(d)
    try:
        body = {"messages": [{"role": "user", "content": "x"}]}
        resp = requests.post(s.base_url + "/v1/chat/completions", json=body, timeout=10)
        assert resp.status_code == 422
        assert resp.json()["error_type"] == "template_error"
        assert resp.json()["error"]["message"] == "Template error: no user"
        assert s.backend.submitted == []
    finally:
        s.stop()
    s = start_server(write_tokenizer_dir(tmp_path / "none"), with_template=False)
    try:
        resp = requests.post(s.base_url + "/v1/chat/completions", json=body, timeout=10)
        assert resp.status_code == 422 and resp.json()["error_type"] == "template_error"
    finally:
        s.stop()


def test_chat_prompt_and_tokenize(tmp_path):
    s = start_server(write_tokenizer_dir(tmp_path))
    try:
        messages = [{"role": "user", "content": "hello"}]
        resp = requests.post(s.base_url + "/chat_tokenize", json={"messages": messages}, timeout=10)
        out = resp.json()
        assert out["templated_text"] == "<|user|>\nhello</s>\n<|assistant|>\n"
        ids = [t["id"] for t in out["tokenize_response"]]
        assert ids[0] != 1  # chat prompts are tokenized without adding special tokens (the template has them)
        requests.post(
            s.base_url + "/v1/chat/completions",
            json={"messages": messages, "max_tokens": 1, "temperature": 0},
        )
        req = s.backend.submitted[-1]
        assert list(req.input_ids) == ids
        assert req.sampling.do_sample is False  # temperature 0 -> greedy
        requests.post(s.base_url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
        assert s.backend.submitted[-1].sampling.do_sample is True  # TGI quirk: chat samples by default
        requests.post(
            s.base_url + "/v1/chat/completions",
            json={"messages": messages, "max_tokens": 1, "presence_penalty": 0.5, "stop": ["a"], "seed": 4},
        )
        last = s.backend.submitted[-1]
        # OpenAI's additive presence penalty (TGI mapped it onto repetition_penalty = presence + 2)
        assert last.sampling.presence_penalty == 0.5 and last.sampling.repetition_penalty == 1.0
        assert last.stopping.stop_sequences == ("a",)
        assert last.sampling.seed == 4
    finally:
        s.stop()
