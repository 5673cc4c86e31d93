"""Shared fixtures: a namespace, deterministic chunk contents, and a fresh metrics registry."""

from __future__ import annotations

import pytest
import torch

from kvtier.sglang_ext.chunk_keys import KVNamespace
from kvtier.sglang_ext.metrics import TierMetrics


@pytest.fixture
def namespace() -> KVNamespace:
    return KVNamespace(
        model="test-llama@main|q=|load=auto",
        kv_dtype="bfloat16",
        layout="mha-nhd:L2:H2:D64:V64:S0",
        page_size=16,
        tp_rank=0,
        tp_size=1,
        chunk_tokens=64,
    )


@pytest.fixture
def metrics() -> TierMetrics:
    return TierMetrics()


def content_for(key: bytes, nbytes: int) -> torch.Tensor:
    """Random bytes determined by ``key``, so any reader can check what it got."""
    gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)


@pytest.fixture
def chunk_of():
    return content_for


def sample(metrics: TierMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


@pytest.fixture
def metric():
    return sample
