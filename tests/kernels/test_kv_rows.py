"""copy_kv_rows: the pool-to-pool row copy kernel against its torch reference, on SGLang's real
MHATokenToKVPool (on CUDA where available, else on the CPU through Triton's interpreter, see
conftest.py): random page layouts, page sizes 1 and 16, several dtypes, bit for bit, and that no
other row of the destination changes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from kvtier.kernels import kv_pages
from kvtier.kernels.kv_pages import RowCopy, copy_kv_rows, copy_kv_rows_reference, uses_triton
from kvtier.transfer.pd_layout import page_rows

_spec = importlib.util.spec_from_file_location("kvtier_kernel_test_pools", Path(__file__).with_name("pools.py"))
_pools = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_pools)
DEVICE, LAYERS, DTYPES = _pools.DEVICE, _pools.LAYERS, _pools.DTYPES
seeded, make_pool, layer_bytes = _pools.seeded, _pools.make_pool, _pools.layer_bytes


def random_pages(pool: MHATokenToKVPool, n: int, gen: torch.Generator) -> np.ndarray:
    """``n`` distinct random pages (page 0 is SGLang's padding page), in random order."""
    return (torch.randperm(pool.size // pool.page_size, generator=gen)[:n] + 1).numpy()


def check_copied(src: MHATokenToKVPool, dst: MHATokenToKVPool, src_rows: torch.Tensor,
                 dst_rows: torch.Tensor, before: list[torch.Tensor]) -> None:
    """The source rows sit at the destination rows, bit for bit, and every other row is as before."""
    untouched = torch.ones(dst.k_buffer[0].shape[0], dtype=torch.bool)
    untouched[dst_rows] = False
    for s, d, b in zip(layer_bytes(src), layer_bytes(dst), before):
        d = d.cpu()
        assert torch.equal(d[dst_rows], s.cpu()[src_rows])
        assert torch.equal(d[untouched], b[untouched])


def source_and_twin_destinations(dtype: torch.dtype, page_size: int, gen: torch.Generator):
    """A random source pool, a random destination, a byte-identical twin of it for the reference,
    and the destination's bytes before the copy."""
    src = make_pool(dtype, page_size, 40, gen)
    dst = make_pool(dtype, page_size, 48, gen)
    ref = make_pool(dtype, page_size, 48, None)
    for got, want in zip(layer_bytes(ref), layer_bytes(dst)):
        got.copy_(want)
    return src, dst, ref, [b.cpu().clone() for b in layer_bytes(dst)]


def check_like_reference(src, dst, ref, src_rows, dst_rows, before) -> None:
    """The copy into ``dst`` left it as the reference left its twin ``ref``, and check_copied."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    check_copied(src, dst, src_rows, dst_rows, before)
    for got, want in zip(layer_bytes(dst), layer_bytes(ref)):
        assert torch.equal(got, want)


def test_kernel_path_is_exercised():
    # Without this the tests below could silently compare the reference with itself.
    assert uses_triton(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [1, 16])
def test_rows_land_bit_exact_and_nothing_else_moves(dtype, page_size):
    gen = seeded("rows", dtype, page_size)
    src, dst, ref, before = source_and_twin_destinations(dtype, page_size, gen)
    n = 23
    src_rows = torch.from_numpy(page_rows(random_pages(src, n, gen), page_size))
    dst_rows = torch.from_numpy(page_rows(random_pages(dst, n, gen), page_size))
    copy_kv_rows(src.k_buffer, src.v_buffer, dst.k_buffer, dst.v_buffer, src_rows, dst_rows)
    copy_kv_rows_reference(src.k_buffer, src.v_buffer, ref.k_buffer, ref.v_buffer, src_rows, dst_rows)
    check_like_reference(src, dst, ref, src_rows, dst_rows, before)


def test_a_row_copy_checked_once_copies_again_and_still_checks_each_call_s_rows():
    """PD's direct path checks the two pools once (``RowCopy.between`` two ``KVPool.of``, as
    ``RowCopy.of`` does) and then copies chunk after chunk:
    each copy lands like the reference's, and each call's rows are still range-checked."""
    gen = seeded("row-copy")
    src, dst, ref, _ = source_and_twin_destinations(torch.bfloat16, 16, gen)
    once = RowCopy.of(src.k_buffer, src.v_buffer, dst.k_buffer, dst.v_buffer)
    for n in (5, 1, 12):
        src_rows = torch.from_numpy(page_rows(random_pages(src, n, gen), 16))
        dst_rows = torch.from_numpy(page_rows(random_pages(dst, n, gen), 16))
        before = [b.cpu().clone() for b in layer_bytes(dst)]
        once.copy(src_rows, dst_rows)
        copy_kv_rows_reference(src.k_buffer, src.v_buffer, ref.k_buffer, ref.v_buffer, src_rows, dst_rows)
        check_like_reference(src, dst, ref, src_rows, dst_rows, before)
    rows = dst.k_buffer[0].shape[0]
    with pytest.raises(ValueError, match=rf"dst_rows must lie in \[0, {rows}\), got \[1, {rows}\]"):
        once.copy(torch.tensor([1, 2]), torch.tensor([1, rows]))
    with pytest.raises(ValueError, match="one destination row per source row"):
        once.copy(torch.tensor([1, 2]), torch.tensor([1]))


@pytest.mark.parametrize("head_dim,v_head_dim", [(16, 8), (3, 5), (2048, 16)])
def test_distinct_v_rows_narrow_words_and_many_tiles(head_dim, v_head_dim):
    # (3, 5) fp16 rows are 12 and 20 bytes: 4-byte words; 2048 dims need several row segments.
    gen = seeded("shapes", head_dim, v_head_dim)
    src = make_pool(torch.float16, 1, 600, gen, head_num=1, head_dim=head_dim, v_head_dim=v_head_dim)
    dst = make_pool(torch.float16, 1, 600, gen, head_num=1, head_dim=head_dim, v_head_dim=v_head_dim)
    before = [b.cpu().clone() for b in layer_bytes(dst)]
    n = 300  # more rows than one program's tile
    src_rows = torch.from_numpy(page_rows(random_pages(src, n, gen), 1))
    dst_rows = torch.from_numpy(page_rows(random_pages(dst, n, gen), 1))
    copy_kv_rows(src.k_buffer, src.v_buffer, dst.k_buffer, dst.v_buffer, src_rows, dst_rows)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    check_copied(src, dst, src_rows, dst_rows, before)


def test_uint8_views_of_flat_regions_are_a_destination():
    # PD's direct path: the destination is the other side's pool as flat byte regions.
    gen = seeded("flat")
    src = make_pool(torch.bfloat16, 4, 10, gen)
    dst = make_pool(torch.bfloat16, 4, 10, None)
    before = [b.cpu().clone() for b in layer_bytes(dst)]
    row = src.k_buffer[0][0].numel() * 2
    views = [b.reshape(-1).view(-1, row) for b in layer_bytes(dst)]
    src_rows = torch.from_numpy(page_rows(np.array([3, 4, 1, 7]), 4))
    dst_rows = torch.from_numpy(page_rows(np.array([2, 3, 9, 5]), 4))
    copy_kv_rows(src.k_buffer, src.v_buffer, views[:LAYERS], views[LAYERS:], src_rows, dst_rows)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    check_copied(src, dst, src_rows, dst_rows, before)


def test_rows_land_in_destination_layers_that_start_off_a_word():
    """The destination's layers start 8 bytes into their buffers (a mapped region need not be
    aligned like a pool's own buffers): every row still lands bit-exact."""
    gen = seeded("offset")
    src = make_pool(torch.float16, 1, 16, gen)
    dst = make_pool(torch.float16, 1, 16, None)
    row = layer_bytes(dst)[0][0].numel()
    dst_bufs = [b.reshape(-1)[8 : 8 + 12 * row].view(-1, row) for b in layer_bytes(dst)]
    src_rows, dst_rows = torch.tensor([3, 1, 7, 12]), torch.tensor([2, 9, 5, 11])
    copy_kv_rows(src.k_buffer, src.v_buffer, dst_bufs[:LAYERS], dst_bufs[LAYERS:], src_rows, dst_rows)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    for s, d in zip(layer_bytes(src), dst_bufs):
        assert torch.equal(d[dst_rows].reshape(4, -1).cpu(), s[src_rows].reshape(4, -1).cpu())


def test_empty_is_a_no_op():
    pool = make_pool(torch.bfloat16, 1, 8, seeded("empty"))
    other = make_pool(torch.bfloat16, 1, 8, None)
    none = torch.empty(0, dtype=torch.int64)
    copy_kv_rows(pool.k_buffer, pool.v_buffer, other.k_buffer, other.v_buffer, none, none)
    assert not any(b.any() for b in layer_bytes(other))


def _bad(case: str):
    gen = seeded("bad")
    src = make_pool(torch.bfloat16, 1, 16, gen)
    dst = make_pool(torch.bfloat16, 1, 16, None)
    sk, sv, dk, dv = list(src.k_buffer), list(src.v_buffer), list(dst.k_buffer), list(dst.v_buffer)
    src_rows, dst_rows = torch.arange(1, 5), torch.arange(5, 9)
    if case == "layers":
        dv = dv[:-1]
    elif case == "pool-layers":
        dk, dv = dk[:-1], dv[:-1]
    elif case == "mixed-layer":
        dk[1] = torch.zeros(dk[1].shape[0], 3, dtype=torch.uint8, device=dk[1].device)
    elif case == "row-bytes":
        dk = dv = [torch.zeros(b.shape[0], 3, dtype=torch.uint8, device=b.device) for b in dk]
    elif case == "rows-dtype":
        src_rows = src_rows.to(torch.int32)
    elif case == "src-range":
        src_rows[2] = sk[0].shape[0]
    elif case == "dst-range":
        dst_rows[0] = -1
    elif case == "lengths":
        dst_rows = dst_rows[:-1]
    elif case == "shape":
        sv[0] = sv[0][:5]
    return sk, sv, dk, dv, src_rows, dst_rows


BAD = {
    "layers": "destination pool: need as many K as V layer buffers",
    "pool-layers": "the source pool has 3 layers, the destination 2",
    "mixed-layer": r"destination pool: k_buffers\[1\] is torch.uint8",
    "row-bytes": "the destination's K and V rows are 3 and 3 bytes",
    "rows-dtype": "src_rows must be a 1-D int64 tensor",
    "src-range": r"src_rows must lie in \[0, 17\)",
    "dst-range": r"dst_rows must lie in \[0, 17\), got \[-1",
    "lengths": "one destination row per source row",
    "shape": r"source pool: v_buffers\[0\] has shape \(5, 2, 16\)",
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("fn", [copy_kv_rows, copy_kv_rows_reference], ids=lambda f: f.__name__)
def test_bad_inputs_raise_naming_the_argument(fn, case):
    with pytest.raises(ValueError, match=BAD[case]):
        fn(*_bad(case))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_rows_into_a_pool_on_another_gpu_by_peer_stores():
    if not torch.cuda.can_device_access_peer(0, 1):
        pytest.skip("GPU 0 cannot access GPU 1")
    from kvtier.transfer.cuda_ipc import enable_peer_access

    enable_peer_access(0, 1)
    gen = seeded("peer")
    src = make_pool(torch.bfloat16, 1, 4000, gen, head_num=8, head_dim=128, device=torch.device("cuda:0"))
    dst = make_pool(torch.bfloat16, 1, 4000, gen, head_num=8, head_dim=128, device=torch.device("cuda:1"))
    before = [b.cpu().clone() for b in layer_bytes(dst)]
    src_rows = torch.from_numpy(page_rows(random_pages(src, 3000, gen), 1))
    dst_rows = torch.from_numpy(page_rows(random_pages(dst, 3000, gen), 1))
    with torch.cuda.device(0):
        copy_kv_rows(src.k_buffer, src.v_buffer, dst.k_buffer, dst.v_buffer, src_rows, dst_rows)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    check_copied(src, dst, src_rows, dst_rows, before)
    assert kv_pages.uses_triton(torch.device("cuda:0"))
