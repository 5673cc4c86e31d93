"""A/B: how much a spill or load-back kernel slows a forward pass running beside it, by grid size.

kvtier's copy kernels read or write pinned host memory from the SMs. A load-back or a spill runs
on a side stream while the scheduler's stream computes; a kernel with one thread block per
32 KiB tile takes every SM it can get, stalls them on PCIe, and may delay the forward pass (the
suspected cost of kvtier's cold passes under concurrency, and the reason a load split into
groups of layers was slower than one launch). HiCache's transfer kernel runs on a few blocks.

For each ``max_programs`` (None = one program per tile, then the given caps) this measures, on
one GPU, a 10K-token Llama-3-8B KV (40 chunks of 32 MiB at random pool pages, small pinned slab):

- the copy alone: gather (spill) and scatter (load-back) GB/s on a side stream;
- a stand-in forward pass alone: ``--matmuls`` bf16 8192x8192 matmuls on the default stream;
- both at once: the copy repeated on the side stream for as long as the matmuls run; the
  matmuls' slowdown and the copy's GB/s meanwhile.

``--staged-rings`` adds the copy-engine path of ``load_path.py`` (the kernels move chunks between
the pool and a small GPU ring in short bursts, the copy engine between the ring and the host): a
background spill that leaves the SMs alone if its slowdown is near 1.

    python benchmarks/copy_interference.py --out benchmarks/results/ab/copy_interference.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Optional

import torch
from bench_common import add_commit_option, run_facts
from load_path import CHUNK, CHUNK_BYTES, DIM, HEADS, LAYERS, PAGE, staged_path, timed_on
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from kvtier.kernels.kv_pages import gather_kv, scatter_kv


def gpu_seconds(stream: torch.cuda.Stream, fn: Callable[[], None]) -> tuple[torch.cuda.Event, torch.cuda.Event]:
    """Queue ``fn`` on ``stream`` between two timing events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record(stream)
        fn()
        end.record(stream)
    return start, end


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=10_240)
    ap.add_argument("--max-programs", type=int, nargs="+", default=[264, 132, 66, 32, 16, 8])
    ap.add_argument("--staged-rings", type=int, nargs="*", default=[2, 8], help="ring sizes in chunks")
    ap.add_argument("--matmuls", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    add_commit_option(ap)
    ap.add_argument("--out", default="benchmarks/results/ab/copy_interference.json")
    args = ap.parse_args()

    pool = MHATokenToKVPool(2 * args.tokens, PAGE, torch.bfloat16, HEADS, DIM, LAYERS, "cuda", False)
    for buf in pool.k_buffer + pool.v_buffer:
        buf.normal_()
    gen = torch.Generator().manual_seed(0)
    n_chunks = args.tokens // CHUNK
    pages = torch.randperm(2 * args.tokens // PAGE - 1, generator=gen)[: args.tokens // PAGE] + 1
    rows = (pages[:, None] * PAGE + torch.arange(PAGE)).flatten().cuda()
    nbytes = n_chunks * CHUNK_BYTES
    slab = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    offsets = torch.arange(n_chunks, dtype=torch.int64) * CHUNK_BYTES
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    side, main_stream = torch.cuda.Stream(), torch.cuda.default_stream()

    ring = torch.empty(max(args.staged_rings, default=0) * CHUNK_BYTES, dtype=torch.uint8, device="cuda")

    def copy(gather: bool, cap: Optional[int], ring_chunks: int = 0) -> Callable[[], None]:
        if ring_chunks:
            return lambda: staged_path(pool, slab, offsets, rows, gather, ring, ring_chunks)
        if gather:
            return lambda: gather_kv(pool.k_buffer, pool.v_buffer, rows, slab, offsets, CHUNK, max_programs=cap)
        return lambda: scatter_kv(slab, offsets, rows, pool.k_buffer, pool.v_buffer, CHUNK, max_programs=cap)

    def matmuls() -> None:
        for _ in range(args.matmuls):
            a @ a

    def together(fn: Callable[[], None], copy_s: float) -> tuple[float, float]:
        """(matmul seconds, copy GB/s) with the copy repeated beside the matmuls."""
        mm_times, copy_rates = [], []
        reps = max(1, round(mm_alone / copy_s))
        for i in range(args.repeats + 1):
            torch.cuda.synchronize()
            c0, c1 = gpu_seconds(side, lambda: [fn() for _ in range(reps)])
            m0, m1 = gpu_seconds(main_stream, matmuls)
            torch.cuda.synchronize()
            if i:
                mm_times.append(m0.elapsed_time(m1) / 1e3)
                copy_rates.append(reps * nbytes / (c0.elapsed_time(c1) / 1e3) / 1e9)
        return median(mm_times), median(copy_rates)

    mm_alone = timed_on(main_stream, matmuls, args.repeats)
    print(f"matmuls alone: {mm_alone * 1e3:.1f} ms", flush=True)
    rows_out = []
    paths = [("kernel", cap, 0) for cap in [None, *args.max_programs]]
    paths += [(f"staged_ring{r}", None, r) for r in args.staged_rings]
    for path, cap, ring_chunks in paths:
        for direction, gather in (("gather", True), ("scatter", False)):
            fn = copy(gather, cap, ring_chunks)
            copy_s = timed_on(side, fn, args.repeats)
            mm_s, copy_gbps = together(fn, copy_s)
            row = {"path": path, "max_programs": cap, "direction": direction,
                   "copy_alone_GBps": round(nbytes / copy_s / 1e9, 2),
                   "copy_beside_matmuls_GBps": round(copy_gbps, 2), "matmuls_alone_ms": round(mm_alone * 1e3, 2),
                   "matmuls_beside_copy_ms": round(mm_s * 1e3, 2), "matmul_slowdown": round(mm_s / mm_alone, 3)}
            print(json.dumps(row), flush=True)
            rows_out.append(row)
    # The last configuration's bytes must still be right: a scatter of the gathered rows restores them.
    expected = [b[rows].clone() for b in pool.k_buffer + pool.v_buffer]
    copy(True, args.max_programs[-1])()
    for b in pool.k_buffer + pool.v_buffer:
        b[rows] = 0
    copy(False, args.max_programs[-1])()
    torch.cuda.synchronize()
    exact = all(torch.equal(b[rows], e) for b, e in zip(pool.k_buffer + pool.v_buffer, expected))
    report = {**run_facts(args.commit), "benchmark": "copy_interference", "gpu": torch.cuda.get_device_name(), "sms":
              torch.cuda.get_device_properties(0).multi_processor_count, "tokens": args.tokens, "bytes": nbytes,
              "bit_exact_at_smallest_cap": exact, "results": rows_out}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"bit exact: {exact}; wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
