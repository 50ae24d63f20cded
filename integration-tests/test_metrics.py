"""/metrics of a real stack after a few requests: TGI's names and types, values that match what was sent."""

from __future__ import annotations

import json

import requests
from conftest import read_settled_metrics
from prometheus_client.parser import text_string_to_metric_families

PROMPT = "the quick brown fox jumps over the lazy dog " * 4  # > one 16-token block: the repeat hits the cache

COUNTERS = ["tgi_request_count", "tgi_request_success", "tgi_request_failure", "tgi_batch_inference_count",
            "tgi_batch_inference_success", "spindle_preemptions", "spindle_prefix_cache_hit_tokens"]
HISTOGRAMS = ["tgi_request_duration", "tgi_request_validation_duration", "tgi_request_queue_duration",
              "tgi_request_inference_duration", "tgi_request_mean_time_per_token_duration",
              "tgi_request_input_length", "tgi_request_generated_tokens", "tgi_batch_forward_duration",
              "tgi_batch_decode_duration", "tgi_batch_inference_duration", "tgi_batch_next_size"]
GAUGES = ["tgi_queue_size", "tgi_batch_current_size", "tgi_batch_current_max_tokens", "tgi_batch_max_total_tokens",
          "spindle_kv_blocks_total", "spindle_kv_blocks_used", "spindle_prefix_cache_blocks",
          "spindle_prefix_cache_hit_ratio"]


def scrape(base_url: str) -> tuple[dict[str, str], dict[tuple[str, tuple], float]]:
    """Family types by name, and every sample by (name, sorted labels)."""
    r = requests.get(f"{base_url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    text = r.text
    # TGI's dashboard queries counters by their bare names; the parser reads them as `<name>_total`.
    assert "\ntgi_request_count " in text and "tgi_request_count_total" not in text
    types, samples = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            name = family.name if family.type == "counter" and s.name == f"{family.name}_total" else s.name
            samples[(name, tuple(sorted(s.labels.items())))] = s.value
    return types, samples


def test_metrics_count_what_was_sent(launcher):
    _, before = scrape(launcher.base_url)
    generated = early = 0  # early: requests that stopped before max_new_tokens (EOS, a stop sequence)
    for n in (3, 5, 7):
        r = requests.post(f"{launcher.base_url}/generate", timeout=60,
                          json={"inputs": PROMPT, "parameters": {"max_new_tokens": n, "details": True}})
        assert r.status_code == 200, r.text
        generated += r.json()["details"]["generated_tokens"]
        early += r.json()["details"]["finish_reason"] != "length"
    r = requests.post(f"{launcher.base_url}/generate_stream", timeout=60,
                      json={"inputs": "a b c", "parameters": {"max_new_tokens": 4, "details": True}})
    assert r.status_code == 200
    events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
    generated += len(events)
    early += events[-1]["details"]["finish_reason"] != "length"
    r = requests.post(f"{launcher.base_url}/generate", timeout=60, json={"inputs": "x", "parameters": {"temperature": 0}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"

    read_settled_metrics(launcher.base_url)  # the step sent before the last answer came back has answered
    types, after = scrape(launcher.base_url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)  # a labelled child exists once it was touched

    for name in COUNTERS:
        assert types.get(name) == "counter", name
    for name in HISTOGRAMS:
        assert types.get(name) == "histogram", name
    for name in GAUGES:
        assert types.get(name) == "gauge", name

    assert ("tgi_request_count", ()) in after
    assert delta("tgi_request_count") == 5
    assert delta("tgi_request_success") == 4
    assert delta("tgi_request_failure", err="validation") == 1
    for name in ("tgi_request_duration", "tgi_request_queue_duration", "tgi_request_inference_duration",
                 "tgi_request_validation_duration", "tgi_request_mean_time_per_token_duration",
                 "tgi_request_generated_tokens"):
        assert delta(f"{name}_count") == 4, name
    assert delta("tgi_request_input_length_count") == 4  # the invalid request never got that far
    assert delta("tgi_request_generated_tokens_sum") == generated
    assert delta("tgi_request_duration_sum") > delta("tgi_request_inference_duration_sum") > 0

    prefills = delta("tgi_batch_forward_duration_count", method="prefill")
    decodes = delta("tgi_batch_forward_duration_count", method="decode")
    assert prefills == 4 == delta("tgi_batch_inference_success", method="prefill")  # sequential: one each
    # Without --overlap-steps (the default) a request that stops early (`early`) costs no extra step.
    assert decodes == generated - 4 == delta("tgi_batch_inference_success", method="decode"), early
    assert delta("tgi_batch_inference_failure", method="decode") == 0

    gauge = {name: after[(name, ())] for name in GAUGES}
    assert gauge["tgi_queue_size"] == 0 and gauge["tgi_batch_current_size"] == 0
    assert gauge["spindle_kv_blocks_used"] == 0 < gauge["spindle_kv_blocks_total"]
    assert gauge["tgi_batch_max_total_tokens"] > 0
    # The prompt repeated three times: its full blocks were served from the cache twice.
    assert delta("spindle_prefix_cache_hit_tokens") >= 2 * 16
    assert 0 < gauge["spindle_prefix_cache_hit_ratio"] < 1
    assert gauge["spindle_prefix_cache_blocks"] >= 1
