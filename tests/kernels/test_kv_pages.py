"""kv_pages: the Triton kernels against the torch reference and the layout contract, on SGLang's
real MHATokenToKVPool (on CUDA with a pinned slab where available, else on the CPU through
Triton's interpreter, see conftest.py)."""

from __future__ import annotations

import zlib

import pytest
import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from kvtier.kernels.kv_pages import (
    chunk_nbytes,
    gather_kv,
    gather_kv_reference,
    scatter_kv,
    scatter_kv_reference,
    uses_triton,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ALIGN = 4096
LAYERS = 3
N_CHUNKS = 4


def make_pool(dtype: torch.dtype, page_size: int, pages: int, head_num: int = 2, head_dim: int = 16,
              v_head_dim: int | None = None, gen: torch.Generator | None = None) -> MHATokenToKVPool:
    """A pool of ``pages`` usable pages, filled with random bytes (or zeros without ``gen``)."""
    pool = MHATokenToKVPool(size=pages * page_size, page_size=page_size, dtype=dtype, head_num=head_num,
                            head_dim=head_dim, layer_num=LAYERS, device=str(DEVICE),
                            enable_memory_saver=False, v_head_dim=v_head_dim)
    for buf in pool.k_buffer + pool.v_buffer:
        raw = buf.view(torch.uint8)
        if gen is None:
            raw.zero_()
        else:
            raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen))
    return pool


def random_slots(pool: MHATokenToKVPool, n_tokens: int, gen: torch.Generator) -> torch.Tensor:
    """Slots of ``n_tokens`` tokens on distinct random pages, page by page (page 0 is SGLang's dummy)."""
    num_pages = pool.size // pool.page_size
    pages = torch.randperm(num_pages, generator=gen)[: n_tokens // pool.page_size] + 1
    slots = (pages[:, None] * pool.page_size + torch.arange(pool.page_size)).flatten()
    return slots.to(DEVICE)


def random_offsets(chunk_bytes: int, n_chunks: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """Distinct ALIGN-aligned chunk offsets scattered over a slab twice as large; and its size."""
    stride = -(-chunk_bytes // ALIGN) * ALIGN
    positions = torch.randperm(2 * n_chunks, generator=gen)[:n_chunks]
    return positions.to(torch.int64) * stride, 2 * n_chunks * stride


def seeded(*params) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


def host_slab(nbytes: int) -> torch.Tensor:
    return torch.zeros(nbytes, dtype=torch.uint8, pin_memory=DEVICE.type == "cuda")


def row_bytes(buf: torch.Tensor, slot: int) -> torch.Tensor:
    return buf[slot].reshape(-1).view(torch.uint8).cpu()


def chunk_by_contract(pool: MHATokenToKVPool, chunk_slots: list[int]) -> torch.Tensor:
    """One chunk built straight from the documented element offsets, independent of the module."""
    T, L, H = len(chunk_slots), LAYERS, pool.head_num
    dk, dv, itemsize = pool.head_dim, pool.v_head_dim, pool.k_buffer[0].element_size()
    out = torch.empty(T * L * H * (dk + dv) * itemsize, dtype=torch.uint8)
    for layer in range(L):
        for t, slot in enumerate(chunk_slots):
            k_at = (layer * T + t) * H * dk * itemsize
            v_at = (L * T * H * dk + (layer * T + t) * H * dv) * itemsize
            out[k_at : k_at + H * dk * itemsize] = row_bytes(pool.k_buffer[layer], slot)
            out[v_at : v_at + H * dv * itemsize] = row_bytes(pool.v_buffer[layer], slot)
    return out


DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn]


def test_kernel_path_is_exercised():
    # Otherwise CPU runs would compare the torch reference against itself.
    assert uses_triton(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size,chunk_tokens", [(1, 16), (1, 24), (16, 16), (16, 32)])
def test_gather_matches_reference_and_layout(dtype, page_size, chunk_tokens):
    gen = seeded(dtype, page_size, chunk_tokens)
    pool = make_pool(dtype, page_size, pages=2 * N_CHUNKS * chunk_tokens // page_size, gen=gen)
    slots = random_slots(pool, N_CHUNKS * chunk_tokens, gen)
    chunk_bytes = chunk_nbytes(pool.k_buffer, pool.v_buffer, chunk_tokens)
    offsets, slab_bytes = random_offsets(chunk_bytes, N_CHUNKS, gen)
    got, want = host_slab(slab_bytes), host_slab(slab_bytes)

    gather_kv(pool.k_buffer, pool.v_buffer, slots, got, offsets, chunk_tokens)
    gather_kv_reference(pool.k_buffer, pool.v_buffer, slots, want, offsets, chunk_tokens)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()

    assert torch.equal(got, want)
    per_chunk = slots.view(N_CHUNKS, chunk_tokens).tolist()
    for off, chunk_slots in zip(offsets.tolist(), per_chunk):
        assert torch.equal(got[off : off + chunk_bytes], chunk_by_contract(pool, chunk_slots))


def test_gather_with_distinct_v_head_dim():
    gen = torch.Generator().manual_seed(7)
    pool = make_pool(torch.bfloat16, 16, pages=8, head_dim=24, v_head_dim=16, gen=gen)
    slots = random_slots(pool, 2 * 32, gen)
    chunk_bytes = chunk_nbytes(pool.k_buffer, pool.v_buffer, 32)
    assert chunk_bytes == 32 * LAYERS * 2 * (24 + 16) * 2
    offsets, slab_bytes = random_offsets(chunk_bytes, 2, gen)
    got = host_slab(slab_bytes)
    gather_kv(pool.k_buffer, pool.v_buffer, slots, got, offsets, 32)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    for off, chunk_slots in zip(offsets.tolist(), slots.view(2, 32).tolist()):
        assert torch.equal(got[off : off + chunk_bytes], chunk_by_contract(pool, chunk_slots))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [1, 16])
def test_round_trip_into_other_slots(dtype, page_size):
    chunk_tokens = 32
    gen = seeded(dtype, page_size)
    pages = 2 * N_CHUNKS * chunk_tokens // page_size
    src_pool = make_pool(dtype, page_size, pages, gen=gen)
    dst_pool, ref_pool = make_pool(dtype, page_size, pages), make_pool(dtype, page_size, pages)
    src_slots = random_slots(src_pool, N_CHUNKS * chunk_tokens, gen)
    dst_slots = random_slots(dst_pool, N_CHUNKS * chunk_tokens, gen)
    chunk_bytes = chunk_nbytes(src_pool.k_buffer, src_pool.v_buffer, chunk_tokens)
    offsets, slab_bytes = random_offsets(chunk_bytes, N_CHUNKS, gen)
    slab = host_slab(slab_bytes)

    gather_kv(src_pool.k_buffer, src_pool.v_buffer, src_slots, slab, offsets, chunk_tokens)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    scatter_kv(slab, offsets, dst_slots, dst_pool.k_buffer, dst_pool.v_buffer, chunk_tokens)
    scatter_kv_reference(slab, offsets, dst_slots, ref_pool.k_buffer, ref_pool.v_buffer, chunk_tokens)

    untouched = torch.ones(dst_pool.k_buffer[0].shape[0], dtype=torch.bool, device=DEVICE)
    untouched[dst_slots] = False
    for src, dst, ref in zip(src_pool.k_buffer + src_pool.v_buffer, dst_pool.k_buffer + dst_pool.v_buffer,
                             ref_pool.k_buffer + ref_pool.v_buffer):
        src_b, dst_b = src.view(torch.uint8), dst.view(torch.uint8)
        assert torch.equal(dst_b[dst_slots], src_b[src_slots])
        assert not dst_b[untouched].any()
        assert torch.equal(dst_b, ref.view(torch.uint8))


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
    gen = torch.Generator().manual_seed(head_dim * 10 + shift)
    src_pool = make_pool(dtype, 1, 64, head_num=1, head_dim=head_dim, gen=gen)
    dst_pool = make_pool(dtype, 1, 64, head_num=1, head_dim=head_dim)
    src_slots = random_slots(src_pool, n_chunks * chunk_tokens, gen)
    dst_slots = random_slots(dst_pool, n_chunks * chunk_tokens, gen)
    chunk_bytes = chunk_nbytes(src_pool.k_buffer, src_pool.v_buffer, chunk_tokens)
    offsets, slab_bytes = random_offsets(chunk_bytes, n_chunks, gen)
    offsets += shift
    got, want = host_slab(slab_bytes + shift), host_slab(slab_bytes + shift)

    gather_kv(src_pool.k_buffer, src_pool.v_buffer, src_slots, got, offsets, chunk_tokens)
    gather_kv_reference(src_pool.k_buffer, src_pool.v_buffer, src_slots, want, offsets, chunk_tokens)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(got, want)
    scatter_kv(got, offsets, dst_slots, dst_pool.k_buffer, dst_pool.v_buffer, chunk_tokens)
    for src, dst in zip(src_pool.k_buffer + src_pool.v_buffer, dst_pool.k_buffer + dst_pool.v_buffer):
        assert torch.equal(dst.view(torch.uint8)[dst_slots], src.view(torch.uint8)[src_slots])


def test_empty_batch_is_a_no_op():
    pool = make_pool(torch.bfloat16, 1, 8, gen=torch.Generator().manual_seed(0))
    slab = host_slab(ALIGN)
    none = torch.empty(0, dtype=torch.int64)
    gather_kv(pool.k_buffer, pool.v_buffer, none.to(DEVICE), slab, none, 16)
    scatter_kv(slab, none, none.to(DEVICE), pool.k_buffer, pool.v_buffer, 16)
    assert not slab.any()


@pytest.fixture(scope="module")
def small_pool() -> MHATokenToKVPool:
    return make_pool(torch.bfloat16, 1, 64, gen=torch.Generator().manual_seed(1))


def _bad_case(pool: MHATokenToKVPool, case: str):
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
    "dtype": "v_buffers\\[1\\] is torch.float16",
    "layers": "as many K as V",
    "slots-length": "n_chunks \\* chunk_tokens = 2 \\* 16",
    "slots-dtype": "slots must be 1-D int64",
    "slots-range": "slots must lie in",
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


def test_overlapping_gather_chunks_raise(small_pool):
    k, v, slots, slab, offsets, T = _bad_case(small_pool, "none")
    offsets[1] = offsets[0] + 8
    with pytest.raises(ValueError, match="overlap"):
        gather_kv(k, v, slots, slab, offsets, T)
    # Reading one chunk twice is fine.
    scatter_kv_reference(slab, torch.zeros(2, dtype=torch.int64), slots, k, v, T)
