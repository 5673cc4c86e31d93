"""A/B: which way of writing into another process's GPU memory over CUDA IPC reaches the link.

``transfer_gpu.py`` measured CudaIpcTransport across two NVLink GPUs at 35 GB/s for a write
(process A's GPU 0 into process B's GPU 1) but 256 GB/s for a read (B's GPU 1 into A's GPU 0),
against 392 GB/s for a plain peer copy in one process. This probe moves 655 MB (64 pieces of
10.24 MB, the shape of the transport's batches) from A's GPU 0 into a buffer that B
allocated on GPU 1 and shared through torch's CUDA IPC, every way we could issue it:

- ``torch_copy``: ``dst.copy_(src)``, what the transport does (torch runs it on the source
  GPU's stream);
- ``cudart_dst_stream`` / ``cudart_src_stream``: ``cudaMemcpyAsync`` on a stream of the
  destination / source GPU, so the engine of that GPU does the copy;
- ``bounce``: a peer copy into A's own buffer on GPU 1, then a local copy into B's buffer;
- ``read``: the reverse direction with ``torch_copy``, and ``plain_peer``: ``copy_`` from GPU 0
  into A's own buffer on GPU 1 (the bound).

Each as 64 copies and as one copy of the whole buffer; median of ``--repeats`` after warm-up.

    python benchmarks/ipc_write_paths.py --out benchmarks/results/ab/ipc_write_paths.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from bench_common import add_commit_option, run_facts
import torch.multiprocessing as mp

from kvtier.transfer.cuda_ipc import cuda_runtime

BUFFERS, BUFFER_BYTES = 64, 10_240_000
TOTAL = BUFFERS * BUFFER_BYTES


def owner(queue: mp.Queue, done: mp.Event) -> None:
    """Process B: allocate on GPU 1, share it, stay alive until A is done."""
    buf = torch.zeros(TOTAL, dtype=torch.uint8, device="cuda:1")
    queue.put(buf)
    done.wait()


def timed(fn: Callable[[], None], sync: Callable[[], None], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
        sync()
    out = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(TOTAL / (time.perf_counter() - t) / 1e9)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/ab/ipc_write_paths.json")
    add_commit_option(ap)
    args = ap.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs two GPUs")
    ctx = mp.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=owner, args=(queue, done))
    proc.start()
    try:
        remote = queue.get(timeout=120)  # B's GPU 1 buffer, opened here through CUDA IPC
        src = torch.randint(0, 256, (TOTAL,), dtype=torch.uint8, device="cuda:0")
        own1 = torch.empty(TOTAL, dtype=torch.uint8, device="cuda:1")
        back0 = torch.empty(TOTAL, dtype=torch.uint8, device="cuda:0")
        s0, s1 = torch.cuda.Stream(device=0), torch.cuda.Stream(device=1)
        lib = cuda_runtime()

        def sync() -> None:
            torch.cuda.synchronize(0)
            torch.cuda.synchronize(1)

        def pieces(t: torch.Tensor, whole: bool) -> list[torch.Tensor]:
            return [t] if whole else list(t.view(BUFFERS, BUFFER_BYTES).unbind(0))

        def torch_copy(dst: torch.Tensor, source: torch.Tensor, whole: bool) -> Callable[[], None]:
            def run() -> None:
                for d, s in zip(pieces(dst, whole), pieces(source, whole)):
                    d.copy_(s, non_blocking=True)
            return run

        def raw(stream: torch.cuda.Stream, device: int, whole: bool) -> Callable[[], None]:
            def run() -> None:
                with torch.cuda.device(device):
                    for d, s in zip(pieces(remote, whole), pieces(src, whole)):
                        err = lib.cudaMemcpyAsync(d.data_ptr(), s.data_ptr(), d.numel(), 3, stream.cuda_stream)
                        if err:
                            raise RuntimeError(f"cudaMemcpyAsync error {err}")
            return run

        def bounce(whole: bool) -> Callable[[], None]:
            first, second = torch_copy(own1, src, whole), torch_copy(remote, own1, whole)

            def run() -> None:
                first()
                second()
            return run

        cases: dict[str, dict] = {}
        for whole in (False, True):
            shape = "1x1310MB" if whole else f"{BUFFERS}x{BUFFER_BYTES / 1e6:.2f}MB"
            variants = {
                "torch_copy": torch_copy(remote, src, whole),
                "cudart_dst_stream": raw(s1, 1, whole),
                "cudart_src_stream": raw(s0, 0, whole),
                "bounce": bounce(whole),
                "read": torch_copy(back0, remote, whole),
                "plain_peer": torch_copy(own1, src, whole),
            }
            for name, fn in variants.items():
                remote.zero_()
                sync()
                gbps = timed(fn, sync, args.warmup, args.repeats)
                exact = bool(torch.equal(remote.to("cuda:0"), src)) if name not in ("read", "plain_peer") else None
                cases[f"{name}/{shape}"] = {"GBps": [round(g, 1) for g in gbps], "GBps_median": round(statistics.median(gbps), 1),
                                           "bit_exact": exact}
                print(f"{name:18s} {shape:12s} {statistics.median(gbps):7.1f} GB/s  exact={exact}", flush=True)
    finally:
        done.set()
        proc.join(timeout=30)
    report = {"benchmark": "ipc_write_paths", "bytes": TOTAL, "gpus": [torch.cuda.get_device_name(i) for i in range(2)],
              "torch": torch.__version__, **run_facts(args.commit), "cases": cases}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
