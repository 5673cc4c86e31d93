"""A bounded queue of chunk writes drained by one background thread (the disk and remote tiers)."""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Callable, Optional

import torch

from kvtier.sglang_ext.chunk_keys import ChunkKey

logger = logging.getLogger(__name__)

WriteFn = Callable[[ChunkKey, torch.Tensor], bool]


class WriteQueue:
    """Runs ``write(key, src)`` for each queued chunk, in order, on a thread named ``name``.

    The queue is bounded so a slow tier applies back-pressure (``put`` refuses or waits) instead
    of holding unbounded pinned memory; ``flush`` waits for everything queued before it.
    """

    def __init__(self, name: str, depth: int, write: WriteFn) -> None:
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def put(self, key: ChunkKey, src: torch.Tensor, block_s: float = 0.0) -> Optional["Future[bool]"]:
        """Queue a write of ``src`` (unchanged until the future is done); None if still full after ``block_s``."""
        future: Future[bool] = Future()
        try:
            self._queue.put((key, src, future), block=block_s > 0, timeout=block_s if block_s > 0 else None)
        except queue.Full:
            return None
        return future

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            key, src, future = item
            if key is None:  # a flush marker: everything queued before it is done
                future.set_result(True)
                continue
            try:
                future.set_result(self._write(key, src))
            except Exception as exc:  # one failed write fails its future, not the thread
                logger.error("kvtier: writing chunk %s failed: %s", key.hex()[:16], exc)
                future.set_exception(exc)

    def flush(self, timeout_s: Optional[float] = None) -> None:
        done: Future[bool] = Future()
        self._queue.put((None, None, done), timeout=timeout_s)
        done.result(timeout=timeout_s)

    def close(self) -> None:
        """Finish every queued write, then stop the thread."""
        self._queue.put(None)
        self._thread.join()
