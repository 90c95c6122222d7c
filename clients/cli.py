"""Client commands: chat (one message or an interactive REPL), translate, generate, models.

`register(subparsers)` adds them to the `shardwire` console script; they also run
standalone as `python -m clients.cli ...`. Only grpcio and protobuf are needed."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import grpc

from clients.client import DEFAULT_TARGET, Chunk, Client

EXIT_COMMANDS = ("/exit", "/quit")


def _add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=DEFAULT_TARGET, help="gateway host:port")
    parser.add_argument("--model", default="", help="served model id (default: the first)")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    parser.add_argument("--stats", action="store_true", help="print usage and timing to stderr")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "stop": args.stop,
    }


def _print_stream(chunks: Iterator[Chunk], args: argparse.Namespace, out: TextIO) -> str:
    """Writes text as it streams; returns the whole text."""
    pieces: list[str] = []
    last: Chunk | None = None
    for chunk in chunks:
        out.write(chunk.text)
        out.flush()
        pieces.append(chunk.text)
        last = chunk
    out.write("\n")
    if args.stats and last is not None and last.usage is not None and last.timing is not None:
        u, t = last.usage, last.timing
        print(
            f"[{last.finish_reason}; {u.prompt_tokens} prompt ({u.cached_prompt_tokens} cached) "
            f"+ {u.completion_tokens} tokens; ttft {t.time_to_first_token_s:.3f} s, "
            f"total {t.total_s:.3f} s]",
            file=sys.stderr,
        )
    return "".join(pieces)


def _run(args: argparse.Namespace, body: Any) -> int:
    try:
        with Client(args.target, timeout=args.timeout) as client:
            body(client)
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    if args.message:

        def once(client: Client) -> None:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            messages.append({"role": "user", "content": " ".join(args.message)})
            stream = client.chat(messages, model=args.model, **_sampling(args))
            _print_stream(stream, args, sys.stdout)

        return _run(args, once)
    return _run(args, lambda client: chat_repl(client, args, sys.stdin, sys.stdout))


def chat_repl(
    client: Client, args: argparse.Namespace, lines: TextIO, out: TextIO
) -> list[dict[str, str]]:
    """Reads user turns until EOF or /exit, keeping the conversation; returns it."""
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = lines.isatty()
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = lines.readline()
        if not line:
            break
        text = line.strip()
        if text in EXIT_COMMANDS:
            break
        if not text:
            continue
        history.append({"role": "user", "content": text})
        stream = client.chat(history, model=args.model, session_id=args.session, **_sampling(args))
        answer = _print_stream(stream, args, out)
        history.append({"role": "assistant", "content": answer})
    return history


def cmd_translate(args: argparse.Namespace) -> int:
    def once(client: Client) -> None:
        stream = client.translate(
            " ".join(args.text),
            source=args.source,
            target=args.target_lang,
            model=args.model,
            **_sampling(args),
        )
        _print_stream(stream, args, sys.stdout)

    return _run(args, once)


def cmd_generate(args: argparse.Namespace) -> int:
    def once(client: Client) -> None:
        stream = client.generate(" ".join(args.prompt), model=args.model, **_sampling(args))
        _print_stream(stream, args, sys.stdout)

    return _run(args, once)


def cmd_models(args: argparse.Namespace) -> int:
    def show(client: Client) -> None:
        for m in client.list_models():
            print(
                f"{m.id}\tcontext {m.max_context}\tvocab {m.vocab_size}\ttp {m.tp_size}"
                f"\t{m.dtype}\treplicas {m.num_replicas}"
            )

    return _run(args, show)


def register(subparsers: Any) -> None:
    """Adds chat, translate, generate and models to an argparse subparsers object."""
    chat = subparsers.add_parser("chat", help="chat with the model (no message: interactive)")
    chat.add_argument("message", nargs="*", help="the message; omit for an interactive chat")
    chat.add_argument("--system", default="", help="system prompt")
    chat.add_argument("--session", default="", help="session id (routes turns together)")
    _add_common_args(chat)
    chat.set_defaults(func=cmd_chat)

    translate = subparsers.add_parser("translate", help="translate text")
    translate.add_argument("text", nargs="+")
    translate.add_argument("--from", dest="source", default="auto", help="ISO 639-1 or auto")
    translate.add_argument("--to", dest="target_lang", required=True, help="ISO 639-1 code")
    _add_common_args(translate)
    translate.set_defaults(func=cmd_translate)

    generate = subparsers.add_parser("generate", help="continue a raw prompt")
    generate.add_argument("prompt", nargs="+")
    _add_common_args(generate)
    generate.set_defaults(func=cmd_generate)

    models = subparsers.add_parser("models", help="list the served models")
    models.add_argument("--target", default=DEFAULT_TARGET, help="gateway host:port")
    models.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    models.set_defaults(func=cmd_models)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clients.cli", description=__doc__)
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
