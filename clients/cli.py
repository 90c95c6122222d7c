"""Client commands: chat (one message or an interactive REPL), translate (one text, or
live: stdin lines as segments), generate, models.

`register(subparsers)` adds them to the `shardwire` console script; they also run
standalone as `python -m clients.cli ...`. Only grpcio and protobuf are needed."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import grpc

from clients.client import DEFAULT_TARGET, Chunk, Client, SegmentChunk

EXIT_COMMANDS = ("/exit", "/quit")


def _add_connection_args(parser: argparse.ArgumentParser) -> None:
    """How to reach the gateway: address, deadline, API key and TLS."""
    parser.add_argument("--target", default=DEFAULT_TARGET, help="gateway host:port")
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SHARDWIRE_API_KEY", ""),
        help="sent as `authorization: Bearer KEY` (default: $SHARDWIRE_API_KEY; on the "
        "command line it is visible in ps: prefer the variable or --api-key-file)",
    )
    parser.add_argument(
        "--api-key-file", default="", help="file holding the key (the first line not a # comment)"
    )
    parser.add_argument(
        "--tls", action="store_true", help="connect with TLS, trusting the system's CAs"
    )
    parser.add_argument("--tls-ca", default="", help="connect with TLS, trusting this CA (PEM)")
    parser.add_argument("--tls-cert", default="", help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--tls-key", default="", help="private key of --tls-cert (PEM)")
    parser.add_argument(
        "--tls-server-name", default="", help="name on the gateway's certificate, if not its host"
    )


def _client(args: argparse.Namespace) -> Client:
    api_key = args.api_key
    if args.api_key_file:
        with open(args.api_key_file) as f:
            lines = (line.strip() for line in f)
            api_key = next((k for k in lines if k and not k.startswith("#")), "")
    return Client(
        args.target,
        timeout=args.timeout,
        api_key=api_key or None,
        tls=args.tls,
        tls_ca=args.tls_ca or None,
        tls_cert=args.tls_cert or None,
        tls_key=args.tls_key or None,
        tls_server_name=args.tls_server_name or None,
    )


def _add_common_args(parser: argparse.ArgumentParser) -> None:
    _add_connection_args(parser)
    parser.add_argument("--model", default="", help="served model id (default: the first)")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--stats", action="store_true", help="print usage and timing to stderr")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "stop": args.stop,
    }


def _print_stats(last: Chunk | SegmentChunk) -> None:
    if last.usage is None or last.timing is None:
        return
    u, t = last.usage, last.timing
    print(
        f"[{last.finish_reason}; {u.prompt_tokens} prompt ({u.cached_prompt_tokens} cached) "
        f"+ {u.completion_tokens} tokens; ttft {t.time_to_first_token_s:.3f} s, "
        f"total {t.total_s:.3f} s]",
        file=sys.stderr,
    )


def _print_stream(chunks: Iterator[Chunk], args: argparse.Namespace, out: TextIO) -> str:
    """Writes text as it streams; returns the whole text."""
    return _print_chunks(chunks, args, out)[0]


def _print_chunks(
    chunks: Iterator[Chunk], args: argparse.Namespace, out: TextIO
) -> tuple[str, Chunk | None]:
    """Writes text as it streams; returns the whole text and the last chunk."""
    pieces: list[str] = []
    last: Chunk | None = None
    for chunk in chunks:
        out.write(chunk.text)
        out.flush()
        pieces.append(chunk.text)
        last = chunk
    out.write("\n")
    if args.stats and last is not None:
        _print_stats(last)
    return "".join(pieces), last


def _run(args: argparse.Namespace, body: Any) -> int:
    try:
        with _client(args) as client:
            body(client)
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    except (OSError, ValueError) as exc:  # unreadable key or certificate files
        print(f"error: {exc}", file=sys.stderr)
        return 2
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


class ReplSession:
    """The REPL's side of a gateway session: sends only new turns (append_only) and
    keeps the conversation locally too, so that a session the gateway dropped
    (idle timeout, eviction) is opened again with the whole conversation."""

    def __init__(self, client: Client, args: argparse.Namespace) -> None:
        self._client = client
        self._args = args
        # An id given with --session belongs to someone else: never closed here.
        self.session_id: str = args.session
        self._owned = not args.session

    def turn(self, history: list[dict[str, str]], new: list[dict[str, str]], out: TextIO) -> str:
        a = self._args
        try:
            stream = self._client.chat(
                new,
                model=a.model,
                session_id=self.session_id,
                append_only=True,
                **_sampling(a),
            )
            answer, last = _print_chunks(stream, a, out)
        except grpc.RpcError as err:
            gone = err.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
            if not (gone and self.session_id and self._owned):
                raise
            print("[session expired on the gateway; starting it again]", file=sys.stderr)
            self.session_id = ""
            stream = self._client.chat(history, model=a.model, append_only=True, **_sampling(a))
            answer, last = _print_chunks(stream, a, out)
        if last is not None and last.session_id and last.session_id != self.session_id:
            self.session_id = last.session_id
            if a.stats:
                print(f"[session {self.session_id}]", file=sys.stderr)
        return answer

    def close(self) -> None:
        if self._owned and self.session_id:
            with contextlib.suppress(grpc.RpcError):
                self._client.close_session(self.session_id)


def chat_repl(
    client: Client, args: argparse.Namespace, lines: TextIO, out: TextIO
) -> list[dict[str, str]]:
    """Reads user turns until EOF or /exit, keeping the conversation; returns it.

    By default the gateway keeps the conversation (a session) and each turn sends
    only the new message; with --no-session every turn sends the whole history."""
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    session = None if getattr(args, "no_session", False) else ReplSession(client, args)
    interactive = lines.isatty()
    try:
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
            turn = {"role": "user", "content": text}
            new = [*history, turn] if session is not None and not session.session_id else [turn]
            history.append(turn)
            if session is not None:
                answer = session.turn(history, new, out)
            else:
                stream = client.chat(
                    history, model=args.model, session_id=args.session, **_sampling(args)
                )
                answer = _print_stream(stream, args, out)
            history.append({"role": "assistant", "content": answer})
    finally:
        if session is not None:
            session.close()
    return history


def cmd_translate(args: argparse.Namespace) -> int:
    if args.live:
        if args.text:
            args.parser.error("--live reads the segments from stdin; give no text")
        return _run(args, lambda client: translate_live(client, args, sys.stdin, sys.stdout))
    if not args.text:
        args.parser.error("give the text to translate (or --live to read stdin)")

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


def _lines(lines: TextIO) -> Iterator[str]:
    """Non-empty stdin lines, read as they come."""
    while line := lines.readline():
        if text := line.strip():
            yield text


def translate_live(client: Client, args: argparse.Namespace, lines: TextIO, out: TextIO) -> int:
    """Sends each input line as a segment; prints each translation as it streams,
    one line per segment. Returns the number of segments translated."""
    stream = client.translate_live(
        _lines(lines),
        source=args.source,
        target=args.target_lang,
        model=args.model,
        context_segments=args.context_segments,
        **_sampling(args),
    )
    count = 0
    for chunk in stream:
        out.write(chunk.text)
        if chunk.is_last:
            out.write("\n")
            count += 1
            if args.stats:
                _print_stats(chunk)
        out.flush()
    return count


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
    chat.add_argument(
        "--session",
        default="",
        help="REPL: continue this gateway session (with --no-session: an affinity key)",
    )
    chat.add_argument(
        "--no-session",
        action="store_true",
        help="REPL: send the whole conversation every turn instead of a gateway session",
    )
    _add_common_args(chat)
    chat.set_defaults(func=cmd_chat)

    translate = subparsers.add_parser("translate", help="translate text")
    translate.add_argument("text", nargs="*")
    translate.add_argument("--from", dest="source", default="auto", help="ISO 639-1 or auto")
    translate.add_argument("--to", dest="target_lang", required=True, help="ISO 639-1 code")
    translate.add_argument(
        "--live",
        action="store_true",
        help="read stdin line by line; each line is a segment, translated as it arrives "
        "with the previous ones as context",
    )
    translate.add_argument(
        "--context-segments",
        type=int,
        default=None,
        help="--live: previous segments kept as context (default: the gateway's)",
    )
    _add_common_args(translate)
    translate.set_defaults(func=cmd_translate, parser=translate)

    generate = subparsers.add_parser("generate", help="continue a raw prompt")
    generate.add_argument("prompt", nargs="+")
    _add_common_args(generate)
    generate.set_defaults(func=cmd_generate)

    models = subparsers.add_parser("models", help="list the served models")
    _add_connection_args(models)
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
