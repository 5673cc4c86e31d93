"""KV head slices for PD between servers of different attention TP sizes: pure arithmetic.

With TP, SGLang's MHA pool on rank ``r`` of ``tp`` holds KV heads ``[r*H/tp, (r+1)*H/tp)`` of the
model's ``H``, as ``[rows, heads, head_dim]`` per layer buffer. A prefill rank and a decode rank
of different TP sizes share the heads where their ranges overlap; ``head_slice`` says which, in
each side's local numbering. The PD packing (``kvtier.transfer.pd_layout.kv_groups``: per buffer
group, every K layer then every V layer, ``page_size`` rows each, page after page) of a slice is
the packing a rank holding only those heads would have: ``slice_plan`` places each buffer's head
columns in it. Nothing here imports SGLang or torch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

from kvtier.transfer.pd_layout import kv_groups


def head_range(total_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """The global KV heads ``[start, stop)`` that attention TP rank ``tp_rank`` of ``tp_size`` holds."""
    if tp_size <= 0 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} is not a rank of tp_size {tp_size}")
    if total_heads <= 0 or total_heads % tp_size:
        raise ValueError(f"{total_heads} KV heads do not split evenly over tp_size {tp_size}")
    n = total_heads // tp_size
    return tp_rank * n, (tp_rank + 1) * n


@dataclass(frozen=True)
class HeadSlice:
    """The heads one sender rank gives one receiver rank, globally and in each side's numbering."""

    heads: tuple[int, int]
    """Global heads ``[start, stop)``."""
    src: tuple[int, int]
    """The same heads among the sender's ``src_heads``."""
    src_heads: int
    dst: tuple[int, int]
    """The same heads among the receiver's ``dst_heads``."""
    dst_heads: int

    @property
    def src_full(self) -> bool:
        """Whether the slice is every head of the sender (its pages move whole)."""
        return self.src == (0, self.src_heads)

    @property
    def dst_full(self) -> bool:
        """Whether the slice is every head of the receiver (its pages are written whole)."""
        return self.dst == (0, self.dst_heads)


def head_slice(src: tuple[int, int], dst: tuple[int, int]) -> Optional[HeadSlice]:
    """The heads shared by a sender holding global heads ``src`` and a receiver holding ``dst``."""
    start, stop = max(src[0], dst[0]), min(src[1], dst[1])
    if start >= stop:
        return None
    return HeadSlice((start, stop), (start - src[0], stop - src[0]), src[1] - src[0],
                     (start - dst[0], stop - dst[0]), dst[1] - dst[0])


def slice_item_lens(item_lens: Sequence[int], heads: int, start: int, stop: int) -> tuple[int, ...]:
    """Bytes per page of each KV buffer when it holds only heads ``[start, stop)`` of its ``heads``."""
    if not 0 <= start < stop <= heads:
        raise ValueError(f"heads [{start}, {stop}) are not a slice of {heads} heads")
    for i, item in enumerate(item_lens):
        if item % heads:
            raise ValueError(f"KV buffer {i} has {item} bytes per page, not a multiple of its {heads} heads")
    return tuple(item // heads * (stop - start) for item in item_lens)


@dataclass(frozen=True)
class BufferSlice:
    """Where one KV buffer's head columns sit in a packed slice page."""

    buffer: int
    """Index into the pool's KV buffers (``kv_item_lens`` order)."""
    offset: int
    """Byte offset of this buffer's ``page_size`` rows in the packed slice page."""
    column: int
    """Byte offset of the first sliced head within one pool row of the buffer."""
    width: int
    """Bytes of the sliced heads in one row."""
    row: int
    """Bytes of one whole pool row of the buffer."""


@functools.lru_cache(maxsize=256)
def slice_plan(item_lens: tuple[int, ...], page_size: int, heads: int, start: int,
               stop: int) -> tuple[int, tuple[BufferSlice, ...]]:
    """(bytes of one packed slice page, where each buffer's heads ``[start, stop)`` go in it).

    The slice page is packed as ``kv_groups`` packs a pool whose buffers hold only those heads,
    so a slice page of every head is byte for byte the full packed page."""
    sliced = slice_item_lens(item_lens, heads, start, stop)
    plan, offset = [], 0
    for ks, vs in kv_groups(list(sliced)):
        for i in ks + vs:
            row = item_lens[i] // page_size
            if item_lens[i] % page_size:
                raise ValueError(f"KV buffer {i} has {item_lens[i]} bytes per page, not a multiple of "
                                 f"page_size {page_size}")
            per_head = row // heads
            plan.append(BufferSlice(i, offset, start * per_head, (stop - start) * per_head, row))
            offset += sliced[i]
    return offset, tuple(plan)

