"""pd_io: SGLang pools wrapped from their raw pointers, packed page moves, transport choice."""

from __future__ import annotations

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
