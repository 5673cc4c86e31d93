"""Move KV between SGLang's paged GPU KV pool and chunk buffers in (pinned) host memory.

``gather_kv`` copies the pool rows of a batch of chunks into a host slab and ``scatter_kv`` copies
them back, each in a single Triton launch covering every layer, K and V, and every chunk (a
scatter may be issued as one launch per group of layers instead; the GPU reads and writes the
pinned host memory directly, no staging copy); ``KVPool`` does the same for a pool whose buffers
it checked once, for callers that copy from one pool again and again; ``*_reference`` are the
same operations in plain torch. ``copy_kv_rows`` copies rows from one pool straight into another
pool's rows (every layer, K and V, one launch); on CUDA the destination may be another GPU's memory
mapped into this process (CUDA IPC), which the kernel reaches with peer stores; ``RowCopy`` does it
for two pools checked once.

Chunk layout (a contract other code relies on): a chunk holds ``T`` tokens (``chunk_tokens``) of
all ``L`` layers, K then V, contiguous, in the pool's store dtype::

    [K: L x T x (H*Dk)] then [V: L x T x (H*Dv)]

so a chunk is ``T * L * H * (Dk + Dv) * itemsize`` bytes; in elements, K of layer ``l``, token
``t`` starts at ``(l*T + t) * H*Dk`` and V at ``L*T*H*Dk + (l*T + t) * H*Dv``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = [
    "KVPool",
    "RowCopy",
    "chunk_nbytes",
    "copy_kv_rows",
    "copy_kv_rows_reference",
    "gather_kv",
    "gather_kv_reference",
    "scatter_kv",
    "scatter_kv_reference",
    "uses_triton",
]

# Rows are copied as the widest integer word that the row sizes, base pointers and chunk
# offsets are all aligned to, so the kernel never looks at the element dtype (fp8 included).
_WORD_DTYPES = {8: tl.int64, 4: tl.int32, 2: tl.int16, 1: tl.int8}
# Words one program moves per row segment / in all. A 32 KiB tile (4096 int64 words, 4 warps)
# gathered into pinned memory at 51 GB/s on an H100, 93% of a plain device-to-host memcpy.
_MAX_BLOCK_WORDS = 1024
_TILE_WORDS = 4096


@triton.jit
def _copy_rows(pool, slot, host_rows, t_mask, ROW_WORDS: tl.constexpr, BLOCK_W: tl.constexpr,
               GATHER: tl.constexpr):
    for w0 in tl.static_range(0, ROW_WORDS, BLOCK_W):
        cols = w0 + tl.arange(0, BLOCK_W)
        mask = t_mask[:, None] & (cols < ROW_WORDS)[None, :]
        pool_ptrs = pool + slot[:, None] * ROW_WORDS + cols[None, :]
        host_ptrs = host_rows[:, None] + cols[None, :]
        if GATHER:
            tl.store(host_ptrs, tl.load(pool_ptrs, mask=mask), mask=mask)
        else:
            tl.store(pool_ptrs, tl.load(host_ptrs, mask=mask), mask=mask)


@triton.jit
def _kv_copy_kernel(
    layer_ptrs,  # int64 [2L]: data_ptr() of K layer 0, V layer 0, K layer 1, ...
    slots,  # int64 [n_chunks * CHUNK_TOKENS]
    host,  # uint8 slab holding the chunks
    host_offsets,  # int64 [n_chunks], byte offset of each chunk in host
    v_region_words,  # L * CHUNK_TOKENS * K_WORDS: where a chunk's V part starts
    n_tokens,  # n_chunks * CHUNK_TOKENS
    n_tiles,  # cdiv(n_tokens, BLOCK_T)
    n_items,  # n_tiles * the launch's layers
    first_layer,  # the launch's first layer (a load may be issued as ranges of layers)
    CHUNK_TOKENS: tl.constexpr,
    K_WORDS: tl.constexpr,
    V_WORDS: tl.constexpr,
    WORD: tl.constexpr,
    WORD_BYTES: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_KW: tl.constexpr,
    BLOCK_VW: tl.constexpr,
    GATHER: tl.constexpr,
):
    # Items are (layer, token tile) pairs, layer-major, so layers land roughly in order; each
    # moves K and V of its tile. Every program takes every num_programs-th item: with one
    # program per item that is one each, with fewer (``max_programs``) the copy occupies only
    # that many SMs and leaves the rest to a forward pass running beside it. A tile is BLOCK_T
    # consecutive tokens of the batch and may span chunks, so chunks of one token (PD's packed
    # pages at page size 1) still move in 32 KiB tiles.
    host_words = host.to(tl.pointer_type(WORD))
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
        layer = (item // n_tiles).to(tl.int64) + first_layer
        g = (item % n_tiles).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        g_mask = g < n_tokens
        slot = tl.load(slots + g, mask=g_mask, other=-1)
        t_mask = slot >= 0  # -1 marks a token to skip (and the tile's tail past the batch)
        chunk, t = g // CHUNK_TOKENS, g % CHUNK_TOKENS
        host_chunk = host_words + tl.load(host_offsets + chunk, mask=g_mask, other=0) // WORD_BYTES
        row = layer * CHUNK_TOKENS + t
        # The layers are separate allocations, so their addresses come in as integers and become
        # typed pointers here (as LMCache's multi_layer_kv_transfer does in CUDA); one launch then
        # reaches all of them. Triton's interpreter treats pointers as host addresses too, so the
        # same kernel runs there on CPU tensors.
        k_pool = tl.load(layer_ptrs + 2 * layer).to(tl.pointer_type(WORD))
        _copy_rows(k_pool, slot, host_chunk + row * K_WORDS, t_mask, K_WORDS, BLOCK_KW, GATHER)
        v_pool = tl.load(layer_ptrs + 2 * layer + 1).to(tl.pointer_type(WORD))
        v_host = host_chunk + v_region_words
        _copy_rows(v_pool, slot, v_host + row * V_WORDS, t_mask, V_WORDS, BLOCK_VW, GATHER)


@triton.jit
def _layer_ptr(table_entry, WORD: tl.constexpr):
    """A layer's base address from the table as a typed pointer."""
    return tl.load(table_entry).to(tl.pointer_type(WORD))


@triton.jit
def _row_copy_kernel(
    src_ptrs,  # int64 [2L]: data_ptr() of the source's K layer 0, V layer 0, K layer 1, ...
    dst_ptrs,  # int64 [2L]: the same for the destination pool
    src_rows,  # int64 [n_rows]
    dst_rows,  # int64 [n_rows]
    n_rows,
    K_WORDS: tl.constexpr,
    V_WORDS: tl.constexpr,
    WORD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_KW: tl.constexpr,
    BLOCK_VW: tl.constexpr,
):
    # Grid: (row tiles, layers); each program moves K and V of its rows of one layer.
    layer = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < n_rows
    src = tl.load(src_rows + t, mask=t_mask, other=0)
    dst = tl.load(dst_rows + t, mask=t_mask, other=0)
    # A gather into "host rows" that are the destination pool's rows: the same inner loop.
    k_src = _layer_ptr(src_ptrs + 2 * layer, WORD)
    k_dst = _layer_ptr(dst_ptrs + 2 * layer, WORD)
    _copy_rows(k_src, src, k_dst + dst * K_WORDS, t_mask, K_WORDS, BLOCK_KW, True)
    v_src = _layer_ptr(src_ptrs + 2 * layer + 1, WORD)
    v_dst = _layer_ptr(dst_ptrs + 2 * layer + 1, WORD)
    _copy_rows(v_src, src, v_dst + dst * V_WORDS, t_mask, V_WORDS, BLOCK_VW, True)


# Triton chose compiling or interpreting when it defined the kernels (TRITON_INTERPRET at import).
_INTERPRETED = isinstance(_kv_copy_kernel, InterpretedFunction)


def uses_triton(device: torch.device) -> bool:
    """Whether ``gather_kv``/``scatter_kv`` run the Triton kernel for a pool on ``device``.

    CUDA pools always do. CPU pools do only under ``TRITON_INTERPRET=1`` (set before this module
    is imported), which is how the tests exercise the kernel without a GPU; otherwise they use
    the torch reference.
    """
    if device.type == "cuda":
        if _INTERPRETED:
            # The interpreter dereferences the layer addresses on the host: CUDA ones would crash.
            raise RuntimeError("TRITON_INTERPRET=1 cannot move KV of a CUDA pool; unset it")
        return True
    return _INTERPRETED


def chunk_nbytes(k_buffers: Sequence[torch.Tensor], v_buffers: Sequence[torch.Tensor],
                 chunk_tokens: int) -> int:
    """Bytes of one chunk of ``chunk_tokens`` tokens of this pool (see the module's layout)."""
    return chunk_tokens * len(k_buffers) * (_row_bytes(k_buffers[0]) + _row_bytes(v_buffers[0]))


@dataclass(frozen=True, eq=False)
class KVPool:
    """A pool's per-layer K and V buffers, checked once (``KVPool.of``).

    Checking 2L buffers takes the caller's thread ~0.2 ms (``benchmarks/launch_cost.py``), so a
    server's copies, each launched from SGLang's scheduler thread, go through one ``KVPool`` made at
    start-up (``gather``/``scatter``); ``gather_kv``/``scatter_kv`` make one per call. The buffers'
    addresses are read here: they must keep their storage (SGLang allocates a pool's buffers once).
    """

    k_buffers: tuple[torch.Tensor, ...]
    v_buffers: tuple[torch.Tensor, ...]
    rows: int
    k_row_bytes: int
    v_row_bytes: int
    layer_ptrs: tuple[int, ...]
    """data_ptr() of K layer 0, V layer 0, K layer 1, ... (the kernel's table)."""
    alignment: int
    """gcd of the row sizes and the layer addresses: with a copy's host address and offsets, the
    widest word the kernel may move."""

    @classmethod
    def of(cls, k_buffers: Sequence[torch.Tensor], v_buffers: Sequence[torch.Tensor]) -> "KVPool":
        """The pool of ``k_buffers``/``v_buffers`` (SGLang's ``k_buffer``/``v_buffer``): every layer
        ``[rows, heads, dim]``, contiguous, of one dtype, device and shape."""
        if len(k_buffers) == 0 or len(k_buffers) != len(v_buffers):
            raise ValueError(f"need as many K as V layer buffers, at least one; got "
                             f"{len(k_buffers)} K and {len(v_buffers)} V")
        first = k_buffers[0]
        for name, bufs in (("k_buffers", k_buffers), ("v_buffers", v_buffers)):
            for i, buf in enumerate(bufs):
                if buf.dtype != first.dtype or buf.device != first.device:
                    raise ValueError(f"{name}[{i}] is {buf.dtype} on {buf.device}, but k_buffers[0] "
                                     f"is {first.dtype} on {first.device}; all layers must match")
                if buf.dim() < 2 or buf.shape != bufs[0].shape or buf.shape[0] != first.shape[0]:
                    raise ValueError(f"{name}[{i}] has shape {tuple(buf.shape)}; every layer needs "
                                     f"the same [rows, heads, dim] shape and K and V the same rows")
                if not buf.is_contiguous():
                    raise ValueError(f"{name}[{i}] is not contiguous")
        k_row_bytes, v_row_bytes = _row_bytes(first), _row_bytes(v_buffers[0])
        ptrs = _layer_addresses(k_buffers, v_buffers)
        return cls(tuple(k_buffers), tuple(v_buffers), first.shape[0], k_row_bytes, v_row_bytes, ptrs,
                   math.gcd(k_row_bytes, v_row_bytes, *ptrs))

    @property
    def num_layers(self) -> int:
        return len(self.k_buffers)

    @property
    def device(self) -> torch.device:
        return self.k_buffers[0].device

    def chunk_nbytes(self, chunk_tokens: int) -> int:
        """Bytes of one chunk of ``chunk_tokens`` tokens (see the module's layout)."""
        return chunk_nbytes(self.k_buffers, self.v_buffers, chunk_tokens)

    def gather(self, slots: torch.Tensor, dst: torch.Tensor, dst_offsets: torch.Tensor, chunk_tokens: int,
               max_programs: Optional[int] = None) -> None:
        """:func:`gather_kv` from this pool."""
        plan = _check(self, slots, dst, dst_offsets, chunk_tokens, "dst", gather=True)
        if not plan.offsets.numel():
            return
        if uses_triton(self.device):
            _launch(plan, slots, dst, "dst", chunk_tokens, gather=True,
                    max_programs=_check_programs(max_programs), groups=[range(self.num_layers)])
        else:
            _gather_torch(plan, slots, dst, chunk_tokens)

    def scatter(self, src: torch.Tensor, src_offsets: torch.Tensor, slots: torch.Tensor, chunk_tokens: int,
                max_programs: Optional[int] = None, groups: Optional[Sequence[range]] = None,
                on_launched: Optional[Callable[[range], None]] = None) -> None:
        """:func:`scatter_kv` into this pool."""
        plan = _check(self, slots, src, src_offsets, chunk_tokens, "src", gather=False)
        groups = _layer_groups(groups, self.num_layers)
        if not plan.offsets.numel():
            return
        if uses_triton(self.device):
            _launch(plan, slots, src, "src", chunk_tokens, gather=False,
                    max_programs=_check_programs(max_programs), groups=groups, on_launched=on_launched)
        else:
            _scatter_torch(plan, src, slots, chunk_tokens, groups, on_launched)


@dataclass(frozen=True)
class _Plan:
    """One copy's checked arguments."""

    pool: KVPool
    chunk_bytes: int
    offsets: torch.Tensor
    """int64 [n_chunks] on the CPU."""
    word_bytes: int


def _check(pool: KVPool, slots: torch.Tensor, host: torch.Tensor, host_offsets: torch.Tensor, chunk_tokens: int,
           host_name: str, gather: bool) -> _Plan:
    if not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    device, chunk_bytes = pool.device, pool.chunk_nbytes(chunk_tokens)

    if host.dtype != torch.uint8 or host.dim() != 1 or not host.is_contiguous():
        raise ValueError(f"{host_name} must be a contiguous 1-D uint8 tensor, got {host.dtype} "
                         f"with shape {tuple(host.shape)}")
    if host.device != device and host.device.type != "cpu":
        raise ValueError(f"{host_name} is on {host.device} but the pool is on {device}")

    if host_offsets.dtype != torch.int64 or host_offsets.dim() != 1:
        raise ValueError(f"{host_name}_offsets must be a 1-D int64 tensor, got "
                         f"{host_offsets.dtype} with shape {tuple(host_offsets.shape)}")
    # Read on the host (a stream sync if they live on the GPU; callers keep them on the CPU).
    offsets = host_offsets.cpu()
    n_chunks = offsets.numel()
    if slots.dtype != torch.int64 or slots.dim() != 1 or slots.numel() != n_chunks * chunk_tokens:
        raise ValueError(f"slots must be 1-D int64 with n_chunks * chunk_tokens = {n_chunks} * "
                         f"{chunk_tokens} entries, got {slots.dtype} with shape "
                         f"{tuple(slots.shape)}")
    if slots.device != device and slots.device.type != "cpu":
        raise ValueError(f"slots are on {slots.device} but the pool is on {device}")
    # CUDA-resident slots are trusted: checking them would stall the stream on a sync.
    if slots.device.type == "cpu" and n_chunks:
        low, high = int(slots.min()), int(slots.max())
        if low < -1 or high >= pool.rows:
            raise ValueError(f"slots must lie in [-1, {pool.rows}), got [{low}, {high}]")
    offsets_align = 8  # only powers of two up to a word matter below
    if n_chunks:
        low, high, offsets_align, close = _offset_facts(offsets, chunk_bytes, overlap=gather)
        if low < 0 or high + chunk_bytes > host.numel():
            off = next(o for o in offsets.tolist() if o < 0 or o + chunk_bytes > host.numel())
            raise ValueError(f"chunk at {host_name} offset {off} ({chunk_bytes} bytes) is outside "
                             f"{host_name}'s {host.numel()} bytes")
        if close is not None:
            raise ValueError(f"chunks at {host_name} offsets {close[0]} and {close[1]} overlap "
                             f"({chunk_bytes} bytes each)")

    return _Plan(pool, chunk_bytes, offsets, _word_bytes(math.gcd(pool.alignment, host.data_ptr(), offsets_align)))


# Up to this many chunks a copy's offsets are checked as Python ints, above with tensor ops (PD
# moves pages of one token as chunks, thousands per call). Each small torch op costs the calling
# thread 4-70 us on an H100 host, the most right after it waited for the GPU, as SGLang's scheduler
# has (ab/launch_cost_after_wait_h100.json); a pass over 40 Python ints takes a few us.
_FEW_CHUNKS = 64


def _offset_facts(offsets: torch.Tensor, chunk_bytes: int, overlap: bool
                  ) -> tuple[int, int, int, Optional[tuple[int, int]]]:
    """Of a non-empty int64 CPU tensor of chunk offsets: the smallest, the largest, gcd(8, all of
    them) and, if ``overlap``, the first two in ascending order less than ``chunk_bytes`` apart (else
    None). gcd(8, o) is a power of two, so gcd(8, every offset) is the smallest of them."""
    if offsets.numel() <= _FEW_CHUNKS:
        values = offsets.tolist()
        ordered = sorted(values) if overlap else []
        close = next(((a, b) for a, b in zip(ordered, ordered[1:]) if b - a < chunk_bytes), None)
        return min(values), max(values), math.gcd(8, *values), close
    low, high = (int(x) for x in torch.aminmax(offsets))
    align = int(torch.gcd(offsets, torch.tensor(8)).min())
    close = None
    if overlap:
        ordered = offsets.sort().values
        near = (ordered.diff() < chunk_bytes).nonzero()
        if near.numel():
            i = int(near[0])
            close = (int(ordered[i]), int(ordered[i + 1]))
    return low, high, align, close


def _layer_addresses(k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor]) -> tuple[int, ...]:
    return tuple(b.data_ptr() for kv in zip(k_buffers, v_buffers) for b in kv)


def _word_bytes(alignment: int) -> int:
    return next(w for w in (8, 4, 2, 1) if alignment % w == 0)


def _blocks(k_row_bytes: int, v_row_bytes: int, word_bytes: int) -> tuple[int, int, int, int, int]:
    """Words of a K and a V row, the segments each row is moved in, and the tokens (rows) of one
    tile; the tile depends only on the row sizes, so a new batch size compiles nothing."""
    k_words, v_words = k_row_bytes // word_bytes, v_row_bytes // word_bytes
    block_kw = min(triton.next_power_of_2(k_words), _MAX_BLOCK_WORDS)
    block_vw = min(triton.next_power_of_2(v_words), _MAX_BLOCK_WORDS)
    return k_words, v_words, block_kw, block_vw, _TILE_WORDS // max(block_kw, block_vw)


@functools.lru_cache(maxsize=16)
def _layer_ptr_table(ptrs: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # Keyed by the addresses it holds, so a hit is correct even if the buffers were reallocated.
    return torch.tensor(ptrs, dtype=torch.int64, device=device)


def _launch(plan: _Plan, slots: torch.Tensor, host: torch.Tensor, host_name: str, chunk_tokens: int, gather: bool,
            max_programs: Optional[int], groups: Sequence[range],
            on_launched: Optional[Callable[[range], None]] = None) -> None:
    pool = plan.pool
    device = pool.device
    if host.device != device and not host.is_pinned():
        raise ValueError(f"{host_name} is pageable host memory; the GPU kernel can only reach "
                         f"pinned (cudaHostRegister'd) memory")
    table = _layer_ptr_table(pool.layer_ptrs, device)
    offsets = plan.offsets.contiguous()
    if device.type == "cuda":
        # From pinned memory, without a wait: a blocking copy of pageable memory synchronizes the
        # stream, so the host would wait for everything queued before it, e.g. the forward pass
        # that a spill's side stream waits on.
        offsets = offsets.pin_memory().to(device, non_blocking=True)
    slots = slots.to(device, non_blocking=True)
    k_words, v_words, block_kw, block_vw, block_t = _blocks(pool.k_row_bytes, pool.v_row_bytes, plan.word_bytes)
    n_tokens = plan.offsets.numel() * chunk_tokens
    n_tiles = triton.cdiv(n_tokens, block_t)
    v_region_words = pool.num_layers * chunk_tokens * k_words
    # Everything above is done once per call: a load issued as one launch per layer sits on the
    # scheduler's critical path, so each further group costs only the launch itself.
    for layers in groups:
        n_items = n_tiles * len(layers)
        grid = (min(n_items, max_programs or n_items),)
        # A pinned CPU slab goes in as a tensor: Triton's launcher maps its address to the device
        # pointer of the registered memory (the same address under UVA), and refuses pageable memory.
        _kv_copy_kernel[grid](
            table, slots, host, offsets, v_region_words, n_tokens, n_tiles, n_items, layers.start,
            CHUNK_TOKENS=chunk_tokens, K_WORDS=k_words, V_WORDS=v_words,
            WORD=_WORD_DTYPES[plan.word_bytes], WORD_BYTES=plan.word_bytes,
            BLOCK_T=block_t, BLOCK_KW=block_kw, BLOCK_VW=block_vw, GATHER=gather,
        )
        if on_launched is not None:
            on_launched(layers)


def _check_programs(max_programs: Optional[int]) -> Optional[int]:
    if max_programs is not None and (not isinstance(max_programs, int) or max_programs < 1):
        raise ValueError(f"max_programs must be None or an int >= 1, got {max_programs!r}")
    return max_programs


def _row_bytes(buf: torch.Tensor) -> int:
    # From the shape: indexing a row (buf[0]) makes a view, microseconds per buffer and call.
    return math.prod(buf.shape[1:]) * buf.element_size()


def _byte_rows(buf: torch.Tensor) -> torch.Tensor:
    # index_select/index_copy_ lack kernels for some dtypes (fp8 on CPU); bytes always work.
    return buf.view(torch.uint8).view(buf.shape[0], -1)


def _gather_torch(plan: _Plan, slots: torch.Tensor, dst: torch.Tensor, chunk_tokens: int) -> None:
    pool = plan.pool
    n_chunks = plan.offsets.numel()
    slots = slots.to(pool.device)
    keep = slots >= 0
    skipping = not bool(keep.all())
    parts, keep_parts = [], []
    for bufs in (pool.k_buffers, pool.v_buffers):
        rows = torch.stack([_byte_rows(b).index_select(0, slots.clamp(min=0)) for b in bufs])  # [L, n*T, row]
        per_chunk = rows.view(pool.num_layers, n_chunks, chunk_tokens, -1).transpose(0, 1)
        parts.append(per_chunk.reshape(n_chunks, -1))
        if skipping:  # which bytes of each chunk belong to a kept token
            keep_parts.append(keep.view(n_chunks, 1, chunk_tokens, 1).expand(per_chunk.shape).reshape(n_chunks, -1))
    chunks = torch.cat(parts, dim=1).to(dst.device)
    keep_bytes = torch.cat(keep_parts, dim=1).to(dst.device) if skipping else None
    for i, off in enumerate(plan.offsets.tolist()):
        out = dst[off : off + plan.chunk_bytes]
        out.copy_(chunks[i] if keep_bytes is None else torch.where(keep_bytes[i], chunks[i], out))


def _scatter_torch(plan: _Plan, src: torch.Tensor, slots: torch.Tensor, chunk_tokens: int, groups: Sequence[range],
                   on_launched: Optional[Callable[[range], None]] = None) -> None:
    pool = plan.pool
    device = pool.device
    n_chunks = plan.offsets.numel()
    slots = slots.to(device)
    keep = slots >= 0
    chunks = torch.stack([src[off : off + plan.chunk_bytes] for off in plan.offsets.tolist()]).to(device)
    k_bytes = pool.num_layers * chunk_tokens * pool.k_row_bytes
    per_layer = [(bufs, region.reshape(n_chunks, pool.num_layers, chunk_tokens, row_bytes), row_bytes)
                 for bufs, region, row_bytes in ((pool.k_buffers, chunks[:, :k_bytes], pool.k_row_bytes),
                                                 (pool.v_buffers, chunks[:, k_bytes:], pool.v_row_bytes))]
    for layers in groups:
        for bufs, region, row_bytes in per_layer:
            for layer in layers:
                rows = region[:, layer].reshape(n_chunks * chunk_tokens, row_bytes)
                _byte_rows(bufs[layer]).index_copy_(0, slots[keep], rows[keep])
        if on_launched is not None:
            on_launched(layers)


def gather_kv(k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor], slots: torch.Tensor,
              dst: torch.Tensor, dst_offsets: torch.Tensor, chunk_tokens: int,
              max_programs: Optional[int] = None) -> None:
    """Copy the KV of ``n_chunks`` chunks from the pool into ``dst``, in one kernel launch.

    Args:
        k_buffers, v_buffers: the pool's per-layer ``[rows, heads, dim]`` buffers (SGLang's
            ``MHATokenToKVPool.k_buffer``/``v_buffer``), all of one dtype and device.
        slots: int64 ``[n_chunks * chunk_tokens]``, the pool rows of each chunk's tokens, chunk
            after chunk; on the pool's device or the CPU. Only CPU slots are range-checked. A
            slot of -1 leaves its token's rows of the chunk in ``dst`` as they were (a partly
            filled chunk moves only its tokens' bytes).
        dst: 1-D uint8 slab receiving the chunks in the module's layout; on a CUDA pool's device,
            or pinned host memory, which the kernel writes directly.
        dst_offsets: int64 ``[n_chunks]`` byte offset in ``dst`` where each chunk starts; read
            on the host for validation, so keep it on the CPU.
        chunk_tokens: tokens per chunk (``T``).
        max_programs: run the kernel as at most this many programs (thread blocks), each looping
            over its share, so that the copy occupies at most that many SMs; None: one program
            per 32 KiB tile, as many as the GPU takes.

    Runs on the current stream for CUDA pools: synchronize before reading ``dst`` on the host.
    """
    KVPool.of(k_buffers, v_buffers).gather(slots, dst, dst_offsets, chunk_tokens, max_programs)


def scatter_kv(src: torch.Tensor, src_offsets: torch.Tensor, slots: torch.Tensor,
               k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor],
               chunk_tokens: int, max_programs: Optional[int] = None,
               groups: Optional[Sequence[range]] = None,
               on_launched: Optional[Callable[[range], None]] = None) -> None:
    """Copy ``n_chunks`` chunks from ``src`` into the pool rows ``slots``, in one kernel launch
    (or one per group of layers).

    The inverse of :func:`gather_kv`, with the same argument rules (``src``/``src_offsets`` in
    the roles of ``dst``/``dst_offsets``; a slot of -1 skips its token, as when the start of a
    chunk is still in the pool). ``src`` chunks may overlap; slots should not repeat.
    ``groups`` (default: one group of all layers) issues the copy as one launch per contiguous
    range of layers, in order, and calls ``on_launched(layers)`` after each (to record an event
    that the forward pass waits on before it reads those layers); the arguments are checked and
    moved to the GPU once for all groups.
    Runs on the current stream for CUDA pools: leave ``src`` untouched until it has finished.
    """
    KVPool.of(k_buffers, v_buffers).scatter(src, src_offsets, slots, chunk_tokens, max_programs, groups, on_launched)


def _layer_groups(groups: Optional[Sequence[range]], num_layers: int) -> list[range]:
    if groups is None:
        return [range(num_layers)]
    groups = list(groups)
    for layers in groups:
        if (not isinstance(layers, range) or layers.step != 1 or layers.start < 0 or layers.stop > num_layers
                or not layers):
            raise ValueError(f"each layer group must be a non-empty contiguous range within range({num_layers}), "
                             f"got {layers!r}")
    return groups


def gather_kv_reference(k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor],
                        slots: torch.Tensor, dst: torch.Tensor, dst_offsets: torch.Tensor,
                        chunk_tokens: int) -> None:
    """:func:`gather_kv` in plain torch (``index_select``), on any device."""
    plan = _check(KVPool.of(k_buffers, v_buffers), slots, dst, dst_offsets, chunk_tokens, "dst", gather=True)
    if plan.offsets.numel():
        _gather_torch(plan, slots, dst, chunk_tokens)


def scatter_kv_reference(src: torch.Tensor, src_offsets: torch.Tensor, slots: torch.Tensor,
                         k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor],
                         chunk_tokens: int) -> None:
    """:func:`scatter_kv` in plain torch (``index_copy_``), on any device."""
    pool = KVPool.of(k_buffers, v_buffers)
    plan = _check(pool, slots, src, src_offsets, chunk_tokens, "src", gather=False)
    if plan.offsets.numel():
        _scatter_torch(plan, src, slots, chunk_tokens, [range(pool.num_layers)])


@dataclass(frozen=True)
class RowCopy:
    """Row copies from one checked pool into another (``KVPool.of`` each, then ``RowCopy.between``),
    for callers that copy rows between the same two pools again and again (PD's direct path, per
    chunk): a call then checks only its rows. See :func:`copy_kv_rows` for the arguments."""

    src: KVPool
    dst: KVPool
    word_bytes: int

    @classmethod
    def between(cls, src: KVPool, dst: KVPool) -> "RowCopy":
        if dst.num_layers != src.num_layers:
            raise ValueError(f"the source pool has {src.num_layers} layers, the destination {dst.num_layers}")
        if (dst.k_row_bytes, dst.v_row_bytes) != (src.k_row_bytes, src.v_row_bytes):
            raise ValueError(f"the destination's K and V rows are {dst.k_row_bytes} and {dst.v_row_bytes} bytes, "
                             f"the source's {src.k_row_bytes} and {src.v_row_bytes}; both pools need the same "
                             f"row sizes (heads, dim, dtype)")
        return cls(src, dst, _word_bytes(math.gcd(src.alignment, dst.alignment)))

    @classmethod
    def of(cls, src_k: Sequence[torch.Tensor], src_v: Sequence[torch.Tensor], dst_k: Sequence[torch.Tensor],
           dst_v: Sequence[torch.Tensor]) -> "RowCopy":
        """``between`` the pools of these buffers, each checked by ``KVPool.of``."""
        pools = []
        for side, k, v in (("source", src_k, src_v), ("destination", dst_k, dst_v)):
            try:
                pools.append(KVPool.of(k, v))
            except ValueError as e:
                raise ValueError(f"{side} pool: {e}") from None
        return cls.between(*pools)

    @property
    def device(self) -> torch.device:
        """Where the copy runs: the source pool's device."""
        return self.src.device

    def copy(self, src_rows: torch.Tensor, dst_rows: torch.Tensor) -> None:
        """:func:`copy_kv_rows` between these pools."""
        if not self._check_rows(src_rows, dst_rows):
            return
        device = self.device
        if not uses_triton(device):
            self._copy_torch(src_rows, dst_rows)
            return
        if self.dst.device.type != device.type:
            raise ValueError(f"the destination pool is on {self.dst.device}, the source on {device}; "
                             f"the kernel copies between pools of one kind of device")
        src_table = _layer_ptr_table(self.src.layer_ptrs, device)
        dst_table = _layer_ptr_table(self.dst.layer_ptrs, device)
        n_rows = src_rows.numel()
        src_rows = src_rows.to(device, non_blocking=True)
        dst_rows = dst_rows.to(device, non_blocking=True)
        k_words, v_words, block_kw, block_vw, block_t = _blocks(self.src.k_row_bytes, self.src.v_row_bytes,
                                                                self.word_bytes)
        grid = (triton.cdiv(n_rows, block_t), self.src.num_layers)
        _row_copy_kernel[grid](
            src_table, dst_table, src_rows, dst_rows, n_rows,
            K_WORDS=k_words, V_WORDS=v_words, WORD=_WORD_DTYPES[self.word_bytes],
            BLOCK_T=block_t, BLOCK_KW=block_kw, BLOCK_VW=block_vw,
        )

    def copy_reference(self, src_rows: torch.Tensor, dst_rows: torch.Tensor) -> None:
        """:func:`copy_kv_rows_reference` between these pools."""
        if self._check_rows(src_rows, dst_rows):
            self._copy_torch(src_rows, dst_rows)

    def _copy_torch(self, src_rows: torch.Tensor, dst_rows: torch.Tensor) -> None:
        src_rows = src_rows.to(self.device)
        dst_rows = dst_rows.to(self.dst.device)
        pairs = zip((*self.src.k_buffers, *self.src.v_buffers), (*self.dst.k_buffers, *self.dst.v_buffers))
        for src, dst in pairs:
            rows = _byte_rows(src).index_select(0, src_rows).to(dst.device)
            _byte_rows(dst).index_copy_(0, dst_rows, rows)

    def _check_rows(self, src_rows: torch.Tensor, dst_rows: torch.Tensor) -> int:
        """The number of rows to copy, after checking them."""
        for name, rows, pool in (("src_rows", src_rows, self.src), ("dst_rows", dst_rows, self.dst)):
            if rows.dtype != torch.int64 or rows.dim() != 1:
                raise ValueError(f"{name} must be a 1-D int64 tensor, got {rows.dtype} with shape "
                                 f"{tuple(rows.shape)}")
            if rows.device.type != "cpu" and rows.device != self.device:
                raise ValueError(f"{name} are on {rows.device}; keep them on the CPU or on the source "
                                 f"pool's device {self.device}")
            # Rows already on a GPU are trusted: checking them would stall the stream on a sync.
            if rows.device.type == "cpu" and rows.numel():
                low, high = int(rows.min()), int(rows.max())
                if low < 0 or high >= pool.rows:
                    raise ValueError(f"{name} must lie in [0, {pool.rows}), got [{low}, {high}]")
        if src_rows.numel() != dst_rows.numel():
            raise ValueError(f"src_rows has {src_rows.numel()} rows, dst_rows {dst_rows.numel()}; give "
                             f"one destination row per source row")
        return src_rows.numel()


def copy_kv_rows(src_k: list[torch.Tensor], src_v: list[torch.Tensor], dst_k: list[torch.Tensor],
                 dst_v: list[torch.Tensor], src_rows: torch.Tensor, dst_rows: torch.Tensor) -> None:
    """Copy rows ``src_rows`` of one pool into rows ``dst_rows`` of another, every layer, K and V,
    in one kernel launch on the source pool's device (``RowCopy`` does it for two pools checked once).

    Args:
        src_k, src_v: the source pool's per-layer ``[rows, ...]`` buffers, a pool as
            ``KVPool.of`` takes it (its rows are copied as bytes).
        dst_k, dst_v: the destination pool's (of any dtype), as many, with the same K and V row
            sizes in bytes.
            On CUDA they may live on another GPU (memory of another process mapped by CUDA IPC
            included) that the source GPU has peer access to; the kernel stores there directly.
        src_rows, dst_rows: int64 ``[n]``, row ``src_rows[i]`` goes to ``dst_rows[i]`` (page_size
            > 1: the rows of the pages, ``pd_layout.page_rows``); on the CPU, where they are
            range-checked, or on the source pool's device. Destination rows should not repeat.

    Runs on the current stream of the source pool's device: synchronize before the destination's
    owner reads the rows.
    """
    RowCopy.of(src_k, src_v, dst_k, dst_v).copy(src_rows, dst_rows)


def copy_kv_rows_reference(src_k: list[torch.Tensor], src_v: list[torch.Tensor], dst_k: list[torch.Tensor],
                           dst_v: list[torch.Tensor], src_rows: torch.Tensor, dst_rows: torch.Tensor) -> None:
    """:func:`copy_kv_rows` in plain torch (``index_select`` / ``index_copy_``), on any devices."""
    RowCopy.of(src_k, src_v, dst_k, dst_v).copy_reference(src_rows, dst_rows)
