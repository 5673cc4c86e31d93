"""The tier store: the CPU tier over the disk tier, behind the API the tree hook and transfer share.

Semantics are prefix semantics, because KV of chunk i is useless without chunks 0..i-1: every
lookup or read returns how many *leading* keys it served and stops at the first miss.

- ``acquire(keys)``: zero-copy read lease on CPU slots (disk hits are promoted first); the GPU
  copy kernels read straight from the pinned slots.
- ``reserve(keys)``: zero-copy write lease on fresh CPU slots; ``commit()`` publishes them.
- ``get_into`` / ``put``: the copying forms of the two, in batches.
- ``put_async`` / ``prefetch``: background forms with a ``Future`` to wait on with a deadline.

The CPU tier is always present: it is the pinned staging area of every GPU copy. When it is full
its LRU chunks are demoted to the disk tier (if configured) before their slots are reused.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Sequence

import torch

from kvtier.sglang_ext.chunk_keys import ChunkKey, KVNamespace
from kvtier.sglang_ext.config import KVTierConfig
from kvtier.sglang_ext.metrics import TierMetrics
from kvtier.sglang_ext.tiers.cpu import CpuTier, Lease
from kvtier.sglang_ext.tiers.disk import DiskTier

logger = logging.getLogger(__name__)


class TierStore:
    """Chunks of ``chunk_bytes`` bytes keyed by ``namespace`` chunk keys, in CPU then disk."""

    def __init__(
        self,
        cfg: KVTierConfig,
        namespace: KVNamespace,
        chunk_bytes: int,
        *,
        pin: Optional[bool] = None,
        serve_metrics: bool = True,
    ) -> None:
        self.cfg = cfg
        self.namespace = namespace
        self.chunk_bytes = chunk_bytes
        self.metrics = TierMetrics()
        self.disk: Optional[DiskTier] = None
        if cfg.disk_path:
            self.disk = DiskTier(
                cfg.disk_path,
                namespace.digest().hex()[:24],
                chunk_bytes,
                cfg.disk_bytes,
                metrics=self.metrics,
                o_direct=cfg.disk_o_direct,
                queue_depth=cfg.disk_write_queue,
            )
        self.cpu = CpuTier(
            chunk_bytes,
            cfg.cpu_bytes,
            metrics=self.metrics,
            lease_timeout_s=cfg.pin_timeout_s,
            demote=self.disk.submit if self.disk is not None else None,
            pin=pin,
        )
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvtier-io")
        if serve_metrics and cfg.metrics_port:
            port = cfg.metrics_port + namespace.tp_rank
            self.metrics.serve(port)
            logger.info("kvtier: Prometheus metrics on port %d", port)
        logger.info(
            "kvtier: tier store ready: %d CPU slots of %d bytes%s",
            self.cpu.num_slots,
            chunk_bytes,
            f", {self.disk.num_slots} disk slots in {self.disk.path}" if self.disk else "",
        )

    # -- lookups -------------------------------------------------------------------------------

    def prefix_hits(self, keys: Sequence[ChunkKey]) -> int:
        """How many leading ``keys`` some tier holds (nothing is pinned: a hint, not a promise)."""
        in_cpu = self.cpu.contains(keys)
        in_disk = self.disk.contains(keys) if self.disk else [False] * len(keys)
        n = 0
        while n < len(keys) and (in_cpu[n] or in_disk[n]):
            n += 1
        return n

    # -- zero-copy leases ----------------------------------------------------------------------

    def acquire(self, keys: Sequence[ChunkKey], timeout_s: Optional[float] = None) -> Lease:
        """Pin the longest servable prefix of ``keys`` in CPU slots, promoting disk hits first."""
        with self.metrics.timed("store", "acquire"):
            lease = self.cpu.acquire(keys, timeout_s)
            cpu_hits = len(lease.keys)
            if self.disk is not None and cpu_hits < len(keys):
                # Keep the CPU hits pinned while promotion evicts to make room.
                with lease:
                    self._promote(keys[cpu_hits:])
                    lease = self.cpu.acquire(keys, timeout_s)
        self.metrics.hits.labels("cpu").inc(cpu_hits)
        self.metrics.hits.labels("disk").inc(len(lease.keys) - cpu_hits)
        self.metrics.misses.inc(len(keys) - len(lease.keys))
        self.metrics.bytes.labels("cpu", "out").inc(len(lease.keys) * self.chunk_bytes)
        return lease

    def _promote(self, keys: Sequence[ChunkKey]) -> int:
        """Copy the leading disk-resident ``keys`` into CPU slots; returns how many are in CPU."""
        assert self.disk is not None
        n = 0
        for key in keys:
            if not self.disk.contains([key])[0]:
                break
            with self.cpu.reserve([key], written_below=True) as lease:
                if not lease.keys:  # already in CPU, being written by another thread, or no slot
                    if not self.cpu.contains([key])[0]:
                        break
                elif self.disk.read_into(lease.keys, lease.views) == 1:
                    lease.commit()
                else:
                    break
            n += 1
        return n

    def reserve(self, keys: Sequence[ChunkKey], wait_s: float = 0.0, timeout_s: Optional[float] = None) -> Lease:
        """Fresh CPU slots for the keys no tier holds yet; write them, then ``commit()``."""
        if self.disk is not None:
            on_disk = self.disk.contains(keys)
            keys = [k for k, d in zip(keys, on_disk) if not d]
        return self.cpu.reserve(keys, wait_s=wait_s, timeout_s=timeout_s)

    # -- copying batch API ---------------------------------------------------------------------

    def get_into(self, keys: Sequence[ChunkKey], buffers: Sequence[torch.Tensor]) -> int:
        """Copy the longest servable prefix of ``keys`` into ``buffers``; returns its length."""
        with self.acquire(keys) as lease:
            for view, dst in zip(lease.views, buffers):
                dst.copy_(view)
            n = len(lease.keys)
            if not lease.release():
                return 0  # the lease expired mid-copy: the bytes cannot be trusted
        return n

    def put(self, keys: Sequence[ChunkKey], buffers: Sequence[torch.Tensor], wait_s: float = 1.0) -> int:
        """Store ``buffers`` under ``keys``; returns how many chunks were newly stored."""
        by_key = dict(zip(keys, buffers))
        with self.metrics.timed("store", "put"):
            lease = self.reserve(keys, wait_s=wait_s)
            with lease:
                for key, view in zip(lease.keys, lease.views):
                    view.copy_(by_key[key])
                stored = len(lease.keys) if lease.commit() else 0
        return stored

    def put_async(self, keys: Sequence[ChunkKey], buffers: Sequence[torch.Tensor], wait_s: float = 1.0) -> "Future[int]":
        """``put`` on a background thread; ``buffers`` must stay unchanged until the future is done."""
        return self._pool.submit(self.put, list(keys), list(buffers), wait_s)

    def prefetch(self, keys: Sequence[ChunkKey]) -> "Future[int]":
        """Bring the leading disk-resident ``keys`` into the CPU tier in the background."""
        return self._pool.submit(self._prefetch, list(keys))

    def _prefetch(self, keys: list[ChunkKey]) -> int:
        in_cpu = self.cpu.contains(keys)
        start = 0
        while start < len(keys) and in_cpu[start]:
            start += 1
        if self.disk is None or start == len(keys):
            return start
        with self.metrics.timed("disk", "prefetch"):
            return start + self._promote(keys[start:])

    def close(self) -> None:
        """Finish background work and queued disk writes, then free the slab and the file."""
        self._pool.shutdown(wait=True)
        if self.disk is not None:
            self.disk.close()
        self.cpu.close()
