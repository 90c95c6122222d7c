"""clients: request building, chunk conversion, the CLI's parser, and that the
client side (and the gateway) never import torch."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from shardwire.v1 import inference_pb2

from clients import cli
from clients.client import (
    Chunk,
    Timing,
    Usage,
    chat_messages,
    chunk_from_proto,
    generate_request,
    sampling_params,
    translate_request,
)


def test_sampling_params_skip_none_and_accept_one_stop_string() -> None:
    msg = sampling_params(max_tokens=8, temperature=None, seed=3, stop="END", ignore_eos=True)
    assert msg.HasField("max_tokens") and msg.max_tokens == 8
    assert not msg.HasField("temperature")
    assert msg.seed == 3 and list(msg.stop) == ["END"] and msg.ignore_eos
    assert list(sampling_params(stop=["a", "b"]).stop) == ["a", "b"]
    with pytest.raises(TypeError, match="max_token"):
        sampling_params(max_token=3)


def test_chat_messages_from_str_dicts_and_pairs() -> None:
    assert [(m.role, m.content) for m in chat_messages("hi")] == [("user", "hi")]
    mixed = chat_messages([{"role": "system", "content": "s"}, ("user", "u")])
    assert [(m.role, m.content) for m in mixed] == [("system", "s"), ("user", "u")]


def test_generate_request_takes_text_or_token_ids() -> None:
    assert generate_request("abc", "").prompt == "abc"
    by_ids = generate_request([1, 2, 3], "tiny", max_tokens=4)
    assert list(by_ids.prompt_token_ids) == [1, 2, 3] and by_ids.prompt == ""
    assert by_ids.model == "tiny" and by_ids.sampling.max_tokens == 4


def test_translate_request_fields() -> None:
    msg = translate_request("Hallo", "de", "en", "", temperature=0.0)
    assert (msg.text, msg.source_lang, msg.target_lang) == ("Hallo", "de", "en")
    assert msg.sampling.HasField("temperature") and msg.sampling.temperature == 0.0


def test_chunk_from_proto() -> None:
    middle = inference_pb2.GenerateChunk(text="he", token_ids=[104, 101])
    assert chunk_from_proto(middle) == Chunk("he", (104, 101))
    last = inference_pb2.GenerateChunk(
        text="!",
        token_ids=[33],
        finish_reason=inference_pb2.FINISH_REASON_LENGTH,
        usage=inference_pb2.Usage(prompt_tokens=5, completion_tokens=3, cached_prompt_tokens=2),
        timing=inference_pb2.Timing(queue_s=0.5, time_to_first_token_s=1.0, total_s=2.0),
    )
    assert chunk_from_proto(last) == Chunk(
        "!", (33,), "length", Usage(5, 3, 2), Timing(0.5, 1.0, 2.0)
    )


def test_register_adds_client_commands() -> None:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["translate", "--from", "en", "--to", "de", "good", "day"])
    assert (args.source, args.target_lang, args.text) == ("en", "de", ["good", "day"])
    assert args.target == "127.0.0.1:50051" and args.func is cli.cmd_translate
    args = parser.parse_args(["chat", "--target", "h:1", "--max-tokens", "5", "--seed", "2"])
    assert args.message == [] and args.target == "h:1" and args.func is cli.cmd_chat
    assert (args.max_tokens, args.seed, args.temperature) == (5, 2, None)
    assert parser.parse_args(["generate", "x", "--temperature", "0"]).temperature == 0.0
    assert parser.parse_args(["models"]).func is cli.cmd_models


def test_cli_runs_standalone() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clients.cli", "translate", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and "--from" in result.stdout and "--target" in result.stdout


def test_unreachable_gateway_is_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["models", "--target", "127.0.0.1:1", "--timeout", "2"])
    assert rc == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


@pytest.mark.parametrize(
    "module", ["clients.client", "clients.cli", "serve.gateway.app", "serve.gateway.servicer"]
)
def test_module_does_not_import_torch(module: str) -> None:
    forbidden = ("torch",) if module.startswith("serve") else ("torch", "tokenizers", "jinja2")
    code = f"import sys, {module}; sys.exit(int(any(m in sys.modules for m in {forbidden!r})))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
