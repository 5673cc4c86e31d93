"""A/B: can a kernel on GPU 0 store into another process's GPU 1 pool mapped by CUDA IPC, and how fast.

Process B allocates a 10,000-token Llama-3-8B pool on GPU 1 (64 buffers of 10,000 rows x 2,048
bytes, one allocation) and hands its raw CUDA IPC handle to process A. A opens the handle with
GPU ``--map-on`` current: ``owner`` (GPU 1, as CudaIpcTransport.connect maps regions by default) or
``local`` (GPU 0, the GPU whose kernels will store into it, as NCCL maps its peers' buffers and
``connect(map_device=...)`` does for PD's direct path), enables
peer access from GPU 0 to GPU 1, and runs ``copy_kv_rows`` from its own pool on GPU 0 into B's
pool (random rows, all 64 buffers in one launch). It checks the bytes and reports GB/s. Each
variant in its own process: an illegal address would poison the CUDA context.

    python benchmarks/ipc_kernel_probe.py --map-on owner --out benchmarks/results/ab/ipc_kernel_owner.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_common import add_commit_option, run_facts
import torch.multiprocessing as mp

from kvtier.kernels.kv_pages import copy_kv_rows
from kvtier.transfer.cuda_ipc import enable_peer_access, open_handle

BUFFERS, ROWS, ROW_BYTES = 64, 10_000, 2048
TOTAL = BUFFERS * ROWS * ROW_BYTES


def owner(queue: mp.Queue, done: mp.Event) -> None:
    """Process B: the pool on GPU 1; its raw IPC handle goes to A; stays alive until A is done."""
    pool = torch.zeros(TOTAL, dtype=torch.uint8, device="cuda:1")
    share = pool.untyped_storage()._share_cuda_()
    queue.put({"handle": share[1], "size": share[2], "offset": share[3]})
    done.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--map-on", choices=("owner", "local"), required=True)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", required=True)
    add_commit_option(ap)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=owner, args=(queue, done))
    proc.start()
    result: dict = {"map_on": args.map_on}
    try:
        info = queue.get(timeout=120)
        enable_peer_access(0, 1)
        device = 1 if args.map_on == "owner" else 0
        storage = open_handle(device, info["handle"], info["size"], info["offset"])
        remote = torch.empty(0, dtype=torch.uint8, device=storage.device)
        remote.set_(storage, 0, (TOTAL,), (1,))
        dst = list(remote.view(BUFFERS, ROWS, ROW_BYTES).unbind(0))
        src_pool = torch.randint(0, 256, (BUFFERS, ROWS, ROW_BYTES), dtype=torch.uint8, device="cuda:0")
        src = list(src_pool.unbind(0))
        gen = torch.Generator().manual_seed(0)
        src_rows = torch.randperm(ROWS, generator=gen)
        dst_rows = torch.randperm(ROWS, generator=gen)
        times = []
        for i in range(args.repeats + 2):
            torch.cuda.synchronize(0)
            t = time.perf_counter()
            copy_kv_rows(src[0::2], src[1::2], dst[0::2], dst[1::2], src_rows, dst_rows)
            torch.cuda.synchronize(0)
            if i >= 2:
                times.append(time.perf_counter() - t)
        expected = torch.empty_like(src_pool)
        expected[:, dst_rows.cuda(0)] = src_pool[:, src_rows.cuda(0)]
        got = remote.view(BUFFERS, ROWS, ROW_BYTES).to("cuda:0")
        gbps = [TOTAL / s / 1e9 for s in times]
        result.update(ok=True, bit_exact=bool(torch.equal(got, expected)), GBps=[round(g, 1) for g in gbps],
                      GBps_median=round(statistics.median(gbps), 1), mapped_device=str(storage.device))
    except Exception as e:  # the question is whether it works: record the failure
        result.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
    finally:
        done.set()
        proc.join(timeout=30)
    report = {**run_facts(args.commit), "benchmark": "ipc_kernel_probe", "bytes": TOTAL,
              "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], **result}
    print(json.dumps({k: v for k, v in report.items() if k != "GBps"}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
