"""The UCX transport over real loopback connections and processes: the shared transport contract
(``contract.py``) plus what is particular to UCX (its settings, its service thread)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from kvtier.transfer import ucx_transport
from kvtier.transfer.base import PeerTimeout, TransferError
from kvtier.transfer.ucx_transport import UcxTransport

_spec = importlib.util.spec_from_file_location(
    "kvtier_transport_contract", Path(__file__).with_name("contract.py")
)
_contract = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_contract)
globals().update({k: v for k, v in vars(_contract).items() if k.startswith("test_")})


@pytest.fixture
def backend() -> str:
    return "ucx"


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_close_releases_the_thread_endpoints_and_descriptors(pattern):
    def round_trip() -> None:
        with UcxTransport() as a, UcxTransport() as b:
            region = torch.zeros(1 << 20, dtype=torch.uint8)
            b.register("kv", region)
            peer = a.connect(b.descriptor())
            a.write(peer, [(pattern(0, 1 << 20), "kv", 0)], timeout_s=10)
            a.notify(peer, b"x", timeout_s=10)
            assert torch.equal(region, pattern(0, 1 << 20))

    round_trip()  # UCX opens some process-wide descriptors once
    before = _fds()
    for _ in range(3):
        round_trip()
        assert not [t for t in threading.enumerate() if t.name.startswith("kvtier-ucx")]
    assert _fds() == before


def test_a_dead_peer_is_detected_long_before_a_long_deadline(spawn_peer, pattern):
    child = spawn_peer({"kv": 1 << 20}, "ucx")
    with UcxTransport() as me:
        peer = me.connect(child.descriptor)
        me.write(peer, [(pattern(0, 1 << 20), "kv", 0)], timeout_s=10)
        child.kill()
        start = time.monotonic()
        with pytest.raises(PeerTimeout, match="UCX connection .* failed"):
            me.write(peer, [(pattern(1, 1 << 20), "kv", 0)], timeout_s=60)
        assert time.monotonic() - start < 5


def test_concurrent_callers_share_one_endpoint(pair, pattern):
    sender, receiver = pair
    slot, rounds, workers = 256 << 10, 8, 4
    region = torch.zeros(workers * rounds * slot, dtype=torch.uint8)
    receiver.register("kv", region)
    peer = sender.connect(receiver.descriptor())
    errors: list[BaseException] = []

    def work(w: int) -> None:
        try:
            for r in range(rounds):
                i = w * rounds + r
                sender.write(peer, [(pattern(i, slot), "kv", i * slot)], timeout_s=20)
                back = torch.empty(slot, dtype=torch.uint8)
                sender.read(peer, [("kv", i * slot, back)], timeout_s=20)
                assert torch.equal(back, pattern(i, slot))
                sender.notify(peer, str(i).encode(), timeout_s=20)
        except BaseException as e:  # surfaced below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    got = sorted(
        int(receiver.recv_notification(timeout_s=5).message) for _ in range(workers * rounds)
    )
    assert got == list(range(workers * rounds))
    assert torch.equal(region, torch.cat([pattern(i, slot) for i in range(workers * rounds)]))


def test_listen_errors_name_the_fix():
    with pytest.raises(TransferError, match="cannot resolve host"):
        UcxTransport(host="no-such-host.invalid")
    with UcxTransport() as first:
        port = int(first.address.rpartition(":")[2])
        with pytest.raises(TransferError, match="could not listen"):
            UcxTransport(port=port)


def test_a_process_that_never_closes_its_transports_exits_cleanly():
    script = (
        "import torch\n"
        "from kvtier.transfer.ucx_transport import UcxTransport\n"
        "a, b = UcxTransport(), UcxTransport()\n"
        "b.register('kv', torch.zeros(1 << 20, dtype=torch.uint8))\n"
        "a.write(a.connect(b.descriptor()), [(torch.ones(1 << 20, dtype=torch.uint8), 'kv', 0)], timeout_s=10)\n"
    )
    for _ in range(3):  # without the exit hook UCX aborted in about half of these exits
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr[-2000:]


def test_transports_without_tcp_say_what_to_change(monkeypatch):
    monkeypatch.setenv("UCX_TLS", "sm,self")  # read by each new UCX context
    with UcxTransport() as a, UcxTransport() as b:
        b.register("kv", torch.zeros(16, dtype=torch.uint8))
        peer = a.connect(b.descriptor())
        with pytest.raises(PeerTimeout, match="keep tcp in UCX_TLS"):
            a.write(peer, [(torch.ones(16, dtype=torch.uint8), "kv", 0)], timeout_s=5)


def test_ranges_cut_into_iovec_runs_land_bit_exact(pair, pattern):
    # Runs end at GROUP_BYTES and at GROUP_RANGES ranges; empty ranges are in no run.
    sender, receiver = pair
    g = ucx_transport.GROUP_BYTES
    sizes = [g - 1, 2, g + 5, 0, 1] + [17] * (ucx_transport.GROUP_RANGES + 3) + [g // 2] * 3
    offsets = [sum(sizes[:i]) + 3 * i for i in range(len(sizes))]
    region = torch.zeros(offsets[-1] + sizes[-1], dtype=torch.uint8)
    receiver.register("kv", region)
    peer = sender.connect(receiver.descriptor())
    data = [pattern(i, n) for i, n in enumerate(sizes)]
    sender.write(peer, [(d, "kv", o) for d, o in zip(data, offsets)], timeout_s=20)
    expected = torch.zeros_like(region)
    for d, o in zip(data, offsets):
        expected[o : o + d.numel()] = d
    assert torch.equal(region, expected)
    back = [torch.empty(n, dtype=torch.uint8) for n in sizes]
    sender.read(peer, [("kv", o, b) for b, o in zip(back, offsets)], timeout_s=20)
    assert all(torch.equal(b, d) for b, d in zip(back, data))
