"""kv_pages: the Triton kernels against the torch reference and the layout contract, on SGLang's
real MHATokenToKVPool (on CUDA with a pinned slab where available, else on the CPU through
Triton's interpreter, see conftest.py)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from kvtier.kernels import kv_pages
from kvtier.kernels.kv_pages import (
    KVPool,
    chunk_nbytes,
    gather_kv,
    gather_kv_reference,
    scatter_kv,
    scatter_kv_reference,
    uses_triton,
)

_spec = importlib.util.spec_from_file_location("kvtier_kernel_test_pools", Path(__file__).with_name("pools.py"))
_pools = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_pools)
DEVICE, LAYERS, DTYPES = _pools.DEVICE, _pools.LAYERS, _pools.DTYPES
seeded, make_pool, layer_bytes = _pools.seeded, _pools.make_pool, _pools.layer_bytes


ALIGN = 4096
N_CHUNKS = 4


def random_slots(pool: MHATokenToKVPool, n_tokens: int, gen: torch.Generator) -> torch.Tensor:
    """Slots of ``n_tokens`` tokens on distinct random pages, page by page (page 0 is SGLang's
    padding page)."""
    num_pages = pool.size // pool.page_size
    pages = torch.randperm(num_pages, generator=gen)[: n_tokens // pool.page_size] + 1
    slots = (pages[:, None] * pool.page_size + torch.arange(pool.page_size)).flatten()
    return slots.to(DEVICE)


def random_offsets(chunk_bytes: int, n_chunks: int,
                   gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """Distinct ALIGN-aligned chunk offsets spread over a slab twice as large; and its size."""
    stride = -(-chunk_bytes // ALIGN) * ALIGN
    positions = torch.randperm(2 * n_chunks, generator=gen)[:n_chunks]
    return positions.to(torch.int64) * stride, 2 * n_chunks * stride


def host_slab(nbytes: int) -> torch.Tensor:
    return torch.zeros(nbytes, dtype=torch.uint8, pin_memory=DEVICE.type == "cuda")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def chunk_by_contract(pool: MHATokenToKVPool, chunk_slots: list[int], base: torch.Tensor | None = None) -> torch.Tensor:
    """One chunk built straight from the documented element offsets, independent of the module; a
    slot of -1 keeps ``base``'s bytes of its token."""
    T, L, H = len(chunk_slots), LAYERS, pool.head_num
    dk, dv, itemsize = pool.head_dim, pool.v_head_dim, pool.k_buffer[0].element_size()
    out = torch.empty(T * L * H * (dk + dv) * itemsize, dtype=torch.uint8) if base is None else base.clone()
    for layer in range(L):
        k_rows = pool.k_buffer[layer].view(torch.uint8).reshape(pool.k_buffer[layer].shape[0], -1)
        v_rows = pool.v_buffer[layer].view(torch.uint8).reshape(pool.v_buffer[layer].shape[0], -1)
        for t, slot in enumerate(chunk_slots):
            if slot < 0:
                continue
            k_at = (layer * T + t) * H * dk * itemsize
            v_at = (L * T * H * dk + (layer * T + t) * H * dv) * itemsize
            out[k_at : k_at + H * dk * itemsize] = k_rows[slot].cpu()
            out[v_at : v_at + H * dv * itemsize] = v_rows[slot].cpu()
    return out


def gather_both(pool: MHATokenToKVPool, slots: torch.Tensor, chunk_tokens: int,
                gen: torch.Generator, shift: int = 0,
                max_programs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gathers ``slots`` into a fresh slab with the kernel and the reference; checks they agree
    byte for byte (unwritten bytes included) and returns the kernel's slab and the offsets."""
    n_chunks = slots.numel() // chunk_tokens
    offsets, slab_bytes = random_offsets(chunk_nbytes(pool.k_buffer, pool.v_buffer, chunk_tokens),
                                         n_chunks, gen)
    offsets += shift
    got, want = host_slab(slab_bytes + shift), host_slab(slab_bytes + shift)
    gather_kv(pool.k_buffer, pool.v_buffer, slots, got, offsets, chunk_tokens, max_programs=max_programs)
    gather_kv_reference(pool.k_buffer, pool.v_buffer, slots, want, offsets, chunk_tokens)
    sync()
    assert torch.equal(got, want)
    return got, offsets


def scatter_and_check(slab: torch.Tensor, offsets: torch.Tensor, chunk_tokens: int,
                      src_pool: MHATokenToKVPool, src_slots: torch.Tensor,
                      dst_pool: MHATokenToKVPool, dst_slots: torch.Tensor,
                      max_programs: int | None = None) -> None:
    """Scatters into the zeroed ``dst_pool``: the source rows land at ``dst_slots``, bit-exact,
    and no other row is written."""
    scatter_kv(slab, offsets, dst_slots, dst_pool.k_buffer, dst_pool.v_buffer, chunk_tokens,
               max_programs=max_programs)
    sync()
    untouched = torch.ones(dst_pool.k_buffer[0].shape[0], dtype=torch.bool, device=DEVICE)
    untouched[dst_slots] = False
    for src, dst in zip(layer_bytes(src_pool), layer_bytes(dst_pool)):
        assert torch.equal(dst[dst_slots], src[src_slots])
        assert not dst[untouched].any()


def test_kernel_path_is_exercised():
    # Otherwise CPU runs would compare the torch reference with itself.
    assert uses_triton(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size,chunk_tokens", [(1, 1), (1, 3), (1, 16), (1, 24), (16, 16), (16, 32)])
def test_gather_matches_reference_and_layout(dtype, page_size, chunk_tokens):
    gen = seeded(dtype, page_size, chunk_tokens)
    pool = make_pool(dtype, page_size, 2 * N_CHUNKS * chunk_tokens // page_size, gen)
    slots = random_slots(pool, N_CHUNKS * chunk_tokens, gen)
    slab, offsets = gather_both(pool, slots, chunk_tokens, gen)
    chunk_bytes = chunk_nbytes(pool.k_buffer, pool.v_buffer, chunk_tokens)
    for off, chunk_slots in zip(offsets.tolist(), slots.view(N_CHUNKS, -1).tolist()):
        assert torch.equal(slab[off : off + chunk_bytes], chunk_by_contract(pool, chunk_slots))


def test_layout_with_distinct_v_head_dim():
    gen = seeded("v_head_dim")
    pool = make_pool(torch.bfloat16, 16, 8, gen, head_dim=24, v_head_dim=16)
    slots = random_slots(pool, 2 * 32, gen)
    chunk_bytes = chunk_nbytes(pool.k_buffer, pool.v_buffer, 32)
    assert chunk_bytes == 32 * LAYERS * 2 * (24 + 16) * 2
    slab, offsets = gather_both(pool, slots, 32, gen)
    for off, chunk_slots in zip(offsets.tolist(), slots.view(2, -1).tolist()):
        assert torch.equal(slab[off : off + chunk_bytes], chunk_by_contract(pool, chunk_slots))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [1, 16])
def test_round_trip_into_other_slots(dtype, page_size):
    chunk_tokens = 32
    gen = seeded(dtype, page_size)
    pages = 2 * N_CHUNKS * chunk_tokens // page_size
    src_pool = make_pool(dtype, page_size, pages, gen)
    dst_pool, ref_pool = make_pool(dtype, page_size, pages), make_pool(dtype, page_size, pages)
    src_slots = random_slots(src_pool, N_CHUNKS * chunk_tokens, gen)
    dst_slots = random_slots(dst_pool, N_CHUNKS * chunk_tokens, gen)
    slab, offsets = gather_both(src_pool, src_slots, chunk_tokens, gen)
    scatter_and_check(slab, offsets, chunk_tokens, src_pool, src_slots, dst_pool, dst_slots)
    scatter_kv_reference(slab, offsets, dst_slots, ref_pool.k_buffer, ref_pool.v_buffer,
                         chunk_tokens)
    for dst, ref in zip(layer_bytes(dst_pool), layer_bytes(ref_pool)):
        assert torch.equal(dst, ref)


def record_programs(monkeypatch) -> list[int]:
    """Launches of the chunk kernel still run; each one's program count is appended to the list."""
    programs, kernel = [], kv_pages._kv_copy_kernel

    class Spy:
        def __getitem__(self, grid):
            programs.append(grid[0])
            return kernel[grid]

    monkeypatch.setattr(kv_pages, "_kv_copy_kernel", Spy())
    return programs


@pytest.mark.parametrize("chunk_tokens", [1, 5])
@pytest.mark.parametrize("max_programs", [None, 1, 4, 7, 10_000])
def test_fewer_programs_than_tiles_move_the_same_bytes(monkeypatch, max_programs, chunk_tokens):
    """``max_programs`` caps the grid (each program loops over its share of the layer x tile items):
    gather and scatter still equal the reference and write no other row, with counts that do not
    divide the items; tiles span chunks (of one token: PD's packed pages at page size 1)."""
    # 160-byte rows (20 words) in segments of 8 words, tiles of 2 tokens: 3 layers x 2 tiles of two
    # one-token chunks, or 3 x 10 tiles over 5-token chunks; caps 4 and 7 divide neither count.
    monkeypatch.setattr(kv_pages, "_MAX_BLOCK_WORDS", 8)
    monkeypatch.setattr(kv_pages, "_TILE_WORDS", 16)
    programs = record_programs(monkeypatch)
    page_size = 1
    gen = seeded("max_programs", max_programs, chunk_tokens)
    pages = 2 * N_CHUNKS * chunk_tokens
    src_pool = make_pool(torch.bfloat16, page_size, pages, gen, head_dim=40)
    dst_pool = make_pool(torch.bfloat16, page_size, pages, head_dim=40)
    src_slots = random_slots(src_pool, N_CHUNKS * chunk_tokens, gen)
    dst_slots = random_slots(dst_pool, N_CHUNKS * chunk_tokens, gen)
    slab, offsets = gather_both(src_pool, src_slots, chunk_tokens, gen, max_programs=max_programs)
    scatter_and_check(slab, offsets, chunk_tokens, src_pool, src_slots, dst_pool, dst_slots, max_programs)
    items = LAYERS * -(-N_CHUNKS * chunk_tokens // 2)
    assert programs == [min(items, max_programs or items)] * 2


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_max_programs_must_be_a_positive_int(small_pool, bad):
    slots = torch.arange(16, dtype=torch.int64) + 16
    slab = host_slab(chunk_nbytes(small_pool.k_buffer, small_pool.v_buffer, 16))
    with pytest.raises(ValueError, match="max_programs must be None or an int >= 1"):
        gather_kv(small_pool.k_buffer, small_pool.v_buffer, slots, slab, torch.zeros(1, dtype=torch.int64), 16,
                  max_programs=bad)


@pytest.mark.parametrize(
    "dtype,head_dim,shift",
    [
        (torch.float8_e4m3fn, 3, 0),  # 3-byte rows: 1-byte words
        (torch.bfloat16, 5, 0),  # 10-byte rows: 2-byte words
        (torch.float32, 5, 0),  # 20-byte rows: 4-byte words
        (torch.bfloat16, 16, 1),  # odd chunk offsets: 1-byte words despite 32-byte rows
    ],
    ids=["fp8-3B-rows", "bf16-10B-rows", "fp32-20B-rows", "odd-offsets"],
)
def test_narrow_words_round_trip(dtype, head_dim, shift):
    chunk_tokens, n_chunks = 16, 3
    gen = seeded(dtype, head_dim, shift)
    src_pool = make_pool(dtype, 1, 64, gen, head_num=1, head_dim=head_dim)
    dst_pool = make_pool(dtype, 1, 64, head_num=1, head_dim=head_dim)
    src_slots = random_slots(src_pool, n_chunks * chunk_tokens, gen)
    dst_slots = random_slots(dst_pool, n_chunks * chunk_tokens, gen)
    slab, offsets = gather_both(src_pool, src_slots, chunk_tokens, gen, shift=shift)
    scatter_and_check(slab, offsets, chunk_tokens, src_pool, src_slots, dst_pool, dst_slots)


@pytest.mark.parametrize("head_dim,v_head_dim", [(16, 16), (5, 5), (24, 16)])
def test_many_token_tiles_and_row_segments(monkeypatch, head_dim, v_head_dim):
    # Real pools need several token tiles per chunk and several segments per row; shrinking the
    # tile limits sends these small pools down the same paths.
    monkeypatch.setattr(kv_pages, "_MAX_BLOCK_WORDS", 4)
    monkeypatch.setattr(kv_pages, "_TILE_WORDS", 16)
    chunk_tokens, n_chunks = 24, 3
    gen = seeded(head_dim, v_head_dim)
    shape = dict(head_dim=head_dim, v_head_dim=v_head_dim)
    src_pool = make_pool(torch.bfloat16, 1, 96, gen, **shape)
    dst_pool = make_pool(torch.bfloat16, 1, 96, **shape)
    src_slots = random_slots(src_pool, n_chunks * chunk_tokens, gen)
    dst_slots = random_slots(dst_pool, n_chunks * chunk_tokens, gen)
    slab, offsets = gather_both(src_pool, src_slots, chunk_tokens, gen)
    scatter_and_check(slab, offsets, chunk_tokens, src_pool, src_slots, dst_pool, dst_slots)


def test_scatter_skips_slots_of_minus_one():
    T = 16
    gen = seeded("skip")
    src_pool = make_pool(torch.bfloat16, 1, 64, gen)
    src_slots = random_slots(src_pool, 2 * T, gen)
    slab, offsets = gather_both(src_pool, src_slots, T, gen)
    # Two pools with the same random rows, so skipped rows must keep their old contents.
    dst_pool, ref_pool = (make_pool(torch.bfloat16, 1, 64, seeded("dst")) for _ in range(2))
    before = [buf.clone() for buf in layer_bytes(dst_pool)]
    dst_slots = random_slots(dst_pool, 2 * T, gen)
    skip = torch.zeros(2 * T, dtype=torch.bool, device=DEVICE)
    skip[:5] = True  # the start of chunk 0 is still in the pool
    skip[T + 7] = True
    skipped_rows = dst_slots[skip]
    dst_slots[skip] = -1

    scatter_kv(slab, offsets, dst_slots, dst_pool.k_buffer, dst_pool.v_buffer, T)
    scatter_kv_reference(slab, offsets, dst_slots, ref_pool.k_buffer, ref_pool.v_buffer, T)
    sync()
    for src, dst, ref, old in zip(layer_bytes(src_pool), layer_bytes(dst_pool),
                                  layer_bytes(ref_pool), before):
        assert torch.equal(dst, ref)
        assert torch.equal(dst[dst_slots[~skip]], src[src_slots[~skip]])
        assert torch.equal(dst[skipped_rows], old[skipped_rows])


def test_gather_leaves_the_rows_of_slots_of_minus_one_unwritten():
    """A partly filled chunk (a tail) moves only its tokens' rows; the rest of its slab bytes,
    every layer, K and V, keep what they held."""
    T = 16
    gen = seeded("gather-skip")
    pool = make_pool(torch.bfloat16, 1, 64, gen)
    slots = random_slots(pool, 2 * T, gen)
    slots[5:T] = -1  # chunk 0: a 5-token tail
    slots[T + 9] = -1
    chunk_bytes = chunk_nbytes(pool.k_buffer, pool.v_buffer, T)
    offsets, slab_bytes = random_offsets(chunk_bytes, 2, gen)
    old = torch.randint(0, 256, (slab_bytes,), dtype=torch.uint8, generator=gen)
    got, want = host_slab(slab_bytes), host_slab(slab_bytes)
    got.copy_(old)
    want.copy_(old)
    gather_kv(pool.k_buffer, pool.v_buffer, slots, got, offsets, T)
    gather_kv_reference(pool.k_buffer, pool.v_buffer, slots, want, offsets, T)
    sync()
    assert torch.equal(got, want)
    for off, chunk_slots in zip(offsets.tolist(), slots.view(2, -1).tolist()):
        expected = chunk_by_contract(pool, chunk_slots, base=old[off : off + chunk_bytes])
        assert torch.equal(got[off : off + chunk_bytes].cpu(), expected)


@pytest.mark.parametrize("max_programs", [None, 2])
@pytest.mark.parametrize("groups", [[range(0, 1), range(1, LAYERS)], [range(LAYERS - 1, LAYERS), range(0, LAYERS - 1)],
                                    [range(layer, layer + 1) for layer in range(LAYERS)]])
def test_scatter_by_layer_ranges_equals_one_scatter(monkeypatch, groups, max_programs):
    """A load issued as several launches over ranges of layers writes exactly what one launch does,
    a launch writes only its own layers, and ``on_launched`` hears of each group, in order, once
    its launch is issued."""
    monkeypatch.setattr(kv_pages, "_TILE_WORDS", 32)  # 8 tiles of 4 tokens per layer: a cap of 2 loops
    T = 16
    gen = seeded("layers", len(groups[0]))
    src_pool = make_pool(torch.bfloat16, 1, 64, gen)
    src_slots = random_slots(src_pool, 2 * T, gen)
    slab, offsets = gather_both(src_pool, src_slots, T, gen)
    dst_pool, ref_pool = (make_pool(torch.bfloat16, 1, 64, seeded("dst-layers")) for _ in range(2))
    dst_slots = random_slots(dst_pool, 2 * T, gen)
    scatter_kv_reference(slab, offsets, dst_slots, ref_pool.k_buffer, ref_pool.v_buffer, T)

    before = [buf.clone() for buf in layer_bytes(dst_pool)]
    heard = []
    scatter_kv(slab, offsets, dst_slots, dst_pool.k_buffer, dst_pool.v_buffer, T, max_programs, groups=groups[:1],
               on_launched=heard.append)
    sync()
    assert heard == groups[:1]
    after = layer_bytes(dst_pool)
    for layer in range(LAYERS):
        for kv in (0, 1):
            i = kv * LAYERS + layer
            expected = layer_bytes(ref_pool)[i] if layer in groups[0] else before[i]
            assert torch.equal(after[i], expected), (layer, kv)
    scatter_kv(slab, offsets, dst_slots, dst_pool.k_buffer, dst_pool.v_buffer, T, max_programs, groups=groups[1:],
               on_launched=heard.append)
    sync()
    assert heard == groups
    for dst, ref in zip(layer_bytes(dst_pool), layer_bytes(ref_pool)):
        assert torch.equal(dst, ref)
    for bad in ([range(0, LAYERS + 1)], [range(0, 1), range(1, 1)], [range(0, LAYERS, 2)]):
        with pytest.raises(ValueError, match="contiguous range"):
            scatter_kv(slab, offsets, dst_slots, dst_pool.k_buffer, dst_pool.v_buffer, T, groups=bad)


def test_empty_batch_is_a_no_op():
    pool = make_pool(torch.bfloat16, 1, 8, seeded("empty"))
    slab = host_slab(ALIGN)
    none = torch.empty(0, dtype=torch.int64)
    before = [buf.clone() for buf in layer_bytes(pool)]
    gather_kv(pool.k_buffer, pool.v_buffer, none.to(DEVICE), slab, none, 16)
    assert not slab.any()
    slab.fill_(0xAB)  # a scatter that wrote anything would now change the pool
    scatter_kv(slab, none, none.to(DEVICE), pool.k_buffer, pool.v_buffer, 16)
    sync()
    assert all(torch.equal(buf, old) for buf, old in zip(layer_bytes(pool), before))


@pytest.fixture(scope="module")
def small_pool() -> MHATokenToKVPool:
    return make_pool(torch.bfloat16, 1, 64, seeded("small"))


def _bad_case(pool: MHATokenToKVPool, case: str | None):
    """Arguments (k, v, slots, slab, offsets, T) broken as ``case`` says; T = 16, two chunks."""
    T = 16
    k, v = list(pool.k_buffer), list(pool.v_buffer)
    slots = torch.arange(1, 2 * T + 1, dtype=torch.int64)
    chunk_bytes = chunk_nbytes(k, v, T)
    slab = host_slab(4 * chunk_bytes)
    offsets = torch.tensor([0, chunk_bytes], dtype=torch.int64)
    if case == "dtype":
        v[1] = v[1].to(torch.float16)
    elif case == "layers":
        v = v[:-1]
    elif case == "slots-length":
        slots = slots[:-1]
    elif case == "slots-dtype":
        slots = slots.to(torch.int32)
    elif case == "slots-range":
        slots[3] = pool.k_buffer[0].shape[0]
    elif case == "offset-past-end":
        offsets[1] = 3 * chunk_bytes + 1
    elif case == "offset-negative":
        offsets[0] = -1
    elif case == "slab-dtype":
        slab = slab.view(torch.int32)
    elif case == "chunk-tokens":
        T = 0
    return k, v, slots, slab, offsets, T


BAD_CASES = {
    "dtype": r"v_buffers\[1\] is torch.float16",
    "layers": "as many K as V",
    "slots-length": r"n_chunks \* chunk_tokens = 2 \* 16",
    "slots-dtype": "slots must be 1-D int64",
    "slots-range": r"slots must lie in \[-1, 65\)",
    "offset-past-end": "is outside",
    "offset-negative": "offset -1",
    "slab-dtype": "contiguous 1-D uint8",
    "chunk-tokens": "chunk_tokens must be a positive int",
}


@pytest.mark.parametrize("case", list(BAD_CASES))
@pytest.mark.parametrize("fn", [gather_kv, gather_kv_reference, scatter_kv, scatter_kv_reference],
                         ids=lambda f: f.__name__)
def test_bad_inputs_raise(small_pool, fn, case):
    k, v, slots, slab, offsets, T = _bad_case(small_pool, case)
    with pytest.raises(ValueError, match=BAD_CASES[case]):
        if fn in (gather_kv, gather_kv_reference):
            fn(k, v, slots, slab, offsets, T)
        else:
            fn(slab, offsets, slots, k, v, T)


def test_one_kv_pool_serves_copies_of_other_layouts_as_the_reference_does():
    """A server checks its pool's buffers once (``KVPool.of``) and then copies with other rows, chunk
    counts and slab offsets each time: every copy matches the reference byte for byte, and the
    round trip lands bit-exact in other rows."""
    chunk_tokens, gen = 16, seeded("kv pool")
    src_pool = make_pool(torch.bfloat16, 1, 8 * chunk_tokens, gen)
    dst_pool, ref_pool = make_pool(torch.bfloat16, 1, 8 * chunk_tokens), make_pool(torch.bfloat16, 1, 8 * chunk_tokens)
    src, dst = KVPool.of(src_pool.k_buffer, src_pool.v_buffer), KVPool.of(dst_pool.k_buffer, dst_pool.v_buffer)
    assert src.num_layers == LAYERS and src.chunk_nbytes(chunk_tokens) == chunk_nbytes(
        src_pool.k_buffer, src_pool.v_buffer, chunk_tokens)
    for n_chunks in (1, 3, 2, 4):
        slots, back = (random_slots(src_pool, n_chunks * chunk_tokens, gen) for _ in range(2))
        offsets, slab_bytes = random_offsets(src.chunk_nbytes(chunk_tokens), n_chunks, gen)
        got, want = host_slab(slab_bytes), host_slab(slab_bytes)
        src.gather(slots, got, offsets, chunk_tokens)
        gather_kv_reference(src_pool.k_buffer, src_pool.v_buffer, slots, want, offsets, chunk_tokens)
        sync()
        assert torch.equal(got, want)
        dst.scatter(got, offsets, back, chunk_tokens, groups=[range(1), range(1, LAYERS)])
        scatter_kv_reference(got, offsets, back, ref_pool.k_buffer, ref_pool.v_buffer, chunk_tokens)
        sync()
        for s, d, r in zip(layer_bytes(src_pool), layer_bytes(dst_pool), layer_bytes(ref_pool)):
            assert torch.equal(d[back], s[slots]) and torch.equal(d, r)


@pytest.mark.parametrize("case", ["slots-length", "slots-range", "offset-past-end", "slab-dtype", "chunk-tokens"])
def test_a_kv_pool_still_checks_each_copys_arguments(small_pool, case):
    k, v, slots, slab, offsets, T = _bad_case(small_pool, case)
    pool = KVPool.of(k, v)
    with pytest.raises(ValueError, match=BAD_CASES[case]):
        pool.gather(slots, slab, offsets, T)
    with pytest.raises(ValueError, match=BAD_CASES[case]):
        pool.scatter(slab, offsets, slots, T)


@pytest.mark.parametrize("n", [1, 2, 40, kv_pages._FEW_CHUNKS, kv_pages._FEW_CHUNKS + 1, 3000])
def test_offset_checks_of_few_and_many_chunks_agree_with_a_plain_reading(n):
    """A copy's offsets are read as Python ints for a few chunks and with tensor ops for many: both
    give the extremes, the alignment and the first overlapping pair a plain reading gives."""
    rng = np.random.default_rng(n)
    chunk = 48
    for trial in range(4):
        offsets = rng.permutation(n) * chunk + int(rng.choice([0, 2, 4, 8, 16]))
        if trial % 2 and n > 1:  # two chunks made to overlap
            i, j = rng.choice(n, 2, replace=False)
            offsets[j] = offsets[i] + int(rng.integers(1, chunk))
        ordered = sorted(offsets.tolist())
        want_close = next(((a, b) for a, b in zip(ordered, ordered[1:]) if b - a < chunk), None)
        want = (min(ordered), max(ordered), math.gcd(8, *ordered), want_close)
        assert kv_pages._offset_facts(torch.from_numpy(offsets), chunk, overlap=True) == want
        assert kv_pages._offset_facts(torch.from_numpy(offsets), chunk, overlap=False) == want[:3] + (None,)


def test_overlapping_chunks_raise_only_when_written(small_pool):
    k, v, slots, slab, offsets, T = _bad_case(small_pool, None)
    offsets[1] = offsets[0] + 8
    with pytest.raises(ValueError, match="overlap"):
        gather_kv(k, v, slots, slab, offsets, T)
    scatter_kv(slab, torch.zeros(2, dtype=torch.int64), slots, k, v, T)

