"""The memory side of kvtier's PD backend: pool views from SGLang's pointers, staging, packing.

SGLang hands a PD backend only addresses (``KVArgs.kv_data_ptrs`` and friends), so the pool and
the metadata rows are wrapped here as uint8 tensors on their device, without a copy. ``Packer``
moves the pages of a request, every layer, K and V, between the pool and a contiguous staging
buffer with ``KVPool.gather`` / ``scatter`` (one launch per buffer group), in page order: page
``i`` of a batch sits at ``i * page_bytes``; between servers of different TP sizes it moves a
head slice instead (``kvtier.transfer.pd_heads.slice_plan``: the packing of a rank holding only
those heads), column by column with torch copies; on the direct path ``Packer.copy_rows`` stores
a request's pages straight into the destination pool's pages (the decode's buffers mapped by CUDA
IPC) with ``RowCopy`` (checked once per mapping, ``copy_target`` / ``reuse_target``), one launch per buffer group, no
staging. Each of these returns the copy's own seconds: on a CUDA pool the GPU time between two
CUDA events recorded around the launches on the Packer's stream (read after the stream sync the
call ends with anyway), on a CPU pool the wall time of the torch copy; PD's
``kvtier_pd_copy_seconds_total`` adds them up, so the copy can be told apart from the protocol
around it. ``transport_kind`` resolves ``pd_transport`` for the pool's device
(``kvtier.transfer.backends.open_transport`` opens it) and ``staging_buffer`` allocates staging
where that transport can reach it: on the pool's GPU for a device-capable transport, else in pinned
host memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import time
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from kvtier.kernels.kv_pages import KVPool, RowCopy
from kvtier.sglang_ext.config import ConfigError, KVTierConfig
from kvtier.transfer.pd_heads import slice_plan
from kvtier.transfer.pd_layout import kv_groups, page_rows, pages_outside

logger = logging.getLogger(__name__)

CopyTarget = tuple[list[torch.Tensor], list[RowCopy]]
"""Another pool's mapped regions and the copies into them (``Packer.copy_target``)."""


class _CudaMemory:
    """Exposes a raw device address as ``__cuda_array_interface__`` so torch can wrap it."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3,
        }


def wrap_memory(ptr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A 1-D uint8 tensor over ``nbytes`` at address ``ptr`` on ``device``, sharing the memory."""
    if device.type == "cuda":
        return torch.as_tensor(_CudaMemory(ptr, nbytes), device=device)
    if device.type != "cpu":
        raise ValueError(f"kvtier PD supports KV pools on CUDA or CPU, not {device}")
    return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=torch.uint8)


def cuda_ipc_available() -> bool:
    """Whether the CUDA IPC transport can be imported here."""
    try:
        importlib.import_module("kvtier.transfer.cuda_ipc")
    except ImportError:
        return False
    return True


def transport_kind(cfg: KVTierConfig, device: torch.device) -> str:
    """The backend that ``pd_transport`` selects for a pool on ``device``."""
    kind = cfg.pd_transport
    if kind == "auto":
        return "cuda_ipc" if device.type == "cuda" and cuda_ipc_available() else "zmq"
    if kind == "cuda_ipc" and device.type != "cuda":
        raise ConfigError(f"kvtier setting pd_transport='cuda_ipc' needs a CUDA KV pool, this one is on "
                          f"{device}; use pd_transport: zmq")
    if kind == "cuda_ipc" and not cuda_ipc_available():
        raise ConfigError("kvtier setting pd_transport='cuda_ipc' but kvtier.transfer.cuda_ipc cannot be "
                          "imported here; use pd_transport: zmq")
    return kind


def staging_buffer(nbytes: int, device: torch.device, on_device: bool) -> torch.Tensor:
    """Staging memory the transport can reach: on ``device`` if ``on_device``, else (pinned) host."""
    if on_device:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")


class Packer:
    """Gathers pages of the pool into a staging buffer and scatters them back, all buffers at once.

    ``heads=(start, stop, of)`` moves only heads ``[start, stop)`` of the ``of`` heads each buffer
    row holds, packed as ``slice_plan`` says; None moves whole pages."""

    def __init__(self, ptrs: Sequence[int], lens: Sequence[int], item_lens: Sequence[int],
                 page_size: int, device: torch.device):
        self.page_size = page_size
        self.device = device
        self.item_lens = tuple(int(x) for x in item_lens)
        self.page_bytes = int(sum(item_lens))
        self.views = views = []
        for ptr, nbytes, item in zip(ptrs, lens, item_lens):
            row = item // page_size
            views.append(wrap_memory(ptr, nbytes - nbytes % row, device).view(-1, row))
        self.groups = []
        self.index_groups = kv_groups(list(item_lens))
        offset = 0
        for ks, vs in self.index_groups:
            self.groups.append((KVPool.of([views[i] for i in ks], [views[i] for i in vs]), offset))
            offset += sum(item_lens[i] for i in ks + vs)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._row_buffer: Optional[torch.Tensor] = None

    def _offsets(self, n: int, base: int, group_offset: int) -> torch.Tensor:
        return torch.arange(n, dtype=torch.int64) * self.page_bytes + base + group_offset

    def packed_bytes(self, heads: Optional[tuple[int, int, int]] = None) -> int:
        """Bytes of one packed page (of the head slice ``heads``)."""
        if heads is None:
            return self.page_bytes
        return slice_plan(self.item_lens, self.page_size, heads[2], heads[0], heads[1])[0]

    def gather(self, pages: np.ndarray, dst: torch.Tensor, wait: Optional[object] = None,
               heads: Optional[tuple[int, int, int]] = None) -> float:
        """Copy ``pages`` into ``dst[: len(pages) * packed_bytes(heads)]``; returns when the bytes
        are there, with the copy's seconds (see the module). ``wait`` is a CUDA event that the copy
        waits for (the scheduler's KV writes)."""
        rows = torch.from_numpy(page_rows(pages, self.page_size))
        with self._copying(wait) as timer:
            if heads is None:
                for pool, off in self.groups:
                    pool.gather(rows, dst, self._offsets(len(pages), 0, off), self.page_size)
            else:
                rows, n, ps = rows.to(self.device), len(pages), self.page_size
                nbytes, plan = slice_plan(self.item_lens, ps, heads[2], heads[0], heads[1])
                # Host staging (zmq) for a GPU pool: pack on the GPU, then one copy to the host.
                out = dst[: n * nbytes].view(n, nbytes)
                packed = out if out.device == self.device else torch.empty_like(out, device=self.device)
                for b in plan:
                    part = self.views[b.buffer][:, b.column : b.column + b.width].index_select(0, rows)
                    packed[:, b.offset : b.offset + ps * b.width].copy_(part.view(n, ps * b.width))
                if packed is not out:
                    out.copy_(packed)
        return timer.seconds

    def scatter(self, src: torch.Tensor, base: int, pages: np.ndarray,
                heads: Optional[tuple[int, int, int]] = None) -> float:
        """Copy ``len(pages)`` packed pages (of the head slice ``heads``) at ``src[base:]`` into
        ``pages``; returns when done, with the copy's seconds."""
        rows = torch.from_numpy(page_rows(pages, self.page_size))
        with self._copying(None) as timer:
            if heads is None:
                for pool, off in self.groups:
                    pool.scatter(src, self._offsets(len(pages), base, off), rows, self.page_size)
            else:
                rows, n, ps = rows.to(self.device), len(pages), self.page_size
                nbytes, plan = slice_plan(self.item_lens, ps, heads[2], heads[0], heads[1])
                # Host staging (zmq) holds the slice for a GPU pool: one copy to the GPU, where
                # index_copy_ needs it, instead of one per buffer.
                packed = src[base : base + n * nbytes].view(n, nbytes).to(self.device)
                for b in plan:
                    part = packed[:, b.offset : b.offset + ps * b.width].reshape(n * ps, b.width)
                    self.views[b.buffer][:, b.column : b.column + b.width].index_copy_(0, rows, part)
        return timer.seconds

    def copy_target(self, regions: Sequence[torch.Tensor]) -> list[RowCopy]:
        """Another pool of this layout, given as one flat uint8 region per KV buffer (as wrapped or
        registered), as the destination of ``copy_rows``: per buffer group, the regions viewed as
        ``[rows, row bytes]`` and checked once here rather than at every copy (64 buffers of a
        Llama-3-8B pool: ~0.2 ms of the sending thread per copy on a CPU)."""
        if len(regions) != len(self.views):
            raise ValueError(f"the destination pool has {len(regions)} KV buffers, this one {len(self.views)}")
        dst = [r.view(-1, v.shape[1]) for r, v in zip(regions, self.views)]
        return [RowCopy.between(pool, KVPool.of([dst[i] for i in ks], [dst[i] for i in vs]))
                for (pool, _), (ks, vs) in zip(self.groups, self.index_groups)]

    def reuse_target(self, last: Optional[CopyTarget], regions: Sequence[torch.Tensor]) -> CopyTarget:
        """``last`` if it was built for these very region objects (a transport hands out the same
        mappings while they stay valid), else the regions with their ``copy_target``."""
        if last is not None and len(last[0]) == len(regions) and all(a is b for a, b in zip(last[0], regions)):
            return last
        return list(regions), self.copy_target(regions)

    def copy_rows(self, pages: np.ndarray, dst: Sequence[RowCopy], dst_pages: np.ndarray,
                  wait: Optional[object] = None) -> float:
        """Copy ``pages`` of this pool into ``dst_pages`` of the pool ``dst`` (``copy_target``; on a
        CUDA pool it may be another GPU's buffers mapped into this process), every buffer, one
        launch per buffer group on this pool's GPU; returns when the bytes are there, with the
        copy's seconds. ``wait`` as in ``gather``."""
        if len(pages) != len(dst_pages):
            raise ValueError(f"{len(pages)} source pages for {len(dst_pages)} destination pages")
        for side, side_pages, rows in (("source", pages, self.views[0].shape[0]),
                                       ("destination", dst_pages, dst[0].dst.rows)):
            why = pages_outside(side_pages, rows // self.page_size)
            if why is not None:
                raise ValueError(f"{side} {why}")
        rows = np.concatenate([page_rows(pages, self.page_size), page_rows(dst_pages, self.page_size)])
        with self._copying(wait) as timer:
            both = self._on_device(rows)
            src_rows, dst_rows = both[: len(rows) // 2], both[len(rows) // 2 :]
            for group in dst:
                group.copy(src_rows, dst_rows)
        return timer.seconds

    def _on_device(self, rows: np.ndarray) -> torch.Tensor:
        """``rows`` on this pool's device, by one copy on the current stream from a pinned buffer
        reused across calls (each call ends with a stream sync, so the buffer is free again).

        Not a pageable copy per list: a copy from pageable memory blocks the thread, which then
        waits for the GIL, kept by SGLang's scheduler loop for up to Python's switch interval
        (transfer_gpu.py's direct_packer: 0.6 ms around the copy idle, 6.6 ms beside a busy
        Python thread at a 0.5 ms interval). Device rows are not range-checked by
        ``RowCopy.copy``: ``copy_rows`` checks the pages on the host first."""
        if self.stream is None:
            return torch.from_numpy(rows)
        if self._row_buffer is None or self._row_buffer.numel() < len(rows):
            self._row_buffer = torch.empty(max(len(rows), 1 << 16), dtype=torch.int64, pin_memory=True)
        host = self._row_buffer[: len(rows)]
        host.numpy()[:] = rows
        return host.to(self.device, non_blocking=True)

    @contextlib.contextmanager
    def _copying(self, wait: Optional[object]) -> Iterator["_CopyTimer"]:
        """Runs the body's copies on this Packer's stream (after ``wait``), then waits for them;
        the timer then holds their seconds."""
        timer = _CopyTimer()
        if self.stream is None:
            start = time.perf_counter()
            yield timer
            timer.seconds = time.perf_counter() - start
            return
        if wait is not None:
            self.stream.wait_event(wait)
        # Recorded after the wait: the GPU time of the copy, not of the scheduler's work before it.
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        try:
            with torch.cuda.stream(self.stream):
                begin.record(self.stream)
                yield timer
                end.record(self.stream)
        finally:
            self.stream.synchronize()
        timer.seconds = begin.elapsed_time(end) / 1e3


class _CopyTimer:
    """The seconds of one ``Packer`` copy, known once the copy has completed."""

    seconds: float = 0.0
