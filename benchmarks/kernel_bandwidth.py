"""GB/s of the KV gather/scatter kernels against a plain pinned copy, measured side by side (GPU).

A 10,000-token Llama-3-8B KV (32 layers x 8 KV heads x 128 dims x K,V, bf16: 1.31 GB) sits at
random pages of SGLang's ``MHATokenToKVPool``; ``gather_kv`` moves it into a pinned ``HostSlab`` as
chunks and ``scatter_kv`` moves it back to other random pages. The reference in the same run is
``copy_`` of one contiguous 1.31 GB tensor between GPU and pinned host memory, i.e. the PCIe link.

    python benchmarks/kernel_bandwidth.py --out benchmarks/results/kernel_bandwidth.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
from pathlib import Path

import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from kvtier.kernels.kv_pages import gather_kv, scatter_kv
from kvtier.sglang_ext.tiers.host_memory import HostSlab

LAYERS, HEADS, DIM, PAGE, CHUNK = 32, 8, 128, 16, 256


def timed(fn, repeats: int) -> float:
    """Best of ``repeats`` (seconds), after one untimed warm-up run."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def random_rows(n_tokens: int, pool_pages: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint random page layouts of ``n_tokens`` rows each (page 0 is SGLang's pad)."""
    pages = torch.randperm(pool_pages - 1, generator=gen)[: 2 * (n_tokens // PAGE)] + 1
    rows = (pages[:, None] * PAGE + torch.arange(PAGE)).flatten().cuda()
    return rows[:n_tokens], rows[n_tokens:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=10_240, help="multiple of 256; 10,240 = 40 chunks")
    ap.add_argument("--pool-tokens", type=int, default=40_960, help="at least 2 x --tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/kernel_bandwidth.json")
    args = ap.parse_args()

    pool = MHATokenToKVPool(args.pool_tokens, PAGE, torch.bfloat16, HEADS, DIM, LAYERS, "cuda", False)
    gen = torch.Generator().manual_seed(0)
    for buf in pool.k_buffer + pool.v_buffer:
        buf.normal_()
    n_chunks = args.tokens // CHUNK
    chunk_bytes = CHUNK * LAYERS * HEADS * DIM * 2 * 2
    nbytes = n_chunks * chunk_bytes
    slab = HostSlab(nbytes)
    offsets = torch.arange(n_chunks, dtype=torch.int64) * chunk_bytes
    src_rows, dst_rows = random_rows(args.tokens, args.pool_tokens // PAGE, gen)

    gather_s = timed(lambda: gather_kv(pool.k_buffer, pool.v_buffer, src_rows, slab.tensor, offsets, CHUNK), args.repeats)
    scatter_s = timed(lambda: scatter_kv(slab.tensor, offsets, dst_rows, pool.k_buffer, pool.v_buffer, CHUNK), args.repeats)
    torch.cuda.synchronize()
    exact = all(torch.equal(b[src_rows].view(torch.int16), b[dst_rows].view(torch.int16)) for b in pool.k_buffer + pool.v_buffer)

    flat_gpu = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    d2h_s = timed(lambda: slab.tensor.copy_(flat_gpu, non_blocking=True), args.repeats)
    h2d_s = timed(lambda: flat_gpu.copy_(slab.tensor, non_blocking=True), args.repeats)

    gbps = lambda s: round(nbytes / s / 1e9, 2)  # noqa: E731
    report = {
        "benchmark": "kernel_bandwidth",
        "tokens": args.tokens,
        "bytes": nbytes,
        "gpu": torch.cuda.get_device_name(),
        "gather_to_pinned_GBps": gbps(gather_s),
        "scatter_from_pinned_GBps": gbps(scatter_s),
        "plain_d2h_copy_GBps": gbps(d2h_s),
        "plain_h2d_copy_GBps": gbps(h2d_s),
        "gather_vs_plain": round(d2h_s / gather_s, 3),
        "scatter_vs_plain": round(h2d_s / scatter_s, 3),
        "gather_ms": round(gather_s * 1e3, 2),
        "scatter_ms": round(scatter_s * 1e3, 2),
        "round_trip_bit_exact": exact,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f"python benchmarks/kernel_bandwidth.py --tokens {args.tokens} --pool-tokens {args.pool_tokens} --repeats {args.repeats}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
