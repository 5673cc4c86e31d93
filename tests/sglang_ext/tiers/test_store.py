"""Tier store: demotion CPU -> disk, promotion and prefetch back, async puts, metrics over HTTP."""

from __future__ import annotations

import json
import logging
import re
import socket
import urllib.error
import urllib.request

import pytest
import torch

from kvtier.sglang_ext.config import load_config
from kvtier.sglang_ext.tiers.disk import BLOCK
from kvtier.sglang_ext.tiers.store import TierStore

CHUNK = 256 * 1024


def make_store(namespace, tmp_path, cpu_slots: int, disk_slots: int = 0, **cfg) -> TierStore:
    # Half a chunk of slack: sizes are given in GB and a float may land a byte short.
    settings = {"cpu_size_gb": (cpu_slots + 0.5) * CHUNK / 1e9, **cfg}
    if disk_slots:
        disk_bytes = BLOCK + (disk_slots + 0.5) * (BLOCK + CHUNK)
        settings.update(disk_path=str(tmp_path / "disk"), disk_size_gb=disk_bytes / 1e9)
    return TierStore(load_config(env={}, **settings), namespace, CHUNK)


def chunks(namespace, n: int, chunk_of, start: int = 0):
    keys = namespace.chunk_keys(list(range(start, start + n * namespace.chunk_tokens)))
    return keys, [chunk_of(k, CHUNK) for k in keys]


def put_one_by_one(store, keys, data) -> None:
    """As evictions from the GPU arrive: a chunk at a time, each stored."""
    for key, value in zip(keys, data):
        assert store.put([key], [value], wait_s=5.0) == 1


def test_start_says_how_much_host_memory_it_takes_and_how_long(namespace, tmp_path, caplog):
    """A CPU tier of tens of GB takes seconds to fault in and pin at server start: logged before and after."""
    with caplog.at_level(logging.INFO, logger="kvtier.sglang_ext.tiers.store"):
        store = make_store(namespace, tmp_path, cpu_slots=8)
    store.close()
    assert re.search(r"allocating 0\.0 GB of host memory for the CPU tier", caplog.text)
    pinned = "allocated and pinned" if torch.cuda.is_available() else "allocated, not pinned"
    assert re.search(rf"tier store ready: 8 CPU slots of {CHUNK} bytes \({pinned} in \d+\.\d s\)", caplog.text)


def test_put_and_get_round_trip(namespace, tmp_path, chunk_of, metric):
    store = make_store(namespace, tmp_path, cpu_slots=8)
    keys, data = chunks(namespace, 5, chunk_of)
    assert store.put(keys, data) == 5
    assert store.put(keys, data) == 0  # already stored: nothing copied twice
    out = [torch.empty(CHUNK, dtype=torch.uint8) for _ in keys]
    assert store.get_into(keys, out) == 5
    assert all(torch.equal(a, b) for a, b in zip(out, data))
    assert metric(store.metrics, "kvtier_hits_total", tier="cpu") == 5
    store.close()


@pytest.mark.parametrize("disk_slots", [0, 16], ids=["cpu", "cpu+disk"])
def test_prefix_semantics(namespace, tmp_path, chunk_of, metric, disk_slots):
    store = make_store(namespace, tmp_path, cpu_slots=8, disk_slots=disk_slots)
    keys, data = chunks(namespace, 4, chunk_of)
    store.put([keys[0], keys[1], keys[3]], [data[0], data[1], data[3]])
    assert store.prefix_hits(keys) == 2
    out = [torch.zeros(CHUNK, dtype=torch.uint8) for _ in keys]
    assert store.get_into(keys, out) == 2
    assert torch.equal(out[1], data[1]) and not out[3].any()
    assert metric(store.metrics, "kvtier_misses_total") == 2
    store.close()


def test_full_cpu_tier_demotes_to_disk_in_lru_order(namespace, tmp_path, chunk_of, metric):
    store = make_store(namespace, tmp_path, cpu_slots=3, disk_slots=16)
    keys, data = chunks(namespace, 10, chunk_of)
    put_one_by_one(store, keys, data)
    store.disk.flush(timeout_s=10)
    in_cpu, on_disk = store.cpu.contains(keys), store.disk.contains(keys)
    assert in_cpu == [False] * 7 + [True] * 3  # the newest stay in CPU
    assert all(on_disk[:7])  # the oldest were demoted, none dropped
    assert metric(store.metrics, "kvtier_demotions_total") >= 7
    out = [torch.empty(CHUNK, dtype=torch.uint8) for _ in keys]
    assert store.get_into(keys, out) == 10  # disk hits are promoted back through the CPU tier
    assert all(torch.equal(a, b) for a, b in zip(out, data))
    assert metric(store.metrics, "kvtier_hits_total", tier="disk") >= 7
    store.close()


def test_prefetch_brings_disk_chunks_into_cpu(namespace, tmp_path, chunk_of):
    store = make_store(namespace, tmp_path, cpu_slots=4, disk_slots=16)
    keys, data = chunks(namespace, 8, chunk_of)
    put_one_by_one(store, keys, data)
    store.disk.flush(timeout_s=10)
    assert store.cpu.contains(keys[:2]) == [False, False]
    assert store.prefetch(keys[:3]).result(timeout=10) == 3
    assert store.cpu.contains(keys[:3]) == [True, True, True]
    with store.acquire(keys[:3]) as lease:
        assert all(torch.equal(v, d) for v, d in zip(lease.views, data[:3]))
    store.close()


def test_restarted_store_serves_from_disk(namespace, tmp_path, chunk_of):
    store = make_store(namespace, tmp_path, cpu_slots=2, disk_slots=16)
    keys, data = chunks(namespace, 6, chunk_of)
    put_one_by_one(store, keys, data)
    store.close()
    again = make_store(namespace, tmp_path, cpu_slots=2, disk_slots=16)
    # All 6: 4 demoted on eviction, the last 2 demoted ahead of need and flushed by close().
    assert again.prefix_hits(keys) == 6
    out = [torch.empty(CHUNK, dtype=torch.uint8) for _ in keys]
    assert again.get_into(keys, out) == 6
    assert all(torch.equal(a, b) for a, b in zip(out, data))
    again.close()


def test_another_model_never_reads_these_chunks(namespace, tmp_path, chunk_of):
    import dataclasses

    store = make_store(namespace, tmp_path, cpu_slots=2, disk_slots=8)
    keys, data = chunks(namespace, 4, chunk_of)
    put_one_by_one(store, keys, data)
    store.close()
    other_ns = dataclasses.replace(namespace, kv_dtype="float16")
    other = make_store(other_ns, tmp_path, cpu_slots=2, disk_slots=8)
    same_tokens = other_ns.chunk_keys(list(range(4 * namespace.chunk_tokens)))
    assert other.prefix_hits(same_tokens) == 0
    # Asked for the very keys the first model stored (as a store sharing its slab would serve them):
    # still nothing, since each namespace has its own slab file.
    assert other.prefix_hits(keys) == 0
    assert other.disk.path != store.disk.path  # separate slab files per namespace
    other.close()
    # The chunks are on disk for their own model: the misses above are the namespace's doing.
    again = make_store(namespace, tmp_path, cpu_slots=2, disk_slots=8)
    assert again.prefix_hits(keys) == 4
    again.close()


def test_put_async_completes_within_a_deadline(namespace, tmp_path, chunk_of):
    store = make_store(namespace, tmp_path, cpu_slots=8)
    keys, data = chunks(namespace, 6, chunk_of)
    future = store.put_async(keys, data)
    assert future.result(timeout=10) == 6
    assert store.prefix_hits(keys) == 6
    store.close()


def test_metrics_are_served_over_http(namespace, tmp_path, chunk_of):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = make_store(namespace, tmp_path, cpu_slots=4, metrics_port=port)
    keys, data = chunks(namespace, 2, chunk_of)
    store.put(keys, data)
    store.get_into(keys, [torch.empty(CHUNK, dtype=torch.uint8) for _ in keys])
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'kvtier_hits_total{tier="cpu"} 2.0' in body
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(s.labels.items())): s.value for f in text_string_to_metric_families(body) for s in f.samples}
    assert samples[("kvtier_capacity_bytes", (("tier", "cpu"),))] == 4 * CHUNK
    assert samples[("kvtier_used_bytes", (("tier", "cpu"),))] == 2 * CHUNK
    health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read())
    assert health["status"] == "ok" and health["cpu"] == {"chunks": 2, "capacity": 4}
    assert "disk" not in health and "remote" not in health
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nothing", timeout=5)
    assert missing.value.code == 404
    store.close()
    with pytest.raises(urllib.error.URLError):  # closing the store stops its HTTP server
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)


def test_chunk_larger_than_the_cpu_tier_is_a_clear_error(namespace, tmp_path):
    with pytest.raises(ValueError, match="cannot hold one chunk"):
        TierStore(load_config(env={}, cpu_size_gb=CHUNK / 2e9), namespace, CHUNK)


def test_close_writes_cpu_only_chunks_to_disk_for_the_next_start(namespace, tmp_path, chunk_of):
    store = make_store(namespace, tmp_path, cpu_slots=16, disk_slots=16)
    keys, data = chunks(namespace, 5, chunk_of)
    store.put(keys, data)  # plenty of room: nothing was demoted
    assert store.disk.contains(keys) == [False] * 5
    store.close()
    store.close()
    again = make_store(namespace, tmp_path, cpu_slots=16, disk_slots=16)
    out = [torch.empty(CHUNK, dtype=torch.uint8) for _ in keys]
    assert again.get_into(keys, out) == 5
    assert all(torch.equal(a, b) for a, b in zip(out, data))
    again.close()


def put_expendable(store, key, value) -> None:
    lease = store.reserve([key], expendable=True)
    lease.views[0].copy_(value)
    assert store.commit(lease)


def test_an_expendable_chunk_goes_first_and_never_to_disk(namespace, tmp_path, chunk_of):
    """A tail: kept while the CPU tier has room, evicted before older chunks without a demotion,
    and not written to disk when the store closes (lookups find tails in the CPU tier only)."""
    store = make_store(namespace, tmp_path, cpu_slots=3, disk_slots=16)
    keys, data = chunks(namespace, 3, chunk_of)
    tail = namespace.tail_keys(list(range(3 * 64 + 20)), keys)[0]
    put_one_by_one(store, keys[:2], data[:2])
    put_expendable(store, tail, data[2])
    assert store.cpu.contains([*keys[:2], tail]) == [True, True, True]  # room for it: kept
    put_one_by_one(store, keys[2:], data[2:])  # the tier is full: the tail goes, not keys[0]
    assert store.cpu.contains([*keys, tail]) == [True, True, True, False]
    store.disk.flush(timeout_s=10)
    assert store.disk.contains([tail]) == [False]
    put_expendable(store, tail, data[2])  # a full tier makes room for it as for any chunk
    assert store.cpu.contains([tail]) == [True]
    store.close()
    again = make_store(namespace, tmp_path, cpu_slots=3, disk_slots=16)
    assert again.prefix_hits(keys) == 3 and again.prefix_hits([tail]) == 0
    again.close()
