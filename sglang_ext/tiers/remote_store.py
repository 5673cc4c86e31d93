"""The remote tier on kvtier's own store server (``kvtier://host:port?token=T``, ``launch.store``).

The same interface as ``RedisTier`` (contains / read_many / submit / flush / close), spoken to a
``StoreServer`` over a ``ZmqTransport``: one request at a time under a lock, each with a deadline.
Bytes are read from and written into the server's CPU slab directly, one-sidedly. A failed or late
call marks the tier down for ``retry_after_s`` (lookups are misses without touching the network);
the next call after that says hello again, so a restarted server is found by itself.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from concurrent.futures import Future
from typing import Any, Optional, Sequence
from urllib.parse import parse_qs, urlparse

import torch

from kvtier.sglang_ext.chunk_keys import ChunkKey
from kvtier.sglang_ext.metrics import TierMetrics
from kvtier.sglang_ext.tiers.outage import Outage
from kvtier.sglang_ext.tiers.write_queue import WriteQueue
from kvtier.transfer.base import TransferError
from kvtier.transfer.zmq_transport import ZmqTransport


def parse_url(url: str) -> tuple[str, str]:
    """``kvtier://host:port?token=T`` -> (``tcp://host:port``, ``T``)."""
    parsed = urlparse(url)
    if parsed.scheme != "kvtier" or not parsed.hostname or not parsed.port:
        raise ValueError(f"remote_url {url!r}: expected kvtier://host:port?token=...")
    return f"tcp://{parsed.hostname}:{parsed.port}", parse_qs(parsed.query).get("token", [""])[0]


class _Refused(Exception):
    """The server answered with an error (wrong token, other chunk size, ...)."""


class KvtierStoreTier:
    """Chunks of ``chunk_bytes`` on a ``launch.store`` server."""

    name = "remote"

    def __init__(
        self, url: str, chunk_bytes: int, *, metrics: TierMetrics, timeout_s: float = 0.5,
        retry_after_s: float = 5.0, queue_depth: int = 64,
    ) -> None:
        self.url = url
        self.chunk_bytes = chunk_bytes
        self._address, self._token = parse_url(url)
        self._metrics = metrics
        self._timeout = timeout_s
        self._outage = Outage(url, retry_after_s, metrics)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._transport = ZmqTransport()
        self._server: Optional[str] = None
        self._writes = WriteQueue("kvtier-store-writer", queue_depth, self._write)

    @property
    def available(self) -> bool:
        return self._outage.up

    def _failed(self, what: str, exc: Exception) -> None:
        self._outage.failed(what, exc)
        self._server = None  # say hello again next time

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request and its reply (caller holds the lock); raises TransferError or _Refused."""
        if self._server is None:
            peer = self._transport.connect({"backend": "zmq", "address": self._address, "regions": {}})
            self._server = peer
            reply = self._exchange(peer, {"op": "hello", "token": self._token, "chunk_bytes": self.chunk_bytes})
            self._transport.connect({"backend": "zmq", "address": self._address, "regions": reply["regions"]})
        return self._exchange(self._server, request)

    def _exchange(self, peer: str, request: dict[str, Any]) -> dict[str, Any]:
        request["id"] = next(self._ids)
        deadline = time.monotonic() + self._timeout
        self._transport.notify(peer, json.dumps(request).encode(), timeout_s=self._timeout)
        while True:
            note = self._transport.recv_notification(max(0.0, deadline - time.monotonic()))
            reply = json.loads(note.message)
            if reply.get("id") == request["id"]:
                break  # replies to requests that timed out earlier are dropped here
        if "error" in reply:
            raise _Refused(reply["error"])
        return reply

    def _guarded(self, what: str, fn, default):
        if not self.available:
            return default
        with self._lock:
            try:
                return fn()
            except (TransferError, _Refused) as exc:
                self._failed(what, exc)
                return default

    # -- reads ------------------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []
        return self._guarded("a lookup", lambda: self._call({"op": "contains", "keys": [k.hex() for k in keys]})["found"], [False] * len(keys))

    def read_many(self, keys: Sequence[ChunkKey], dsts: Sequence[torch.Tensor]) -> list[bool]:
        if not keys:
            return []

        def fetch() -> list[bool]:
            reply = self._call({"op": "get", "keys": [k.hex() for k in keys]})
            got = dict(zip(reply["keys"], reply["offsets"]))
            ops = [("slab", got[k.hex()], d) for k, d in zip(keys, dsts) if k.hex() in got]
            try:
                if ops:
                    self._transport.read(self._server, ops, timeout_s=self._timeout + len(ops) * 0.1)
            finally:
                if reply["keys"]:
                    self._call({"op": "release", "lease": reply["lease"]})
            return [k.hex() in got for k in keys]

        with self._metrics.timed(self.name, "read"):
            loaded = self._guarded("a read", fetch, [False] * len(keys))
        self._metrics.bytes.labels(self.name, "out").inc(sum(loaded) * self.chunk_bytes)
        return loaded

    # -- writes -----------------------------------------------------------------------------------

    def submit(self, key: ChunkKey, src: torch.Tensor) -> Optional["Future[bool]"]:
        """Queue ``src`` (unchanged until the future is done); None if the queue is full."""
        future = self._writes.put(key, src)
        if future is None:
            self._metrics.dropped.labels("remote_busy").inc()
        return future

    def _write(self, key: ChunkKey, src: torch.Tensor) -> bool:
        def put() -> bool:
            reply = self._call({"op": "reserve", "keys": [key.hex()]})
            if not reply["keys"]:
                return True  # the server has it already
            self._transport.write(self._server, [(src, "slab", reply["offsets"][0])], timeout_s=self._timeout + 0.5)
            return bool(self._call({"op": "commit", "lease": reply["lease"]})["ok"])

        with self._metrics.timed(self.name, "write"):
            ok = self._guarded("a write", put, False)
        if ok:
            self._metrics.bytes.labels(self.name, "in").inc(self.chunk_bytes)
        return ok

    def flush(self, timeout_s: Optional[float] = None) -> None:
        self._writes.flush(timeout_s)

    def close(self) -> None:
        self._writes.close()
        self._transport.close()
