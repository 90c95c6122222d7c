"""Shard.MoveKv and ExportKv when they fail, on a real replica (tiny model): a pre-copy
that armed a pause at an output token and then failed leaves the request going
on here, whether the pause was still waiting or already taken, and frees every
block it held; an export cancelled while its snapshot is taken releases it; a move
reports its stages' times and the CPU time of both ends."""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from shardwire.v1 import inference_pb2, shard_pb2, shard_pb2_grpc

from serve.engine.engine import LLMEngine
from tests.fixtures.servers import idle_free_blocks, servers, shard_status


@pytest.fixture()
def silent_target() -> Iterator[str]:
    """An address that accepts connections and never answers (a hung replica)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        for conn in accepted:
            conn.close()


def _generate(address: str, request: shard_pb2.ShardGenerateRequest, tokens: queue.Queue) -> None:
    """Puts each chunk's token count, then "end" (or the error's status code)."""
    with grpc.insecure_channel(address) as channel:
        try:
            for chunk in shard_pb2_grpc.ShardStub(channel).Generate(request, timeout=120):
                tokens.put(len(chunk.token_ids))
            tokens.put("end")
        except grpc.RpcError as err:
            tokens.put(err.code())


@pytest.mark.parametrize("pause_at", [1, 10_000])
def test_a_failed_pre_copy_lets_the_paused_request_go_on(silent_target: str, pause_at: int) -> None:
    """pause_at 1: the pause is taken at once, before the move fails; 10 000: it is
    still waiting when the move fails."""
    for s in servers():
        address = s.shard()
        total = shard_status(address).kv_blocks_total
        tokens: queue.Queue = queue.Queue()
        request = shard_pb2.ShardGenerateRequest(
            request_id="m1",
            prompt_token_ids=list(range(1, 40)),
            sampling=inference_pb2.SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True),
        )

        threading.Thread(target=_generate, args=(address, request, tokens), daemon=True).start()
        assert isinstance(tokens.get(timeout=30), int)
        move = shard_pb2.MoveKvRequest(
            request_id="m1", target=silent_target, at_output_token=pause_at
        )
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
            shard_pb2_grpc.ShardStub(channel).MoveKv(move, timeout=5.0)
        failed = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert err.value.code() in failed, err.value.details()
        # The request goes on here at once (not after the 30 s an unclaimed pause waits).
        while not tokens.empty():
            tokens.get()
        started = time.monotonic()
        items = []
        while "end" not in items:
            items.append(tokens.get(timeout=20))
            assert not isinstance(items[-1], grpc.StatusCode), items[-1]
        assert time.monotonic() - started < 20
        assert idle_free_blocks(address) == total
        engine = s.shards[0].engine.engine
        assert not engine.suspended


def test_an_export_cancelled_while_its_snapshot_is_taken_releases_it(monkeypatch) -> None:
    """The deadline passes while the engine thread takes the snapshot (its blocks
    held): the snapshot that arrives after the handler is gone is released."""
    snapshot_prefix = LLMEngine.snapshot_prefix

    def slow(self: LLMEngine, token_ids: list[int]) -> object:
        time.sleep(0.5)
        return snapshot_prefix(self, token_ids)

    monkeypatch.setattr(LLMEngine, "snapshot_prefix", slow)
    for s in servers():
        address = s.shard()
        total = shard_status(address).kv_blocks_total
        prompt = list(range(1, 66))
        request = shard_pb2.ShardGenerateRequest(
            request_id="p",
            prompt_token_ids=prompt,
            sampling=inference_pb2.SamplingParams(max_tokens=1),
        )
        tokens: queue.Queue = queue.Queue()
        _generate(address, request, tokens)  # its prompt's KV stays in the prefix cache
        export = shard_pb2.ExportKvRequest(prefix_token_ids=prompt[:64], codec="none")
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
            list(shard_pb2_grpc.ShardStub(channel).ExportKv(export, timeout=0.2))
        assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(1.0)  # the snapshot has been taken (and released) by now
        assert idle_free_blocks(address) == total


@pytest.mark.parametrize("sequential", [False, True])
def test_a_move_reports_its_stages_and_the_cpu_time_of_both_ends(sequential: bool) -> None:
    """What `shardwire bench kv` reads from a MoveKvResponse: the stages' times and
    the CPU time each end's process spent while the move ran (both replicas live in
    this test's process, so each is at most the move's time over every core)."""
    for s in servers():
        source, target = s.shard(), s.shard()
        prompt = list(range(1, 66))
        request = shard_pb2.ShardGenerateRequest(
            request_id="p",
            prompt_token_ids=prompt,
            sampling=inference_pb2.SamplingParams(max_tokens=1),
        )
        _generate(source, request, queue.Queue())  # its prompt's KV stays in the prefix cache
        move = shard_pb2.MoveKvRequest(
            request_id="m", target=target, codec="int8", prefix_token_ids=prompt[:64],
            sequential=sequential,
        )  # fmt: skip
        with grpc.insecure_channel(source) as channel:
            r = shard_pb2_grpc.ShardStub(channel).MoveKv(move, timeout=30.0)
        assert r.moved and r.num_tokens == 64 and 0 < r.wire_bytes < r.raw_bytes
        assert 0 < r.encode_s < r.total_s and 0 < r.decode_s < r.total_s
        assert 0 < r.receive_s < r.total_s
        cores = os.cpu_count() or 1
        assert 0 < r.target_cpu_s <= r.source_cpu_s <= r.total_s * cores
