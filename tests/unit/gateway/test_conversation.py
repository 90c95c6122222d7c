"""serve.gateway.conversation: each turn's prompt starts with the ids of the
previous prompt and answer (so the prefix cache serves them), and equals the
whole conversation tokenized when the answer's text is all the model gave."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from serve.gateway.conversation import Conversation
from serve.gateway.prompts import ChatMessage
from serve.model.tokenizer import Tokenizer

BUILTIN = Tokenizer.builtin()
END = BUILTIN.encode("<|end|>", add_special_tokens=False)[0]
EOS = BUILTIN.eos_token_ids[0]
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
USER_TURNS = ("Hello there!", "Wie spät ist es? 😀", "and  spaces\tand\nlines", "ok")


def _bpe_tokenizer() -> Tokenizer:
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["Hello there, how are you? I am fine.", "Wie spät ist es? Es ist spät."] * 20
    backend.train_from_iterator(corpus, trainer=trainer)
    return Tokenizer(
        backend,
        special_tokens={"eos_token": "<|im_end|>"},
        chat_template=QWEN_TEMPLATE,
        eos_token_ids=[backend.token_to_id("<|im_end|>")],
    )


def _canonical(tok: Tokenizer, messages: list[ChatMessage]) -> list[int]:
    turns = [{"role": m.role, "content": m.content} for m in messages]
    return tok.encode_chat(turns, add_generation_prompt=True)


@pytest.mark.parametrize("tok", [BUILTIN, _bpe_tokenizer()], ids=["builtin", "bpe"])
def test_turns_extend_the_previous_prompt_and_match_the_whole_conversation(tok: Tokenizer) -> None:
    conv = Conversation(tok)
    history: list[ChatMessage] = []
    previous: tuple[int, ...] = ()
    for i, text in enumerate(USER_TURNS):
        turn = conv.prompt([ChatMessage("user", text)])
        history.append(ChatMessage("user", text))
        assert list(turn.token_ids) == _canonical(tok, history)
        assert turn.token_ids[: len(previous)] == previous
        assert turn.num_kept_tokens == conv.num_tokens
        answer = f"Answer {i}: fine."
        ids = [*tok.encode(answer, add_special_tokens=False), tok.eos_token_ids[-1]]
        conv.append(turn, answer, ids)
        history.append(ChatMessage("assistant", answer))
        # The prompt, then the model's answer; its EOS is the template's closing token.
        previous = (*turn.token_ids, *ids)
        assert conv.token_ids[: len(previous)] == previous


def test_the_models_own_tokenization_is_kept() -> None:
    tok = _bpe_tokenizer()
    conv = Conversation(tok)
    turn = conv.prompt([ChatMessage("user", "Hello there")])
    answer = "Hello there"
    canonical = tok.encode(answer, add_special_tokens=False)
    by_letter = [tok.encode(ch, add_special_tokens=False)[0] for ch in answer]
    assert by_letter != canonical and tok.decode(by_letter) == answer
    conv.append(turn, answer, by_letter)
    following = conv.prompt([ChatMessage("user", "again")])
    assert following.token_ids[: len(turn.token_ids) + len(by_letter)] == (
        *turn.token_ids,
        *by_letter,
    )


@pytest.mark.parametrize(
    ("answer", "generated"),
    [
        ("\ufffd\ufffd", [0xFF, 0xFE]),  # invalid UTF-8: the client saw replacement characters
        ("cut here", list(b"cut here STOP more")),  # a stop string cut the text
        ("", [EOS]),  # end of sequence at once
        ("x" * 5, list(b"xxxxx")),  # max_tokens: no closing token generated
    ],
)
def test_answers_are_kept_as_the_client_saw_them(answer: str, generated: list[int]) -> None:
    conv = Conversation(BUILTIN)
    turn = conv.prompt([ChatMessage("user", "hi")])
    conv.append(turn, answer, generated)
    following = conv.prompt([ChatMessage("user", "next")])
    messages = [
        ChatMessage("user", "hi"),
        ChatMessage("assistant", answer),
        ChatMessage("user", "next"),
    ]
    assert list(following.token_ids) == _canonical(BUILTIN, messages)
    assert following.token_ids[: len(turn.token_ids)] == turn.token_ids
    assert following.token_ids[len(turn.token_ids) + len(answer.encode())] == END


def test_a_template_that_rerenders_earlier_turns_falls_back_to_the_whole_text() -> None:
    template = (
        "{{ bos_token }}[{{ messages | length }} messages]"
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    base = Tokenizer.builtin()
    tok = Tokenizer(
        base._backend,
        special_tokens={"bos_token": "<|bos|>"},
        chat_template=template,
        eos_token_ids=base.eos_token_ids,
    )
    conv = Conversation(tok)
    first = conv.prompt([ChatMessage("user", "a")])
    conv.append(first, "b", list(b"b"))
    second = conv.prompt([ChatMessage("user", "c")])
    assert second.num_kept_tokens == 0
    messages = [ChatMessage("user", "a"), ChatMessage("assistant", "b"), ChatMessage("user", "c")]
    assert list(second.token_ids) == _canonical(tok, messages)


def test_a_conversation_rebuilt_from_text_continues_like_a_kept_one() -> None:
    messages = [ChatMessage("user", "a"), ChatMessage("assistant", "b")]
    rebuilt = Conversation(BUILTIN, messages)
    turn = rebuilt.prompt([ChatMessage("user", "c")])
    assert list(turn.token_ids) == _canonical(BUILTIN, [*messages, ChatMessage("user", "c")])
    assert rebuilt.num_bytes == 2


def test_appended_changes_nothing_until_committed() -> None:
    conv = Conversation(BUILTIN)
    turn = conv.prompt([ChatMessage("user", "a")])
    state = conv.appended(turn, "b", [])
    assert conv.messages == () and conv.num_tokens == 0
    conv.commit(state)
    assert conv.messages == (ChatMessage("user", "a"), ChatMessage("assistant", "b"))
    assert list(conv.token_ids) == list(state[2])
