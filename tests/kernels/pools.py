"""Pools for the kernel tests: SGLang's real MHATokenToKVPool filled with seeded random bytes, on
CUDA where available, else on the CPU (the kernels then run in Triton's interpreter)."""

from __future__ import annotations

import zlib

import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LAYERS = 3
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn]


def seeded(*params) -> torch.Generator:
    """A generator seeded by the test's parameters, so every case has its own reproducible bytes."""
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


def make_pool(dtype: torch.dtype, page_size: int, pages: int, gen: torch.Generator | None = None,
              head_num: int = 2, head_dim: int = 16, v_head_dim: int | None = None,
              device: torch.device = DEVICE) -> MHATokenToKVPool:
    """A pool of ``pages`` usable pages, filled with random bytes (zeros without ``gen``)."""
    pool = MHATokenToKVPool(size=pages * page_size, page_size=page_size, dtype=dtype, head_num=head_num,
                            head_dim=head_dim, layer_num=LAYERS, device=str(device), enable_memory_saver=False,
                            v_head_dim=v_head_dim)
    for buf in layer_bytes(pool):
        if gen is None:
            buf.zero_()
        else:
            buf.copy_(torch.randint(0, 256, buf.shape, dtype=torch.uint8, generator=gen))
    return pool


def layer_bytes(pool: MHATokenToKVPool) -> list[torch.Tensor]:
    """Every K then V layer buffer, viewed as bytes (comparisons stay bit-exact, NaNs included)."""
    return [buf.view(torch.uint8) for buf in pool.k_buffer + pool.v_buffer]
