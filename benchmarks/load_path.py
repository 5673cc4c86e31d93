"""Which host<->GPU path moves chunks fastest under server conditions (GPU; an A/B for pool_io).

The server's loads took 95-117 ms of GPU time for 10K tokens against 27 ms in isolation. This
measures the candidate causes and remedies side by side on one GPU, moving the same 10K-token
Llama-3-8B KV (40 chunks of 32 MiB, random pool pages) in both directions:

- ``kernel``: the Triton kernels reading/writing pinned host memory directly (SM-driven, today's path);
- ``staged``: the copy engine moves each chunk between the host slot and a small GPU staging ring
  (``--ring`` chunks), and the kernels gather/scatter between ring and pool on the GPU;

each with the chunks in a small slab (1.31 GB) or spread at random over a server-sized one
(``--slab-gb``), with 4 KiB pages or transparent huge pages, and idle or next to a compute load
on the default stream (bf16 matmuls, standing in for the forward pass).

    python benchmarks/load_path.py --out benchmarks/results/ab/load_path.json
"""

from __future__ import annotations

import argparse
import json
import mmap
import threading
from pathlib import Path

import torch
from bench_common import run_facts
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from kvtier.kernels.kv_pages import gather_kv, scatter_kv

LAYERS, HEADS, DIM, PAGE, CHUNK = 32, 8, 128, 16, 256
CHUNK_BYTES = CHUNK * LAYERS * HEADS * DIM * 2 * 2


def pinned_slab(nbytes: int, huge: bool) -> tuple[mmap.mmap, torch.Tensor]:
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    m = mmap.mmap(-1, nbytes, flags=flags if huge else flags | mmap.MAP_POPULATE)
    if huge:
        m.madvise(mmap.MADV_HUGEPAGE)
    t = torch.frombuffer(m, dtype=torch.uint8)
    if huge:
        t.zero_()  # fault the pages in after the advice, as huge pages where the kernel allows
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)
    assert int(err) == 0, f"cudaHostRegister failed: {int(err)}"
    return m, t


def kernel_path(pool, slab, offsets, rows, gather: bool) -> None:
    if gather:
        gather_kv(pool.k_buffer, pool.v_buffer, rows, slab, offsets, CHUNK)
    else:
        scatter_kv(slab, offsets, rows, pool.k_buffer, pool.v_buffer, CHUNK)


def staged_path(pool, slab, offsets, rows, gather: bool, ring: torch.Tensor, ring_chunks: int) -> None:
    """Chunks move through the ring ``ring_chunks`` at a time; one stream keeps the ring safe."""
    n = len(offsets)
    ring_offsets = torch.arange(ring_chunks, dtype=torch.int64) * CHUNK_BYTES
    for g in range(0, n, ring_chunks):
        k = min(ring_chunks, n - g)
        part = rows[g * CHUNK : (g + k) * CHUNK]
        if gather:
            gather_kv(pool.k_buffer, pool.v_buffer, part, ring, ring_offsets[:k], CHUNK)
            for j in range(k):
                o = int(offsets[g + j])
                slab[o : o + CHUNK_BYTES].copy_(ring[j * CHUNK_BYTES : (j + 1) * CHUNK_BYTES], non_blocking=True)
        else:
            for j in range(k):
                o = int(offsets[g + j])
                ring[j * CHUNK_BYTES : (j + 1) * CHUNK_BYTES].copy_(slab[o : o + CHUNK_BYTES], non_blocking=True)
            scatter_kv(ring, ring_offsets[:k], part, pool.k_buffer, pool.v_buffer, CHUNK)


def timed_on(stream: torch.cuda.Stream, fn, repeats: int) -> float:
    """Median GPU seconds of ``fn`` on ``stream`` after one warm-up."""
    times = []
    for i in range(repeats + 1):
        with torch.cuda.stream(stream):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
        end.synchronize()
        if i:
            times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


class ComputeLoad:
    """Back-to-back bf16 matmuls on the default stream until stopped (a stand-in forward pass)."""

    def __init__(self) -> None:
        self.a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        s = torch.cuda.default_stream()
        while not self._stop.is_set():
            with torch.cuda.stream(s):
                for _ in range(8):
                    self.a @ self.a
            s.synchronize()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=10_240)
    ap.add_argument("--pool-tokens", type=int, default=40_960)
    ap.add_argument("--slab-gb", type=float, default=30)
    ap.add_argument("--ring", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/ab/load_path.json")
    args = ap.parse_args()

    pool = MHATokenToKVPool(args.pool_tokens, PAGE, torch.bfloat16, HEADS, DIM, LAYERS, "cuda", False)
    for buf in pool.k_buffer + pool.v_buffer:
        buf.normal_()
    gen = torch.Generator().manual_seed(0)
    n_chunks = args.tokens // CHUNK
    pages = torch.randperm(args.pool_tokens // PAGE - 1, generator=gen)[: 2 * (args.tokens // PAGE)] + 1
    rows = (pages[:, None] * PAGE + torch.arange(PAGE)).flatten().cuda()
    src, dst = rows[: args.tokens], rows[args.tokens :]
    nbytes = n_chunks * CHUNK_BYTES
    side = torch.cuda.Stream()
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()

    results = []
    slabs = [("small", nbytes, False), ("large", int(args.slab_gb * 2**30) // CHUNK_BYTES * CHUNK_BYTES, False),
             ("large_thp", int(args.slab_gb * 2**30) // CHUNK_BYTES * CHUNK_BYTES, True)]
    max_ring = max(args.ring)
    ring = torch.empty(max_ring * CHUNK_BYTES, dtype=torch.uint8, device="cuda")
    for slab_name, size, huge in slabs:
        m, slab = pinned_slab(size, huge)
        offsets = torch.randperm(size // CHUNK_BYTES, generator=gen)[:n_chunks] * CHUNK_BYTES
        paths = [("kernel", lambda g, o=offsets: kernel_path(pool, slab, o, src if g else dst, g))]
        for r in args.ring:
            paths.append((f"staged_ring{r}", lambda g, o=offsets, r=r: staged_path(pool, slab, o, src if g else dst, g, ring, r)))
        for load in (False, True):
            for name, fn in paths:
                def measure():
                    return {
                        "gather_GBps": round(nbytes / timed_on(side, lambda: fn(True), args.repeats) / 1e9, 2),
                        "scatter_GBps": round(nbytes / timed_on(side, lambda: fn(False), args.repeats) / 1e9, 2),
                    }
                if load:
                    with ComputeLoad():
                        r = measure()
                else:
                    r = measure()
                row = {"slab": slab_name, "slab_bytes": size, "path": name, "compute_load": load, **r}
                torch.cuda.synchronize()
                # each path's result must be the pool rows bit for bit
                fn(True)
                torch.cuda.synchronize()
                fn(False)
                torch.cuda.synchronize()
                row["bit_exact"] = all(torch.equal(b[src], b[dst]) for b in pool.k_buffer + pool.v_buffer)
                print(json.dumps(row), flush=True)
                results.append(row)
        torch.cuda.cudart().cudaHostUnregister(slab.data_ptr())
        del slab
        m.close()

    flat_gpu = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    _, plain = pinned_slab(nbytes, False)
    report = {
        "benchmark": "load_path",
        "gpu": torch.cuda.get_device_name(),
        "tokens": args.tokens,
        "bytes": nbytes,
        "transparent_hugepage": thp,
        "plain_h2d_GBps": round(nbytes / timed_on(side, lambda: flat_gpu.copy_(plain, non_blocking=True), args.repeats) / 1e9, 2),
        "plain_d2h_GBps": round(nbytes / timed_on(side, lambda: plain.copy_(flat_gpu, non_blocking=True), args.repeats) / 1e9, 2),
        "results": results,
        **run_facts(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
