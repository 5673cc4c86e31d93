"""``python -m launch.store`` in its own process, and TierStores using it as their remote tier."""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from kvtier.sglang_ext.config import load_config
from kvtier.sglang_ext.tiers.store import TierStore

CHUNK = 128 * 1024
TOKEN = "t0ken"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StoreProcess:
    def __init__(self, port: int, *extra: str) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvtier.launch.store", "--port", str(port), "--token", TOKEN,
             "--chunk-bytes", str(CHUNK), "--cpu-size-gb", str(16.5 * CHUNK / 1e9), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,  # logs go to stderr, unread
        )
        line = self.proc.stdout.readline()
        assert "listening" in line, f"store did not start: {line!r}"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(30)


@pytest.fixture
def store_server():
    servers: list[StoreProcess] = []

    def start(port: int | None = None, *extra: str) -> StoreProcess:
        servers.append(StoreProcess(port or free_port(), *extra))
        return servers[-1]

    yield start
    for s in servers:
        if s.proc.poll() is None:
            s.stop(signal.SIGKILL)


def client(namespace, port: int, token: str = TOKEN) -> TierStore:
    cfg = load_config(env={}, cpu_size_gb=8.5 * CHUNK / 1e9, remote_url=f"kvtier://127.0.0.1:{port}?token={token}",
                      remote_timeout_s=1.0, remote_retry_s=0.5)
    return TierStore(cfg, namespace, CHUNK)


def chunks(namespace, n: int, chunk_of, start: int = 0):
    keys = namespace.chunk_keys(list(range(start, start + n * namespace.chunk_tokens)))
    return keys, [chunk_of(k, CHUNK) for k in keys]


def test_one_clients_chunks_are_another_clients_hits(namespace, store_server, chunk_of, metric):
    server = store_server()
    a, b = client(namespace, server.port), client(namespace, server.port)
    keys, data = chunks(namespace, 4, chunk_of)
    assert a.put(keys, data) == 4
    a.remote.flush(timeout_s=10)
    out = [torch.zeros(CHUNK, dtype=torch.uint8) for _ in keys]
    assert b.get_into(keys, out) == 4
    assert all(torch.equal(x, y) for x, y in zip(out, data))
    assert metric(b.metrics, "kvtier_hits_total", tier="remote") == 4
    # A tail (an expendable chunk) stays in its writer's CPU tier.
    tail = namespace.tail_keys(list(range(4 * 64 + 20)), keys)[0]
    lease = a.reserve([tail], expendable=True)
    lease.views[0].copy_(data[0])
    assert a.commit(lease)
    a.remote.flush(timeout_s=10)
    assert a.cpu.contains([tail]) == [True] and b.remote.contains([tail]) == [False]
    a.close()
    b.close()


_WRITER = textwrap.dedent(
    """
    import json, sys, torch
    from kvtier.sglang_ext.chunk_keys import KVNamespace
    from kvtier.sglang_ext.config import load_config
    from kvtier.sglang_ext.tiers.store import TierStore
    ns, port, chunk = KVNamespace(**json.loads(sys.argv[1])), sys.argv[2], int(sys.argv[3])
    cfg = load_config(env={}, cpu_size_gb=0.01, remote_url=f"kvtier://127.0.0.1:{port}?token=t0ken", remote_timeout_s=1.0)
    store = TierStore(cfg, ns, chunk)
    keys = ns.chunk_keys(list(range(2 * ns.chunk_tokens)))
    store.put(keys, [torch.full((chunk,), 7 + i, dtype=torch.uint8) for i in range(2)])
    store.close()
    """
)


def test_a_restarted_store_with_a_disk_keeps_what_another_process_wrote(namespace, store_server, tmp_path):
    port = free_port()
    server = store_server(port, "--disk-path", str(tmp_path / "store"), "--disk-size-gb", str(40 * CHUNK / 1e9))
    subprocess.run([sys.executable, "-c", _WRITER, json.dumps(dataclasses.asdict(namespace)), str(port), str(CHUNK)],
                   check=True, timeout=120)
    server.stop()  # graceful: the CPU tier is written to disk
    store_server(port, "--disk-path", str(tmp_path / "store"), "--disk-size-gb", str(40 * CHUNK / 1e9))
    reader = client(namespace, port)
    keys = namespace.chunk_keys(list(range(2 * namespace.chunk_tokens)))
    out = [torch.zeros(CHUNK, dtype=torch.uint8) for _ in keys]
    assert reader.get_into(keys, out) == 2
    assert [int(o[0]) for o in out] == [7, 8] and all(bool((o == o[0]).all()) for o in out)
    reader.close()


def test_a_corrupt_entry_on_the_stores_disk_is_a_miss_not_served(namespace, store_server, tmp_path):
    port = free_port()
    disk = ("--disk-path", str(tmp_path / "store"), "--disk-size-gb", str(40 * CHUNK / 1e9))
    server = store_server(port, *disk)
    subprocess.run([sys.executable, "-c", _WRITER, json.dumps(dataclasses.asdict(namespace)), str(port), str(CHUNK)],
                   check=True, timeout=120)
    server.stop()
    (slab,) = [p for p in (tmp_path / "store").rglob("*") if p.is_file() and p.stat().st_size > CHUNK]
    with open(slab, "r+b") as f:  # flip one byte inside the second chunk's payload (all 8s)
        at = f.read().find(bytes([8]) * 4096)
        assert at > 0
        f.seek(at + 1000)
        f.write(bytes([0x88]))
    store_server(port, *disk)
    reader = client(namespace, port)
    keys = namespace.chunk_keys(list(range(2 * namespace.chunk_tokens)))
    out = [torch.zeros(CHUNK, dtype=torch.uint8) for _ in keys]
    assert reader.get_into(keys, out) == 1  # the first chunk is whole; the damaged one is recomputed
    assert bool((out[0] == 7).all()) and not out[1].any()
    reader.close()


def test_a_wrong_token_is_refused(namespace, store_server, chunk_of, metric):
    server = store_server()
    good, bad = client(namespace, server.port), client(namespace, server.port, token="guess")
    keys, data = chunks(namespace, 2, chunk_of)
    good.put(keys, data)
    good.remote.flush(timeout_s=10)
    assert bad.prefix_hits(keys) == 0
    assert metric(bad.metrics, "kvtier_remote_errors_total") >= 1
    # The chunks are on the server: another client with the right token (and an empty CPU tier) finds them.
    other = client(namespace, server.port)
    assert other.prefix_hits(keys) == 2
    good.close()
    bad.close()
    other.close()


def test_a_dead_store_is_a_fast_miss_and_a_restarted_one_is_found(namespace, store_server, chunk_of):
    port = free_port()
    server = store_server(port)
    c = client(namespace, port)
    keys, data = chunks(namespace, 2, chunk_of)
    assert c.put(keys, data) == 2
    c.remote.flush(timeout_s=10)
    server.stop(signal.SIGKILL)
    start = time.monotonic()
    other_keys, other_data = chunks(namespace, 2, chunk_of, start=50_000)
    assert c.prefix_hits(other_keys) == 0
    assert time.monotonic() - start < 3.0
    store_server(port)
    time.sleep(0.6)  # remote_retry_s
    writer = client(namespace, port)
    writer.put(other_keys, other_data)
    writer.remote.flush(timeout_s=10)
    assert c.prefix_hits(other_keys) == 2  # hello again, by itself
    c.close()
    writer.close()
