"""Chunk copies between the KV pool and CPU-tier slots, on side streams, with completions.

Spills (device to host) and loads (host to device) run on streams of their own, so a load never
queues behind a spill launched before it; a background (unguarded) spill starts only after the
loads launched before it, since beside one it halves the load's speed (the kernels share SMs and
PCIe).

A copy to the host of rows the radix tree has just freed (a spill) is *guarded*: the stream that
will next write those rows (SGLang runs its scheduler under a schedule stream that every forward
stream waits on) waits on the copy's event, so no CPU thread blocks and no row is overwritten
before it was read. A copy of rows the tree still owns (write-through, a spill ahead of
eviction) is not guarded, so the forward pass never waits for it; it names its *owners*, the
deepest tree nodes whose rows it touches, and ``guard_pending(owner)`` adds the wait when one of
them is deleted (before its ancestors, so before any row of the copy is freed). A copy to the
device (load-back; one for all requests of a prefill batch) is guarded too, so the forward pass
reads the rows after they arrived; or, with ``load_layer_groups`` > 1, it is issued as that many
launches over groups of layers (checked and moved to the GPU once, so each further launch costs
the scheduler only itself), unguarded and named by its nodes, and a ``LayerGate`` that SGLang's
pool consults before attention reads a layer (its ``layer_transfer_counter``, as HiCache uses)
makes the forward pass wait for that layer's group only, so attention of the first layers
overlaps the copy of the rest (the default, as HiCache loads; measured in
``KVTierConfig.load_layer_groups``).
With ``spill_staging_chunks`` > 0 a spill goes through a GPU staging ring of that many chunks: the kernel gathers into the ring at
device-memory speed, so it holds SMs for a small part of the time a gather over PCIe takes, and
the copy engine moves each ring chunk to its host slot. On a CPU pool (tests) copies are
synchronous.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Hashable, Optional, Sequence

import torch

from kvtier.kernels.kv_pages import KVPool


class LayerGate:
    """The events of the latest load's layer groups; ``wait_until(layer)`` makes the stream about to
    read ``layer`` wait for its group.

    Loads run in order on one stream, so the latest load's event for a layer also covers every
    earlier load of that layer. The scheduler thread records, the reaper thread forgets: the lock
    keeps a forget from writing back a list read before a newer load's record.
    """

    def __init__(self, num_layers: int) -> None:
        self._events: list[Optional[torch.cuda.Event]] = [None] * num_layers
        self._lock = threading.Lock()

    def record(self, layers: range, event: torch.cuda.Event) -> None:
        with self._lock:
            for layer in layers:
                self._events[layer] = event

    def forget(self, events: Sequence[torch.cuda.Event]) -> None:
        """Stop waiting for ``events`` (their load finished) unless a later load replaced them."""
        done = {id(e) for e in events}
        with self._lock:
            self._events = [None if e is not None and id(e) in done else e for e in self._events]

    def wait_until(self, layer: int) -> None:
        event = self._events[layer]
        if event is not None and not torch.cuda.is_current_stream_capturing():
            torch.cuda.current_stream().wait_event(event)


def layer_groups(num_layers: int, groups: int) -> list[range]:
    """``num_layers`` split into at most ``groups`` contiguous ranges of near-equal size."""
    groups = max(1, min(groups, num_layers))
    bounds = [num_layers * g // groups for g in range(groups + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


@dataclass
class Completion:
    """An in-flight copy; ``on_done`` runs once, from ``poll`` or ``wait``, when it finished.

    With a ``start`` event, ``observe(seconds)`` then receives the copy's GPU time. Several
    threads may poll one completion; ``on_done`` still runs exactly once.
    """

    event: Optional[torch.cuda.Event]
    on_done: Callable[[], None]
    start: Optional[torch.cuda.Event] = None
    observe: Optional[Callable[[float], None]] = None
    _finished: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def poll(self) -> bool:
        with self._lock:  # held through on_done: a poller seeing True knows on_done has ended
            if not self._finished and (self.event is None or self.event.query()):
                self._finished = True
                self.on_done()
                if self.start is not None and self.observe is not None:
                    self.observe(self.start.elapsed_time(self.event) / 1e3)
            return self._finished

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
        self.poll()


class PoolIO:
    """Gathers pool rows into host chunks and scatters them back, one kernel launch per batch."""

    def __init__(
        self,
        k_buffers: list[torch.Tensor],
        v_buffers: list[torch.Tensor],
        chunk_tokens: int,
        slab: torch.Tensor,
        observe: Optional[Callable[[str, float], None]] = None,
        spill_max_programs: Optional[int] = None,
        load_max_programs: Optional[int] = None,
        load_layer_groups: int = 1,
        spill_staging_chunks: int = 0,
    ):
        self.observe = observe
        self.spill_max_programs = spill_max_programs
        self.load_max_programs = load_max_programs
        self.gate = LayerGate(len(k_buffers))
        self.load_groups = layer_groups(len(k_buffers), load_layer_groups)
        self.pool = KVPool.of(k_buffers, v_buffers)  # checked once: each copy is launched on the scheduler's thread
        self.chunk_tokens = chunk_tokens
        self.slab = slab
        self.device = k_buffers[0].device
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.spill_stream = torch.cuda.Stream(self.device) if cuda else None
        self._unguarded: list[tuple[Completion, tuple[Hashable, ...]]] = []
        self._last_load: Optional[Completion] = None
        self.chunk_bytes = self.pool.chunk_nbytes(chunk_tokens)
        # Allocated now, so that a ring the GPU cannot hold fails at start, not in a request.
        self.ring = (torch.empty(spill_staging_chunks * self.chunk_bytes, dtype=torch.uint8, device=self.device)
                     if spill_staging_chunks > 0 else None)

    def warm_up(self) -> None:
        """Compile both kernels now rather than inside the first request that spills or loads.

        Gathers the pool's padding row 0 (SGLang's sink for padded tokens) into the first slab
        chunk and scatters it back with every token skipped: nothing observable changes.
        """
        view = self.slab[: self.chunk_bytes]  # one chunk: the staged path copies whole views
        rows = torch.zeros(self.chunk_tokens, dtype=torch.int64, device=self.device)
        self.to_host(rows, [view], lambda: None).wait()
        self.to_device([view], torch.full_like(rows, -1), lambda: None).wait()
        self._unguarded.clear()

    def _offsets(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        base = self.slab.data_ptr()
        # Kept on the host: the kernels read offsets there, a device tensor would force a sync.
        return torch.tensor([v.data_ptr() - base for v in views], dtype=torch.int64)

    def _run(
        self, op: str, launch: Callable[[], None], on_done: Callable[[], None], guard: bool, *inputs: torch.Tensor,
        owners: tuple[Hashable, ...] = (),
    ) -> Completion:
        if self.stream is None:
            launch()
            done = Completion(None, on_done)
            done.poll()
            return done
        stream = self.spill_stream if op == "spill" else self.stream
        current = torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        if op == "spill" and not guard:
            # A background spill goes behind the loads already queued: in H100 runs where spills ran
            # beside them, 10K-token loads averaged 50-54 ms of GPU time (offload_ttft*.json) against
            # 26 ms for 1.31 GB at the kernel's 51 GB/s (kernel_bandwidth.json). A guarded spill is
            # not held back: the rows it frees are wanted now.
            stream.wait_stream(self.stream)
        with torch.cuda.stream(stream):
            for t in inputs:  # made on the current stream, read on ours: keep them alive until then
                t.record_stream(stream)
            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            launch()
            event = torch.cuda.Event(enable_timing=True)
            event.record(stream)
        observe = None if self.observe is None else (lambda seconds: self.observe(op, seconds))
        done = Completion(event, on_done, start, observe)
        if op == "load":
            self._last_load = done
        if guard:
            current.wait_event(event)
        else:
            self._unguarded.append((done, owners))
        return done

    def loads_running(self) -> bool:
        """Whether the GPU may still be copying a load (loads run in order: the latest one's event
        covers the others); never on a CPU pool, where copies are synchronous."""
        return self._last_load is not None and not self._last_load.event.query()

    def guard_pending(self, owner: Optional[Hashable] = None) -> None:
        """Make the current stream wait for the unguarded copies still reading or writing pool rows
        of ``owner`` (and those given no owner); every one when ``owner`` is None.

        Called before rows are freed, so that whoever gets them next cannot race those copies. A
        copy that does not touch the freed rows keeps running: the forward pass need not wait.
        """
        current = torch.cuda.current_stream(self.device) if self.stream is not None else None
        kept = []
        for c, owners in self._unguarded:
            if c.poll():
                continue
            if owner is None or not owners or any(o is owner for o in owners):
                current.wait_event(c.event)
            else:
                kept.append((c, owners))
        self._unguarded = kept

    def to_host(
        self, slots: torch.Tensor, views: Sequence[torch.Tensor], on_done: Callable[[], None], guard: bool = True,
        owners: Sequence[Hashable] = (),
    ) -> Completion:
        """Copy the pool rows ``slots`` (chunk after chunk) into the slot ``views``.

        ``guard=False`` for rows that stay allocated: the forward pass does not wait for it, and
        ``guard_pending(owner)`` of any of ``owners`` makes it wait before those rows are freed.
        """
        slots = slots.to(self.device, non_blocking=True)
        if self.ring is None:
            launch = partial(self.pool.gather, slots, self.slab, self._offsets(views), self.chunk_tokens,
                             max_programs=self.spill_max_programs)
        else:
            launch = partial(self._spill_staged, slots, views)
        return self._run("spill", launch, on_done, guard, slots, owners=tuple(owners))

    def _spill_staged(self, slots: torch.Tensor, views: Sequence[torch.Tensor]) -> None:
        """Gather ring-fulls of chunks into the ring, then copy each to its host view. One stream
        runs both, so a gather into a ring chunk waits for the copy out of it before."""
        assert self.ring is not None
        ring_chunks, size, T = self.ring.numel() // self.chunk_bytes, self.chunk_bytes, self.chunk_tokens
        ring_offsets = torch.arange(ring_chunks, dtype=torch.int64) * size
        for first in range(0, len(views), ring_chunks):
            group = views[first : first + ring_chunks]
            self.pool.gather(slots[first * T : (first + len(group)) * T], self.ring, ring_offsets[: len(group)], T,
                             max_programs=self.spill_max_programs)
            for j, view in enumerate(group):
                view.copy_(self.ring[j * size : (j + 1) * size], non_blocking=True)

    def to_device(
        self, views: Sequence[torch.Tensor], slots: torch.Tensor, on_done: Callable[[], None],
        owners: Sequence[Hashable] = (),
    ) -> Completion:
        """Copy chunk ``views`` into the pool rows ``slots``; a slot of -1 skips that token. No
        two views may write one row: the chunks are copied in parallel.

        One group of layers: the forward pass waits for the whole copy. Several: readers of a layer
        through the pool wait for its group via ``gate``; rows freed later wait via
        ``guard_pending(owner)`` of any of ``owners``.
        """
        offsets = self._offsets(views)
        slots = slots.to(self.device, non_blocking=True)
        gated = len(self.load_groups) > 1 and self.stream is not None
        events: list[torch.cuda.Event] = []

        def launched(layers: range) -> None:
            events.append(torch.cuda.Event())
            events[-1].record(self.stream)
            self.gate.record(layers, events[-1])

        def launch() -> None:
            self.pool.scatter(self.slab, offsets, slots, self.chunk_tokens, max_programs=self.load_max_programs,
                              groups=self.load_groups, on_launched=launched if gated else None)

        def done() -> None:
            self.gate.forget(events)
            on_done()

        return self._run("load", launch, done, not gated, slots, owners=tuple(owners) if gated else ())
