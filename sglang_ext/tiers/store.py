"""The tier store: CPU, then disk, then remote tiers, behind the API the tree hook and transfer share.

Semantics are prefix semantics, because KV of chunk i is useless without chunks 0..i-1: every
lookup or read returns how many *leading* keys it served and stops at the first miss.

- ``acquire(keys)``: zero-copy read lease on CPU slots (disk hits are promoted first); the GPU
  copy kernels read straight from the pinned slots.
- ``reserve(keys)``: zero-copy write lease on fresh CPU slots; ``commit()`` publishes them.
- ``get_into`` / ``put``: the copying forms of the two, in batches.
- ``put_async`` / ``prefetch``: background forms with a ``Future`` to wait on with a deadline.

The CPU tier is always present: it is the pinned staging area of every GPU copy. When it is full
its LRU chunks are demoted to the disk tier (if configured) before their slots are reused. Every
chunk committed to the CPU tier is also written to the remote tier (if configured) in the
background, so other replicas can hit it; reads fall through CPU, disk, remote in that order.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from kvtier.sglang_ext.chunk_keys import ChunkKey, KVNamespace
from kvtier.sglang_ext.config import KVTierConfig
from kvtier.sglang_ext.metrics import TierMetrics
from kvtier.sglang_ext.tiers.cpu import CpuTier, Lease
from kvtier.sglang_ext.tiers.disk import DiskTier
from kvtier.sglang_ext.tiers.remote_store import KvtierStoreTier

if TYPE_CHECKING:
    from kvtier.sglang_ext.tiers.remote import RedisTier

logger = logging.getLogger(__name__)


class TierStore:
    """Chunks of ``chunk_bytes`` bytes keyed by ``namespace`` chunk keys, in CPU, disk, remote."""

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
        self.remote: Optional["RedisTier | KvtierStoreTier"] = None
        if cfg.remote_url.startswith("kvtier://"):
            self.remote = KvtierStoreTier(
                cfg.remote_url, chunk_bytes, metrics=self.metrics, timeout_s=cfg.remote_timeout_s,
                retry_after_s=cfg.remote_retry_s, queue_depth=cfg.remote_write_queue,
            )
        elif cfg.remote_url:
            # Imported here: the redis client is needed only by servers configured with Redis.
            from kvtier.sglang_ext.tiers import remote

            self.remote = remote.RedisTier(
                cfg.remote_url,
                namespace.digest().hex()[:24],
                chunk_bytes,
                metrics=self.metrics,
                timeout_s=cfg.remote_timeout_s,
                retry_after_s=cfg.remote_retry_s,
                queue_depth=cfg.remote_write_queue,
            )
        # Faulting in and pinning tens of GB takes seconds at server start: say what is happening.
        logger.info("kvtier: allocating %.1f GB of host memory for the CPU tier", cfg.cpu_bytes / 1e9)
        started = time.monotonic()
        self.cpu = CpuTier(
            chunk_bytes,
            cfg.cpu_bytes,
            metrics=self.metrics,
            lease_timeout_s=cfg.pin_timeout_s,
            demote=self.disk.submit if self.disk is not None else None,
            pin=pin,
        )
        cpu_seconds = time.monotonic() - started
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvtier-io")
        self._closed = False
        self._http = None
        if serve_metrics and cfg.metrics_port:
            port = cfg.metrics_port + namespace.tp_rank
            self._http = self.metrics.serve(port, self.health)
            logger.info("kvtier: Prometheus metrics on port %d (/metrics, /health)", port)
        logger.info(
            "kvtier: tier store ready: %d CPU slots of %d bytes (%s in %.1f s)%s",
            self.cpu.num_slots,
            chunk_bytes,
            "allocated and pinned" if self.cpu.slab.pinned else "allocated, not pinned",
            cpu_seconds,
            (f", {self.disk.num_slots} disk slots in {self.disk.path}" if self.disk else "")
            + (f", remote tier {self.remote.url}" if self.remote else ""),
        )

    # -- lookups -------------------------------------------------------------------------------

    def prefix_hits(self, keys: Sequence[ChunkKey]) -> int:
        """How many leading ``keys`` some tier holds (nothing is pinned: a hint, not a promise).

        Asks the remote tier (a network round trip) only about keys no local tier holds.
        """
        local = [a or b for a, b in zip(self.cpu.contains(keys), self.disk.contains(keys) if self.disk else [False] * len(keys))]
        n = local.index(False) if False in local else len(keys)
        if self.remote is not None and n < len(keys):
            remote = self.remote.contains(keys[n:])
            n += remote.index(False) if False in remote else len(remote)
        return n

    def acquire(
        self, keys: Sequence[ChunkKey], timeout_s: Optional[float] = None, wait_s: float = 1.0, lower: bool = True
    ) -> Lease:
        """Pin the longest servable prefix of ``keys`` in CPU slots, loading lower-tier hits on the way.

        Loading a disk or remote hit may wait up to ``wait_s`` for a CPU slot (a demotion).
        ``lower=False`` pins CPU-resident chunks only and never touches the disk or the network:
        the form for the scheduler's thread.
        """
        loaded_from: dict[ChunkKey, str] = {}

        def fill(keys: Sequence[ChunkKey], views: Sequence[torch.Tensor]) -> list[bool]:
            loaded = self.disk.read_many(keys, views) if self.disk else [False] * len(keys)
            loaded_from.update((k, "disk") for k, ok in zip(keys, loaded) if ok)
            missing = [i for i, ok in enumerate(loaded) if not ok]
            if self.remote is not None and missing:
                got = self.remote.read_many([keys[i] for i in missing], [views[i] for i in missing])
                for i, ok in zip(missing, got):
                    loaded[i] = ok
                    if ok:
                        loaded_from[keys[i]] = "remote"
            return loaded

        lower = lower and (self.disk is not None or self.remote is not None)
        requested = len(keys)
        with self.metrics.timed("store", "acquire"):
            if lower:  # reserve slots only for chunks some tier can deliver
                keys = keys[: self.prefix_hits(keys)]
            lease = self.cpu.acquire(keys, timeout_s, fill=fill if lower else None, wait_s=wait_s)
        for tier in ("cpu", "disk", "remote"):
            self.metrics.hits.labels(tier).inc(sum(loaded_from.get(k, "cpu") == tier for k in lease.keys))
        self.metrics.misses.inc(requested - len(lease.keys))
        self.metrics.bytes.labels("cpu", "out").inc(len(lease.keys) * self.chunk_bytes)
        return lease

    def reserve(
        self, keys: Sequence[ChunkKey], wait_s: float = 0.0, timeout_s: Optional[float] = None, expendable: bool = False
    ) -> Lease:
        """Fresh CPU slots for the keys no local tier holds yet; write them, then ``commit``.
        ``expendable`` chunks stay in the CPU tier only and go first when it is full (see CpuTier)."""
        if self.disk is not None and not expendable:
            on_disk = self.disk.contains(keys)
            keys = [k for k, d in zip(keys, on_disk) if not d]
        return self.cpu.reserve(keys, wait_s=wait_s, timeout_s=timeout_s, expendable=expendable)

    def commit(self, lease: Lease) -> bool:
        """Publish a ``reserve`` lease's chunks, and start writing them to the remote tier."""
        if not lease.commit():
            return False
        if self.remote is not None and not lease.expendable:
            self._to_remote(lease.keys)
        return True

    def _to_remote(self, keys: list[ChunkKey]) -> None:
        """Write chunks to the remote tier from their CPU slots, pinned until every write ended."""
        assert self.remote is not None
        lease = self.cpu.acquire(keys, timeout_s=max(60.0, self.cfg.pin_timeout_s))
        futures = [self.remote.submit(k, v) for k, v in zip(lease.keys, lease.views)]
        pending = [f for f in futures if f is not None]
        if not pending:
            lease.release()
            return
        remaining = [len(pending)]
        lock = threading.Lock()

        def one_done(_: "Future[bool]") -> None:
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                lease.release()

        for f in pending:
            f.add_done_callback(one_done)

    # -- copying batch API ---------------------------------------------------------------------

    def get_into(self, keys: Sequence[ChunkKey], buffers: Sequence[torch.Tensor]) -> int:
        """Copy the longest servable prefix of ``keys`` into ``buffers``; returns its length.

        Works in windows of half the CPU tier, so a batch may be larger than the CPU tier.
        """
        window = max(1, self.cpu.num_slots // 2)
        done = 0
        while done < len(keys):
            want = keys[done : done + window]
            with self.acquire(want) as lease:
                for view, dst in zip(lease.views, buffers[done:]):
                    dst.copy_(view)
                got = len(lease.keys)
                if not lease.release():
                    break  # the lease expired mid-copy: this window's bytes cannot be trusted
            done += got
            if got < len(want):
                break
        return done

    def put(self, keys: Sequence[ChunkKey], buffers: Sequence[torch.Tensor], wait_s: float = 1.0) -> int:
        """Store ``buffers`` under ``keys``; returns how many chunks were newly stored."""
        by_key = dict(zip(keys, buffers))
        with self.metrics.timed("store", "put"):
            lease = self.reserve(keys, wait_s=wait_s)
            with lease:
                for key, view in zip(lease.keys, lease.views):
                    view.copy_(by_key[key])
                stored = len(lease.keys) if self.commit(lease) else 0
        return stored

    def put_async(self, keys: Sequence[ChunkKey], buffers: Sequence[torch.Tensor], wait_s: float = 1.0) -> "Future[int]":
        """``put`` on a background thread; ``buffers`` must stay unchanged until the future is done."""
        return self._pool.submit(self.put, list(keys), list(buffers), wait_s)

    def prefetch(self, keys: Sequence[ChunkKey], wait_s: float = 1.0) -> "Future[int]":
        """Bring the leading servable ``keys`` into the CPU tier in the background.

        The future gives how many leading chunks were in the CPU tier when it ran; they stay
        there as the most recently used, unpinned.
        """
        return self._pool.submit(self._prefetch, list(keys), wait_s)

    def _prefetch(self, keys: list[ChunkKey], wait_s: float) -> int:
        with self.metrics.timed("store", "prefetch"), self.acquire(keys, wait_s=wait_s) as lease:
            return len(lease.keys)

    @property
    def closed(self) -> bool:
        return self._closed

    def health(self) -> dict:
        """What ``/health`` answers: ok while open, with each tier's occupancy and the remote's state."""
        state = {
            "status": "closed" if self._closed else "ok",
            "cpu": {"chunks": len(self.cpu), "capacity": self.cpu.num_slots},
        }
        if self.disk is not None:
            state["disk"] = {"chunks": len(self.disk), "capacity": self.disk.num_slots}
        if self.remote is not None:
            state["remote"] = {"url": _without_secrets(self.remote.url), "up": self.remote.available}
        return state

    def close(self, persist_timeout_s: float = 120.0) -> None:
        """Finish background work, write CPU-only chunks to the disk tier, free slab and file.

        So a restarted server finds everything this one held, not only what had been demoted.
        Closing twice is harmless.
        """
        if self._closed:
            return
        self._closed = True
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        self._pool.shutdown(wait=True)
        if self.disk is not None:
            n = self.cpu.demote_all(persist_timeout_s)
            if n:
                logger.info("kvtier: writing %d CPU-tier chunks to %s before exit", n, self.disk.path)
            self.disk.close()
        if self.remote is not None:
            self.remote.close()
        self.cpu.close()


def _without_secrets(url: str) -> str:
    """``url`` without a password (``redis://:pw@host``) or query (``?token=T``): safe to serve."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.split("?", 1)[0].partition("/")
    return scheme + sep + netloc.rpartition("@")[2] + slash + path
