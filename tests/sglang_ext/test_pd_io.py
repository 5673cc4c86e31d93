"""pd_io: SGLang pools wrapped from their raw pointers, packed page moves, transport choice."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from kvtier.sglang_ext.config import ConfigError, load_config
from kvtier.sglang_ext.pd_io import Packer, staging_buffer, transport_kind, wrap_memory

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pool(device: str, seed: int, page_size: int, heads: int = 2, layers: int = 3):
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    p = MHATokenToKVPool(128, page_size, torch.bfloat16, heads, 16, layers, device, False)
    gen = torch.Generator().manual_seed(seed)
    for buf in p.k_buffer + p.v_buffer:
        raw = buf.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen).to(raw.device))
    return p


def packer_of(p) -> Packer:
    ptrs, lens, items = p.get_contiguous_buf_infos()
    return Packer(ptrs, lens, items, p.page_size, torch.device(p.device))


def test_wrapped_pointers_share_the_pool_memory():
    p = pool("cpu", 0, 4)
    ptrs, lens, _ = p.get_contiguous_buf_infos()
    view = wrap_memory(ptrs[0], lens[0], torch.device("cpu"))
    assert view.data_ptr() == p.k_buffer[0].data_ptr() and view.numel() == lens[0]
    view[:8] = 7
    assert (p.k_buffer[0].view(torch.uint8).reshape(-1)[:8] == 7).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("on_device", [False, True])
def test_pages_move_bit_exact_through_a_staging_buffer(device, on_device):
    if on_device and device == "cpu":
        pytest.skip("device staging is for GPU pools")
    page_size = 8
    src, dst = pool(device, 1, page_size), pool(device, 2, page_size)
    before = [b.view(torch.uint8).clone() for b in dst.k_buffer + dst.v_buffer]
    sp, dp = packer_of(src), packer_of(dst)
    assert sp.page_bytes == 6 * page_size * 2 * 16 * 2
    rng = np.random.default_rng(3)
    src_pages = rng.choice(np.arange(1, 16), 5, replace=False)
    dst_pages = rng.choice(np.arange(1, 16), 5, replace=False)
    buf = staging_buffer(7 * sp.page_bytes, torch.device(device), on_device)
    assert buf.device.type == (device if on_device else "cpu")
    assert buf.is_pinned() == (device == "cuda" and not on_device)
    sp.gather(src_pages, buf)
    dp.scatter(buf, 0, dst_pages)
    moved = set()
    for s, d in zip(src_pages, dst_pages):
        moved.update(range(d * page_size, (d + 1) * page_size))
        for a, b in zip(src.k_buffer + src.v_buffer, dst.k_buffer + dst.v_buffer):  # bytes: the pattern has NaNs
            assert torch.equal(a.view(torch.uint8)[s * page_size : (s + 1) * page_size],
                               b.view(torch.uint8)[d * page_size : (d + 1) * page_size])
    keep = torch.tensor([r for r in range(before[0].shape[0]) if r not in moved], device=device)
    for old, new in zip(before, dst.k_buffer + dst.v_buffer):
        assert torch.equal(old[keep], new.view(torch.uint8)[keep])


def test_transport_choice():
    cpu = torch.device("cpu")
    assert transport_kind(load_config(env={}), cpu) == "zmq"
    assert transport_kind(load_config(env={}, pd_transport="zmq"), cpu) == "zmq"
    with pytest.raises(ConfigError, match="pd_transport='cuda_ipc' needs a CUDA KV pool.*use pd_transport: zmq"):
        transport_kind(load_config(env={}, pd_transport="cuda_ipc"), cpu)


def packer_over(pools) -> Packer:
    """One Packer over several pools' buffers, in order (a model and its draft model's)."""
    infos = [p.get_contiguous_buf_infos() for p in pools]
    ptrs, lens, items = (sum((list(i[k]) for i in infos), []) for k in range(3))
    return Packer(ptrs, lens, items, pools[0].page_size, torch.device(pools[0].device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page_size", [1, 8])
def test_pages_move_bit_exact_pool_to_pool_into_wrapped_regions(device, page_size):
    # The direct path: the destination pool arrives as one flat byte region per KV buffer (wrapped
    # from its pointers here, mapped by CUDA IPC in PD); a draft model's buffers form a second group.
    src = [pool(device, 1, page_size), pool(device, 4, page_size, heads=1, layers=1)]
    dst = [pool(device, 2, page_size), pool(device, 5, page_size, heads=1, layers=1)]
    sp = packer_over(src)
    assert len(sp.index_groups) == 2
    regions = []
    for p in dst:
        ptrs, lens, _ = p.get_contiguous_buf_infos()
        regions += [wrap_memory(ptr, n, torch.device(device)) for ptr, n in zip(ptrs, lens)]
    src_bufs = [b for p in src for b in p.k_buffer + p.v_buffer]
    dst_bufs = [b for p in dst for b in p.k_buffer + p.v_buffer]
    before = [b.view(torch.uint8).clone() for b in dst_bufs]
    rng = np.random.default_rng(page_size)
    src_pages = rng.choice(np.arange(1, 128 // page_size), 9, replace=False)
    dst_pages = rng.choice(np.arange(1, 128 // page_size), 9, replace=False)
    sp.copy_rows(src_pages, sp.copy_target(regions), dst_pages)
    rows = lambda pages: torch.from_numpy((pages[:, None] * page_size + np.arange(page_size)).reshape(-1))  # noqa: E731
    for s, d, old in zip(src_bufs, dst_bufs, before):
        want = old.clone()
        want[rows(dst_pages).to(device)] = s.view(torch.uint8)[rows(src_pages).to(device)]
        assert torch.equal(d.view(torch.uint8), want)  # the pages, bit for bit, and nothing else
    with pytest.raises(ValueError, match="the destination pool has 3 KV buffers, this one 8"):
        sp.copy_target(regions[:3])
    with pytest.raises(ValueError, match="2 source pages for 1 destination pages"):
        sp.copy_rows(src_pages[:2], sp.copy_target(regions), dst_pages[:1])
    # Out-of-pool pages are refused before any byte moves (on a GPU the kernel would store there).
    after = [b.view(torch.uint8).clone() for b in dst_bufs]
    n_pages = 128 // page_size + 1  # 128 tokens and SGLang's padding page
    with pytest.raises(ValueError, match=rf"^destination pages \[1, {n_pages}\] outside a pool of {n_pages} pages$"):
        sp.copy_rows(np.array([1, 2]), sp.copy_target(regions), np.array([1, n_pages]))
    with pytest.raises(ValueError, match=rf"^source pages \[-1, 2\] outside a pool of {n_pages} pages$"):
        sp.copy_rows(np.array([-1, 2]), sp.copy_target(regions), np.array([1, 2]))
    assert all(torch.equal(b.view(torch.uint8), a) for b, a in zip(dst_bufs, after))
    # PD keeps the copies while the transport hands out the same mapping objects, rebuilds on others.
    first = sp.reuse_target(None, regions)
    assert sp.reuse_target(first, list(regions)) is first
    remapped = sp.reuse_target(first, [r.view(-1) for r in regions])
    assert remapped is not first and all(a is not b for a, b in zip(remapped[0], regions))
    sp.copy_rows(src_pages[:1], remapped[1], dst_pages[-1:])  # the new target copies
    assert torch.equal(dst_bufs[0].view(torch.uint8)[rows(dst_pages[-1:]).to(device)],
                       src_bufs[0].view(torch.uint8)[rows(src_pages[:1]).to(device)])
    with pytest.raises(ValueError, match="the destination pool has 3 KV buffers"):
        sp.reuse_target(first, regions[:3])


@pytest.mark.parametrize("device", DEVICES)
def test_each_copy_returns_its_own_seconds(device):
    """gather, scatter and copy_rows return the copy's seconds (kvtier_pd_copy_seconds_total): the
    wall time of the torch copy on a CPU pool, the GPU time between CUDA events on a CUDA pool;
    never more than the call itself took, and the bytes are there when it returns."""
    src, dst = pool(device, 1, 4), pool(device, 2, 4)
    sp, dp = packer_of(src), packer_of(dst)
    pages = np.random.default_rng(0).permutation(np.arange(1, 32))
    buf = staging_buffer(len(pages) * sp.page_bytes, torch.device(device), device == "cuda")
    ptrs, lens, _ = dst.get_contiguous_buf_infos()
    regions = sp.copy_target([wrap_memory(p, n, torch.device(device)) for p, n in zip(ptrs, lens)])
    calls = {"gather": lambda: sp.gather(pages, buf), "scatter": lambda: dp.scatter(buf, 0, pages[::-1].copy()),
             "copy_rows": lambda: sp.copy_rows(pages, regions, pages)}
    for name, call in calls.items():
        start = time.perf_counter()
        seconds = call()
        wall = time.perf_counter() - start
        assert isinstance(seconds, float) and 0 < seconds <= wall, (name, seconds, wall)
    for a, b in zip(src.k_buffer + src.v_buffer, dst.k_buffer + dst.v_buffer):  # copy_rows: same rows
        rows = torch.from_numpy(pages * 4).repeat_interleave(4) + torch.arange(4).repeat(len(pages))
        assert torch.equal(a.view(torch.uint8)[rows.to(device)], b.view(torch.uint8)[rows.to(device)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_copy_seconds_leave_out_the_work_the_copy_waited_for():
    """The copy's stream waits for the scheduler's event first; the events are recorded after that
    wait, so ~50 ms of GPU work before the event is in the call's wall time, not in its seconds."""
    src, dst = pool("cuda", 1, 4), pool("cuda", 2, 4)
    sp = packer_of(src)
    ptrs, lens, _ = dst.get_contiguous_buf_infos()
    regions = sp.copy_target([wrap_memory(p, n, torch.device("cuda")) for p, n in zip(ptrs, lens)])
    pages = np.arange(1, 32)
    sp.copy_rows(pages, regions, pages)  # compiles the kernel
    torch.cuda._sleep(100_000_000)  # cycles: ~50 ms at 2 GHz
    busy = torch.cuda.Event()
    busy.record()
    start = time.perf_counter()
    seconds = sp.copy_rows(pages, regions, pages, busy)
    wall = time.perf_counter() - start
    assert wall > 0.02 and seconds < wall / 4, (seconds, wall)
