"""shardwire load test: chat sessions, translations and raw generation over gRPC.

    locust -f loadtests/locustfile.py -H 127.0.0.1:50051 --headless -u 8 -r 2 -t 60s \
        --load-shape ramp --slo-ttft-p95-ms 1500 --slo-error-rate 0.01 \
        --csv loadtests/results/run --csv-full-history --html loadtests/results/run.html

Every streamed call reports three kinds of rows (Type column): TTFT, ITL
(inter-token latency) and E2E, named after the task: `chat`,
`translate_short`, `translate_long`, `generate`. See grpc_user.py.

Tasks:
- `chat`: multi-turn sessions from data/chat_sessions.jsonl; each turn sends the
  whole history (with the replies the server gave) under one session_id, so the
  replica's prefix cache serves the earlier turns.
- `translate_short` / `translate_long`: sentences / paragraphs in many languages.
- `generate`: raw text continuation.

Load shapes (`--load-shape`): `steady` holds -u users for -t; `ramp` climbs to
-u in `--ramp-steps` equal plateaus over -t; `spike` holds a quarter of -u,
jumps to -u for the middle fifth of -t, then falls back.

SLOs: `--slo-ttft-p95-ms`, `--slo-itl-p95-ms` and `--slo-error-rate` (failed
calls / calls) are checked when the run ends; a missed one makes locust exit
with code 3, and when all are met failures within the error budget do not fail
the run. Latency SLOs of 0 and a negative error rate (the defaults) are off;
`--slo-error-rate 0` allows no failure at all.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import uuid
from functools import cache
from pathlib import Path
from typing import Any

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # `locust -f` from another directory
    sys.path.insert(0, _ROOT)

from locust import LoadTestShape, between, events, task  # noqa: E402
from locust.env import Environment  # noqa: E402
from locust.runners import MasterRunner, WorkerRunner  # noqa: E402

from clients.client import ChannelSettings  # noqa: E402
from loadtests.grpc_user import CALL_LOG, InferenceUser  # noqa: E402
from loadtests.slo import SHAPES, Slos, check_slos, shape_users  # noqa: E402

logger = logging.getLogger(__name__)

DATA = Path(__file__).resolve().parent / "data"
SLO_MISSED_EXIT_CODE = 3


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("shardwire")
    group.add_argument(
        "--load-shape",
        choices=SHAPES,
        default="steady",
        help="steady, ramp or spike (uses -u and -t)",
    )
    group.add_argument("--ramp-steps", type=int, default=4, help="plateaus of the ramp shape")
    group.add_argument("--max-tokens", type=int, default=48, help="max_tokens of chat turns")
    group.add_argument(
        "--translate-max-tokens",
        type=int,
        default=96,
        help="max_tokens of long translations (short ones get a third)",
    )
    group.add_argument("--generate-max-tokens", type=int, default=64)
    group.add_argument("--temperature", type=float, default=0.7)
    group.add_argument(
        "--ignore-eos",
        action="store_true",
        default=False,
        help="generate max_tokens every time (fixed output lengths)",
    )
    group.add_argument(
        "--max-history-bytes",
        type=int,
        default=1200,
        help="start a new chat session once the history is this long",
    )
    group.add_argument(
        "--itl-per-request",
        action="store_true",
        default=False,
        help="one ITL sample per call (its mean gap), not one per token",
    )
    group.add_argument("--request-timeout", type=float, default=120.0, help="seconds per call")
    group.add_argument(
        "--api-key",
        default=os.environ.get("SHARDWIRE_API_KEY", ""),
        help="sent as `authorization: Bearer KEY` (default: $SHARDWIRE_API_KEY)",
    )
    # Locust's own --tls-cert/--tls-key are its web UI's: these are the gateway's.
    group.add_argument(
        "--gateway-tls", action="store_true", default=False, help="TLS to the gateway"
    )
    group.add_argument("--gateway-ca", default="", help="PEM of the CA that signed the gateway")
    group.add_argument("--gateway-cert", default="", help="client certificate PEM (mutual TLS)")
    group.add_argument("--gateway-key", default="", help="its private key PEM")
    group.add_argument(
        "--gateway-server-name", default="", help="name to check the gateway's certificate against"
    )
    group.add_argument(
        "--slo-ttft-p95-ms",
        type=float,
        default=0.0,
        help="fail the run when TTFT p95 over all tasks exceeds this",
    )
    group.add_argument(
        "--slo-itl-p95-ms",
        type=float,
        default=0.0,
        help="fail the run when ITL p95 over all tasks exceeds this",
    )
    group.add_argument(
        "--slo-error-rate",
        type=float,
        default=-1.0,
        help="fail the run when failed / all calls exceeds this (0..1)",
    )


# -- prompt sets -----------------------------------------------------------------------


@cache
def chat_sessions() -> list[list[str]]:
    return [json.loads(line)["turns"] for line in _lines("chat_sessions.jsonl")]


@cache
def translations(kind: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in _lines(f"translate_{kind}.jsonl")]


@cache
def generate_prompts() -> list[str]:
    return _lines("generate_prompts.txt")


def _lines(name: str) -> list[str]:
    text = (DATA / name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


# -- users ---------------------------------------------------------------------------


def channel_settings(opts: Any) -> ChannelSettings:
    """TLS and the API key from the command line (all optional)."""
    return ChannelSettings.build(
        api_key=getattr(opts, "api_key", "") or None,
        tls=getattr(opts, "gateway_tls", False),
        tls_ca=getattr(opts, "gateway_ca", "") or None,
        tls_cert=getattr(opts, "gateway_cert", "") or None,
        tls_key=getattr(opts, "gateway_key", "") or None,
        tls_server_name=getattr(opts, "gateway_server_name", "") or None,
    )


class ShardwireUser(InferenceUser):
    """A mix of dialogue, translation and generation, as a chat product would see."""

    wait_time = between(0.1, 0.5)

    def __init__(self, environment: Environment) -> None:
        opts = environment.parsed_options
        if opts is not None:
            self.timeout_s = opts.request_timeout
            self.itl_per_request = opts.itl_per_request
            self.channel_settings = channel_settings(opts)
        super().__init__(environment)
        self.opts = opts
        self.rng = random.Random()
        self.session_id = ""
        self.history: list[dict[str, str]] = []
        self.turns: list[str] = []
        self._new_session()

    def _option(self, name: str, default: Any) -> Any:
        return getattr(self.opts, name, default) if self.opts is not None else default

    def _sampling(self, max_tokens: int) -> dict[str, Any]:
        return {
            "max_tokens": max_tokens,
            "temperature": self._option("temperature", 0.7),
            "ignore_eos": self._option("ignore_eos", False),
        }

    def _new_session(self) -> None:
        self.session_id = uuid.uuid4().hex
        self.history = []
        self.turns = list(self.rng.choice(chat_sessions()))

    @task(4)
    def chat(self) -> None:
        if not self.turns or _size(self.history) > self._option("max_history_bytes", 1200):
            self._new_session()
        message = {"role": "user", "content": self.turns.pop(0)}
        messages = [*self.history, message]
        max_tokens = self._option("max_tokens", 48)
        result = self.client.chat(
            "chat", messages, session_id=self.session_id, **self._sampling(max_tokens)
        )
        if result is None:
            self._new_session()
            return
        self.history = [*messages, {"role": "assistant", "content": result.text}]

    @task(3)
    def translate_short(self) -> None:
        item = self.rng.choice(translations("short"))
        max_tokens = max(8, self._option("translate_max_tokens", 96) // 3)
        self.client.translate(
            "translate_short",
            item["text"],
            item["source"],
            item["target"],
            **self._sampling(max_tokens),
        )

    @task(1)
    def translate_long(self) -> None:
        item = self.rng.choice(translations("long"))
        self.client.translate(
            "translate_long",
            item["text"],
            item["source"],
            item["target"],
            **self._sampling(self._option("translate_max_tokens", 96)),
        )

    @task(2)
    def generate(self) -> None:
        prompt = self.rng.choice(generate_prompts())
        max_tokens = self._option("generate_max_tokens", 64)
        self.client.generate("generate", prompt, **self._sampling(max_tokens))


def _size(messages: list[dict[str, str]]) -> int:
    return sum(len(m["content"].encode()) for m in messages)


# -- load shape ----------------------------------------------------------------------


class ShardwireShape(LoadTestShape):
    """steady / ramp / spike, chosen by --load-shape, sized by -u, -r and -t."""

    use_common_options = True
    default_run_time_s = 60

    def tick(self) -> tuple[int, float] | None:
        opts = self.runner.environment.parsed_options if self.runner else None
        users = max(1, int(getattr(opts, "num_users", None) or 1))
        rate = float(getattr(opts, "spawn_rate", None) or users)
        run_time = int(getattr(opts, "run_time", None) or 0)
        shape = getattr(opts, "load_shape", "steady")
        elapsed = self.get_run_time()
        if shape == "steady":
            return None if run_time and elapsed > run_time else (users, rate)
        duration = run_time or self.default_run_time_s
        if elapsed > duration:
            return None
        steps = getattr(opts, "ramp_steps", 4)
        # Ramp plateaus and spikes change the user count at once.
        return shape_users(shape, users, elapsed / duration, steps), float(users)


# -- per-call log for report.py ------------------------------------------------------


@events.test_start.add_listener
def open_call_log(environment: Environment, **_kwargs: Any) -> None:
    """With --csv PREFIX, every call also goes to PREFIX_calls.csv (see report.py)."""
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if prefix and not CALL_LOG.is_open and not isinstance(environment.runner, MasterRunner):
        suffix = f".{os.getpid()}" if isinstance(environment.runner, WorkerRunner) else ""
        CALL_LOG.open(Path(f"{prefix}_calls{suffix}.csv"))


@events.quitting.add_listener
def close_call_log(**_kwargs: Any) -> None:
    CALL_LOG.close()


# -- SLOs ----------------------------------------------------------------------------


@events.quitting.add_listener
def enforce_slos(environment: Environment, **_kwargs: Any) -> None:
    opts = environment.parsed_options
    if opts is None or environment.runner is None:
        return
    slos = Slos.from_options(opts)
    if not slos.any:
        return
    missed = check_slos(environment.runner.stats.entries.values(), slos)
    for line in missed:
        logger.error("SLO missed: %s", line)
    if missed:
        environment.process_exit_code = SLO_MISSED_EXIT_CODE
    else:
        logger.info("all SLOs met")
        if slos.error_rate >= 0:
            environment.process_exit_code = 0
