"""Disk tier: bit-exact slots, persistence, checksums, crash safety, LRU capacity, locking."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from kvtier.sglang_ext.metrics import TierMetrics
from kvtier.sglang_ext.tiers.disk import BLOCK, DiskTier

CHUNK = 64 * 1024


def open_tier(path, metrics, slots: int = 8, chunk: int = CHUNK, **kw) -> DiskTier:
    capacity = BLOCK + slots * (BLOCK + -(-chunk // BLOCK) * BLOCK)
    return DiskTier(str(path), "t", chunk, capacity, metrics=metrics, **kw)


def write(tier: DiskTier, keys, chunk_of) -> None:
    futures = [tier.submit(k, chunk_of(k, tier.chunk_bytes), block_s=5.0) for k in keys]
    assert all(f.result(timeout=10) for f in futures)


def read(tier: DiskTier, key) -> torch.Tensor | None:
    dst = torch.empty(tier.chunk_bytes, dtype=torch.uint8)
    return dst if tier.read_into([key], [dst]) == 1 else None


def keys_of(n: int, salt: int = 0) -> list[bytes]:
    return [(salt * 1000 + i).to_bytes(4, "little") * 8 for i in range(n)]


@pytest.mark.parametrize("chunk", [CHUNK, CHUNK + 1000])  # aligned (direct) and padded (bounce)
def test_round_trip_is_bit_exact(tmp_path, metrics, chunk_of, chunk):
    tier = open_tier(tmp_path, metrics, chunk=chunk)
    keys = keys_of(5)
    write(tier, keys, chunk_of)
    for key in keys:
        assert torch.equal(read(tier, key), chunk_of(key, chunk))
    assert tier.read_into(keys_of(1, salt=9), [torch.empty(chunk, dtype=torch.uint8)]) == 0
    tier.close()


def test_o_direct_is_used_where_the_filesystem_allows_it(tmp_path, metrics):
    tier = open_tier(tmp_path, metrics)
    assert tier.o_direct is True  # ext4/xfs, as on the CI and GPU machines
    tier.close()


def test_a_filesystem_refusing_o_direct_falls_back_with_a_warning(tmp_path, chunk_of, caplog):
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    # ramfs has no direct I/O at all: the real refusal, not a simulated one. Needs root (CI is).
    if subprocess.run(["mount", "-t", "ramfs", "none", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a ramfs here (not root)")
    try:
        tier = open_tier(mnt, TierMetrics())
        assert tier.o_direct is False
        assert "refuses O_DIRECT" in caplog.text
        keys = keys_of(2)
        write(tier, keys, chunk_of)
        assert torch.equal(read(tier, keys[1]), chunk_of(keys[1], CHUNK))
        tier.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_restart_serves_what_was_written(tmp_path, metrics, chunk_of, caplog):
    tier = open_tier(tmp_path, metrics)
    keys = keys_of(6)
    write(tier, keys, chunk_of)
    tier.close()
    with caplog.at_level(logging.INFO, logger="kvtier.sglang_ext.tiers.disk"):
        again = open_tier(tmp_path, TierMetrics())
    assert again.contains(keys) == [True] * 6
    # A big slab file takes a while to scan at start: the log says how long.
    assert re.search(r"restored 6 chunks \(\d+ headers read in \d+\.\d s\)", caplog.text)
    for key in keys:
        assert torch.equal(read(again, key), chunk_of(key, CHUNK))
    again.close()


def test_a_flipped_byte_is_a_miss_not_a_wrong_answer(tmp_path, metrics, chunk_of):
    tier = open_tier(tmp_path, metrics)
    keys = keys_of(3)
    write(tier, keys, chunk_of)
    slot = tier._index[keys[1]]
    offset = tier._offset(slot) + BLOCK + 12345
    with open(tier.path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    assert read(tier, keys[1]) is None
    assert tier.contains([keys[1]]) == [False]  # dropped from the index: recomputed next time
    assert metrics.registry.get_sample_value("kvtier_corrupt_total", {"tier": "disk"}) == 1
    assert torch.equal(read(tier, keys[2]), chunk_of(keys[2], CHUNK))
    write(tier, [keys[1]], chunk_of)  # the recomputed chunk can be stored again
    assert torch.equal(read(tier, keys[1]), chunk_of(keys[1], CHUNK))
    tier.close()


def test_a_truncated_file_is_detected(tmp_path, metrics, chunk_of):
    tier = open_tier(tmp_path, metrics)
    keys = keys_of(4)
    write(tier, keys, chunk_of)
    last = max(keys, key=lambda k: tier._index[k])
    cut = tier._offset(tier._index[last]) + BLOCK + CHUNK // 2
    os.truncate(tier.path, cut)  # behind the running tier's back
    assert read(tier, last) is None
    tier.close()
    os.truncate(tier.path, cut)  # and across a restart (start-up extends the file again)
    again = open_tier(tmp_path, TierMetrics())
    served = [k for k in keys if read(again, k) is not None]
    assert last not in served
    for key in served:
        assert torch.equal(read(again, key), chunk_of(key, CHUNK))
    again.close()


def test_capacity_evicts_least_recently_used(tmp_path, metrics, chunk_of):
    tier = open_tier(tmp_path, metrics, slots=3)
    a, b, c, d = keys_of(4)
    write(tier, [a, b, c], chunk_of)
    assert read(tier, a) is not None  # a is now most recently used
    write(tier, [d], chunk_of)
    assert tier.contains([a, b, c, d]) == [True, False, True, True]
    assert metrics.registry.get_sample_value("kvtier_evictions_total", {"tier": "disk"}) == 1


def test_a_second_server_cannot_open_the_same_slab(tmp_path, metrics):
    tier = open_tier(tmp_path, metrics)
    with pytest.raises(RuntimeError, match="in use by another process"):
        open_tier(tmp_path, TierMetrics())
    tier.close()
    open_tier(tmp_path, TierMetrics()).close()


def test_a_full_queue_refuses_instead_of_blocking(tmp_path, metrics):
    big = 8 * 1024 * 1024
    tier = open_tier(tmp_path, metrics, slots=4, chunk=big, queue_depth=1)
    value = torch.ones(big, dtype=torch.uint8)
    keys = keys_of(20)
    start = time.monotonic()
    results = [tier.submit(k, value) for k in keys]  # 20 submits in microseconds, 8 MiB writes behind
    assert time.monotonic() - start < 0.5
    assert any(r is None for r in results)
    tier.flush(timeout_s=30)
    accepted = [k for k, r in zip(keys, results) if r is not None]
    assert all(r.result() for r in results if r is not None)
    assert sum(tier.contains(accepted)) == min(len(accepted), 4)
    tier.close()


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from kvtier.sglang_ext.metrics import TierMetrics
    from kvtier.sglang_ext.tiers.disk import DiskTier
    path, chunk, capacity = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    tier = DiskTier(path, "t", chunk, capacity, metrics=TierMetrics())
    print("ready", flush=True)
    i = 0
    while True:  # overwrite slots forever, until killed
        key = (i % 64).to_bytes(4, "little") * 8
        value = torch.full((chunk,), i % 251, dtype=torch.uint8)
        tier.submit(key, value, block_s=10).result()
        tier._index.pop(key, None)  # forget it so that the same key is written again
        i += 1
    """
)


def test_kill_9_mid_write_never_serves_torn_data(tmp_path, chunk_of):
    chunk = 4 * 1024 * 1024
    slots = 6
    capacity = BLOCK + slots * (BLOCK + chunk)
    served = 0
    for attempt in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path), str(chunk), str(capacity)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3 + 0.17 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        metrics = TierMetrics()
        tier = DiskTier(str(tmp_path), "t", chunk, capacity, metrics=metrics)
        for key in list(tier._index):
            got = read(tier, key)
            if got is not None:  # every chunk served is one whole write: a single repeated byte
                assert torch.equal(got, torch.full_like(got, got[0].item())), "torn chunk served"
                served += 1
        tier.close()
    assert served > 0  # the restarts did find and serve the chunks written before each kill
