"""KV ops on the plan channel: a receiving rank refuses ops outside its model and
KV pool before it allocates anything they size; a TP runner knows which rank's
heads make up the whole KV."""

from __future__ import annotations

import pytest
import torch

from serve.config import EngineConfig
from serve.dist.group import PLAN_KV_READ, KvOp, ParallelGroup, PlanChannel
from serve.dist.plan import HEADER_LEN, PlanError, PlanLimits
from serve.engine.runner import ModelRunner
from serve.model.loader import load_model

LIMITS = PlanLimits(vocab_size=100, num_blocks=16, block_size=4, max_model_len=64, num_layers=2)


class Fed(PlanChannel):
    """A receiving rank whose transport hands over the given tensors in order."""

    def __init__(self, *messages: torch.Tensor) -> None:
        super().__init__(rank=1, size=2)
        self.limits = LIMITS
        self.messages = list(messages)
        self.asked: list[int] = []

    def _recv(self, t: torch.Tensor) -> torch.Tensor:
        self.asked.append(t.numel())
        msg = self.messages.pop(0)
        assert msg.shape == t.shape, "the sender and receiver disagree on a length"
        return t.copy_(msg)


def _header(layer: int, start: int, stop: int, table_len: int) -> torch.Tensor:
    fields = [PLAN_KV_READ, layer, start, stop, table_len]
    return torch.tensor(fields + [0] * (1 + HEADER_LEN - len(fields)))


def test_a_valid_op_comes_through() -> None:
    channel = Fed(_header(1, 3, 9, 3), torch.tensor([4, 0, 15]))
    kind, op = channel.recv()
    assert kind == PLAN_KV_READ
    assert op == KvOp(1, 3, 9, [4, 0, 15])


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (_header(2, 0, 4, 1), "layer"),
        (_header(-1, 0, 4, 1), "layer"),
        (_header(0, 5, 5, 2), "tokens"),
        (_header(0, 0, 1 << 20, 1 << 18), "tokens"),
        (_header(0, 0, 9, 2), "do not fit"),
        (_header(0, 0, 4, 1 << 40), "block table"),
    ],
)
def test_ops_outside_the_pool_are_refused_before_allocating(header, match: str) -> None:
    channel = Fed(header)
    with pytest.raises(PlanError, match=match):
        channel.recv()
    assert channel.asked == [1 + HEADER_LEN]  # the table was never asked for


def test_block_ids_outside_the_pool_are_refused() -> None:
    with pytest.raises(PlanError, match="block ids"):
        Fed(_header(0, 0, 4, 1), torch.tensor([16])).recv()


@pytest.mark.parametrize(("size", "ranks"), [(1, [0]), (2, [0, 1]), (4, [0, 2])])
def test_whole_kv_takes_each_head_piece_from_one_rank(size: int, ranks: list[int]) -> None:
    # tiny has 2 KV heads: over 4 ranks each head is held by two of them.
    net = load_model("tiny", group=ParallelGroup(0, size))
    runner = ModelRunner(net, EngineConfig(), num_blocks=4)
    assert runner.num_kv_heads == 2
    assert runner._piece_ranks == ranks
