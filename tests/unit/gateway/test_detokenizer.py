"""serve.gateway.detokenizer: incremental text equals the full decode, no split
UTF-8 characters, stop strings cut at the first match."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from serve.gateway.detokenizer import (
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    StopStringMatcher,
)
from serve.model.tokenizer import Tokenizer

BUILTIN = Tokenizer.builtin()


def _stream(tokenizer: object, ids: Sequence[int], sizes: Sequence[int] = (1,)) -> list[str]:
    """Feeds ids in pieces of the given sizes (cycled); returns every emitted piece."""
    detok = IncrementalDetokenizer(tokenizer)  # type: ignore[arg-type]
    pieces, i, k = [], 0, 0
    while i < len(ids):
        size = max(1, sizes[k % len(sizes)])
        pieces.append(detok.step(ids[i : i + size]))
        i, k = i + size, k + 1
    pieces.append(detok.flush())
    return pieces


@settings(max_examples=300, deadline=None)
@given(st.text(), st.lists(st.integers(1, 4), min_size=1, max_size=5))
def test_incremental_text_equals_full_decode_for_unicode(text: str, sizes: list[int]) -> None:
    ids = BUILTIN.encode(text, add_special_tokens=False)
    pieces = _stream(BUILTIN, ids, sizes)
    assert "".join(pieces) == BUILTIN.decode(ids) == text
    # Valid UTF-8 in, so the pieces carry no replacement character the text
    # does not hold itself (U+FFFD is a valid character too).
    assert sum(p.count(REPLACEMENT_CHAR) for p in pieces) == text.count(REPLACEMENT_CHAR)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64), st.lists(st.integers(1, 3), min_size=1, max_size=4))
def test_incremental_text_equals_full_decode_for_random_bytes(
    data: bytes, sizes: list[int]
) -> None:
    ids = list(data)
    assert "".join(_stream(BUILTIN, ids, sizes)) == BUILTIN.decode(ids)


def test_multibyte_character_is_held_until_complete() -> None:
    detok = IncrementalDetokenizer(BUILTIN)
    euro = list("€".encode())
    assert [detok.step([b]) for b in euro] == ["", "", "€"]
    smile = list("a😀".encode())
    assert "".join(detok.step([b]) for b in smile[:4]) == "a"
    assert detok.step(smile[4:]) == "😀"
    assert detok.flush() == ""


def test_invalid_bytes_still_flow_before_the_end() -> None:
    detok = IncrementalDetokenizer(BUILTIN)
    emitted = "".join(detok.step([0xFF]) for _ in range(20))
    assert emitted.count(REPLACEMENT_CHAR) >= 17
    assert emitted + detok.flush() == REPLACEMENT_CHAR * 20


def test_truncated_character_is_flushed_at_the_end() -> None:
    detok = IncrementalDetokenizer(BUILTIN)
    assert detok.step(list(b"ok\xe2\x82")) == "ok"
    assert detok.flush() == REPLACEMENT_CHAR


def test_special_tokens_are_skipped() -> None:
    detok = IncrementalDetokenizer(BUILTIN)
    assert detok.step([*b"hi", 262]) == "hi"
    assert detok.step([258]) == ""
    assert detok.flush() == ""


def _merged_byte_level() -> Backend:
    """A trained byte-level BPE whose tokens span several bytes and characters."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["Grüße aus München", "東京の天気はいいです", "😀🚀 emoji", "naïve café"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    return backend


def _byte_fallback_metaspace() -> Backend:
    """Llama-2-style: Metaspace words, unknown characters as <0xNN> byte tokens."""
    words = ["hello", "world", "good", "morning"]
    merges: list[tuple[str, str]] = []
    vocab = ["<unk>", *(f"<0x{b:02X}>" for b in range(256)), "▁"]
    vocab += sorted({c for w in words for c in w})
    for word in words:
        piece = "▁"
        for c in word:
            merges.append((piece, c))
            piece += c
            vocab.append(piece)
    ids = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    backend = Backend(models.BPE(ids, merges, unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return backend


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="Grüße aus München東京の天気😀🚀 naïve café\n", max_size=40))
def test_incremental_matches_full_decode_with_merged_tokens(text: str) -> None:
    backend = _MERGED
    ids = backend.encode(text, add_special_tokens=False).ids
    assert "".join(_stream(backend, ids)) == backend.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="hello world goodmorning€😀ß ", min_size=1, max_size=40))
def test_incremental_matches_full_decode_with_byte_fallback(text: str) -> None:
    backend = _FALLBACK
    ids = backend.encode(text, add_special_tokens=False).ids
    assert "".join(_stream(backend, ids)) == backend.decode(ids) == text


_MERGED = _merged_byte_level()
_FALLBACK = _byte_fallback_metaspace()


def test_invalid_byte_fallback_tokens_flow() -> None:
    invalid = _FALLBACK.token_to_id("<0xFF>")
    detok = IncrementalDetokenizer(_FALLBACK)
    emitted = "".join(detok.step([invalid]) for _ in range(20))
    assert emitted == REPLACEMENT_CHAR * 19
    assert detok.flush() == REPLACEMENT_CHAR


def test_emoji_in_byte_fallback_tokens_is_never_split() -> None:
    ids = _FALLBACK.encode("hello 😀😀 world", add_special_tokens=False).ids
    pieces = _stream(_FALLBACK, ids)
    assert "".join(pieces) == "hello 😀😀 world"
    assert all(REPLACEMENT_CHAR not in p for p in pieces)


# -- stop strings ---------------------------------------------------------------------


def _push_all(stop: Sequence[str], pieces: Sequence[str]) -> tuple[str, StopStringMatcher]:
    matcher = StopStringMatcher(stop)
    out = "".join(matcher.push(p) for p in pieces)
    return out + matcher.flush(), matcher


def test_stop_string_cuts_output_and_is_not_returned() -> None:
    out, matcher = _push_all(["STOP"], ["hello ", "wor", "ld STO", "P and more"])
    assert out == "hello world "
    assert matcher.is_stopped and matcher.matched == "STOP"
    assert matcher.push("later") == ""


def test_text_that_may_start_a_stop_string_is_held_back() -> None:
    matcher = StopStringMatcher(["</answer>"])
    assert matcher.push("result </ans") == "result "
    assert matcher.push("wer is near") == "</answer is near"[: len("</answer is near")]
    assert matcher.flush() == ""
    held = StopStringMatcher(["xyz"])
    assert held.push("abcxy") == "abc"
    assert held.flush() == "xy"


def test_first_completed_stop_string_wins() -> None:
    out, matcher = _push_all(["world", "lo w"], ["hel", "lo world"])
    assert out == "hel"
    assert matcher.matched == "lo w"
    # "a" completes before "baa" does, whether the text comes at once or piece by piece.
    assert _push_all(["baa", "a"], ["baa"])[0] == _push_all(["baa", "a"], ["b", "a", "a"])[0]


def test_no_stop_strings_passes_text_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.push("abc") == "abc"
    assert not matcher.is_stopped


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="abc", max_size=30),
    st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
    st.lists(st.integers(1, 5), min_size=1, max_size=6),
)
def test_stop_output_is_text_before_first_match(
    text: str, stops: list[str], sizes: list[int]
) -> None:
    pieces, i, k = [], 0, 0
    while i < len(text):
        pieces.append(text[i : i + sizes[k % len(sizes)]])
        i, k = i + sizes[k % len(sizes)], k + 1
    out, matcher = _push_all(stops, pieces)
    # Cut where the first stop string completes (character by character), at its start.
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    expected = text[: min(hits)[1]] if hits else text
    assert out == expected
    assert matcher.is_stopped == bool(hits)
