"""Write and read GB/s of a transfer backend between two processes on this host; writes JSON.

A child process registers a region and hands its descriptor to the parent through a pipe; the
parent writes ``--mib`` MiB into it (and reads it back) ``--repeats`` times over 127.0.0.1, as one
range or, with ``--range-kib``, as one batch of ranges of that size (KV pages).

    python benchmarks/transfer_loopback.py --backend zmq --out benchmarks/results/transfer_loopback_zmq.json
    python benchmarks/transfer_loopback.py --backend ucx --out benchmarks/results/transfer_loopback_ucx.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path

import torch
from bench_common import run_facts

from kvtier.transfer.backends import KINDS, open_transport


def receiver(backend: str, nbytes: int, conn) -> None:
    region = torch.zeros(nbytes, dtype=torch.uint8)
    with open_transport(backend) as transport:
        transport.register("bench", region)
        conn.send(transport.descriptor())
        conn.recv()  # until the parent is done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=list(KINDS), default="zmq")
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--range-kib", type=int, default=0, help="0: one range of --mib MiB")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    nbytes = args.mib << 20
    ctx = mp.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    child = ctx.Process(target=receiver, args=(args.backend, nbytes, child_end))
    child.start()
    try:
        descriptor = parent_end.recv()
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        back = torch.zeros(nbytes, dtype=torch.uint8)
        writes, reads = [], []
        with open_transport(args.backend) as transport:
            peer = transport.connect(descriptor)
            step = (args.range_kib << 10) or nbytes
            write_ops = [(src[i : i + step], "bench", i) for i in range(0, nbytes, step)]
            read_ops = [("bench", i, back[i : i + step]) for i in range(0, nbytes, step)]
            for _ in range(args.repeats):
                start = time.perf_counter()
                transport.write(peer, write_ops, timeout_s=60)
                writes.append(nbytes / (time.perf_counter() - start) / 1e9)
                start = time.perf_counter()
                transport.read(peer, read_ops, timeout_s=60)
                reads.append(nbytes / (time.perf_counter() - start) / 1e9)
            exact = torch.equal(src, back)
        parent_end.send("done")
    finally:
        child.join(30)
    report = {
        "benchmark": "transfer_loopback",
        "backend": args.backend,
        "bytes": nbytes,
        "range_bytes": (args.range_kib << 10) or nbytes,
        "write_GBps": [round(x, 2) for x in writes],
        "read_GBps": [round(x, 2) for x in reads],
        "write_GBps_median": round(sorted(writes)[len(writes) // 2], 2),
        "read_GBps_median": round(sorted(reads)[len(reads) // 2], 2),
        "bit_exact": exact,
        "ucx_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("UCX_")},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        **run_facts(),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
