"""Incremental detokenization: the text each generated token adds, never half a character.

    ids:   p0 p1 ... p(n-5) ... p(n-1) | g0 g1 g2 ...
                    ^prefix_offset      ^read_offset
    text of the new tokens = decode(ids[prefix:]) minus decode(ids[prefix:read])

Decoding from a few tokens back (rather than the new token alone) keeps what the tokenizer's
decoder does at word boundaries (e.g. a leading-space marker) right. While the decoded text ends in
U+FFFD the token completes no character yet: it yields "" and its bytes come out with a later token.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import tokenizers

_PREFIX_TOKENS = 5
_REPLACEMENT = "\ufffd"
_special_cache: weakref.WeakKeyDictionary[tokenizers.Tokenizer, frozenset[int]] = weakref.WeakKeyDictionary()


def special_token_ids(tokenizer: tokenizers.Tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's special added tokens (computed once per tokenizer)."""
    try:
        return _special_cache[tokenizer]
    except (KeyError, TypeError):
        pass
    ids = frozenset(i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special)
    try:
        _special_cache[tokenizer] = ids
    except TypeError:  # not weak-referenceable: compute per call
        pass
    return ids


class IncrementalDetokenizer:
    """One request's detokenization state (TGI's prefix/read offsets)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._special = special_token_ids(tokenizer)
        # Only the tail of the prompt is ever decoded again.
        self._ids = list(prompt_ids[-_PREFIX_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def step(self, token_id: int) -> str:
        """Append one generated token; return the text it completes ("" while a character is partial).
        Special tokens keep their text (e.g. "</s>")."""
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=False)
        new_text = decode(self._ids[self._prefix_offset :], skip_special_tokens=False)
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            text = new_text[len(prefix_text) :]
            # Drop what no later decode reads again, so the window stays a few tokens long.
            self._ids = self._ids[self._read_offset :]
            self._prefix_offset, self._read_offset = 0, len(self._ids)
            return text
        return ""

    def flush(self) -> str:
        """The text still held back, once the sequence has ended: a character no later token can complete
        comes out as U+FFFD, so the pieces of a finished sequence add up to its full decode."""
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=False)
        new_text = decode(self._ids[self._prefix_offset :], skip_special_tokens=False)
        self._ids = self._ids[self._read_offset :]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return new_text[len(prefix_text) :]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special


def decode_generated(tokenizer: tokenizers.Tokenizer, ids: Sequence[int]) -> str:
    """All generated ids decoded together, special tokens skipped (TGI's generated_text)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)
