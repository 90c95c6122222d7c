"""Lossy activation codecs on a real TP=2 group (two gloo processes on
loopback, the `shardwire bench tp` harness): prompts long enough that prefill
all-reduces exceed the small-message threshold, so the codecs are on the path.

int8 must keep greedy tokens and logits close to `none`, int8 and int4 must put
fewer bytes on the wire than they reduce, and micro-chunked prefill steps
(overlapped all-reduces) must give the whole step's logits, and with codec
`none` the greedy tokens of transformers on prompts long enough to be cut."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from serve.launch import free_port
from tests.fixtures.hf_checkpoints import CheckpointFactory
from tests.integration.dist.test_tp import _serve_and_generate
from tests.integration.test_parity_grpc import _greedy_reference, _prompt

ROOT = Path(__file__).resolve().parents[3]
PROMPT_LEN = 300  # x hidden 128 x 4 bytes: 150 KB prefill messages, over the 64 KB threshold


def _run_harness(tmp_path: Path) -> dict:
    out = tmp_path / "tp.json"
    common = [
        "--world", "2", "--master", f"127.0.0.1:{free_port()}", "--model", "tiny",
        "--codecs", "none,int8,int4", "--prompts", "3", "--prompt-len", str(PROMPT_LEN),
        "--max-tokens", "16", "--timing-tokens", str(PROMPT_LEN), "--timing-reps", "1",
        "--overlap-chunks", "1,2,3", "--timeout-s", "60",
    ]  # fmt: skip
    env = {
        **os.environ,
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    procs = []
    for rank in range(2):
        argv = [sys.executable, "-m", "serve.bench.tp_harness", "--rank", str(rank), *common]
        if rank == 0:
            argv += ["--out", str(out)]
        procs.append(
            subprocess.Popen(
                argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, (_, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed:\n{err[-3000:]}"
    return json.loads(out.read_text())


def test_int8_and_int4_on_a_two_rank_group(tmp_path: Path) -> None:
    result = _run_harness(tmp_path)
    codecs = result["codecs"]

    ref = codecs["none"]["accuracy"]
    assert ref["kl_mean"] == 0.0 and ref["top1_agreement"] == 1.0, ref
    assert ref["positions"] == 3 * 16

    int8 = codecs["int8"]["accuracy"]
    assert int8["top1_agreement"] >= 0.9, int8
    assert int8["free_run_agreement"] >= 0.9, int8
    assert int8["kl_mean"] < 0.01, int8
    assert codecs["int4"]["accuracy"]["kl_mean"] > int8["kl_mean"]

    for name in ("int8", "int4"):
        coded = codecs[name]["coded"]
        assert name in coded, f"no {name} all-reduce happened: {coded}"
        assert coded[name]["wire_bytes"] < coded[name]["raw_bytes"], coded
    assert codecs["int8"]["coded"]["int8"]["wire_vs_raw"] < 0.3  # float32: 1 byte + scales
    assert codecs["int4"]["coded"]["int4"]["wire_vs_bf16"] <= 0.30
    # Decode steps (3 tokens x 512 bytes) stay on the exact path.
    assert codecs["int8"]["coded"]["none"]["wire_vs_raw"] == 1.0

    # Micro-chunked steps: the whole step's logits up to float rounding.
    for name in ("none", "int8"):
        steps = codecs[name]["timing"]["by_chunks"]
        for k in ("2", "3"):
            assert steps[k]["same_argmax"], (name, k, steps[k])
            assert steps[k]["max_abs_logit_diff"] < 1e-3, (name, k, steps[k])
    # int8 in three pieces of 100 tokens would send 51 KB messages, under the
    # 64 KB codec threshold: that step is not cut. Two rounds (warm-up, timed) of
    # k=1 (whole), k=2 (two pieces), k=3 (whole), each piece 1 + 2 x 4 layers messages.
    per_step = 1 + 2 * 4
    assert codecs["int8"]["timing"]["coded"]["int8"]["messages"] == 2 * per_step * (1 + 2 + 1)


def test_long_prompts_cut_into_pieces_keep_parity(checkpoint_factory: CheckpointFactory) -> None:
    ckpt = checkpoint_factory("llama")
    # >= 256 tokens in a step: the default policy cuts it in two (codec none, gloo).
    prompts = [_prompt(ckpt, n, seed=7 + n) for n in (300, 400)]
    reference = [_greedy_reference(ckpt, p, max_tokens=64) for p in prompts]
    assert _serve_and_generate(str(ckpt.path), 2, prompts) == reference
