"""The CPU tier: one pinned host slab carved into fixed chunk slots, LRU, leased pins, demotion.

Readers and writers hold slots through leases (``acquire`` to read, ``reserve`` to write). A
lease ends when its holder releases it or, at the latest, when its deadline passes: a holder that
crashed or hung cannot pin a slot forever (LMCache's most reported bug). An expired read lease
reports ``release() == False`` so its holder knows the bytes may have been overwritten.

When a slot is needed and none is free, the least recently used unpinned chunk is evicted; if a
``demote`` function is given (the disk tier), the chunk is first handed to it and its slot is
reused only once the write completed, so a full CPU tier demotes instead of dropping. To keep
that off the hot path, the LRU eighth of the tier is demoted ahead of need, so eviction usually
finds a chunk that is already below and reuses its slot at once.

Chunks reserved ``expendable`` (the tree hook's tails: a few tokens each, cheap to recompute, useful
only while their sequence is continued soon) are committed at the LRU end that goes first, are
never demoted, and are the first evicted while no reader touched them since.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from kvtier.sglang_ext.chunk_keys import ChunkKey
from kvtier.sglang_ext.metrics import TierMetrics
from kvtier.sglang_ext.tiers.host_memory import HostSlab, round_up

logger = logging.getLogger(__name__)

FillFn = Callable[[Sequence[ChunkKey], Sequence[torch.Tensor]], Sequence[bool]]
"""Loads chunks into the given slot views (from the tier below); per chunk, whether it did."""

DemoteFn = Callable[[ChunkKey, torch.Tensor], Optional["Future[bool]"]]
"""Starts writing a chunk to the tier below; None when it cannot take more now (queue full)."""


@dataclass
class _Entry:
    slot: int
    ready: bool = False  # committed: visible to readers
    pins: int = 0
    demoting: bool = False
    written_below: bool = False  # eviction needs no write below: a copy is there, or none is wanted


@dataclass
class Lease:
    """Slots held by one reader or writer until ``release`` or ``deadline``."""

    keys: list[ChunkKey]
    views: list[torch.Tensor]
    deadline: float
    writing: bool
    _tier: "CpuTier" = field(repr=False)
    _id: int = 0
    _open: bool = True
    expired: bool = False
    expendable: bool = False
    """Reserved ``expendable``: committed as the next to go, for this tier only (its chunks are
    ``written_below``: never demoted; the store writes them to no other tier)."""

    def release(self) -> bool:
        """Unpin (a read lease) or abort uncommitted slots (a write lease).

        Returns False if the lease had already expired: the views may no longer hold its keys.
        """
        return self._tier._end(self, commit=False)

    def commit(self) -> bool:
        """Publish a write lease's chunks; returns False if it expired first (nothing stored)."""
        assert self.writing, "commit() is for leases from reserve()"
        return self._tier._end(self, commit=True)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._open:
            self.release()


class CpuTier:
    """Fixed-size chunk slots in one page-aligned, pinned host slab."""

    name = "cpu"

    def __init__(
        self,
        chunk_bytes: int,
        capacity_bytes: int,
        *,
        metrics: TierMetrics,
        lease_timeout_s: float = 60.0,
        demote: Optional[DemoteFn] = None,
        pin: Optional[bool] = None,
    ) -> None:
        self.chunk_bytes = chunk_bytes
        self.slot_bytes = round_up(chunk_bytes)  # 4 KiB-aligned slots are valid O_DIRECT buffers
        self.num_slots = capacity_bytes // self.slot_bytes
        if self.num_slots < 1:
            raise ValueError(
                f"CPU tier of {capacity_bytes} bytes cannot hold one chunk of {chunk_bytes} bytes; "
                "raise cpu_size_gb or lower chunk_tokens"
            )
        self.slab = HostSlab(self.num_slots * self.slot_bytes, pin=pin)
        self._lease_timeout = lease_timeout_s
        self._demote = demote
        self._metrics = metrics
        # Re-entrant: a demotion future that completes at once runs its callback in this thread.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._lru: OrderedDict[ChunkKey, _Entry] = OrderedDict()  # oldest first
        self._free = list(range(self.num_slots - 1, -1, -1))
        self._leases: dict[int, Lease] = {}
        self.reuse_target = max(2, self.num_slots // 8)
        self._demoting_ahead = False
        self._lease_ids = itertools.count(1)
        metrics.capacity.labels(self.name).set(self.num_slots * self.chunk_bytes)

    # -- queries -----------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [k in self._lru and self._lru[k].ready for k in keys]

    def __len__(self) -> int:
        with self._lock:
            return sum(e.ready for e in self._lru.values())

    def view(self, slot: int) -> torch.Tensor:
        start = slot * self.slot_bytes
        return self.slab.view(start, self.chunk_bytes)

    # -- leases ------------------------------------------------------------------------------

    def acquire(
        self,
        keys: Sequence[ChunkKey],
        timeout_s: Optional[float] = None,
        fill: Optional[FillFn] = None,
        wait_s: float = 0.0,
    ) -> Lease:
        """Pin the longest prefix of ``keys`` that is present, or that ``fill`` can bring in.

        Keys missing here get fresh slots (waiting up to ``wait_s`` for each) and are loaded by
        one ``fill(keys, views)`` call outside the lock (the disk tier's parallel read). Loaded
        chunks stay pinned in this lease like hits, so a batch cannot evict its own chunks.
        """
        deadline = time.monotonic() + wait_s
        planned: list[tuple[ChunkKey, _Entry, bool]] = []  # key, entry, needs filling
        with self._lock:
            self._expire_leases()
            lease = self._new_lease([], [], False, timeout_s)
            for key in keys:
                entry = self._lru.get(key)
                if entry is not None and entry.ready:
                    entry.pins += 1
                    self._lru.move_to_end(key)
                    planned.append((key, entry, False))
                    continue
                if entry is not None or fill is None:
                    break  # being written by someone else, or no tier below to load from
                slot = self._take_slot(deadline, own=lease)
                if slot is None:
                    break
                entry = self._lru[key] = _Entry(slot=slot, pins=1, written_below=True)
                planned.append((key, entry, True))
        missing = [(k, e) for k, e, needs in planned if needs]
        loaded = fill([k for k, _ in missing], [self.view(e.slot) for _, e in missing]) if missing else []
        ok = {k: good for (k, _), good in zip(missing, loaded)}
        with self._lock:
            serving = True
            for key, entry, needs in planned:
                serving = serving and (not needs or ok[key])
                if serving:
                    entry.ready = True
                    lease.keys.append(key)
                    lease.views.append(self.view(entry.slot))
                    continue
                entry.pins -= 1  # past the first failure: a prefix cannot use it
                if needs:
                    del self._lru[key]
                    self._free.append(entry.slot)
            self._update_used()
            self._changed.notify_all()
            self._close_if_empty(lease)
        return lease

    def reserve(
        self,
        keys: Sequence[ChunkKey],
        wait_s: float = 0.0,
        timeout_s: Optional[float] = None,
        written_below: bool = False,
        expendable: bool = False,
    ) -> Lease:
        """Slots for the keys not yet present, evicting or demoting LRU chunks as needed.

        Waits up to ``wait_s`` for demotions to free slots; keys that still get no slot are left
        out of the lease (the caller stores fewer chunks, it never blocks for long).
        """
        deadline = time.monotonic() + wait_s
        with self._lock:
            self._expire_leases()
            got: list[ChunkKey] = []
            slots: list[int] = []
            for key in dict.fromkeys(keys):  # de-duplicate, keep order
                if key in self._lru:
                    continue
                slot = self._take_slot(deadline)
                if slot is None:
                    self._metrics.dropped.labels("cpu_full").inc()
                    continue
                self._lru[key] = _Entry(slot=slot, pins=1, written_below=written_below or expendable)
                got.append(key)
                slots.append(slot)
            lease = self._new_lease(got, slots, True, timeout_s)
            lease.expendable = expendable
            self._close_if_empty(lease)
            return lease

    def _new_lease(self, keys: list[ChunkKey], slots: list[int], writing: bool, timeout_s: Optional[float]) -> Lease:
        timeout = self._lease_timeout if timeout_s is None else timeout_s
        lease = Lease(
            keys=keys,
            views=[self.view(s) for s in slots],
            deadline=time.monotonic() + timeout,
            writing=writing,
            _tier=self,
            _id=next(self._lease_ids),
        )
        self._leases[lease._id] = lease
        return lease

    def _close_if_empty(self, lease: Lease) -> None:
        if not lease.keys:
            self._leases.pop(lease._id, None)
            lease._open = False

    def _end(self, lease: Lease, commit: bool) -> bool:
        with self._lock:
            if not lease._open:
                return not lease.expired
            self._finish(lease, commit)
            self._changed.notify_all()
            return True

    def _finish(self, lease: Lease, commit: bool) -> None:
        lease._open = False
        self._leases.pop(lease._id, None)
        for key in lease.keys:
            entry = self._lru[key]
            entry.pins -= 1
            if not lease.writing:
                continue
            if commit:
                entry.ready = True
                self._lru.move_to_end(key, last=not lease.expendable)
                self._metrics.bytes.labels(self.name, "in").inc(self.chunk_bytes)
            else:
                del self._lru[key]
                self._free.append(entry.slot)
        self._update_used()
        if lease.writing and commit:
            self._demote_ahead()

    def _expire_leases(self) -> None:
        now = time.monotonic()
        for lease in [l for l in self._leases.values() if l.deadline <= now]:
            logger.warning(
                "kvtier: %s lease on %d CPU chunks expired unreleased; reclaiming its slots",
                "write" if lease.writing else "read",
                len(lease.keys),
            )
            lease.expired = True
            self._finish(lease, commit=False)
            self._metrics.expired_pins.inc()

    # -- eviction ----------------------------------------------------------------------------

    def _take_slot(self, deadline: float, own: Optional[Lease] = None) -> Optional[int]:
        while True:
            if self._free:
                return self._free.pop()
            waiting_on_demotion = False
            # No copy of the LRU list: every branch that changes it leaves the loop at once, and a
            # copy cost 125 us per slot taken from a full tier of 1,900 chunks (a document: 5 ms).
            for key, entry in self._lru.items():
                if entry.pins or not entry.ready:
                    continue
                if entry.demoting:
                    waiting_on_demotion = True
                    continue
                if self._demote is None or entry.written_below:
                    del self._lru[key]
                    self._metrics.evictions.labels(self.name).inc()
                    return entry.slot
                if not self._start_demotion(key, entry):
                    waiting_on_demotion = True  # the tier below is busy: wait for it
                    break
                waiting_on_demotion = True
                if entry.written_below:  # already below (e.g. the key was on disk): reuse now
                    del self._lru[key]
                    self._metrics.evictions.labels(self.name).inc()
                    return entry.slot
                break  # one demotion per slot needed: demote only what must leave, in LRU order
            self._expire_leases()
            if self._free:
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            others_hold_pins = len(self._leases) > (own is not None and own._id in self._leases)
            if not waiting_on_demotion and not others_hold_pins:
                return None  # nothing will free a slot
            self._changed.wait(min(remaining, 0.05))

    def _start_demotion(self, key: ChunkKey, entry: _Entry) -> bool:
        """Hand a chunk to the tier below; False if it cannot take more now."""
        assert self._demote is not None
        future = self._demote(key, self.view(entry.slot))
        if future is None:
            return False
        entry.demoting = True
        future.add_done_callback(lambda f: self._demoted(key, f))
        return True

    def _demoted(self, key: ChunkKey, future: "Future[bool]") -> None:
        ok = not future.cancelled() and future.exception() is None and future.result()
        with self._lock:
            entry = self._lru.get(key)
            if entry is not None:
                entry.demoting = False
                # A failed write is not retried: the chunk is evicted without a copy.
                entry.written_below = True
            if ok:
                self._metrics.demotions.inc()
            else:
                self._metrics.dropped.labels("demotion_failed").inc()
            self._demote_ahead()
            self._changed.notify_all()

    def _demote_ahead(self) -> None:
        """Keep ``reuse_target`` slots reusable at once by demoting the LRU chunks early.

        Without it a burst of puts into a full tier finds only chunks that still have to be
        written below, and (not waiting) drops itself; with it eviction is a pointer move.
        Eviction takes the LRU end first, so only the ``reuse_target`` evictable chunks there count:
        the walk stops at them (it ran the whole tier at every commit and every finished
        demotion before: 24 ms per put of 4 chunks into a full tier of 30,000).
        """
        if self._demote is None or self._demoting_ahead:
            return
        self._demoting_ahead = True
        try:
            reusable = len(self._free)
            candidates = []
            for key, entry in self._lru.items():
                if reusable + len(candidates) >= self.reuse_target:
                    break
                if not entry.ready or entry.pins:
                    continue
                if entry.written_below or entry.demoting:
                    reusable += 1
                else:
                    candidates.append((key, entry))
            for key, entry in candidates:
                if not self._start_demotion(key, entry):
                    break
        finally:
            self._demoting_ahead = False

    def _update_used(self) -> None:
        used = (self.num_slots - len(self._free)) * self.chunk_bytes
        self._metrics.used.labels(self.name).set(used)

    def demote_all(self, timeout_s: float) -> int:
        """Hand every chunk the tier below lacks to it (graceful shutdown); returns how many.

        Waits while the tier below is busy, at most ``timeout_s`` in all.
        """
        if self._demote is None:
            return 0
        deadline = time.monotonic() + timeout_s
        started = 0
        with self._lock:
            for key, entry in list(self._lru.items()):
                if not entry.ready or entry.written_below or entry.demoting:
                    continue
                while not self._start_demotion(key, entry):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return started
                    self._changed.wait(min(remaining, 0.05))
                started += 1
        return started

    def close(self) -> None:
        self.slab.close()
