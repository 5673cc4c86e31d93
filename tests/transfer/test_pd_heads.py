"""KV head slices between TP sizes: head ranges, the slice packing against a torch reference that
slices real ``[rows, heads, dim]`` buffers, and ``pd_io.Packer`` moving slices between real CPU pools
of SGLang's ``MHATokenToKVPool``, bit for bit, over randomized layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier.transfer.pd_heads import head_range, head_slice, slice_item_lens, slice_plan
from kvtier.transfer.pd_layout import kv_groups, page_rows

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn]


def test_head_ranges_tile_the_heads_and_refuse_uneven_splits():
    assert [head_range(8, 2, r) for r in range(2)] == [(0, 4), (4, 8)]
    assert head_range(8, 1, 0) == (0, 8)
    assert [head_range(8, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ValueError, match="6 KV heads do not split evenly over tp_size 4"):
        head_range(6, 4, 0)
    with pytest.raises(ValueError, match="not a rank of tp_size 2"):
        head_range(8, 2, 2)


@pytest.mark.parametrize("src_tp, dst_tp", [(2, 1), (1, 2), (4, 2), (2, 4), (4, 1), (1, 4), (2, 2)])
def test_slices_give_every_receiver_head_exactly_once(src_tp, dst_tp):
    total = 8
    for d in range(dst_tp):
        dst = head_range(total, dst_tp, d)
        got = []
        for s in range(src_tp):
            src = head_range(total, src_tp, s)
            sl = head_slice(src, dst)
            if sl is None:
                assert src[1] <= dst[0] or dst[1] <= src[0]
                continue
            assert sl.src_heads == total // src_tp and sl.dst_heads == total // dst_tp
            assert sl.heads[0] - src[0] == sl.src[0] and sl.heads[0] - dst[0] == sl.dst[0]
            assert sl.src_full == (src_tp >= dst_tp) and sl.dst_full == (dst_tp >= src_tp)
            got.extend(range(*sl.heads))
        assert got == list(range(*dst))


def random_buffers(rng: np.random.Generator, rows: int):
    """K and V buffers of a random MHA layout (V may have another head dim), a draft model's pair
    sometimes appended, each ``[rows, heads, dim]`` of a random dtype, filled with random bytes."""
    layers, heads = int(rng.integers(1, 4)), int(rng.choice([1, 2, 4, 8]))
    dk = int(rng.choice([8, 16, 24]))
    dv = int(rng.choice([dk, 8]))
    dtype = DTYPES[int(rng.integers(len(DTYPES)))]
    dims = [dk] * layers + [dv] * layers
    if dv == dk and rng.random() < 0.4:  # kv_groups pairs a draft's buffers only after equal K and V
        dims += [dk // 2 if dk > 8 else 16] * 2
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    bufs = []
    for d in dims:
        raw = torch.randint(0, 256, (rows, heads, d * dtype.itemsize), dtype=torch.uint8, generator=gen)
        bufs.append(raw.view(dtype))
    return bufs, heads


def packed(bufs: list[torch.Tensor], pages: np.ndarray, page_size: int) -> bytes:
    """The PD packing of ``pages`` done the slow way: per page, buffers in kv_groups order."""
    item_lens = [b[0].numel() * b.element_size() * page_size for b in bufs]
    order = [i for ks, vs in kv_groups(item_lens) for i in ks + vs]
    out = []
    for p in pages:
        for i in order:
            out.append(bufs[i][p * page_size : (p + 1) * page_size].contiguous().view(torch.uint8).numpy().tobytes())
    return b"".join(out)


@pytest.mark.parametrize("seed", range(40))
def test_slice_plan_packs_like_the_sliced_tensors(seed):
    """Reading each plan entry's columns out of a full packed page, row by row, and placing them at
    the entry's offset gives the packing of the sliced tensors, byte for byte."""
    rng = np.random.default_rng(seed)
    page_size = int(rng.choice([1, 2, 4, 16]))
    bufs, heads = random_buffers(rng, 4 * page_size)
    item_lens = tuple(b[0].numel() * b.element_size() * page_size for b in bufs)
    start = int(rng.integers(0, heads))
    stop = int(rng.integers(start + 1, heads + 1))
    page = packed(bufs, np.array([2]), page_size)
    full_size, full = slice_plan(item_lens, page_size, heads, 0, heads)
    assert full_size == sum(item_lens) == len(page)
    base = {b.buffer: b.offset for b in full}
    nbytes, plan = slice_plan(item_lens, page_size, heads, start, stop)
    assert nbytes == sum(slice_item_lens(item_lens, heads, start, stop))
    assert sorted(b.buffer for b in plan) == list(range(len(bufs)))
    got = bytearray(nbytes)
    for b in plan:
        for t in range(page_size):
            src = base[b.buffer] + t * b.row + b.column
            got[b.offset + t * b.width : b.offset + (t + 1) * b.width] = page[src : src + b.width]
    assert bytes(got) == packed([b[:, start:stop] for b in bufs], np.array([2]), page_size)


def test_slices_refuse_bad_geometry():
    with pytest.raises(ValueError, match=r"heads \[2, 2\) are not a slice of 4 heads"):
        slice_item_lens((256, 256), 4, 2, 2)
    with pytest.raises(ValueError, match="not a multiple of its 3 heads"):
        slice_item_lens((256, 256), 3, 0, 1)


def mha_pool(heads: int, head_dim: int, layers: int, dtype: torch.dtype, page_size: int, seed: int, device: str):
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    pool = MHATokenToKVPool(64 * page_size, page_size, dtype, heads, head_dim, layers, device, False)
    gen = torch.Generator().manual_seed(seed)
    for buf in pool.k_buffer + pool.v_buffer:
        raw = buf.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen).to(device))
    return pool


def packer(pool, device: str):
    from kvtier.sglang_ext.pd_io import Packer

    ptrs, lens, items = pool.get_contiguous_buf_infos()
    return Packer(ptrs, lens, items, pool.page_size, torch.device(device))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("src_tp, dst_tp", [(2, 1), (1, 2), (4, 2), (2, 4)])
def test_packer_moves_head_slices_between_pools_of_different_tp(seed, src_tp, dst_tp, device):
    """Every sender rank's slice, gathered on its pool and scattered into the receiver's pages,
    rebuilds the receiver's heads from the model-wide tensors, bit for bit; other pages stay."""
    rng = np.random.default_rng(seed * 10 + src_tp * 3 + dst_tp)
    total = 8
    page_size, head_dim = int(rng.choice([1, 4, 8])), int(rng.choice([8, 16]))
    layers, dtype = int(rng.integers(1, 4)), DTYPES[int(rng.integers(3))]
    n_pages = int(rng.integers(1, 9))
    src_pools = [mha_pool(total // src_tp, head_dim, layers, dtype, page_size, seed * 100 + r, device)
                 for r in range(src_tp)]
    src_pages = rng.choice(np.arange(1, 64), n_pages, replace=False)
    dst_pages = rng.choice(np.arange(1, 64), n_pages, replace=False)
    # The model-wide KV of the moved pages: every sender rank's heads side by side.
    model = [torch.cat([(p.k_buffer + p.v_buffer)[i].cpu() for p in src_pools], dim=1) for i in range(2 * layers)]
    src_rows = torch.from_numpy(page_rows(src_pages, page_size))
    for d in range(dst_tp):
        dst_pool = mha_pool(total // dst_tp, head_dim, layers, dtype, page_size, seed * 100 + 50 + d, device)
        before = [b.cpu() for b in dst_pool.k_buffer + dst_pool.v_buffer]
        dst_packer, dst = packer(dst_pool, device), head_range(total, dst_tp, d)
        for s, pool in enumerate(src_pools):
            sl = head_slice(head_range(total, src_tp, s), dst)
            if sl is None:
                continue
            src_heads = None if sl.src_full else (*sl.src, sl.src_heads)
            dst_heads = None if sl.dst_full else (*sl.dst, sl.dst_heads)
            src_packer = packer(pool, device)
            nbytes = src_packer.packed_bytes(src_heads)
            assert nbytes == dst_packer.packed_bytes(dst_heads)
            # On a GPU, odd seeds stage in pinned host memory as zmq does: the slice is packed on the GPU
            # and copied over whole.
            host_stage = device == "cuda" and seed % 2 == 1
            stage = torch.zeros(8 + n_pages * nbytes, dtype=torch.uint8, device="cpu" if host_stage else device,
                                pin_memory=host_stage)
            src_packer.gather(src_pages, stage[8:], heads=src_heads)
            dst_packer.scatter(stage, 8, dst_pages, heads=dst_heads)
        dst_rows = torch.from_numpy(page_rows(dst_pages, page_size))
        moved = set(dst_rows.tolist())
        others = [r for r in range(before[0].shape[0]) if r not in moved]
        for i, buf in enumerate(b.cpu() for b in dst_pool.k_buffer + dst_pool.v_buffer):
            want = model[i][src_rows][:, dst[0] : dst[1]]
            assert torch.equal(buf[dst_rows].view(torch.uint8), want.view(torch.uint8)), i
            assert torch.equal(buf[others].view(torch.uint8), before[i][others].view(torch.uint8)), i
