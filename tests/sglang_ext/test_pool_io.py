"""PoolIO: chunk copies between a real SGLang KV pool and a host slab, ordered by stream events.

On CPU the copies are synchronous; on a GPU machine the same tests run the Triton kernels on a
side stream, and work queued right after a load must see the loaded rows.
"""

from __future__ import annotations

import pytest
import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from kvtier.sglang_ext.pool_io import PoolIO
from kvtier.sglang_ext.tiers.host_memory import HostSlab

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def make(layers: int, heads: int, dim: int, pool_tokens: int, chunk_tokens: int, chunks: int):
    pool = MHATokenToKVPool(pool_tokens, 16, torch.bfloat16, heads, dim, layers, DEVICE, False)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for buf in pool.k_buffer + pool.v_buffer:
        buf.copy_(torch.randn(buf.shape, generator=gen, device=DEVICE).to(buf.dtype))
    chunk_bytes = chunk_tokens * layers * heads * dim * 2 * 2
    slab = HostSlab(chunks * chunk_bytes)
    seen: list[tuple[str, float]] = []
    io = PoolIO(pool.k_buffer, pool.v_buffer, chunk_tokens, slab.tensor, observe=lambda op, s: seen.append((op, s)))
    views = [slab.view(i * chunk_bytes, chunk_bytes) for i in range(chunks)]
    return pool, io, views, seen


def test_spill_then_load_round_trip_and_completions():
    pool, io, views, seen = make(layers=3, heads=2, dim=32, pool_tokens=1024, chunk_tokens=32, chunks=4)
    src = torch.arange(16, 16 + 128, device=DEVICE)
    dst = torch.arange(512, 512 + 128, device=DEVICE)
    done: list[str] = []
    io.to_host(src, views, lambda: done.append("spill")).wait()
    io.to_device(views, dst, lambda: done.append("load")).wait()
    assert done == ["spill", "load"]
    for buf in pool.k_buffer + pool.v_buffer:
        assert torch.equal(buf[dst].view(torch.int16), buf[src].view(torch.int16))
    if CUDA:
        assert [op for op, _ in seen] == ["spill", "load"] and all(s > 0 for _, s in seen)


@pytest.mark.skipif(not CUDA, reason="stream ordering exists on CUDA only; on CPU copies are synchronous")
def test_work_queued_after_a_load_sees_the_loaded_rows():
    # Llama-3-8B shape, 40 chunks of 256 tokens: a 1.3 GB load, slow enough to race against.
    layers, chunks, T = 32, 40, 256
    pool, io, views, seen = make(layers=layers, heads=8, dim=128, pool_tokens=3 * chunks * T, chunk_tokens=T, chunks=chunks)
    src = torch.arange(16, 16 + chunks * T, device=DEVICE)
    dst = src + chunks * T
    expected = [pool.k_buffer[l][src].clone() for l in range(layers)]
    io.to_host(src, views, lambda: None).wait()
    for l in range(layers):
        pool.k_buffer[l][dst] = 0
    torch.cuda.synchronize()
    load = io.to_device(views, dst, lambda: None)
    # What the forward pass does next, on the current stream, without any host-side wait.
    got = [pool.k_buffer[l][dst].clone() for l in range(layers)]
    torch.cuda.synchronize()
    load.poll()
    assert all(torch.equal(g.view(torch.int16), e.view(torch.int16)) for g, e in zip(got, expected))
