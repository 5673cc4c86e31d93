"""What every Transport backend must do, as tests over real loopback connections and processes.

A backend's test module loads this file and takes its ``test_*`` functions as its own, and defines
the fixture ``backend`` (its kind in ``backends.open_transport``); the tests open transports with
``conftest``'s ``make`` and ``pair`` fixtures and real peer processes with
``spawn_peer(regions, backend)``.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from kvtier.transfer.base import PeerTimeout, RemoteError, TransferError

SIZES = [1, 4096, (1 << 20) + 17, 64 << 20]
SLACK_S = 0.5  # how far past its deadline a failing call may return


@pytest.mark.parametrize("nbytes", SIZES)
def test_write_then_read_back_is_bit_exact(pair, pattern, nbytes):
    sender, receiver = pair
    region = torch.zeros(nbytes + 64, dtype=torch.uint8)
    receiver.register("kv", region)
    peer = sender.connect(receiver.descriptor())
    data = pattern(nbytes, nbytes)

    sender.write(peer, [(data, "kv", 3)], timeout_s=10)
    assert torch.equal(region[3 : 3 + nbytes], data)
    assert not region[:3].any() and not region[3 + nbytes :].any()

    back = torch.empty(nbytes, dtype=torch.uint8)
    sender.read(peer, [("kv", 3, back)], timeout_s=10)
    assert torch.equal(back, data)


def test_many_ranges_over_several_regions_in_one_batch(pair, pattern):
    sender, receiver = pair
    regions = {f"layer{i}": torch.zeros(1 << 20, dtype=torch.uint8) for i in range(3)}
    for name, t in regions.items():
        receiver.register(name, t)
    peer = sender.connect(receiver.descriptor())
    gen = torch.Generator().manual_seed(0)
    ops, expected = [], {name: torch.zeros(1 << 20, dtype=torch.uint8) for name in regions}
    taken: set[tuple[str, int]] = set()
    for i in range(600):  # disjoint 1 KiB slots over the regions, random lengths and dtypes
        name = f"layer{i % 3}"
        slot = int(torch.randint(0, 1024, (1,), generator=gen))
        if (name, slot) in taken:
            continue
        taken.add((name, slot))
        offset = slot * 1024
        nbytes = int(torch.randint(1, 1025, (1,), generator=gen))
        data = pattern(i, nbytes)
        src = data if nbytes % 2 else data.view(torch.bfloat16)  # any contiguous dtype is bytes
        ops.append((src, name, offset))
        expected[name][offset : offset + nbytes] = data
    sender.write(peer, ops, timeout_s=10)
    for name, t in regions.items():
        assert torch.equal(t, expected[name]), name

    reads = [
        (name, offset, torch.empty(src.numel() * src.element_size(), dtype=torch.uint8))
        for src, name, offset in ops
    ]
    sender.read(peer, reads, timeout_s=10)
    for name, offset, dst in reads:
        assert torch.equal(dst, expected[name][offset : offset + dst.numel()])


def test_empty_ranges_and_batches_are_fine(pair, pattern):
    sender, receiver = pair
    region = torch.zeros(64, dtype=torch.uint8)
    receiver.register("kv", region)
    peer = sender.connect(receiver.descriptor())
    sender.write(peer, [], timeout_s=5)
    sender.write(
        peer, [(torch.empty(0, dtype=torch.uint8), "kv", 64), (pattern(1, 8), "kv", 0)], timeout_s=5
    )
    assert torch.equal(region[:8], pattern(1, 8)) and not region[8:].any()
    sender.read(peer, [], timeout_s=5)


def test_notification_carries_sender_and_message(pair):
    sender, receiver = pair
    peer = sender.connect(receiver.descriptor())
    sender.notify(peer, b"room 7 done", timeout_s=5)
    sender.notify(peer, b"", timeout_s=5)
    note = receiver.recv_notification(timeout_s=5)
    assert (note.sender, note.message) == (sender.address, b"room 7 done")
    assert receiver.recv_notification(timeout_s=5).message == b""
    with pytest.raises(PeerTimeout, match="no notification"):
        receiver.recv_notification(timeout_s=0.05)


def test_writes_and_reads_across_processes(make, backend, spawn_peer, pattern, digest):
    sizes = {f"r{n}": n for n in SIZES}
    child = spawn_peer(sizes, backend)
    with make() as me:
        peer = me.connect(child.descriptor)
        payloads = {name: pattern(n, n) for name, n in sizes.items()}
        me.write(peer, [(data, name, 0) for name, data in payloads.items()], timeout_s=20)
        assert child.call(op="digests") == {name: digest(d) for name, d in payloads.items()}
        for name, data in payloads.items():
            back = torch.empty_like(data)
            me.read(peer, [(name, 0, back)], timeout_s=20)
            assert torch.equal(back, data), name
    assert child.call(op="close") == "closed"


def test_notification_arrives_only_after_the_data_it_follows(
    make, backend, spawn_peer, pattern, digest
):
    # Each round writes its own slot, so a check can never see the next round's bytes.
    nbytes, rounds = (4 << 20) + 1, 10
    with make() as me:
        region = torch.zeros(rounds * nbytes, dtype=torch.uint8)
        me.register("kv", region)
        child = spawn_peer({}, backend)
        assert child.call(op="connect", descriptor=me.descriptor()) == "ok"
        child.send(op="write_then_notify", region="kv", nbytes=nbytes, rounds=rounds)
        for seed in range(rounds):
            note = me.recv_notification(timeout_s=20)
            assert note.message == str(seed).encode()
            slot = region[seed * nbytes : (seed + 1) * nbytes]
            assert torch.equal(slot, pattern(seed, nbytes)), f"round {seed}: notified before data"
        assert child.reply() == "ok"

        # and the other direction: the child hashes each slot the moment its notification lands
        child2 = spawn_peer({"kv": rounds * nbytes}, backend)
        peer = me.connect(child2.descriptor)
        child2.send(op="await_notifications", count=rounds, timeout_s=20)
        for seed in range(rounds):
            me.write(peer, [(pattern(seed, nbytes), "kv", seed * nbytes)], timeout_s=20)
            me.notify(peer, json.dumps(["kv", seed * nbytes, nbytes]).encode(), timeout_s=20)
        assert child2.reply() == [digest(pattern(s, nbytes)) for s in range(rounds)]


def _fails_in_time(call, deadline_s: float, killer: threading.Timer) -> None:
    """Repeats ``call(deadline_s)`` until the peer's death fails it, then checks the timing."""
    killer.start()
    with pytest.raises(PeerTimeout, match="may have died"):  # never "not connected"
        for _ in range(10_000):
            start = time.monotonic()
            call(deadline_s)
    elapsed = time.monotonic() - start
    killer.join()
    assert elapsed < deadline_s + SLACK_S


@pytest.mark.parametrize("what", ["write", "read", "notify"])
def test_peer_killed_mid_transfer_fails_the_caller_within_its_deadline(
    make, backend, spawn_peer, pattern, what
):
    nbytes = 64 << 20
    child = spawn_peer({"kv": nbytes}, backend)
    data = pattern(0, nbytes)
    calls = {
        "write": lambda me, peer, t: me.write(peer, [(data, "kv", 0)], timeout_s=t),
        "read": lambda me, peer, t: me.read(peer, [("kv", 0, data)], timeout_s=t),
        "notify": lambda me, peer, t: me.notify(peer, b"x" * 1000, timeout_s=t),
    }
    with make() as me:
        peer = me.connect(child.descriptor)
        calls[what](me, peer, 20)  # connected and working
        _fails_in_time(lambda t: calls[what](me, peer, t), 2.0, threading.Timer(0.2, child.kill))
        with pytest.raises(TransferError, match=r"connect\(descriptor\)"):
            me.write(peer, [(data[:1], "kv", 0)])


def test_hung_peer_fails_the_caller_at_its_deadline(make, backend, spawn_peer, pattern):
    child = spawn_peer({"kv": 1 << 20}, backend)
    with make() as me:
        peer = me.connect(child.descriptor)
        me.write(peer, [(pattern(0, 1 << 20), "kv", 0)], timeout_s=20)
        child.pause()
        for call in (
            lambda: me.write(peer, [(pattern(1, 1 << 20), "kv", 0)], timeout_s=0.5),
            lambda: me.read(
                peer, [("kv", 0, torch.empty(1 << 20, dtype=torch.uint8))], timeout_s=0.5
            ),
            lambda: me.notify(peer, b"anyone?", timeout_s=0.5),
        ):
            peer = me.connect(child.descriptor)
            start = time.monotonic()
            with pytest.raises(PeerTimeout, match="may have died"):
                call()
            assert time.monotonic() - start < 0.5 + SLACK_S
        child.kill()


@pytest.mark.parametrize("what", ["write", "read"])
def test_peer_killed_mid_transfer_leaves_the_survivor_serving(
    make, backend, spawn_peer, pattern, what
):
    nbytes = 64 << 20
    with make() as me:
        region = torch.zeros(nbytes, dtype=torch.uint8)
        me.register("kv", region)
        child = spawn_peer({}, backend)
        assert child.call(op="connect", descriptor=me.descriptor()) == "ok"
        assert child.call(op=f"{what}_forever", region="kv", nbytes=nbytes) in (
            "writing",
            "reading",
        )
        time.sleep(0.3)
        child.kill()
        start = time.monotonic()
        with pytest.raises(PeerTimeout):
            me.recv_notification(timeout_s=1.0)
        assert time.monotonic() - start < 1.0 + SLACK_S
        with make() as other:
            peer = other.connect(me.descriptor())
            other.write(peer, [(pattern(3, nbytes), "kv", 0)], timeout_s=10)
            other.notify(peer, b"after", timeout_s=5)
        assert me.recv_notification(timeout_s=5).message == b"after"
        assert torch.equal(region, pattern(3, nbytes))


def test_unreachable_peer_times_out(make):
    with make() as gone:
        descriptor = gone.descriptor()
    with make() as me:
        peer = me.connect(descriptor)
        start = time.monotonic()
        with pytest.raises(PeerTimeout):
            me.notify(peer, b"anyone?", timeout_s=0.3)
        assert time.monotonic() - start < 0.3 + SLACK_S


def test_bad_writes_are_rejected_and_change_nothing(pair, pattern):
    sender, receiver = pair
    region = pattern(5, 4096)
    original = region.clone()
    receiver.register("kv", region)
    receiver.register("gone", torch.zeros(16, dtype=torch.uint8))
    descriptor = receiver.descriptor()
    peer = sender.connect(descriptor)
    data = torch.zeros(100, dtype=torch.uint8)

    with pytest.raises(TransferError, match="unknown region 'nope'"):
        sender.write(peer, [(data, "nope", 0)])
    with pytest.raises(TransferError, match="out of bounds"):
        sender.write(peer, [(data, "kv", 4000)])
    with pytest.raises(TransferError, match="bad range"):
        sender.write(peer, [(data, "kv", -1)])
    with pytest.raises(TransferError, match="contiguous"):
        sender.write(peer, [(torch.zeros(10, 10, dtype=torch.uint8)[:, 0], "kv", 0)])

    # The receiver checks again: a stale or forged descriptor cannot write past its regions.
    receiver.deregister("gone")
    sender.connect({**descriptor, "regions": {"kv": 1 << 30, "gone": 16}})
    with pytest.raises(RemoteError, match="out of bounds"):
        sender.write(peer, [(data, "kv", 0), (data, "kv", 4090)], timeout_s=5)
    with pytest.raises(RemoteError, match="unknown region 'gone'"):
        sender.write(peer, [(data, "kv", 0), (data[:16], "gone", 0)], timeout_s=5)
    with pytest.raises(RemoteError, match="out of bounds"):
        sender.read(peer, [("kv", 4090, data)], timeout_s=5)
    assert torch.equal(region, original)

    sender.write(peer, [(data, "kv", 0)], timeout_s=5)  # the connection is still good
    assert not region[:100].any() and torch.equal(region[100:], original[100:])


def test_registration_errors_name_the_fix(make):
    with make() as t:
        with pytest.raises(TransferError, match="1-D uint8"):
            t.register("kv", torch.zeros(4, dtype=torch.float32))
        t.register("kv", torch.zeros(4, dtype=torch.uint8))
        with pytest.raises(TransferError, match="already registered"):
            t.register("kv", torch.zeros(4, dtype=torch.uint8))
        with pytest.raises(TransferError, match="not registered"):
            t.deregister("nope")
        with pytest.raises(TransferError, match="same transport backend"):
            t.connect({"backend": "carrier-pigeon", "address": "x", "regions": {}})


def test_close_is_idempotent_and_later_calls_say_so(make):
    t = make()
    peer = t.connect(t.descriptor())
    t.close()
    t.close()
    with pytest.raises(TransferError, match="closed"):
        t.notify(peer, b"x")
    with make() as again:  # a new endpoint works after the old one closed
        region = torch.zeros(8, dtype=torch.uint8)
        again.register("kv", region)
        again.write(
            again.connect(again.descriptor()),
            [(torch.ones(8, dtype=torch.uint8), "kv", 0)],
            timeout_s=5,
        )
        assert region.all()
