"""serve.model.tokenizer: the built-in byte-level tokenizer, and parity with
transformers on Hugging Face folders whose tokenizer is trained here."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from serve.model.tokenizer import BUILTIN_SPECIAL_TOKENS, Tokenizer
from tests.fixtures.hf_checkpoints import Checkpoint

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "敏捷的棕色狐狸跳过了懒狗。今日はいい天気ですね。",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "def add(a, b):\n    return a + b  # 😀",
] * 10
TEXTS = [
    "hello world",
    "  leading spaces and\ttabs\n\nnewlines  ",
    "Grüße aus München — 東京 😀🚀 ok",
    "<s>starts with the BOS text",
    "mixed <|im_start|>special<|im_end|> tokens",
    "",
]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Übersetze: good morning 😀"},
    {"role": "assistant", "content": "Guten Morgen"},
    {"role": "user", "content": "and 'good night'?"},
]
BOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_level_bpe() -> Backend:
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return backend


def _sentencepiece_like_bpe() -> Backend:
    """Metaspace + byte fallback, decoded the way Llama 2 / Mistral tokenizers are."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    backend = Backend(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return backend


def _save_hf(backend: Backend, folder: Path, **kwargs: object) -> Path:
    PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs).save_pretrained(folder)
    return folder


def _assert_parity(folder: Path, texts: list[str]) -> None:
    ours = Tokenizer.from_pretrained(folder)
    theirs = AutoTokenizer.from_pretrained(folder)
    for text in texts:
        for special in (True, False):
            expected = theirs.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == expected, (text, special)
        ids = theirs.encode(text, add_special_tokens=True)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip
            )
    for turns in (CONVERSATION[:2], CONVERSATION):
        for gen in (True, False):
            rendered = theirs.apply_chat_template(turns, add_generation_prompt=gen, tokenize=False)
            assert ours.apply_chat_template(turns, add_generation_prompt=gen) == rendered
            ids = theirs.apply_chat_template(turns, add_generation_prompt=gen, return_dict=False)
            assert ours.encode_chat(turns, add_generation_prompt=gen) == list(ids)


# -- built-in ---------------------------------------------------------------------------


def test_builtin_vocabulary_layout() -> None:
    tok = Tokenizer.builtin()
    assert tok.vocab_size == 264
    assert tok.eos_token_ids == (258, 262)
    assert tok.bos_token_id == 257
    for i, token in enumerate(BUILTIN_SPECIAL_TOKENS):
        assert tok.encode(token, add_special_tokens=False) == [256 + i]
    assert tok.encode("aé€", add_special_tokens=False) == list("aé€".encode())
    assert tok.encode("hi") == [257, *b"hi"]


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_builtin_round_trips_any_text(text: str) -> None:
    tok = Tokenizer.builtin()
    ids = tok.encode(text, add_special_tokens=False)
    if not any(s in text for s in BUILTIN_SPECIAL_TOKENS):
        assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_builtin_decode_skips_specials_and_replaces_invalid_bytes() -> None:
    tok = Tokenizer.builtin()
    assert tok.decode([257, *b"ok", 262, 258]) == "ok"
    assert tok.decode([257, *b"ok", 262], skip_special_tokens=False) == "<|bos|>ok<|end|>"
    assert tok.decode([0xFF, *b"a"]) == "\ufffda"


def test_builtin_chat_template() -> None:
    tok = Tokenizer.builtin()
    text = tok.apply_chat_template(CONVERSATION[:2])
    assert text == (
        "<|bos|><|system|>You are terse.<|end|><|user|>Übersetze: good morning 😀<|end|>"
        "<|assistant|>"
    )
    assert not tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=False).endswith(
        "<|assistant|>"
    )
    ids = tok.encode_chat(CONVERSATION[:2])
    assert ids[:2] == [257, 259] and ids.count(257) == 1
    assert ids[-1] == 261
    with pytest.raises(jinja2.TemplateError, match="unknown role"):
        tok.apply_chat_template([{"role": "wizard", "content": "x"}])


def test_builtin_saves_a_folder_both_loaders_read(tmp_path: Path) -> None:
    tok = Tokenizer.builtin()
    tok.save(tmp_path)
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.vocab_size == 264
    assert loaded.eos_token_ids == tok.eos_token_ids
    assert loaded.bos_token_id == 257
    assert loaded.chat_template == tok.chat_template
    _assert_parity(tmp_path, TEXTS)
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text)


# -- Hugging Face folders ----------------------------------------------------------------


def test_parity_byte_level_with_bos_in_template(tmp_path: Path) -> None:
    folder = _save_hf(
        _byte_level_bpe(),
        tmp_path,
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,
        chat_template=BOS_TEMPLATE,
    )
    _assert_parity(folder, TEXTS)
    tok = Tokenizer.from_pretrained(folder)
    # The template writes BOS itself, so a chat prompt has exactly one.
    ids = tok.encode_chat(CONVERSATION)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_parity_chat_template_in_tokenizer_config_list_form(tmp_path: Path) -> None:
    folder = _save_hf(_byte_level_bpe(), tmp_path, eos_token="<|im_end|>")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [
        {"name": "default", "template": QWEN_TEMPLATE},
        {"name": "tool_use", "template": "{{ raise_exception('tools') }}"},
    ]
    config["eos_token"] = {"__type": "AddedToken", "content": "<|im_end|>", "special": True}
    config_path.write_text(json.dumps(config))
    _assert_parity(folder, TEXTS)
    tok = Tokenizer.from_pretrained(folder)
    assert tok.bos_token_id is None
    assert tok.encode_chat(CONVERSATION[:1])[0] == tok.encode("<|im_start|>", False)[0]
    with pytest.raises(jinja2.TemplateError, match="no tools"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_parity_sentencepiece_style_folder(tmp_path: Path) -> None:
    """Metaspace + byte fallback; tokenizer.json's (absent) post-processor decides, and
    add_bos_token in tokenizer_config is ignored, as transformers 5 does."""
    backend = _sentencepiece_like_bpe()
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "rstrip": False},
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": BOS_TEMPLATE,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    _assert_parity(tmp_path, [t for t in TEXTS if "<|im_start|>" not in t])
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.bos_token_id is not None
    assert tok.encode("hello") == tok.encode("hello", add_special_tokens=False)
    assert tok.encode_chat(CONVERSATION)[0] == tok.bos_token_id


def test_eos_ids_from_generation_config_and_config(tmp_path: Path) -> None:
    folder = _save_hf(_byte_level_bpe(), tmp_path, bos_token="<s>", eos_token="</s>")
    tok = Tokenizer.from_pretrained(folder)
    eos = tok.encode("</s>", add_special_tokens=False)[0]
    end = tok.encode("<|im_end|>", add_special_tokens=False)[0]
    assert tok.eos_token_ids == (eos,)
    (folder / "config.json").write_text(json.dumps({"eos_token_id": end}))
    assert Tokenizer.from_pretrained(folder).eos_token_ids == (eos, end)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [end, eos, 7]}))
    assert Tokenizer.from_pretrained(folder).eos_token_ids == (eos, end, 7)


def test_missing_special_tokens_are_added_like_transformers(tmp_path: Path) -> None:
    backend = _byte_level_bpe()
    folder = _save_hf(backend, tmp_path, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    ours, theirs = Tokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert ours.vocab_size == len(theirs) == backend.get_vocab_size() + 1
    assert ours.encode("a<pad>b") == theirs.encode("a<pad>b")


def test_missing_tokenizer_json_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_tokenizer_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, serve.model.tokenizer; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_added_token_flags_from_added_tokens_decoder(tmp_path: Path) -> None:
    backend = _byte_level_bpe()
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {
        "eos_token": "</s>",
        "added_tokens_decoder": {
            str(backend.get_vocab_size()): {"content": "<tool>", "special": True},
        },
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.encode("x<tool>y", add_special_tokens=False)[1] == backend.get_vocab_size()
    assert tok.decode(tok.encode("x<tool>y")) == "xy"


def test_parity_on_the_shared_test_checkpoints(hf_checkpoint: Checkpoint) -> None:
    """The folders the model parity tests serve (tests/fixtures/hf_checkpoints.py)."""
    _assert_parity(hf_checkpoint.path, TEXTS)
    tok = Tokenizer.from_pretrained(hf_checkpoint.path)
    assert tok.vocab_size == hf_checkpoint.vocab_size
    assert hf_checkpoint.eos_token_id in tok.eos_token_ids
    assert tok.bos_token_id == hf_checkpoint.bos_token_id
