"""CPU tier: bit-exact slots, LRU eviction, leases that cannot leak, concurrency."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import torch

from kvtier.sglang_ext.tiers.cpu import CpuTier

CHUNK = 3 * 4096 + 100  # not a multiple of 4 KiB: slots are padded, views are exact


def make_tier(metrics, slots: int, **kw) -> CpuTier:
    return CpuTier(CHUNK, slots * 4 * 4096, metrics=metrics, **kw)


def put(tier: CpuTier, keys, chunk_of, wait_s: float = 0.0) -> list[bytes]:
    with tier.reserve(keys, wait_s=wait_s) as lease:
        for key, view in zip(lease.keys, lease.views):
            view.copy_(chunk_of(key, CHUNK))
        assert lease.commit()
        return lease.keys


def read(tier: CpuTier, keys) -> list[torch.Tensor]:
    with tier.acquire(keys) as lease:
        out = [v.clone() for v in lease.views]
        assert lease.release()
    return out


def test_round_trip_is_bit_exact_and_slots_are_aligned(metrics, chunk_of):
    tier = make_tier(metrics, 4)
    keys = [bytes([i]) * 32 for i in range(4)]
    assert put(tier, keys, chunk_of) == keys
    for key, got in zip(keys, read(tier, keys)):
        assert torch.equal(got, chunk_of(key, CHUNK))
    with tier.acquire(keys) as lease:
        assert all(v.data_ptr() % 4096 == 0 and v.numel() == CHUNK for v in lease.views)
    tier.close()


def test_reads_stop_at_the_first_missing_chunk(metrics, chunk_of):
    tier = make_tier(metrics, 4)
    a, b, c = (bytes([i]) * 32 for i in range(3))
    put(tier, [a, c], chunk_of)
    assert tier.contains([a, b, c]) == [True, False, True]
    with tier.acquire([a, b, c]) as lease:
        assert lease.keys == [a]


def test_lru_eviction_order(metrics, chunk_of):
    tier = make_tier(metrics, 3)
    a, b, c, d, e = (bytes([i]) * 32 for i in range(5))
    put(tier, [a, b, c], chunk_of)
    read(tier, [a])  # a becomes most recently used: b is now the oldest
    put(tier, [d], chunk_of)
    assert tier.contains([a, b, c, d]) == [True, False, True, True]
    put(tier, [e], chunk_of)
    assert tier.contains([a, c, d, e]) == [True, False, True, True]
    assert metrics.registry.get_sample_value("kvtier_evictions_total", {"tier": "cpu"}) == 2


def test_demotion_ahead_readies_the_lru_end_though_chunks_read_from_below_sit_at_the_other(metrics, chunk_of):
    """Eviction takes the LRU end first, so that is where demotion ahead must leave reusable slots;
    chunks read back from the tier below (already written there, now most recently used) do not
    count (counted, as the tier once did, they left the end unready and a put that cannot wait dropped)."""
    handed_down: list[tuple[bytes, Future]] = []

    def demote(key: bytes, view: torch.Tensor) -> Future:
        handed_down.append((key, Future()))
        return handed_down[-1][1]

    tier = make_tier(metrics, 16, demote=demote)  # reuse_target 2
    assert tier.reuse_target == 2
    old = [bytes([i]) * 32 for i in range(12)]
    put(tier, old, chunk_of)  # 4 slots free: nothing to demote yet
    assert handed_down == []
    from_below = [bytes([100 + i]) * 32 for i in range(2)]
    with tier.acquire(from_below, fill=lambda keys, views: [True] * len(keys)) as lease:
        assert lease.keys == from_below and lease.release()
    put(tier, [bytes([50]) * 32], chunk_of)  # 1 slot free: the oldest chunk goes below ahead
    assert [key for key, _ in handed_down] == [old[0]]
    handed_down[0][1].set_result(True)
    new = [bytes([60 + i]) * 32 for i in range(2)]
    assert put(tier, new, chunk_of) == new  # the free slot, then old[0]'s without a wait
    assert tier.contains([old[0], old[1], *from_below]) == [False, True, True, True]
    assert metrics.registry.get_sample_value("kvtier_dropped_puts_total", {"reason": "cpu_full"}) is None


def test_pinned_chunks_are_not_evicted_and_a_full_tier_does_not_block(metrics, chunk_of):
    tier = make_tier(metrics, 2)
    a, b, c = (bytes([i]) * 32 for i in range(3))
    put(tier, [a, b], chunk_of)
    lease = tier.acquire([a, b])
    start = time.monotonic()
    assert put(tier, [c], chunk_of, wait_s=0.2) == []  # every slot pinned: nothing stored
    assert time.monotonic() - start < 2.0
    assert metrics.registry.get_sample_value("kvtier_dropped_puts_total", {"reason": "cpu_full"}) == 1
    assert tier.contains([a, b]) == [True, True]
    lease.release()
    assert put(tier, [c], chunk_of) == [c]
    assert tier.contains([a, b, c]) == [False, True, True]


def test_a_read_lease_that_is_never_released_expires(metrics, chunk_of):
    tier = make_tier(metrics, 1)
    a, b = bytes([1]) * 32, bytes([2]) * 32
    put(tier, [a], chunk_of)
    forgotten = tier.acquire([a], timeout_s=0.1)  # its holder "dies" and never releases
    assert put(tier, [b], chunk_of) == []
    time.sleep(0.15)
    assert put(tier, [b], chunk_of) == [b]
    assert forgotten.release() is False  # the holder learns its views were reclaimed
    assert metrics.registry.get_sample_value("kvtier_expired_leases_total") == 1


def test_a_reader_that_raises_releases_its_pins(metrics, chunk_of):
    tier = make_tier(metrics, 1)
    a, b = bytes([1]) * 32, bytes([2]) * 32
    put(tier, [a], chunk_of)
    try:
        with tier.acquire([a]):
            raise RuntimeError("reader died mid-copy")
    except RuntimeError:
        pass
    assert put(tier, [b], chunk_of) == [b]


def test_an_uncommitted_write_is_invisible_and_expires(metrics, chunk_of):
    tier = make_tier(metrics, 1)
    a, b = bytes([1]) * 32, bytes([2]) * 32
    writer = tier.reserve([a], timeout_s=0.1)
    assert writer.keys == [a] and tier.contains([a]) == [False]
    assert tier.reserve([a]).keys == []  # already being written: no second slot
    time.sleep(0.15)
    assert put(tier, [b], chunk_of) == [b]
    assert writer.commit() is False and tier.contains([a]) == [False]


def test_concurrent_readers_and_writers_see_only_whole_chunks(metrics, chunk_of):
    tier = make_tier(metrics, 6)
    keys = [i.to_bytes(2, "little") * 16 for i in range(24)]
    errors: list[str] = []
    stop = time.monotonic() + 3.0

    def writer(offset: int) -> None:
        i = offset
        while time.monotonic() < stop:
            try:
                put(tier, [keys[i % len(keys)]], chunk_of, wait_s=0.05)
            except AssertionError as exc:
                errors.append(f"commit failed: {exc}")
            i += 3

    def reader(offset: int) -> None:
        i = offset
        while time.monotonic() < stop:
            key = keys[i % len(keys)]
            with tier.acquire([key]) as lease:
                if lease.keys and not torch.equal(lease.views[0], chunk_of(key, CHUNK)):
                    errors.append(key.hex())
            i += 5

    threads = [threading.Thread(target=f, args=(n,)) for n in range(2) for f in (writer, reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(tier) <= 6
    hits = metrics.registry.get_sample_value("kvtier_bytes_total", {"tier": "cpu", "direction": "in"})
    assert hits and hits >= 6 * CHUNK
