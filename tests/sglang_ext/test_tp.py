"""Two TP ranks in two processes (gloo): they agree on the host hit, so their batches stay alike."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("tp_rank.py")


def test_tp_ranks_load_the_shortest_prefix_every_rank_holds(tiny_llama_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Rank 0 holds 3 chunks of the document, rank 1 only 2 (say its copy of the third was evicted).
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(rank), "2", str(port), tiny_llama_dir, str(stored)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, stored in ((0, 3), (1, 2))
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        assert r["host_hit"] == 2 * 64, r  # both ranks: the 2 chunks that every rank holds
        assert r["loaded"] == 2 * 64 and r["exact"], r
