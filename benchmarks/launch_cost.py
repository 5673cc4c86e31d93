"""The calling thread's time to launch one spill or load through ``PoolIO``, by chunks per copy.

Every kvtier copy is launched from SGLang's scheduler thread (at eviction, by ``spill_deferred``
and ``launch_loads``), so what a launch costs that thread delays the next batch; the copy itself
runs on a side stream. This times ``PoolIO.to_host`` (a guarded spill, as at eviction),
``to_host`` unguarded (a spill ahead) and ``to_device`` (a load, in ``--load-layer-groups``
launches) over a real SGLang ``MHATokenToKVPool`` of the Llama-3-8B shape and a ``HostSlab``
(pinned on CUDA): argument checks, stream and event bookkeeping and the kernel launch(es); and,
as parts of a spill, its argument checks alone and the checked kernel call (``KVPool.gather``). On
CUDA the GPU is synchronized before each timed call, so a call's time is its own and not a wait
behind an earlier copy. ``--no-copies`` (CPU only) moves no byte, leaving the rest. Each size
first makes one round trip (spill random rows, load them into other rows) and checks that it is
bit-exact, unless ``--no-copies``.

A thread that has just waited for the GPU runs slower for a while (on an H100 host a 40-element CPU
``torch.aminmax`` took 4 us back to back and 42-70 us after a synchronize that waited 10-40 ms; as
slow after a sleep, with any CUDA schedule flag, ``cold_thread.py``), and the synchronize before
each timed call waits for the previous call's copy, longer for more chunks. So on CUDA ``after_gpu_wait`` also times the checked kernel call of 1 and
of the most chunks and the load of 1 chunk as ``--load-layer-groups`` launches, and that aminmax as
a plain CPU reference, each after the GPU was kept busy ``--gpu-wait-ms`` before the wait: what a
launch costs SGLang's scheduler thread, which waits for each step's results. The wait is
``torch.cuda.synchronize`` (``synchronize``, as SGLang's) or, with ``spin`` in ``--wait-modes``, a
Python loop polling a CUDA event.

    python benchmarks/launch_cost.py --out benchmarks/results/ab/launch_cost.json
    python benchmarks/launch_cost.py --device cpu --no-copies --out /tmp/launch_cost_cpu.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from bench_common import BENCHMARKS_DIR, add_commit_option, percentile, run_facts
from hook_cost import skip_copies
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from kvtier.kernels import kv_pages
from kvtier.sglang_ext.pool_io import PoolIO
from kvtier.sglang_ext.tiers.host_memory import HostSlab

HEADS, DIM, CHUNK = 8, 128, 256


@functools.cache
def spin_cycles_per_ms(device: torch.device) -> float:
    """GPU clock cycles of ``torch.cuda._sleep`` per millisecond, measured (the SM clock varies)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(10_000_000)  # warm the clock up
    start.record()
    torch.cuda._sleep(50_000_000)
    end.record()
    end.synchronize()
    return 50_000_000 / start.elapsed_time(end)


def wait_gpu(device: torch.device, mode: str = "synchronize") -> None:
    """Wait until ``device`` is idle: ``synchronize``, or ``spin`` on an event's query from Python."""
    if mode == "synchronize":
        torch.cuda.synchronize(device)
        return
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    while not done.query():
        pass


def timed_us(fn: Callable[[], object], repeats: int, device: torch.device, gpu_wait_ms: float = 0.0,
             wait_mode: str = "synchronize") -> dict[str, float]:
    """Median and p90 of ``fn``'s own time in microseconds over ``repeats`` calls, after 5 untimed;
    on CUDA each after waiting (``wait_gpu``) for the GPU, kept busy ``gpu_wait_ms`` first."""
    times = []
    cycles = int(gpu_wait_ms * spin_cycles_per_ms(device)) if gpu_wait_ms else 0
    for i in range(5 + repeats):
        if device.type == "cuda":
            if cycles:
                torch.cuda._sleep(cycles)
            wait_gpu(device, wait_mode)
        start = time.perf_counter()
        fn()
        if i >= 5:
            times.append(time.perf_counter() - start)
    return {"median_us": round(statistics.median(times) * 1e6, 1), "p90_us": round(percentile(times, 90) * 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--chunks", default="1,8,40", help="chunks per copy, comma-separated")
    ap.add_argument("--pool-tokens", type=int, default=24_576, help="at least 2 x the largest copy's tokens")
    ap.add_argument("--load-layer-groups", type=int, default=8, help="launches per load (the server's default "
                                                                      "under SGLang's breakable prefill graph)")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-copies", action="store_true", help="CPU only: move no byte, time everything else")
    ap.add_argument("--gpu-wait-ms", default="0,1,10,40",
                    help="CUDA only: GPU busy times before the wait for after_gpu_wait, comma-separated")
    ap.add_argument("--wait-modes", default="synchronize,spin",
                    help="CUDA only: how after_gpu_wait waits (synchronize, spin), comma-separated")
    ap.add_argument("--out", default=str(BENCHMARKS_DIR / "results" / "ab" / "launch_cost.json"))
    add_commit_option(ap)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("launch_cost.py --device cuda needs a CUDA GPU (or pass --device cpu)")
    if args.no_copies:
        if device.type != "cpu":
            raise SystemExit("--no-copies is for --device cpu")
        skip_copies()
    sizes = [int(n) for n in args.chunks.split(",")]
    if 2 * max(sizes) * CHUNK > args.pool_tokens - 1:
        raise SystemExit(f"--pool-tokens {args.pool_tokens} is too small for two copies of {max(sizes)} chunks")

    pool = MHATokenToKVPool(args.pool_tokens, 1, torch.bfloat16, HEADS, DIM, args.layers, args.device, False)
    torch.manual_seed(args.seed)
    for buf in pool.k_buffer + pool.v_buffer:
        buf.normal_()  # on the pool's device: 64 x 25M random values
    gen = torch.Generator().manual_seed(args.seed)
    chunk_bytes = CHUNK * args.layers * HEADS * DIM * 2 * 2
    slab = HostSlab(max(sizes) * chunk_bytes, pin=device.type == "cuda")
    io = PoolIO(pool.k_buffer, pool.v_buffer, CHUNK, slab.tensor, load_layer_groups=args.load_layer_groups)
    io.warm_up()
    views = [slab.tensor[i * chunk_bytes : (i + 1) * chunk_bytes] for i in range(max(sizes))]
    offsets = torch.arange(max(sizes), dtype=torch.int64) * chunk_bytes

    results: dict[str, dict] = {}
    exact: dict[str, bool] = {}
    for n in sizes:
        # Two disjoint random row sets (row 0 is SGLang's padding row), on the pool's device as the tree's are.
        rows = (torch.randperm(args.pool_tokens - 1, generator=gen)[: 2 * n * CHUNK] + 1).to(device)
        src, dst = rows[: n * CHUNK], rows[n * CHUNK :]
        if not args.no_copies:
            io.to_host(src, views[:n], lambda: None).wait()
            io.to_device(views[:n], dst, lambda: None).wait()
            exact[str(n)] = all(torch.equal(b[src].view(torch.int16), b[dst].view(torch.int16))
                                for b in pool.k_buffer + pool.v_buffer)
        done = lambda: None  # noqa: E731
        results[str(n)] = {
            "spill_guarded": timed_us(lambda: io.to_host(src, views[:n], done), args.repeats, device),
            "spill_unguarded": timed_us(lambda: io.to_host(src, views[:n], done, guard=False, owners=(n,)),
                                        args.repeats, device),
            "load": timed_us(lambda: io.to_device(views[:n], dst, done), args.repeats, device),
            # Parts of a spill: the argument checks alone, then the checks and the kernel launch (the rest
            # of spill_unguarded is PoolIO's stream, event and completion bookkeeping).
            "spill_checks": timed_us(lambda: kv_pages._check(io.pool, src, slab.tensor, offsets[:n], CHUNK, "dst",
                                                             True), args.repeats, device),
            "spill_kernel_call": timed_us(lambda: io.pool.gather(src, slab.tensor, offsets[:n], CHUNK),
                                          args.repeats, device),
        }
        io.guard_pending()
        print(f"{n} chunk(s): " + ", ".join(f"{op} {t['median_us']} us" for op, t in results[str(n)].items()),
              flush=True)
    if exact and not all(exact.values()):
        raise SystemExit(f"a round trip was not bit-exact: {exact}")

    after_wait: dict[str, dict] = {}
    if device.type == "cuda":
        n_max = max(sizes)
        rows = (torch.randperm(args.pool_tokens - 1, generator=gen)[: n_max * CHUNK] + 1).to(device)
        small = offsets.clone()
        for mode in args.wait_modes.split(","):
            if mode not in ("synchronize", "spin"):
                raise SystemExit(f"--wait-modes: {mode!r} is not synchronize or spin")
            after_wait[mode] = {}
            for ms in (float(x) for x in args.gpu_wait_ms.split(",")):
                after_wait[mode][f"{ms:g}"] = case = {
                    "cpu_aminmax": timed_us(lambda: torch.aminmax(small), args.repeats, device, ms, mode),
                    "spill_kernel_call_1": timed_us(lambda: io.pool.gather(rows[:CHUNK], slab.tensor, offsets[:1],
                                                                           CHUNK), args.repeats, device, ms, mode),
                    f"spill_kernel_call_{n_max}": timed_us(lambda: io.pool.gather(rows, slab.tensor, offsets, CHUNK),
                                                           args.repeats, device, ms, mode),
                    "load_kernel_calls_1": timed_us(lambda: io.pool.scatter(slab.tensor, offsets[:1], rows[:CHUNK],
                                                                            CHUNK, groups=io.load_groups),
                                                    args.repeats, device, ms, mode),
                }
                print(f"after the GPU was busy {ms:g} ms ({mode}): " + ", ".join(
                    f"{op} {t['median_us']} us" for op, t in case.items()), flush=True)

    report = {
        "benchmark": "launch_cost",
        "workload": {"device": device.type, "layers": args.layers, "heads": HEADS, "head_dim": DIM,
                     "dtype": "bfloat16", "chunk_tokens": CHUNK, "load_layer_groups": len(io.load_groups),
                     "repeats": args.repeats, "copies": not args.no_copies},
        **run_facts(args.commit),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "round_trip_bit_exact": exact or None,
        "by_chunks": results,
        "after_gpu_wait": after_wait or None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
