"""Warmup's step cost: a one-token forward, a prefill probe from position 0, and the same probe deep in a
context, which prices the (token, earlier position) pairs a late chunk of a long prompt attends."""

from __future__ import annotations

import logging
import math

import pytest
from spindle_server.engine.shard import WarmupSpec

from tests.helpers.engine_driver import make_engine
from tests.helpers.tiny_model import TinyModelSpec, make_tiny_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return make_engine(make_tiny_model(tmp_path_factory.mktemp("probe") / "llama", TinyModelSpec(seed=5)), None)


def test_warmup_probes_deep_in_context_when_the_prompt_limit_allows(engine, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="spindle_server.engine"):
        deep = engine.warmup(WarmupSpec(max_input_tokens=400, max_prefill_tokens=512, max_total_tokens=512))
    # 400-token prompts: the 128-token probe runs again after 272 cached positions.
    assert "probes of 128 tokens at 0 and 272" in caplog.text
    assert deep.forward_base_ns > 0 and deep.forward_token_ns >= 0
    assert math.isfinite(deep.forward_context_ns) and deep.forward_context_ns >= 0
    # Prompts too short for a second probe: no context term measured, the rest as before.
    shallow = engine.warmup(WarmupSpec(max_input_tokens=200, max_prefill_tokens=200, max_total_tokens=256))
    assert shallow.forward_context_ns == 0 and shallow.forward_base_ns > 0
