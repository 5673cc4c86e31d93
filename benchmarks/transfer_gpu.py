"""GB/s of GPU-to-GPU KV moves between two processes through CudaIpcTransport, against the bound.

The payload is a 10,000-token Llama-3-8B KV: 32 layers x K,V x 10,000 tokens x 8 KV heads x 128
dims x bf16 = 64 buffers of 20.48 MB, 1.31 GB. Process B registers one region per buffer and hands
its descriptor to process A (this script) through a pipe; A moves all 64 buffers with one
``write`` batch (and one ``read`` back, checked bit for bit). Cases, each with warm-up runs and
the median of ``--repeats``:

- ``cuda_ipc_same_gpu``: both processes on GPU 0; the bound is ``b.copy_(a)`` of the same bytes
  within one process on GPU 0.
- ``cuda_ipc_cross_gpu`` (two or more GPUs): A's GPU 0 into B's GPU 1; the bound is a plain torch
  peer copy ``b.copy_(a)`` from GPU 0 to GPU 1 in one process.
- ``direct_rows`` (two or more GPUs): PD's direct path. The 64 buffers are a KV pool of 10,000
  rows (page_size 1) on A's GPU 0 and one that B allocated on GPU 1; A maps B's pool by CUDA IPC
  (``peer_regions``) and ``copy_kv_rows`` stores every row, in random order, into random rows of
  B's pool with one kernel launch on GPU 0 (rows handed over from host memory each time, as PD
  does per chunk); checked bit for bit by reading B's pool back. The bound is the plain peer copy.
  ``direct_rows_ordered`` copies rows in order (as a fresh server's pages mostly are): an A/B of
  the row order.
- ``direct_packer`` (two or more GPUs): the same store, through what PD's prefill does per chunk
  (``KvtierKVManager._send_direct``): ``CudaIpcTransport.peer_regions`` (the liveness check),
  ``Packer.copy_target`` (rebuilt only when the transport hands out other mappings, as PD keeps
  them), ``Packer.copy_rows`` after a scheduler event (row tensors, the kernel, the
  stream sync, CUDA events timing the copy) and a ``K`` notification that B's transport
  acknowledges. Each step is timed; the copy's GPU time is what ``kvtier_pd_copy_seconds_total``
  counts in serving. Measured twice: with both processes idle, and with a Python thread spinning
  in each (``busy_gil``), as SGLang's scheduler loops do while a request is in flight, so every
  wait that lets go of the GIL (the stream sync, the acknowledgement) has to win it back (a thread
  that never blocks is the worst case: CPython hands the GIL over after ``sys.getswitchinterval()``,
  5 ms). ``--switch-interval-ms X`` adds a third run, ``busy_gil_switch``, with that interval in
  both processes.
- ``zmq_pinned_loopback``: the ZMQ transport over 127.0.0.1 between pinned host buffers, for
  reference.

    python benchmarks/transfer_gpu.py   # writes benchmarks/results/transfer_gpu_<N>gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from bench_common import run_facts

from kvtier.transfer.base import TransferError, Transport

LAYERS, HEADS, DIM, ELEM = 32, 8, 128, 2


def make_transport(kind: str) -> Transport:
    from kvtier.transfer.backends import open_transport

    return open_transport(kind)


def receiver(kind: str, device: str, buffer_bytes: int, count: int, conn, spin: bool = False,
             switch_s: Optional[float] = None) -> None:
    """Process B: registers ``count`` regions on ``device`` ("cpu" means pinned host memory) and
    takes the notifications that arrive; with ``spin`` a Python thread keeps the GIL busy, handed
    over every ``switch_s`` if given."""
    if switch_s is not None:
        sys.setswitchinterval(switch_s)
    if device == "cpu":
        flat = torch.zeros(buffer_bytes * count, dtype=torch.uint8).pin_memory()
    else:
        flat = torch.zeros(buffer_bytes * count, dtype=torch.uint8, device=device)
    stop = threading.Event()
    with make_transport(kind) as transport, spinning(spin):
        for i in range(count):
            transport.register(f"kv{i}", flat[i * buffer_bytes : (i + 1) * buffer_bytes])

        def drain() -> None:
            while not stop.is_set():
                with contextlib.suppress(TransferError):
                    transport.recv_notification(0.1)

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        conn.send(transport.descriptor())
        with contextlib.suppress(EOFError):  # A failed and closed its end
            conn.recv()  # until process A closed its side
        stop.set()
        drainer.join()


@contextlib.contextmanager
def spinning(on: bool) -> Iterator[None]:
    """With ``on``, a Python thread that never blocks runs meanwhile, as a serving scheduler's loop."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    thread = threading.Thread(target=spin, daemon=True)
    if on:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if on:
            thread.join()


@contextlib.contextmanager
def switch_interval(seconds: Optional[float]) -> Iterator[None]:
    """``sys.setswitchinterval(seconds)`` meanwhile; None leaves it as it is."""
    interval = sys.getswitchinterval()
    if seconds is not None:
        sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


@contextlib.contextmanager
def process_b(kind: str, device: str, buffer_bytes: int, count: int, spin: bool = False,
              switch_s: Optional[float] = None) -> Iterator[object]:
    """Starts ``receiver`` as process B and yields its transport descriptor; when the body is done,
    B is told to finish (it stays up meanwhile, its regions mapped) and joined."""
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=receiver, args=(kind, device, buffer_bytes, count, there, spin, switch_s), daemon=True)
    child.start()
    there.close()  # so that recv() below fails if B dies
    try:
        yield here.recv()
        here.send("done")
    finally:
        here.close()
        child.join(60)


def read_back_exact(transport: Transport, peer, names: list[str], buffer_bytes: int, src: list[torch.Tensor],
                    src_rows: torch.Tensor, dst_rows: torch.Tensor) -> bool:
    """Reads B's regions back to GPU 0: does row ``dst_rows[i]`` of each hold row ``src_rows[i]`` of its source?"""
    back = torch.empty(len(names) * buffer_bytes, dtype=torch.uint8, device="cuda:0")
    transport.read(peer, [(name, 0, back[i * buffer_bytes : (i + 1) * buffer_bytes])
                          for i, name in enumerate(names)], timeout_s=120)
    s_rows, d_rows = src_rows.cuda(0), dst_rows.cuda(0)
    return all(torch.equal(back[i * buffer_bytes : (i + 1) * buffer_bytes].view(s.shape)[d_rows], s[s_rows])
               for i, s in enumerate(src))


def timed(fn: Callable[[], None], warmup: int, repeats: int) -> list[float]:
    """Wall seconds of each of ``repeats`` calls after ``warmup`` untimed ones; fn must block."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def gbps(nbytes: int, times: list[float]) -> list[float]:
    return [round(nbytes / t / 1e9, 2) for t in times]


def plain_copy(src: torch.Tensor, dst_device: str, warmup: int, repeats: int) -> list[float]:
    dst = torch.empty_like(src, device=dst_device)

    def run() -> None:
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(src.device)
        torch.cuda.synchronize(dst.device)

    times = timed(run, warmup, repeats)
    assert torch.equal(dst.to(src.device), src)
    return times


def case(kind: str, src_device: str, dst_device: str, buffer_bytes: int, count: int,
         warmup: int, repeats: int) -> dict:
    """Moves ``count`` buffers from ``src_device`` here to regions on ``dst_device`` in process B."""
    nbytes = buffer_bytes * count
    with process_b(kind, dst_device, buffer_bytes, count) as descriptor:
        if src_device == "cpu":
            src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).pin_memory()
            back = torch.zeros(nbytes, dtype=torch.uint8).pin_memory()
        else:
            src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=src_device)
            back = torch.zeros(nbytes, dtype=torch.uint8, device=src_device)
        pieces = [(i * buffer_bytes, f"kv{i}") for i in range(count)]
        writes = [(src[o : o + buffer_bytes], name, 0) for o, name in pieces]
        reads = [(name, 0, back[o : o + buffer_bytes]) for o, name in pieces]
        with make_transport(kind) as transport:
            peer = transport.connect(descriptor)
            write_s = timed(lambda: transport.write(peer, writes, timeout_s=120), warmup, repeats)
            read_s = timed(lambda: transport.read(peer, reads, timeout_s=120), warmup, repeats)
            exact = torch.equal(src, back)
    write, read = gbps(nbytes, write_s), gbps(nbytes, read_s)
    return {
        "transport": kind,
        "from": f"process A {src_device}" + (" (pinned)" if src_device == "cpu" else ""),
        "to": f"process B {dst_device}" + (" (pinned)" if dst_device == "cpu" else ""),
        "ops_per_batch": count,
        "write_GBps": write,
        "read_GBps": read,
        "write_GBps_median": statistics.median(write),
        "read_GBps_median": statistics.median(read),
        "write_ms_median": round(statistics.median(write_s) * 1e3, 3),
        "bit_exact": exact,
    }


def direct_rows_case(buffer_bytes: int, count: int, tokens: int, warmup: int, repeats: int,
                     ordered: bool = False) -> dict:
    """Pool rows on GPU 0 here into random rows (``ordered``: the same rows, in order, as a fresh
    server's pages mostly are) of a pool that process B allocated on GPU 1."""
    from kvtier.kernels.kv_pages import copy_kv_rows
    from kvtier.transfer.cuda_ipc import enable_peer_access

    row = buffer_bytes // tokens
    names = [f"kv{i}" for i in range(count)]
    layers = count // 2
    with process_b("cuda_ipc", "cuda:1", buffer_bytes, count) as descriptor:
        torch.cuda.set_device(0)
        src = [torch.randint(0, 256, (tokens, row), dtype=torch.uint8, device="cuda:0") for _ in names]
        gen = torch.Generator().manual_seed(0)
        src_rows, dst_rows = torch.randperm(tokens, generator=gen), torch.randperm(tokens, generator=gen)
        if ordered:
            src_rows = dst_rows = torch.arange(tokens)
        enable_peer_access(0, 1)  # before mapping, as PD's prefill does
        with make_transport("cuda_ipc") as transport:
            peer = transport.connect(descriptor, map_device=0)  # opened where the kernel runs, as PD's prefill does

            def run() -> None:
                dst = [t.view(tokens, row) for t in transport.peer_regions(peer, names)]
                copy_kv_rows(src[:layers], src[layers:], dst[:layers], dst[layers:], src_rows, dst_rows)
                torch.cuda.synchronize(0)

            times = timed(run, warmup, repeats)
            exact = read_back_exact(transport, peer, names, buffer_bytes, src, src_rows, dst_rows)
    rates = gbps(buffer_bytes * count, times)
    return {
        "path": "copy_kv_rows on GPU 0 storing into process B's GPU 1 pool mapped by CUDA IPC",
        "from": "process A cuda:0 pool", "to": "process B cuda:1 pool", "rows": tokens, "page_size": 1,
        "row_order": "in order" if ordered else "random",
        "row_bytes": row, "buffers": count, "launches_per_copy": 1,
        "GBps": rates, "GBps_median": statistics.median(rates),
        "ms_median": round(statistics.median(times) * 1e3, 3), "bit_exact": exact,
    }


def direct_packer_case(buffer_bytes: int, count: int, tokens: int, warmup: int, repeats: int,
                       switch_s: Optional[float]) -> dict:
    """``direct_rows``'s store through PD's per-chunk steps, each timed, idle and with busy GILs."""
    modes = [("idle", False, None), ("busy_gil", True, None)]
    if switch_s is not None:
        modes.append(("busy_gil_switch", True, switch_s))
    return {"path": "KvtierKVManager._send_direct's steps: peer_regions, Packer.copy_target, Packer.copy_rows "
                    "(after a scheduler event), K notification acknowledged by process B",
            "from": "process A cuda:0 pool", "to": "process B cuda:1 pool", "rows": tokens, "page_size": 1,
            "row_bytes": buffer_bytes // tokens, "buffers": count,
            **{mode: packer_run(buffer_bytes, count, tokens, warmup, repeats, spin, switch)
               for mode, spin, switch in modes}}


def packer_run(buffer_bytes: int, count: int, tokens: int, warmup: int, repeats: int, spin: bool,
               switch_s: Optional[float]) -> dict:
    from kvtier.sglang_ext.pd_io import Packer
    from kvtier.sglang_ext.pd_manager import direct_note
    from kvtier.transfer.cuda_ipc import enable_peer_access

    row = buffer_bytes // tokens
    names = [f"kv{i}" for i in range(count)]
    with switch_interval(switch_s), process_b("cuda_ipc", "cuda:1", buffer_bytes, count, spin, switch_s) as descriptor:
        torch.cuda.set_device(0)
        src = [torch.randint(0, 256, (tokens, row), dtype=torch.uint8, device="cuda:0") for _ in names]
        packer = Packer([t.data_ptr() for t in src], [t.numel() for t in src], [row] * count, 1, torch.device("cuda:0"))
        rng = np.random.default_rng(0)
        src_pages, dst_pages = rng.permutation(tokens), rng.permutation(tokens)
        enable_peer_access(0, 1)
        steps: dict[str, list[float]] = {k: [] for k in ("peer_regions", "copy_target", "copy_rows", "copy_gpu",
                                                         "notify", "total")}
        with make_transport("cuda_ipc") as transport, spinning(spin):
            peer = transport.connect(descriptor, map_device=0)
            target: list = [None]  # the CopyTarget last used, kept as _direct_target keeps it
            note = json.dumps(direct_note(1, "stage/bench", 0, tokens)).encode()

            def chunk() -> None:
                event = torch.cuda.Event()  # what KvtierKVSender.send records for the worker
                event.record()
                t0 = time.perf_counter()
                regions = transport.peer_regions(peer, names)
                t1 = time.perf_counter()
                target[0] = packer.reuse_target(target[0], regions)
                dst = target[0][1]
                t2 = time.perf_counter()
                gpu_s = packer.copy_rows(src_pages, dst, dst_pages, event)
                t3 = time.perf_counter()
                transport.notify(peer, b"K" + note, timeout_s=30)
                t4 = time.perf_counter()
                for key, value in (("peer_regions", t1 - t0), ("copy_target", t2 - t1), ("copy_rows", t3 - t2),
                                   ("copy_gpu", gpu_s), ("notify", t4 - t3), ("total", t4 - t0)):
                    steps[key].append(value)

            timed(chunk, warmup, repeats)
            steps = {k: v[warmup:] for k, v in steps.items()}
            exact = read_back_exact(transport, peer, names, buffer_bytes, src, torch.from_numpy(src_pages),
                                    torch.from_numpy(dst_pages))
    nbytes = buffer_bytes * count
    ms = {k: round(statistics.median(v) * 1e3, 3) for k, v in steps.items()}
    return {"spinning_python_thread_per_process": spin,
            "switch_interval_ms": (switch_s or sys.getswitchinterval()) * 1e3, "ms_median": ms,
            "GBps_median": round(nbytes / statistics.median(steps["total"]) / 1e9, 2),
            "copy_GBps_median": round(nbytes / statistics.median(steps["copy_gpu"]) / 1e9, 2),
            "not_copy_ms_median": round(statistics.median(t - g for t, g in zip(steps["total"], steps["copy_gpu"]))
                                        * 1e3, 3),
            "total_ms": [round(t * 1e3, 3) for t in steps["total"]], "bit_exact": exact}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--zmq-repeats", type=int, default=3, help="ZMQ moves ~1 s per repeat")
    ap.add_argument("--out", default=None, help="default benchmarks/results/transfer_gpu_<N>gpu.json")
    ap.add_argument("--switch-interval-ms", type=float, default=None,
                    help="direct_packer: also run busy_gil with this sys.setswitchinterval in both processes")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("transfer_gpu.py needs a CUDA GPU")
    gpus = torch.cuda.device_count()
    buffer_bytes = args.tokens * HEADS * DIM * ELEM
    count = 2 * LAYERS
    nbytes = buffer_bytes * count
    started = time.monotonic()

    cases = {}
    plan = [("cuda_ipc_same_gpu", "cuda:0", "cuda:0")]
    if gpus >= 2:
        plan.append(("cuda_ipc_cross_gpu", "cuda:0", "cuda:1"))
    flat = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda:0")
    for name, src, dst in plan:
        result = case("cuda_ipc", src, dst, buffer_bytes, count, args.warmup, args.repeats)
        plain = gbps(nbytes, plain_copy(flat, dst, args.warmup, args.repeats))
        result["plain_copy_GBps"] = plain
        result["plain_copy_GBps_median"] = statistics.median(plain)
        result["plain_copy"] = f"one process, b.copy_(a) of one {nbytes}-byte tensor, {src} -> {dst}"
        result["write_vs_plain"] = round(result["write_GBps_median"] / result["plain_copy_GBps_median"], 3)
        result["read_vs_plain"] = round(result["read_GBps_median"] / result["plain_copy_GBps_median"], 3)
        cases[name] = result
        print(json.dumps({name: result}), flush=True)
    if gpus >= 2:
        plain = cases["cuda_ipc_cross_gpu"]["plain_copy_GBps_median"]
        variants = {"direct_rows": {}, "direct_rows_ordered": {"ordered": True}}
        for name, kw in variants.items():
            result = direct_rows_case(buffer_bytes, count, args.tokens, args.warmup, args.repeats, **kw)
            result["plain_copy_GBps_median"] = plain
            result["vs_plain"] = round(result["GBps_median"] / plain, 3)
            cases[name] = result
            print(json.dumps({name: result}), flush=True)
        switch_s = None if args.switch_interval_ms is None else args.switch_interval_ms / 1e3
        result = direct_packer_case(buffer_bytes, count, args.tokens, args.warmup, args.repeats, switch_s)
        for mode in [k for k in ("idle", "busy_gil", "busy_gil_switch") if k in result]:
            result[mode]["vs_plain"] = round(result[mode]["GBps_median"] / plain, 3)
            result[mode]["vs_direct_rows_ms"] = round(result[mode]["ms_median"]["total"]
                                                      / cases["direct_rows"]["ms_median"], 3)
        cases["direct_packer"] = result
        print(json.dumps({"direct_packer": result}), flush=True)
    del flat
    cases["zmq_pinned_loopback"] = case("zmq", "cpu", "cpu", buffer_bytes, count, 1, args.zmq_repeats)
    print(json.dumps({"zmq_pinned_loopback": cases["zmq_pinned_loopback"]}), flush=True)

    report = {
        "benchmark": "transfer_gpu",
        "payload": f"{args.tokens}-token Llama-3-8B KV: {LAYERS} layers x K,V x {args.tokens} x "
        f"{HEADS} heads x {DIM} x bf16 = {count} buffers of {buffer_bytes} B",
        "bytes": nbytes,
        "cases": cases,
        "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)],
        "torch": torch.__version__,
        **run_facts(),
        "seconds": round(time.monotonic() - started, 1),
    }
    out = Path(args.out or f"benchmarks/results/transfer_gpu_{gpus}gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
