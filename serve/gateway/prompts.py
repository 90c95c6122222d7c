"""Prompt building: chat templates, translation instructions, raw prompts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jinja2.exceptions import TemplateError

from serve.errors import FailedPrecondition, InvalidArgument
from serve.gateway.languages import ISO_639_1
from serve.model.tokenizer import Tokenizer

AUTO_LANGUAGE = "auto"


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


def language_name(code: str, field: str) -> str:
    """English name of an ISO 639-1 code; InvalidArgument naming `field` if unknown."""
    name = ISO_639_1.get(code.strip().lower())
    if name is None:
        raise InvalidArgument(
            f"{field} must be an ISO 639-1 language code such as 'en' or 'de', got {code!r}"
        )
    return name


def translation_instruction(text: str, source_lang: str, target_lang: str) -> str:
    """The user message asking the model for a translation."""
    target = language_name(target_lang, "target_lang")
    if source_lang.strip().lower() in ("", AUTO_LANGUAGE):
        head = f"Translate the following text to {target}."
    else:
        source = language_name(source_lang, "source_lang")
        head = f"Translate the following text from {source} to {target}."
    return f"{head} Reply with the translation only.\n\n{text}"


def live_translation_instruction(text: str, source_lang: str, target_lang: str) -> str:
    """The first user message of a live translation; later segments follow as plain
    user messages, each answered by its translation."""
    target = language_name(target_lang, "target_lang")
    if source_lang.strip().lower() in ("", AUTO_LANGUAGE):
        head = f"Translate the following text to {target}."
    else:
        source = language_name(source_lang, "source_lang")
        head = f"Translate the following text from {source} to {target}."
    return (
        f"{head} It arrives in segments, one per message. "
        f"Reply to each with the translation of that segment only.\n\n{text}"
    )


def render_chat(
    tokenizer: Tokenizer, messages: Sequence[ChatMessage], add_generation_prompt: bool
) -> str:
    """A conversation as text, rendered with the model's chat template."""
    if tokenizer.chat_template is None:
        raise FailedPrecondition("the model has no chat template; use Generate instead")
    rendered = [{"role": m.role, "content": m.content} for m in messages]
    try:
        return tokenizer.apply_chat_template(rendered, add_generation_prompt=add_generation_prompt)
    except TemplateError as err:
        raise InvalidArgument(f"messages: the chat template refused them: {err}") from err


def chat_prompt_ids(tokenizer: Tokenizer, messages: Sequence[ChatMessage]) -> list[int]:
    """Token ids of a conversation rendered with the model's chat template,
    ending with the assistant's generation prompt."""
    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def translate_prompt_ids(
    tokenizer: Tokenizer, text: str, source_lang: str, target_lang: str
) -> list[int]:
    """Token ids of a translation request, sent as one user turn."""
    instruction = translation_instruction(text, source_lang, target_lang)
    return chat_prompt_ids(tokenizer, [ChatMessage("user", instruction)])


def text_prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Token ids of a raw prompt, with the tokenizer's special tokens (BOS) added once
    even when the text already starts with the BOS token."""
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        del ids[0]
    return ids
