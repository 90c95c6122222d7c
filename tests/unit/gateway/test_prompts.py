"""serve.gateway.prompts: chat and translation prompts, language codes."""

from __future__ import annotations

import re

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models

from serve.errors import FailedPrecondition, InvalidArgument
from serve.gateway import prompts
from serve.gateway.languages import ISO_639_1
from serve.gateway.prompts import ChatMessage
from serve.model.tokenizer import Tokenizer

BUILTIN = Tokenizer.builtin()


def test_language_table_is_iso_639_1() -> None:
    assert len(ISO_639_1) == 184
    assert all(re.fullmatch(r"[a-z]{2}", code) for code in ISO_639_1)
    assert len(set(ISO_639_1.values())) == len(ISO_639_1)
    expected = {
        "en": "English",
        "de": "German",
        "zh": "Chinese",
        "ja": "Japanese",
        "uk": "Ukrainian",
    }
    assert {code: ISO_639_1[code] for code in expected} == expected


def test_language_codes_are_case_insensitive() -> None:
    assert prompts.language_name("DE", "target_lang") == "German"
    assert prompts.language_name(" fr ", "target_lang") == "French"


@pytest.mark.parametrize(
    ("source", "target", "field"),
    [("en", "xx", "target_lang"), ("zz", "de", "source_lang"), ("en", "", "target_lang")],
)
def test_unknown_language_names_the_field(source: str, target: str, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field) as info:
        prompts.translation_instruction("hi", source, target)
    assert info.value.code == "INVALID_ARGUMENT"


def test_translation_instruction() -> None:
    assert prompts.translation_instruction("Good morning", "en", "de") == (
        "Translate the following text from English to German. "
        "Reply with the translation only.\n\nGood morning"
    )
    assert prompts.translation_instruction("Bonjour", "auto", "ja").startswith(
        "Translate the following text to Japanese. Reply"
    )


def test_chat_prompt_has_one_bos_and_ends_with_assistant_header() -> None:
    ids = prompts.chat_prompt_ids(BUILTIN, [ChatMessage("user", "hi")])
    assert ids == [257, 260, *b"hi", 262, 261]


def test_translate_prompt_is_a_user_turn() -> None:
    ids = prompts.translate_prompt_ids(BUILTIN, "Hallo", "de", "en")
    text = BUILTIN.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|bos|><|user|>Translate the following text from German to English.")
    assert text.endswith("Hallo<|end|><|assistant|>")


def test_text_prompt_adds_bos_once() -> None:
    assert prompts.text_prompt_ids(BUILTIN, "hi") == [257, *b"hi"]
    assert prompts.text_prompt_ids(BUILTIN, "<|bos|>hi") == [257, *b"hi"]


def test_chat_without_template_is_a_failed_precondition() -> None:
    backend = Backend(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    plain = Tokenizer(backend, special_tokens={}, chat_template=None, eos_token_ids=[])
    with pytest.raises(FailedPrecondition):
        prompts.chat_prompt_ids(plain, [ChatMessage("user", "a")])


def test_template_errors_become_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="messages"):
        prompts.chat_prompt_ids(BUILTIN, [ChatMessage("tool", "x")])
