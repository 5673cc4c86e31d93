"""Page-aligned host memory, pinned for DMA when CUDA is present.

Memory comes from an anonymous ``mmap`` (page-aligned, exactly the size asked for, which
``torch.empty(pin_memory=True)`` does not promise: its caching allocator rounds up to a power of
two) and is registered with ``cudaHostRegister`` so GPU copies from and to it run as DMA. Page
alignment also makes every slot a valid O_DIRECT buffer for the disk tier.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import weakref

import torch

logger = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE


def round_up(n: int, to: int = 4096) -> int:
    return (n + to - 1) // to * to


class HostSlab:
    """``nbytes`` of page-aligned host memory as a uint8 tensor; pinned if CUDA is available."""

    def __init__(self, nbytes: int, pin: bool | None = None) -> None:
        if nbytes <= 0:
            raise ValueError(f"HostSlab size must be positive, got {nbytes}")
        self.nbytes = nbytes
        # MAP_POPULATE faults every page in now: the tier is allocated once, at start, rather
        # than at 4 KiB a fault on the first copies (which ran at 0.6 GB/s here).
        self._mmap = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
        # The tensor and each view of it hold this buffer object, which holds the mapping: the memory
        # lives, and stays pinned, as long as any view does, whether or not the slab object is kept.
        memory = (ctypes.c_ubyte * nbytes).from_buffer(self._mmap)
        self.tensor = torch.frombuffer(memory, dtype=torch.uint8)
        self.pinned = False
        if pin is None:
            pin = torch.cuda.is_available()
        if pin:
            err = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed with CUDA error {int(err)}")
            self.pinned = True
            # Unpinned when the last view goes (or at close), before the mapping is unmapped: a range
            # unmapped still registered makes the next mmap at those addresses fail to register
            # (error 712), and unpinning while a view lives made the kernels refuse it as pageable.
            self._unpin = weakref.finalize(memory, torch.cuda.cudart().cudaHostUnregister, self.tensor.data_ptr())
            self._unpin.atexit = False  # at exit the process's memory goes anyway
        else:
            logger.info("kvtier: CUDA not available, host slab of %d bytes is not pinned", nbytes)

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.tensor[offset : offset + nbytes]

    def close(self) -> None:
        """Unpin and unmap; the slab and every view of it must no longer be used."""
        if self._mmap.closed:
            return
        if self.pinned:
            self._unpin()
            self.pinned = False
        if hasattr(self, "tensor"):  # a close that found views alive already dropped it
            del self.tensor
        try:
            self._mmap.close()
        except BufferError:
            # A view is still referenced somewhere; the mapping is freed with the last one.
            logger.debug("kvtier: host slab still referenced at close; left to the garbage collector")
