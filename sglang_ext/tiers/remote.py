"""The remote tier on Redis or Valkey (``redis://host:port``): chunks shared by every replica.

``redis+cluster://host:port`` (any node as the seed) talks to a Redis Cluster: chunks spread over
its nodes by key slot, and batched reads go to each node separately.

Each chunk is one Redis value under ``kvtier:<namespace>:<key hex>``: a header (magic, the chunk
key, the payload length, the payload's XXH3-64) followed by the payload, so a value that was
truncated, corrupted or written for another key is detected and read as a miss. Replicas of the
same model and layout compute the same keys (see ``chunk_keys``) and so share; nothing else does.

A remote store must never stall serving: every call has a short socket timeout, and after a
failure the tier is marked down for ``retry_after_s`` during which lookups answer "miss" without
touching the network; then the next call tries again (redis-py reconnects by itself). Writes go
through a bounded ``WriteQueue``; a full queue drops the write (counted).
"""

from __future__ import annotations

import logging
import struct
from concurrent.futures import Future
from typing import Optional, Sequence

import numpy as np
import redis
import redis.cluster
import torch
import xxhash

from kvtier.sglang_ext.chunk_keys import KEY_BYTES, ChunkKey
from kvtier.sglang_ext.metrics import TierMetrics
from kvtier.sglang_ext.tiers.outage import Outage
from kvtier.sglang_ext.tiers.write_queue import WriteQueue

logger = logging.getLogger(__name__)

_HEADER = struct.Struct(f"<8s{KEY_BYTES}sQQ")  # magic, key, payload length, payload xxh3
_MAGIC = b"KVTREM01"
_CLUSTER_SCHEMES = {"redis+cluster://": "redis://", "rediss+cluster://": "rediss://"}


class RedisTier:
    """Chunks of ``chunk_bytes`` in a Redis/Valkey server, namespaced by ``tag``."""

    name = "remote"

    def __init__(
        self,
        url: str,
        tag: str,
        chunk_bytes: int,
        *,
        metrics: TierMetrics,
        timeout_s: float = 0.5,
        retry_after_s: float = 5.0,
        queue_depth: int = 64,
    ) -> None:
        self.url = url
        self.chunk_bytes = chunk_bytes
        self._prefix = f"kvtier:{tag}:"
        self._timeout = timeout_s
        self._metrics = metrics
        self._outage = Outage(url, retry_after_s, metrics)
        self._client: Optional[redis.Redis | redis.cluster.RedisCluster] = None
        self._connect()
        self._writes = WriteQueue("kvtier-remote-writer", queue_depth, self._write)

    def _connect(self) -> bool:
        """Create the client; a cluster client must reach a node to learn the slots, which may fail."""
        if self._client is not None:
            return True
        timeouts = {"socket_timeout": self._timeout, "socket_connect_timeout": self._timeout}
        for scheme, plain in _CLUSTER_SCHEMES.items():
            if self.url.startswith(scheme):
                try:
                    self._client = redis.cluster.RedisCluster.from_url(plain + self.url[len(scheme):], **timeouts)
                except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
                    self._failed("connecting to the cluster", exc)
                    return False
                return True
        self._client = redis.Redis.from_url(self.url, **timeouts)
        return True

    def _mget(self, names: list[str]) -> list[Optional[bytes]]:
        if isinstance(self._client, redis.cluster.RedisCluster):
            return self._client.mget_nonatomic(names)  # keys live on several nodes
        return self._client.mget(names)

    def _name(self, key: ChunkKey) -> str:
        return self._prefix + key.hex()

    # -- availability ---------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return self._outage.up and self._connect()

    def _failed(self, what: str, exc: Exception) -> None:
        self._outage.failed(what, exc)

    # -- reads ------------------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys or not self.available:
            return [False] * len(keys)
        try:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self._name(key))
            return [bool(n) for n in pipe.execute()]
        except redis.RedisError as exc:
            self._failed("a lookup", exc)
            return [False] * len(keys)

    def read_many(self, keys: Sequence[ChunkKey], dsts: Sequence[torch.Tensor]) -> list[bool]:
        """Read each key into its ``dst``; per key, whether it was there and intact."""
        if not keys or not self.available:
            return [False] * len(keys)
        with self._metrics.timed(self.name, "read"):
            try:
                values = self._mget([self._name(k) for k in keys])
            except redis.RedisError as exc:
                self._failed("a read", exc)
                return [False] * len(keys)
            loaded = [value is not None and self._unpack(key, value, dst) for key, value, dst in zip(keys, values, dsts)]
        self._metrics.bytes.labels(self.name, "out").inc(sum(loaded) * self.chunk_bytes)
        return loaded

    def _unpack(self, key: ChunkKey, value: bytes, dst: torch.Tensor) -> bool:
        payload = memoryview(value)[_HEADER.size :]
        if len(value) >= _HEADER.size:
            magic, hkey, length, digest = _HEADER.unpack_from(value)
            if (magic, hkey, length) == (_MAGIC, key, self.chunk_bytes) and len(payload) == length:
                if xxhash.xxh3_64_intdigest(payload) == digest:
                    dst.numpy()[:] = np.frombuffer(payload, dtype=np.uint8)
                    return True
        self._metrics.corrupt.labels(self.name).inc()
        logger.warning("kvtier: remote chunk %s is damaged; treated as a miss", key.hex()[:16])
        return False

    # -- writes -----------------------------------------------------------------------------------

    def submit(self, key: ChunkKey, src: torch.Tensor) -> Optional["Future[bool]"]:
        """Queue ``src`` (unchanged until the future is done) for writing; None if the queue is full."""
        if not self.available:
            future: Future[bool] = Future()
            future.set_result(False)
            return future
        future = self._writes.put(key, src)
        if future is None:
            self._metrics.dropped.labels("remote_busy").inc()
        return future

    def _write(self, key: ChunkKey, src: torch.Tensor) -> bool:
        if not self.available:
            return False
        payload = src.numpy().tobytes()
        header = _HEADER.pack(_MAGIC, key, len(payload), xxhash.xxh3_64_intdigest(payload))
        try:
            with self._metrics.timed(self.name, "write"):
                self._client.set(self._name(key), header + payload)
        except redis.RedisError as exc:
            self._failed("a write", exc)
            return False
        self._metrics.bytes.labels(self.name, "in").inc(self.chunk_bytes)
        return True

    def flush(self, timeout_s: Optional[float] = None) -> None:
        """Wait until every queued write was attempted."""
        self._writes.flush(timeout_s)

    def close(self) -> None:
        self._writes.close()
        if self._client is not None:
            self._client.close()
