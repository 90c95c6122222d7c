"""Text <-> token ids and chat templates (no torch import).

`Tokenizer.from_pretrained` reads a Hugging Face folder the way transformers'
`PreTrainedTokenizerFast` does, so `encode` and `apply_chat_template` give the
same ids and text; `Tokenizer.builtin()` is the byte-level vocabulary of the
random-weight presets.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

logger = logging.getLogger(__name__)

BUILTIN_SPECIAL_TOKENS = (
    "<|pad|>",
    "<|bos|>",
    "<|eos|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<|translate|>",
)
BUILTIN_EOS_TOKENS = ("<|eos|>", "<|end|>")
BUILTIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _byte_symbols() -> list[str]:
    """The printable stand-in character of each byte value (the byte-level alphabet)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + shifted)
            shifted += 1
    return [symbols[b] for b in range(256)]


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _pick_chat_template(value: Any) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of {name, template}."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        template = named.get("default")
        return template if isinstance(template, str) else None
    return None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """A `tokenizers` backend plus the special tokens and chat template of a model."""

    def __init__(
        self,
        backend: _Backend,
        *,
        special_tokens: Mapping[str, str],
        chat_template: str | None,
        eos_token_ids: Sequence[int],
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self._backend = backend
        self._special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self._chat_template_source = chat_template
        self._template = _compile_template(chat_template) if chat_template else None
        self._eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        self._config = dict(config or {})
        bos = self._special_tokens.get("bos_token")
        self._bos_token_id = backend.token_to_id(bos) if bos else None

    # -- construction -----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Tokenizer:
        """Loads tokenizer.json, tokenizer_config.json and the model's EOS ids from a folder.

        As in transformers 5, tokenizer.json's post-processor alone decides which special
        tokens `encode` adds; add_bos_token/add_eos_token in tokenizer_config are ignored."""
        root = Path(folder)
        path = root / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (only fast tokenizers are supported)")
        backend = _Backend.from_file(str(path))
        config = _read_json(root / "tokenizer_config.json")
        special = {name: _token_content(config.get(name)) for name in _NAMED_SPECIAL_TOKENS}
        _add_missing_special_tokens(backend, config, special)
        template = _load_chat_template(root, config)
        eos_ids = _resolve_eos_ids(root, backend, special.get("eos_token"))
        return cls(
            backend,
            special_tokens=special,
            chat_template=template,
            eos_token_ids=eos_ids,
            config=config,
        )

    @classmethod
    def builtin(cls) -> Tokenizer:
        """The presets' tokenizer: ids 0..255 are bytes, 256..263 the special tokens."""
        vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
        # No merges, so nothing to cache; and without a splitting pre-tokenizer the
        # BPE word cache would keep up to 10 000 whole prompts (~40 MB) per process.
        backend = _Backend(models.BPE(vocab=vocab, merges=[], cache_capacity=0))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in BUILTIN_SPECIAL_TOKENS]
        )
        bos_id = backend.token_to_id("<|bos|>")
        backend.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A:0",
            pair="<|bos|> $A:0 <|bos|>:1 $B:1",
            special_tokens=[("<|bos|>", bos_id)],
        )
        special = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
        eos_ids = [backend.token_to_id(t) for t in BUILTIN_EOS_TOKENS]
        return cls(
            backend,
            special_tokens=special,
            chat_template=BUILTIN_CHAT_TEMPLATE,
            eos_token_ids=eos_ids,
        )

    # -- properties -------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens.get("eos_token")

    @property
    def chat_template(self) -> str | None:
        return self._chat_template_source

    # -- text <-> ids -----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Renders a conversation with the model's template (jinja2, sandboxed)."""
        if self._template is None:
            raise ValueError("this tokenizer has no chat template")
        return self._template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **self._special_tokens,
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a rendered conversation. Templates write their own special tokens
        (BOS included), so the text is encoded without adding any."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    def save(self, folder: str | Path) -> None:
        """Writes tokenizer.json and tokenizer_config.json (loadable by transformers)."""
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(root / "tokenizer.json"))
        config = {k: v for k, v in self._config.items() if k != "chat_template"}
        config.update(self._special_tokens)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        if self._chat_template_source is not None:
            config["chat_template"] = self._chat_template_source
        with (root / "tokenizer_config.json").open("w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        generation = root / "generation_config.json"
        if not generation.exists():
            with generation.open("w", encoding="utf-8") as f:
                json.dump(
                    {"bos_token_id": self._bos_token_id, "eos_token_id": list(self._eos_token_ids)},
                    f,
                    indent=2,
                )


def _add_missing_special_tokens(
    backend: _Backend, config: Mapping[str, Any], special: Mapping[str, str | None]
) -> None:
    """Adds configured tokens the vocabulary lacks, as transformers does on load."""
    vocab = backend.get_vocab(with_added_tokens=True)
    missing: list[AddedToken] = []
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, Mapping):
        for entry in decoder.values():
            content = _token_content(entry)
            if content and content not in vocab:
                flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
                options = {k: bool(entry[k]) for k in flags if k in entry}
                missing.append(AddedToken(content, **options))
    for content in special.values():
        if content and content not in vocab and all(t.content != content for t in missing):
            missing.append(AddedToken(content, special=True, normalized=False))
    if missing:
        backend.add_tokens(missing)


def _load_chat_template(root: Path, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja wins over the template inside tokenizer_config.json."""
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _pick_chat_template(config.get("chat_template"))
    if template is None and config.get("chat_template") is not None:
        logger.warning("%s: chat_template has no 'default' entry; chat is unavailable", root)
    return template


def _resolve_eos_ids(root: Path, backend: _Backend, eos_token: str | None) -> list[int]:
    """The tokenizer's EOS token first, then generation_config.json's or config.json's ids."""
    ids: list[int] = []
    if eos_token is not None and (eos_id := backend.token_to_id(eos_token)) is not None:
        ids.append(eos_id)
    generation = _as_id_list(_read_json(root / "generation_config.json").get("eos_token_id"))
    model = _as_id_list(_read_json(root / "config.json").get("eos_token_id"))
    ids.extend(generation or model)
    return list(dict.fromkeys(ids))
