"""Put and get GB/s through ``launch.store`` on this host (Llama-3-8B 32 MiB chunks); writes JSON.

Starts ``python -m kvtier.launch.store`` as its own process, one client TierStore puts ``--chunks``
chunks (timed until the remote writes are done), a second client with an empty CPU tier gets them.

    python benchmarks/store_throughput.py --out benchmarks/results/store_throughput.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from kvtier.sglang_ext.chunk_keys import KVNamespace
from kvtier.sglang_ext.config import load_config
from kvtier.sglang_ext.tiers.store import TierStore

CHUNK = 256 * 32 * 8 * 128 * 2 * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "kvtier.launch.store", "--port", str(port), "--token", "bench", "--chunk-bytes", str(CHUNK),
         "--cpu-size-gb", str((args.chunks + 2) * CHUNK / 1e9)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert "listening" in server.stdout.readline()
        ns = KVNamespace("bench", "bfloat16", "mha-nhd:L32:H8:D128:V128:S0", 16, 0, 1, 256)
        keys = ns.chunk_keys(list(range(args.chunks * 256)))
        data = [torch.randint(0, 256, (CHUNK,), dtype=torch.uint8) for _ in keys]
        cfg = load_config(env={}, cpu_size_gb=(args.chunks + 2) * CHUNK / 1e9,
                          remote_url=f"kvtier://127.0.0.1:{port}?token=bench", remote_timeout_s=5.0)
        writer, reader = TierStore(cfg, ns, CHUNK), TierStore(cfg, ns, CHUNK)
        start = time.perf_counter()
        assert writer.put(keys, data) == len(keys)
        writer.remote.flush(timeout_s=600)
        put_s = time.perf_counter() - start
        out = [torch.zeros(CHUNK, dtype=torch.uint8) for _ in keys]
        start = time.perf_counter()
        assert reader.get_into(keys, out) == len(keys)
        get_s = time.perf_counter() - start
        exact = all(torch.equal(a, b) for a, b in zip(out, data))
        writer.close()
        reader.close()
    finally:
        server.terminate()
        server.wait(60)
    total = len(keys) * CHUNK
    report = {
        "benchmark": "store_throughput",
        "transport": "zmq (loopback, two processes)",
        "chunk_bytes": CHUNK,
        "chunks": len(keys),
        "put_GBps": round(total / put_s / 1e9, 2),
        "get_GBps": round(total / get_s / 1e9, 2),
        "bit_exact": exact,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f"python benchmarks/store_throughput.py --chunks {args.chunks}",
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
