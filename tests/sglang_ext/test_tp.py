"""Two TP ranks in two processes (gloo): they agree on the host hit, so their batches stay alike."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("tp_rank.py")


@pytest.mark.parametrize("stored, agreed", [
    # Rank 0 holds 3 chunks of the document, rank 1 only 2 and a 48-token tail (say its copy of the
    # third chunk was evicted): both load the 2 chunks every rank holds, no tail (rank 0 has none).
    ((3 * 64, 2 * 64 + 48), 2 * 64),
    # Both hold 2 chunks and the same 32-token tail: both load all of it.
    ((2 * 64 + 32, 2 * 64 + 32), 2 * 64 + 32),
], ids=["shortest_prefix", "same_tail"])
def test_tp_ranks_load_the_longest_prefix_every_rank_holds(tiny_llama_dir, stored, agreed):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(rank), "2", str(port), tiny_llama_dir, str(tokens)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, tokens in enumerate(stored)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        assert r["host_hit"] == agreed, r
        assert r["loaded"] == agreed and r["exact"], r
