"""Shared fixtures: a namespace, deterministic chunk contents, a fresh metrics registry, and an
HTTP port that answers health polls with garbage first."""

from __future__ import annotations

import socket
import threading

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


@pytest.fixture
def echo_then_ok_server():
    """A local HTTP port whose first ``n`` connections get their own request line back as the
    "status line" (what a TCP connection to itself reads: a health poll that lands on its own
    ephemeral port), and every later one a 200. Yields ``start(n) -> url``."""
    servers = []

    def start(n: int) -> str:
        sock = socket.create_server(("127.0.0.1", 0))
        servers.append(sock)

        def serve() -> None:
            served = 0
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                with conn:
                    request_line = conn.recv(65536).split(b"\r\n", 1)[0]
                    conn.sendall(request_line + b"\r\n" if served < n else
                                 b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                served += 1

        threading.Thread(target=serve, daemon=True).start()
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for sock in servers:
        sock.close()
