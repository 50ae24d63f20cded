"""IncrementalDetokenizer on a byte-level BPE tokenizer with characters split across tokens."""

from __future__ import annotations

import pytest
from spindle_server.sampling import IncrementalDetokenizer, decode_generated

from tests.helpers.tiny_model import BOS_ID, EOS_ID, build_tokenizer

# Characters absent from the tokenizer's training corpus are encoded byte by byte, so one character
# spans 2-4 tokens; the corpus's own 東京 / 🙂 / café come out as merged tokens.
TEXTS = [
    "hello 中文 🚀 world 한국어 🙂 東京",
    "🚀🚀🚀 ß∂ƒ© 日本語の文章 café über 👩‍👩‍👧",
    "plain ascii text with the quick brown fox",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(512)


def _splits(tokenizer, ids: list[int]) -> list[int]:
    """Prompt lengths whose prompt decodes to whole characters."""
    return [n for n in range(0, len(ids)) if "\ufffd" not in tokenizer.decode(ids[:n])]


@pytest.mark.parametrize("text", TEXTS)
def test_steps_concatenate_to_the_full_decode_and_never_split_a_character(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    splits = _splits(tokenizer, ids)
    assert len(splits) > 3
    for n in splits:
        detok = IncrementalDetokenizer(tokenizer, ids[:n])
        pieces = [detok.step(t) for t in ids[n:]]
        full = tokenizer.decode(ids[n:], skip_special_tokens=False)
        assert "".join(pieces) == full
        emitted = ""
        for piece in pieces:
            assert "\ufffd" not in piece
            emitted += piece
            assert full.startswith(emitted)


def test_multibyte_characters_really_span_several_tokens(tokenizer) -> None:
    ids = tokenizer.encode("🚀", add_special_tokens=False).ids
    assert len(ids) >= 3
    detok = IncrementalDetokenizer(tokenizer, [BOS_ID])
    assert [detok.step(t) for t in ids] == [""] * (len(ids) - 1) + ["🚀"]


def test_special_tokens_keep_their_text_and_are_flagged(tokenizer) -> None:
    prompt = tokenizer.encode("hello world").ids
    assert prompt[0] == BOS_ID
    generated = tokenizer.encode(" 中文", add_special_tokens=False).ids + [EOS_ID]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.step(t) for t in generated]
    assert pieces[-1] == "</s>"
    assert "".join(pieces) == " 中文</s>"
    assert detok.is_special(EOS_ID) and detok.is_special(BOS_ID)
    assert not detok.is_special(generated[0])
    assert decode_generated(tokenizer, generated) == " 中文"


def test_empty_prompt_and_prompt_longer_than_the_prefix_window(tokenizer) -> None:
    ids = tokenizer.encode("the quick brown fox jumps over lazy dog 🚀 done", add_special_tokens=False).ids
    for prompt in ([], ids[:12]):
        detok = IncrementalDetokenizer(tokenizer, prompt)
        rest = ids[len(prompt) :]
        assert "".join(detok.step(t) for t in rest) == tokenizer.decode(rest)


def test_decode_generated_skips_special_tokens(tokenizer) -> None:
    ids = [BOS_ID, *tokenizer.encode("über 🚀", add_special_tokens=False).ids, EOS_ID, EOS_ID]
    assert decode_generated(tokenizer, ids) == "über 🚀"


def test_flush_gives_the_held_back_bytes_of_a_sequence_cut_mid_character(tokenizer) -> None:
    ids = tokenizer.encode("ok 🚀", add_special_tokens=False).ids
    cut = ids[:-1]  # the rocket's last byte never comes (max_new_tokens hit mid-character)
    detok = IncrementalDetokenizer(tokenizer, [BOS_ID])
    pieces = [detok.step(t) for t in cut]
    assert pieces[-1] == ""
    tail = detok.flush()
    assert tail.endswith("\ufffd")
    assert "".join(pieces) + tail == decode_generated(tokenizer, cut)
    assert detok.flush() == ""  # nothing is sent twice


def test_flush_after_a_whole_character_is_empty(tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, [BOS_ID])
    pieces = [detok.step(t) for t in tokenizer.encode("hello 🚀", add_special_tokens=False).ids]
    assert "".join(pieces) == "hello 🚀" and detok.flush() == ""
