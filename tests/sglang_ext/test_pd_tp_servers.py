"""kvtier PD between real SGLang 0.5.17 servers of different TP sizes (needs two CUDA GPUs).

A ``--tp 2`` prefill (GPUs 0 and 1) feeds a ``--tp 1`` decode, and a ``--tp 1`` prefill feeds a
``--tp 2`` decode; greedy tokens must equal a plain ``--tp 1`` server's. The model is a tiny
Llama (2 KV heads, so each TP-2 rank holds one) with random weights saved to disk, so that every
TP layout loads the same weights (dummy loading draws each rank's shard on its own), in float32 so
that the TP-2 ranks' reduction order cannot flip a greedy token.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

_spec = importlib.util.spec_from_file_location("kvtier_test_pd_servers_for_tp",
                                               Path(__file__).with_name("test_pd_servers.py"))
_servers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_servers)
Server, pd_generate, free_port = _servers.Server, _servers.pd_generate, _servers.free_port

WEIGHTS = ["--load-format", "auto", "--dtype", "float32"]  # after BASE_ARGS' --load-format dummy: the last wins


def tiny_llama_with_weights(path: str) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig.from_pretrained(_servers.sglang_objects.tiny_llama(path))
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(path)
    return path


@pytest.mark.timeout(590)  # five servers start one after another
def test_tp2_prefill_to_tp1_decode_and_back_match_a_single_server(tmp_path, monkeypatch):
    # Five servers share two GPUs, so a TP-2 server starts beside the others' memory on one of its GPUs; SGLang's
    # start-time check takes that for a foreign process and refuses (seen on 2x H200): warn instead.
    monkeypatch.setenv("SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK", "false")
    model = tiny_llama_with_weights(str(tmp_path / "model"))
    ports = {"p2": free_port(), "p1": free_port()}
    pd = lambda mode, port: ("--disaggregation-mode", mode, "--disaggregation-transfer-backend", "kvtier",  # noqa: E731
                             "--disaggregation-bootstrap-port", str(port))
    plan = {
        "reference": (),
        "p2": ("--tp", "2", *pd("prefill", ports["p2"])),
        "d1": pd("decode", ports["p2"]),
        "p1": pd("prefill", ports["p1"]),
        "d2": ("--tp", "2", *pd("decode", ports["p1"])),
    }
    servers: dict = {}
    try:
        for name, args in plan.items():  # one at a time (see test_pd_servers)
            servers[name] = Server(model, tmp_path / f"{name}.log", *WEIGHTS, *args)
            servers[name].wait_ready()
        gen = torch.Generator().manual_seed(0)
        for i, length in enumerate((5, 300, 1500)):
            ids = torch.randint(10, 900, (length,), generator=gen).tolist()
            ref: dict = {}
            servers["reference"].generate({"input_ids": ids, "sampling_params": {"temperature": 0,
                                                                                 "max_new_tokens": 12}}, ref, "r")
            for room, (prefill, decode) in enumerate((("p2", "d1"), ("p1", "d2")), start=2000 + 10 * i):
                got = pd_generate(servers[prefill], servers[decode], ports[prefill], ids, room=room, n=12)
                assert got["d"][0] == 200, (prefill, decode, got)
                assert got["d"][1]["output_ids"] == ref["r"][1]["output_ids"], (prefill, decode, length, got["d"][1],
                                                                                ref["r"][1])
        assert all(s.healthy() for s in servers.values())
    finally:
        for s in servers.values():
            s.stop()
