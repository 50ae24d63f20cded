"""StoppingCriteria: TGI's order (length -> EOS -> stop sequence) and stop sequences across tokens."""

from __future__ import annotations

import pytest
from spindle_proto import generate_pb2
from spindle_server.sampling import FinishReason, StoppingCriteria

EOS = 2


def _feed(criteria: StoppingCriteria, tokens: list[tuple[int, str]]) -> list[FinishReason | None]:
    return [criteria(token, text) for token, text in tokens]


def test_finish_reasons_equal_the_proto_enum() -> None:
    for reason in FinishReason:
        assert generate_pb2.FinishReason.Value(f"FINISH_REASON_{reason.name}") == reason.value


def test_length_stops_on_the_max_new_tokens_th_token() -> None:
    c = StoppingCriteria(3, [], [EOS], False)
    assert _feed(c, [(5, "a"), (6, "b"), (7, "c")]) == [None, None, FinishReason.LENGTH]


def test_length_wins_over_eos_and_stop_sequence_on_the_same_token() -> None:
    c = StoppingCriteria(2, ["ab"], [EOS], False)
    assert _feed(c, [(5, "a"), (EOS, "b")]) == [None, FinishReason.LENGTH]


def test_eos_wins_over_stop_sequence() -> None:
    c = StoppingCriteria(10, ["</s>"], [EOS, 7], False)
    assert _feed(c, [(5, "x"), (EOS, "</s>")]) == [None, FinishReason.EOS_TOKEN]
    c = StoppingCriteria(10, [], [EOS, 7], False)
    assert _feed(c, [(7, "q")]) == [FinishReason.EOS_TOKEN]  # any of several EOS ids


def test_ignore_eos_token_generates_past_eos() -> None:
    c = StoppingCriteria(3, [], [EOS], True)
    assert _feed(c, [(EOS, ""), (EOS, ""), (EOS, "")]) == [None, None, FinishReason.LENGTH]


def test_stop_sequence_spanning_tokens_and_empty_partial_texts() -> None:
    c = StoppingCriteria(20, ["Hello wor", "stop"], [EOS], False)
    steps = [(5, "He"), (6, "llo"), (7, " w"), (8, ""), (9, "or")]
    assert _feed(c, steps) == [None, None, None, None, FinishReason.STOP_SEQUENCE]


def test_stop_sequence_must_be_at_the_end_of_the_output() -> None:
    c = StoppingCriteria(20, ["cat"], [EOS], False)
    assert _feed(c, [(5, "ca"), (6, "ts"), (7, " dog")]) == [None, None, None]
    assert c(8, " cat") == FinishReason.STOP_SEQUENCE


def test_stop_sequence_inside_one_token_text_matches_only_at_its_end() -> None:
    c = StoppingCriteria(20, ["\n"], [EOS], False)
    assert c(5, "a\nb") is None
    assert c(6, "c\n") == FinishReason.STOP_SEQUENCE


def test_output_tail_is_bounded_but_long_stop_sequences_still_match() -> None:
    long_stop = "x" * 500
    c = StoppingCriteria(10_000, [long_stop], [EOS], False)
    for _ in range(499):
        assert c(5, "x") is None
    assert c(5, "x") == FinishReason.STOP_SEQUENCE
    short = StoppingCriteria(10_000, ["never"], [EOS], False)
    for _ in range(2000):
        short(5, "abc")
    assert len(short._tail) <= 300


def test_counts_tokens_replayed_after_preemption() -> None:
    c = StoppingCriteria(4, ["ab"], [EOS], False)
    for token, text in [(5, "x"), (6, "a")]:  # generated before the preemption
        c(token, text)
    assert c.num_generated == 2
    assert c(7, "b") == FinishReason.STOP_SEQUENCE


def test_rejects_max_new_tokens_below_one() -> None:
    with pytest.raises(ValueError, match="max_new_tokens"):
        StoppingCriteria(0, [], [EOS], False)
