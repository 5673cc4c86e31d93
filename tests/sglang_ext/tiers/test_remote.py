"""Remote tier on a real redis-server started on loopback: sharing, outages, damage, isolation."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import redis
import torch

from kvtier.sglang_ext.config import load_config
from kvtier.sglang_ext.tiers.store import TierStore

CHUNK = 128 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on 127.0.0.1, no persistence, stopped and restarted at will."""

    def __init__(self, password: str | None = None) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed; tests/run.sh installs it (apt-get install redis-server)")
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_ping(redis.Redis(port=self.port, password=self.password))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def url(self, password: str | None = None) -> str:
        auth = f":{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"


@pytest.fixture
def server():
    s = RedisServer()
    yield s
    s.stop()


def make_store(namespace, url: str, **cfg) -> TierStore:
    settings = {"cpu_size_gb": 8.5 * CHUNK / 1e9, "remote_url": url, "remote_timeout_s": 0.3, "remote_retry_s": 0.5, **cfg}
    return TierStore(load_config(env={}, **settings), namespace, CHUNK)


def chunks(namespace, n: int, chunk_of, start: int = 0):
    keys = namespace.chunk_keys(list(range(start, start + n * namespace.chunk_tokens)))
    return keys, [chunk_of(k, CHUNK) for k in keys]


def test_a_chunk_put_by_one_replica_is_a_hit_for_another(namespace, server, chunk_of, metric):
    writer, reader = make_store(namespace, server.url()), make_store(namespace, server.url())
    keys, data = chunks(namespace, 4, chunk_of)
    assert writer.put(keys, data) == 4
    writer.remote.flush(timeout_s=10)
    out = [torch.zeros(CHUNK, dtype=torch.uint8) for _ in keys]
    assert reader.prefix_hits(keys) == 4
    assert reader.get_into(keys, out) == 4
    assert all(torch.equal(a, b) for a, b in zip(out, data))
    assert metric(reader.metrics, "kvtier_hits_total", tier="remote") == 4
    assert reader.cpu.contains(keys) == [True] * 4  # now local: the next hit costs no round trip
    writer.close()
    reader.close()


_WRITER = textwrap.dedent(
    """
    import json, sys, torch
    from kvtier.sglang_ext.chunk_keys import KVNamespace
    from kvtier.sglang_ext.config import load_config
    from kvtier.sglang_ext.tiers.store import TierStore
    ns = KVNamespace(**json.loads(sys.argv[2]))
    store = TierStore(load_config(env={}, cpu_size_gb=0.01, remote_url=sys.argv[1]), ns, int(sys.argv[3]))
    keys = ns.chunk_keys(list(range(3 * ns.chunk_tokens)))
    store.put(keys, [torch.full((int(sys.argv[3]),), i + 1, dtype=torch.uint8) for i in range(3)])
    store.close()  # drains the remote writes
    """
)


def test_two_processes_share_through_one_server(namespace, server):
    subprocess.run(
        [sys.executable, "-c", _WRITER, server.url(), __import__("json").dumps(dataclasses.asdict(namespace)), str(CHUNK)],
        check=True,
        timeout=120,
    )
    reader = make_store(namespace, server.url())
    keys = namespace.chunk_keys(list(range(3 * namespace.chunk_tokens)))
    out = [torch.zeros(CHUNK, dtype=torch.uint8) for _ in keys]
    assert reader.get_into(keys, out) == 3
    assert [int(o[0]) for o in out] == [1, 2, 3] and all(bool((o == o[0]).all()) for o in out)
    reader.close()


def test_a_dead_store_is_a_fast_miss_and_is_found_again(namespace, server, chunk_of, metric):
    store = make_store(namespace, server.url())
    keys, data = chunks(namespace, 2, chunk_of)
    server.stop()
    start = time.monotonic()
    assert store.prefix_hits(keys) == 0  # one timed-out call, then the tier is skipped
    assert store.get_into(keys, [torch.zeros(CHUNK, dtype=torch.uint8) for _ in keys]) == 0
    assert time.monotonic() - start < 2.0
    assert metric(store.metrics, "kvtier_remote_errors_total") >= 1
    assert store.put(keys, data) == 2  # local tiers keep working
    server.start()
    time.sleep(0.6)  # remote_retry_s
    other = make_store(namespace, server.url())
    other_keys, other_data = chunks(namespace, 2, chunk_of, start=10_000)
    assert other.put(other_keys, other_data) == 2
    other.remote.flush(timeout_s=10)
    assert store.prefix_hits(other_keys) == 2  # reconnected by itself
    store.close()
    other.close()


def test_a_damaged_value_is_a_miss(namespace, server, chunk_of, metric):
    writer, reader = make_store(namespace, server.url()), make_store(namespace, server.url())
    keys, data = chunks(namespace, 2, chunk_of)
    writer.put(keys, data)
    writer.remote.flush(timeout_s=10)
    client = redis.Redis(port=server.port)
    name = f"kvtier:{namespace.digest().hex()[:24]}:{keys[1].hex()}"
    value = bytearray(client.get(name))
    value[-5] ^= 0x40
    client.set(name, bytes(value))
    out = [torch.zeros(CHUNK, dtype=torch.uint8) for _ in keys]
    assert reader.get_into(keys, out) == 1
    assert torch.equal(out[0], data[0])
    assert metric(reader.metrics, "kvtier_corrupt_total", tier="remote") == 1
    writer.close()
    reader.close()


def test_another_namespace_shares_nothing(namespace, server, chunk_of):
    writer = make_store(namespace, server.url())
    keys, data = chunks(namespace, 2, chunk_of)
    writer.put(keys, data)
    writer.remote.flush(timeout_s=10)
    other_ns = dataclasses.replace(namespace, tp_rank=1, tp_size=2)
    reader = make_store(other_ns, server.url())
    assert reader.prefix_hits(other_ns.chunk_keys(list(range(2 * namespace.chunk_tokens)))) == 0
    # Even the writer's own keys are not served across namespaces (Redis names carry the namespace)...
    assert reader.prefix_hits(keys) == 0
    # ...while a replica of the writer's namespace, with an empty CPU tier, finds both on the server.
    same = make_store(namespace, server.url())
    assert same.prefix_hits(keys) == 2
    writer.close()
    reader.close()
    same.close()


def test_a_wrong_password_reads_and_writes_nothing():
    secured = RedisServer(password="s3cret")
    try:
        ns_fields = dict(model="m", kv_dtype="bfloat16", layout="l", page_size=16, tp_rank=0, tp_size=1, chunk_tokens=64)
        from kvtier.sglang_ext.chunk_keys import KVNamespace

        ns = KVNamespace(**ns_fields)
        keys = ns.chunk_keys(list(range(64)))
        good = make_store(ns, secured.url("s3cret"))
        assert good.health()["remote"] == {"url": f"redis://127.0.0.1:{secured.port}/0", "up": True}  # no password
        good.put(keys, [torch.ones(CHUNK, dtype=torch.uint8)])
        good.remote.flush(timeout_s=10)
        intruder = make_store(ns, secured.url("guess"))
        assert intruder.prefix_hits(keys) == 0
        intruder.put(ns.chunk_keys(list(range(100, 164))), [torch.zeros(CHUNK, dtype=torch.uint8)])
        intruder.remote.flush(timeout_s=10)
        assert redis.Redis(port=secured.port, password="s3cret").dbsize() == 1
        good.close()
        intruder.close()
    finally:
        secured.stop()


class RedisCluster:
    """Three real redis-server nodes on loopback joined into a Redis Cluster (no replicas)."""

    def __init__(self, tmp_path) -> None:
        if shutil.which("redis-cli") is None:
            pytest.fail("redis-cli is not installed; tests/run.sh installs it with redis-server")
        self.ports = [_cluster_port() for _ in range(3)]
        self.procs = [
            subprocess.Popen(
                ["redis-server", "--port", str(p), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{p}.conf", "--dir", str(tmp_path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for p in self.ports
        ]
        for p in self.ports:
            _wait_for_ping(redis.Redis(port=p))
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while not all(redis.Redis(port=p).cluster("info")["cluster_state"] == "ok" for p in self.ports):
            assert time.monotonic() < deadline, "the cluster did not reach state ok"
            time.sleep(0.1)

    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[1]}"

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is a valid, free port too."""
    while True:
        port = free_port()
        if port + 10_000 < 65_536:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10_000))
                except OSError:
                    continue
            return port


def _wait_for_ping(client: redis.Redis) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_redis_cluster_spreads_chunks_over_its_nodes_and_serves_them(namespace, chunk_of, tmp_path, metric):
    cluster = RedisCluster(tmp_path)
    try:
        writer, reader = make_store(namespace, cluster.url()), make_store(namespace, cluster.url())
        keys, data = chunks(namespace, 8, chunk_of)
        assert writer.put(keys, data) == 8
        writer.remote.flush(timeout_s=10)
        per_node = [redis.Redis(port=p).dbsize() for p in cluster.ports]
        assert sum(per_node) == 8 and sum(n > 0 for n in per_node) >= 2, per_node
        out = [torch.zeros(CHUNK, dtype=torch.uint8) for _ in keys]
        assert reader.get_into(keys, out) == 8
        assert all(torch.equal(a, b) for a, b in zip(out, data))
        assert metric(reader.metrics, "kvtier_hits_total", tier="remote") == 8
        writer.close()
        reader.close()
    finally:
        cluster.stop()
    start = time.monotonic()  # a cluster that is gone: the store still starts, and misses fast
    dead = make_store(namespace, cluster.url())
    assert dead.prefix_hits(keys) == 0
    assert time.monotonic() - start < 3.0
    assert metric(dead.metrics, "kvtier_remote_errors_total") >= 1
    dead.close()
