"""Router start-up: the limits derived from what the shards hold (TGI's defaults and argument rules)."""

from __future__ import annotations

import pytest
from spindle_router.config import LimitsConfig, SchedulerConfig
from spindle_router.server import ConfigError, ShardFacts, check_static_limits, resolve_limits

FACTS = ShardFacts(num_blocks=100, block_size=16, max_position_embeddings=2048, support_chunking=True)


def test_defaults_follow_the_kv_capacity_and_the_model():
    r = resolve_limits(LimitsConfig(), SchedulerConfig(max_batch_prefill_tokens=512), FACTS)
    assert r.max_supported_total_tokens == 1600
    assert (r.limits.max_total_tokens, r.limits.max_input_tokens) == (1600, 1599)  # KV-bound
    assert r.scheduler.max_batch_total_tokens == 1600

    big = ShardFacts(num_blocks=10_000, block_size=16, max_position_embeddings=2048, support_chunking=True,
                     tokenizer_max_length=1000)
    r = resolve_limits(LimitsConfig(), SchedulerConfig(), big)
    assert (r.limits.max_total_tokens, r.limits.max_input_tokens) == (1000, 999)  # tokenizer-bound
    r = resolve_limits(LimitsConfig(), SchedulerConfig(), ShardFacts(10_000, 16, 2048, True))
    assert r.limits.max_total_tokens == 2048  # position-bound


def test_given_values_are_kept_and_input_derives_from_total():
    r = resolve_limits(LimitsConfig(max_total_tokens=300), SchedulerConfig(max_batch_prefill_tokens=256,
                                                                           max_batch_total_tokens=800), FACTS)
    assert (r.limits.max_total_tokens, r.limits.max_input_tokens) == (300, 299)
    assert r.scheduler.max_batch_total_tokens == 800
    r = resolve_limits(LimitsConfig(max_input_tokens=100), SchedulerConfig(max_batch_prefill_tokens=256), FACTS)
    assert (r.limits.max_total_tokens, r.limits.max_input_tokens) == (1600, 100)


@pytest.mark.parametrize(
    ("limits", "sched", "facts", "message"),
    [
        (LimitsConfig(max_input_tokens=1600), SchedulerConfig(), FACTS, "must be < max_total_tokens"),
        (LimitsConfig(max_total_tokens=5000), SchedulerConfig(), FACTS, "Not enough memory"),
        (LimitsConfig(), SchedulerConfig(max_batch_total_tokens=5000), FACTS, "exceeds the 1600 KV tokens"),
        (LimitsConfig(max_total_tokens=900), SchedulerConfig(max_batch_prefill_tokens=64,
                                                            max_batch_total_tokens=800), FACTS,
         "max_total_tokens (900) must be <= max_batch_total_tokens (800)"),
        (LimitsConfig(max_total_tokens=500), SchedulerConfig(max_batch_prefill_tokens=1000,
                                                            max_batch_total_tokens=800), FACTS,
         "max_batch_prefill_tokens (1000) must be <= max_batch_total_tokens"),
        (LimitsConfig(max_total_tokens=600), SchedulerConfig(max_batch_prefill_tokens=256),
         ShardFacts(100, 16, 2048, support_chunking=False), "cannot prefill in chunks"),
    ],
)
def test_rules_fail_with_a_message_naming_the_flags(limits, sched, facts, message):
    with pytest.raises(ConfigError, match=None) as info:
        resolve_limits(limits, sched, facts)
    assert message in str(info.value)


def test_static_rules_need_no_shard():
    with pytest.raises(ConfigError, match="max_total_tokens"):
        check_static_limits(LimitsConfig(max_total_tokens=100), SchedulerConfig(max_batch_prefill_tokens=10,
                                                                                max_batch_total_tokens=50))
    with pytest.raises(ConfigError, match="max_batch_prefill_tokens"):
        check_static_limits(LimitsConfig(), SchedulerConfig(max_batch_prefill_tokens=100, max_batch_total_tokens=50))
    check_static_limits(LimitsConfig(), SchedulerConfig())
