"""PoolIO: chunk copies between a real SGLang KV pool and a host slab, ordered by stream events.

On CPU the copies are synchronous; on a GPU machine the same tests run the Triton kernels on a
side stream, and attention-like reads queued right after a load (through the pool, which consults
the layer gate when the load is issued in groups of layers) must see the loaded rows.
"""

from __future__ import annotations

import pytest
import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from kvtier.sglang_ext.pool_io import Completion, LayerGate, PoolIO, layer_groups
from kvtier.sglang_ext.tiers.host_memory import HostSlab

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def make(layers: int, heads: int, dim: int, pool_tokens: int, chunk_tokens: int, chunks: int, groups: int = 1,
         max_programs: int | None = None, staging: int = 0):
    pool = MHATokenToKVPool(pool_tokens, 16, torch.bfloat16, heads, dim, layers, DEVICE, False)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for buf in pool.k_buffer + pool.v_buffer:
        buf.copy_(torch.randn(buf.shape, generator=gen, device=DEVICE).to(buf.dtype))
    chunk_bytes = chunk_tokens * layers * heads * dim * 2 * 2
    slab = HostSlab(chunks * chunk_bytes)
    seen: list[tuple[str, float]] = []
    io = PoolIO(pool.k_buffer, pool.v_buffer, chunk_tokens, slab.tensor, observe=lambda op, s: seen.append((op, s)),
                spill_max_programs=max_programs, load_max_programs=max_programs, load_layer_groups=groups,
                spill_staging_chunks=staging)
    if groups > 1:  # as KVTierRadixCache does
        pool.register_layer_transfer_counter(io.gate)
    views = [slab.view(i * chunk_bytes, chunk_bytes) for i in range(chunks)]
    return pool, io, views, seen


def test_layer_groups_cover_every_layer_once():
    assert layer_groups(32, 4) == [range(0, 8), range(8, 16), range(16, 24), range(24, 32)]
    assert layer_groups(3, 2) == [range(0, 1), range(1, 3)]
    assert layer_groups(2, 8) == [range(0, 1), range(1, 2)]
    assert layer_groups(5, 1) == [range(0, 5)]


def test_a_completion_polled_from_several_threads_runs_on_done_once():
    """The reaper thread and the scheduler thread both poll copies; a spill must commit once, and a
    poller told the copy finished must find on_done's work done."""
    import threading
    import time

    class Finished:
        def query(self) -> bool:
            return True

    calls, seen = [], []

    def on_done() -> None:
        calls.append(1)
        time.sleep(0.05)  # a slow commit: the other pollers arrive meanwhile
        calls.append(2)

    done = Completion(Finished(), on_done)
    start = threading.Barrier(8)

    def poller() -> None:
        start.wait()
        seen.append((done.poll(), len(calls)))

    threads = [threading.Thread(target=poller) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1, 2] and seen == [(True, 2)] * 8


def test_a_finished_load_forgotten_by_the_reaper_never_drops_a_newer_loads_events():
    """The scheduler thread records each load's events while the reaper thread forgets finished
    ones; a forget racing a record must not put back what the record replaced (the forward pass
    would then read a layer the newest load has not written yet)."""
    import queue
    import sys
    import threading

    layers = 2000  # a long list: the forget is slow enough to interleave with records
    gate, finished = LayerGate(layers), queue.Queue()

    def reaper() -> None:
        while (event := finished.get()) is not None:
            gate.forget([event])

    thread = threading.Thread(target=reaper)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    stale = 0
    try:
        thread.start()
        previous = None
        for _ in range(300):
            event = object()  # stands in for a CUDA event: the gate keys on identity
            gate.record(range(layers), event)
            if previous is not None:
                finished.put(previous)  # the previous load finished
            for _ in range(5):
                stale += any(e is not event for e in gate._events)
            previous = event
    finally:
        finished.put(None)
        thread.join()
        sys.setswitchinterval(interval)
    assert stale == 0
    gate.forget([previous])  # the last load finished: nothing left to wait for
    assert gate._events == [None] * layers


@pytest.mark.parametrize("groups,max_programs,staging", [(1, None, 0), (2, None, 0), (3, 2, 0), (1, None, 2),
                                                         (2, 2, 1), (1, None, 8)])
def test_spill_then_load_round_trip_and_completions(groups, max_programs, staging):
    # staging: 3 chunks spill through a ring of 1 or 2 chunks (reused, the last ring-full short) or 8.
    pool, io, views, seen = make(layers=3, heads=2, dim=32, pool_tokens=1024, chunk_tokens=32, chunks=3,
                                 groups=groups, max_programs=max_programs, staging=staging)
    src = (torch.randperm(496, generator=torch.Generator().manual_seed(staging))[:96] + 16).to(DEVICE)
    dst = torch.arange(600, 696, device=DEVICE)
    reference = [b.view(torch.uint8)[src].clone() for b in pool.k_buffer + pool.v_buffer]
    done: list[str] = []
    io.to_host(src, views, lambda: done.append("spill")).wait()
    assert (io.ring is not None) == (staging > 0)
    if staging:  # the spill went through the ring: it holds the last ring-full, starting with this chunk
        last = (len(views) - 1) // staging * staging
        assert torch.equal(io.ring[: io.chunk_bytes].cpu(), views[last])
    io.to_device(views, dst, lambda: done.append("load")).wait()
    assert done == ["spill", "load"]
    for buf, want in zip(pool.k_buffer + pool.v_buffer, reference):
        assert torch.equal(buf.view(torch.uint8)[dst], want)
    if CUDA:
        assert [op for op, _ in seen] == ["spill", "load"] and all(s > 0 for _, s in seen)


@pytest.mark.parametrize("staging", [0, 2])
def test_warm_up_changes_no_pool_row_with_or_without_a_staging_ring(staging):
    """KVTierRadixCache warms up every PoolIO it makes: with a ring too (the staged path copies
    whole views, so warm_up's view must be one chunk, not the whole slab)."""
    pool, io, views, _ = make(layers=3, heads=2, dim=32, pool_tokens=1024, chunk_tokens=32, chunks=3,
                              staging=staging)
    before = [b.clone() for b in pool.k_buffer + pool.v_buffer]
    io.warm_up()
    assert all(torch.equal(a, b) for a, b in zip(before, pool.k_buffer + pool.v_buffer))
    assert io._unguarded == []


@pytest.mark.skipif(not CUDA, reason="stream ordering exists on CUDA only; on CPU copies are synchronous")
@pytest.mark.parametrize("groups,max_programs", [(1, None), (4, None), (32, None), (4, 16)])
def test_work_queued_after_a_load_sees_the_loaded_rows(groups, max_programs):
    # Llama-3-8B shape, 40 chunks of 256 tokens: a 1.3 GB load, slow enough to race against.
    layers, chunks, T = 32, 40, 256
    pool, io, views, seen = make(layers=layers, heads=8, dim=128, pool_tokens=3 * chunks * T, chunk_tokens=T,
                                 chunks=chunks, groups=groups, max_programs=max_programs)
    src = torch.arange(16, 16 + chunks * T, device=DEVICE)
    dst = src + chunks * T
    expected = [pool.k_buffer[l][src].clone() for l in range(layers)]
    io.to_host(src, views, lambda: None).wait()
    for l in range(layers):
        pool.k_buffer[l][dst] = 0
    torch.cuda.synchronize()
    load = io.to_device(views, dst, lambda: None)
    # What attention does next, on the current stream, without any host-side wait: read each
    # layer through the pool, which waits for that layer's group of the load.
    got = [pool.get_key_buffer(l)[dst].clone() for l in range(layers)]
    torch.cuda.synchronize()
    load.poll()
    assert all(torch.equal(g.view(torch.int16), e.view(torch.int16)) for g, e in zip(got, expected))


def free_rows_of(io: PoolIO, owner: object) -> None:
    """What the cache does before freeing ``owner``'s rows (``guard_pending``), then the current
    stream reaching that point."""
    io.guard_pending(owner)
    freed = torch.cuda.Event()
    freed.record()
    freed.synchronize()


@pytest.mark.skipif(not CUDA, reason="stream ordering exists on CUDA only; on CPU copies are synchronous")
def test_freeing_rows_waits_only_for_the_copies_of_their_owner():
    """A background spill of rows the tree still owns must finish before those rows are freed,
    and must not hold up the freeing of another node's rows (the forward pass would wait for it)."""
    layers, chunks, T = 32, 40, 256
    pool, io, views, _ = make(layers=layers, heads=8, dim=128, pool_tokens=3 * chunks * T, chunk_tokens=T,
                              chunks=chunks)
    rows = torch.arange(16, 16 + chunks * T, device=DEVICE)
    expected = [pool.k_buffer[l][rows].clone() for l in range(layers)]
    owner, other = object(), object()
    torch.cuda.synchronize()
    spill = io.to_host(rows, views, lambda: None, guard=False, owners=(owner,))
    free_rows_of(io, other)
    assert not spill.event.query()  # the 1.3 GB spill is still running: nothing waited for it
    io.guard_pending(owner)
    for l in range(layers):  # the next user of the owner's rows overwrites them
        pool.k_buffer[l][rows] = 0
    io.to_device(views, rows, lambda: None).wait()
    assert spill.poll()
    assert all(torch.equal(pool.k_buffer[l][rows].view(torch.int16), e.view(torch.int16))
               for l, e in enumerate(expected))


@pytest.mark.skipif(not CUDA, reason="stream ordering exists on CUDA only; on CPU copies are synchronous")
def test_a_load_for_several_requests_is_waited_for_when_any_of_its_owners_is_freed():
    """A prefill batch's loads go as one copy naming each request's node: freeing another node's rows
    does not wait for it, freeing any of its nodes' rows does, and the rows then hold the KV loaded."""
    layers, chunks, T = 32, 40, 256
    pool, io, views, _ = make(layers=layers, heads=8, dim=128, pool_tokens=3 * chunks * T, chunk_tokens=T,
                              chunks=chunks, groups=4)
    rows = torch.arange(16, 16 + chunks * T, device=DEVICE)
    expected = [pool.k_buffer[l][rows].clone() for l in range(layers)]
    io.to_host(rows, views, lambda: None).wait()
    for l in range(layers):
        pool.k_buffer[l][rows] = 0
    torch.cuda.synchronize()
    first, second, other = object(), object(), object()
    load = io.to_device(views, rows, lambda: None, owners=[first, second])
    free_rows_of(io, other)
    assert not load.event.query()  # the 1.3 GB load is still running: nothing waited for it
    free_rows_of(io, second)
    assert load.poll()  # the stream that frees the rows waited for the whole copy
    assert all(torch.equal(pool.k_buffer[l][rows].view(torch.int16), e.view(torch.int16))
               for l, e in enumerate(expected))


@pytest.mark.skipif(not CUDA, reason="stream ordering exists on CUDA only; on CPU copies are synchronous")
@pytest.mark.parametrize("staging", [0, 4])
def test_a_spill_starts_after_the_loads_launched_before_it(staging):
    """A load in layer groups is not guarded (the forward pass waits per layer), so nothing but
    PoolIO's ordering keeps a spill launched next from running beside it: the spill must start
    after the load ended, and copy out the rows as loaded."""
    layers, chunks, T = 32, 40, 256
    pool, io, views, _ = make(layers=layers, heads=8, dim=128, pool_tokens=3 * chunks * T, chunk_tokens=T,
                              chunks=2 * chunks, groups=4, staging=staging)
    src = torch.arange(16, 16 + chunks * T, device=DEVICE)
    dst = src + chunks * T
    io.to_host(src, views[:chunks], lambda: None).wait()
    torch.cuda.synchronize()
    load = io.to_device(views[:chunks], dst, lambda: None)
    spill = io.to_host(dst, views[chunks:], lambda: None, guard=False)
    spill.wait()
    load.wait()
    assert load.event.elapsed_time(spill.start) >= 0
    for a, b in zip(views[:chunks], views[chunks:]):
        assert torch.equal(a, b)


@pytest.mark.skipif(not CUDA, reason="stream ordering exists on CUDA only; on CPU copies are synchronous")
def test_a_guarded_spill_does_not_wait_for_an_earlier_load():
    """A spill of freed rows (guarded: the next writer waits for it) is wanted now: it may run
    beside a load of other rows launched before it rather than after it."""
    layers, chunks, T = 32, 40, 256
    pool, io, views, _ = make(layers=layers, heads=8, dim=128, pool_tokens=3 * chunks * T, chunk_tokens=T,
                              chunks=2 * chunks, groups=4)  # in layer groups: the load is not guarded
    loaded = torch.arange(16, 16 + chunks * T, device=DEVICE)
    freed = loaded + chunks * T
    io.to_host(loaded, views[:chunks], lambda: None).wait()
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        load = io.to_device(views[:chunks], loaded, lambda: None, owners=[object()])
        spill = io.to_host(freed, views[chunks:], lambda: None)
    spill.wait()
    load.wait()
    assert spill.start.elapsed_time(load.event) > 0  # the spill started before the load ended


@pytest.mark.skipif(not CUDA, reason="a load runs on the GPU's side stream on CUDA only; on CPU it is done at once")
def test_loads_running_while_the_gpu_copies_a_load():
    """What the tree hook asks before launching spills ahead: true from a load's launch until the GPU
    finished it (40 chunks of 8 MiB: several ms, so still running right after the launch)."""
    layers, chunks, T = 32, 40, 256
    pool, io, views, _ = make(layers=layers, heads=8, dim=128, pool_tokens=2 * chunks * T, chunk_tokens=T,
                              chunks=chunks, groups=4)
    rows = torch.arange(16, 16 + chunks * T, device=DEVICE)
    io.to_host(rows, views, lambda: None).wait()
    assert not io.loads_running()  # none launched yet
    load = io.to_device(views, rows, lambda: None, owners=[object()])
    assert io.loads_running()
    load.wait()
    assert not io.loads_running()
