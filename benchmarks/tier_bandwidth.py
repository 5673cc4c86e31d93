"""Put/get bandwidth of each kvtier tier on this machine, with Llama-3-8B-shaped chunks; writes JSON.

One chunk = 256 tokens x 32 layers x 8 KV heads x 128 dims x (K, V) x bf16 = 32 MiB.
- cpu put: copy a chunk into a CPU-tier slot (``TierStore.put``); cpu get: copy it out
  (``TierStore.get_into``). On a GPU host the GPU copy kernels read and write the slots directly,
  so these host-to-host figures bound only the copying API, not the GPU path.
- disk write: puts into a CPU tier of 8 chunks, so all but the last 8 are demoted to the
  O_DIRECT slab file; timed until they are on disk.
- disk read: after a restart (empty CPU tier, index rebuilt from the slab), ``get_into`` of the
  demoted chunks: parallel O_DIRECT reads into CPU slots, checksums verified, then copied out.

    python benchmarks/tier_bandwidth.py --disk-path /var/tmp/kvtier-bench --out benchmarks/results/tier_bandwidth.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch

from kvtier.sglang_ext.chunk_keys import KVNamespace
from kvtier.sglang_ext.config import load_config
from kvtier.sglang_ext.tiers.store import TierStore

LAYERS, KV_HEADS, HEAD_DIM, TOKENS = 32, 8, 128, 256
CHUNK_BYTES = TOKENS * LAYERS * KV_HEADS * HEAD_DIM * 2 * 2


def gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3)


def run(args: argparse.Namespace) -> dict:
    n = args.chunks
    total = n * CHUNK_BYTES
    ns = KVNamespace("bench-llama-3-8b-shape", "bfloat16", "mha-nhd:L32:H8:D128:V128:S0", 16, 0, 1, TOKENS)
    keys = ns.chunk_keys(list(range(n * TOKENS)))
    data = [torch.randint(0, 256, (CHUNK_BYTES,), dtype=torch.uint8) for _ in range(n)]
    out = [torch.zeros(CHUNK_BYTES, dtype=torch.uint8) for _ in range(n)]  # touched: no page faults timed
    results: dict = {}

    # CPU tier alone: big enough for every chunk.
    cpu = TierStore(load_config(env={}, cpu_size_gb=(n + 1) * CHUNK_BYTES / 1e9), ns, CHUNK_BYTES)
    start = time.perf_counter()
    assert cpu.put(keys, data) == n
    put_s = time.perf_counter() - start
    start = time.perf_counter()
    assert cpu.get_into(keys, out) == n
    get_s = time.perf_counter() - start
    assert all(torch.equal(a, b) for a, b in zip(out, data))
    results["cpu"] = {"put_GBps": gbps(total, put_s), "get_GBps": gbps(total, get_s)}
    cpu.close()

    # Disk tier under a CPU tier of 8 chunks: every put beyond 8 demotes the oldest chunk.
    disk_dir = Path(args.disk_path)
    shutil.rmtree(disk_dir, ignore_errors=True)
    cfg = load_config(
        env={},
        cpu_size_gb=8.5 * CHUNK_BYTES / 1e9,
        disk_path=str(disk_dir),
        disk_size_gb=(n + 8) * (CHUNK_BYTES + 8192) / 1e9,
        disk_write_queue=4,
    )
    store = TierStore(cfg, ns, CHUNK_BYTES)
    start = time.perf_counter()
    for key, value in zip(keys, data):
        assert store.put([key], [value], wait_s=30.0) == 1
    demoted = n - 8
    store.disk.flush(timeout_s=600)
    write_s = time.perf_counter() - start
    assert all(store.disk.contains(keys[:demoted]))
    store.close()
    # Restart: the CPU tier starts empty, so reads measure the disk alone (index rebuilt).
    store = TierStore(cfg, ns, CHUNK_BYTES)
    start = time.perf_counter()
    assert store.get_into(keys[:demoted], out[:demoted]) == demoted
    read_s = time.perf_counter() - start
    assert all(torch.equal(a, b) for a, b in zip(out, data[:demoted]))
    results["disk"] = {
        "write_GBps": gbps(demoted * CHUNK_BYTES, write_s),
        "read_GBps": gbps(demoted * CHUNK_BYTES, read_s),
        "o_direct": store.disk.o_direct,
        "filesystem": subprocess.run(["stat", "-f", "-c", "%T", str(disk_dir)], capture_output=True, text=True).stdout.strip(),
    }
    store.close()
    shutil.rmtree(disk_dir, ignore_errors=True)

    return {
        "benchmark": "tier_bandwidth",
        "chunk": {"tokens": TOKENS, "layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16", "bytes": CHUNK_BYTES},
        "chunks": n,
        "bytes": total,
        "results": results,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__, "cuda": torch.cuda.is_available()},
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/tier_bandwidth.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=64, help="chunks of 32 MiB per measurement (default 64 = 2 GiB)")
    parser.add_argument("--disk-path", default="/var/tmp/kvtier-bench", help="directory for the disk tier's slab")
    parser.add_argument("--out", default="benchmarks/results/tier_bandwidth.json")
    args = parser.parse_args()
    report = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["results"], indent=2))


if __name__ == "__main__":
    main()
