"""The CUDA IPC transport with real processes: GPU regions by CUDA IPC, host regions over ZMQ.

The CPU tests (backend choice, host identity, the composed ZMQ path, dead peers) run anywhere;
the GPU tests run on a CUDA host, across GPUs where two are visible, and check every byte.
"""

from __future__ import annotations

import copy
import gc
import json
import time

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from kvtier.transfer.backends import open_transport
from kvtier.transfer.base import PeerTimeout, RemoteError, TransferError
from kvtier.transfer.cuda_ipc import CudaIpcTransport, host_identity
from kvtier.transfer.zmq_transport import ZmqTransport

CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if CUDA else 0
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
MiB = 1 << 20
SIZES = [1, 3, 4096, 65537, MiB + 17, 16 * MiB, 256 * MiB]


def fake_cuda_region(descriptor: dict, name: str = "gpu", **host: str) -> dict:
    """A descriptor that also claims a CUDA region, optionally from another host."""
    forged = copy.deepcopy(descriptor)
    forged["regions"][name] = 4096
    forged["cuda_regions"] = {
        name: {
            "size": 4096, "offset": 0, "slot": 0, "gen": 1,
            "storage": {"handle": "", "offset": 0, "size": 4096, "device": 0, "device_uuid": "x"},
        }
    }
    forged["host"] = {**forged["host"], **host}
    return forged


def layout(sizes: list[int], gen: torch.Generator) -> tuple[list[int], int]:
    """Disjoint offsets for ``sizes`` in shuffled order with random gaps; and the bytes spanned."""
    offsets, end = [0] * len(sizes), 0
    for i in torch.randperm(len(sizes), generator=gen).tolist():
        end += int(torch.randint(0, 4096, (1,), generator=gen))
        offsets[i], end = end, end + sizes[i]
    return offsets, end


# -- anywhere ----------------------------------------------------------------------------------


def test_open_transport_picks_a_kind_and_names_the_choices():
    with open_transport("zmq") as t:
        assert isinstance(t, ZmqTransport) and not t.device_regions
    with open_transport() as t:
        assert isinstance(t, CudaIpcTransport if CUDA else ZmqTransport)
    with pytest.raises(TransferError, match=r"unknown transport kind 'nope'; choose one of \['auto', 'zmq', 'cuda_ipc'"):
        open_transport("nope")
    if CUDA:
        with open_transport("cuda_ipc") as t:
            assert isinstance(t, CudaIpcTransport) and t.device_regions
    else:
        with pytest.raises(TransferError, match="needs a GPU.*use kind 'zmq'"):
            open_transport("cuda_ipc")


def test_host_regions_use_the_composed_zmq_path(pattern):
    with CudaIpcTransport() as sender, CudaIpcTransport() as receiver:
        region = torch.zeros(2 * MiB, dtype=torch.uint8)
        receiver.register("kv", region)
        descriptor = receiver.descriptor()
        assert descriptor["backend"] == "cuda_ipc" and descriptor["regions"] == {"kv": 2 * MiB}
        assert descriptor["cuda_regions"] == {} and descriptor["host"] == host_identity()
        peer = sender.connect(json.loads(json.dumps(descriptor)))
        gen = torch.Generator().manual_seed(1)
        sizes = [1, 4096, MiB + 17]
        offsets, _ = layout(sizes, gen)
        payloads = [pattern(n, n) for n in sizes]
        sender.write(peer, [(d, "kv", o) for d, o in zip(payloads, offsets)], timeout_s=10)
        expected = torch.zeros_like(region)
        for d, o in zip(payloads, offsets):
            expected[o : o + d.numel()] = d
        assert torch.equal(region, expected)
        backs = [torch.empty_like(d) for d in payloads]
        sender.read(peer, [("kv", o, b) for o, b in zip(offsets, backs)], timeout_s=10)
        assert all(torch.equal(b, d) for b, d in zip(backs, payloads))
        sender.notify(peer, b"done", timeout_s=5)
        assert receiver.recv_notification(timeout_s=5).message == b"done"

        # refused before anything moves: locally, and by the receiver for a forged descriptor
        with pytest.raises(TransferError, match="out of bounds"):
            sender.write(peer, [(payloads[0], "kv", 0), (payloads[2], "kv", 2 * MiB - 5)])
        sender.connect({**descriptor, "regions": {"kv": 1 << 30}})
        with pytest.raises(RemoteError, match="out of bounds"):
            sender.write(peer, [(payloads[0], "kv", 0), (payloads[2], "kv", 2 * MiB - 5)], timeout_s=5)
        assert torch.equal(region, expected)


def test_host_regions_across_processes_and_with_plain_zmq_peers(spawn_ipc, spawn_peer, pattern, digest):
    child = spawn_ipc({"a": (3 * MiB, "cpu"), "b": (4096, "cpu")})
    zmq_child = spawn_peer({"z": MiB})
    with CudaIpcTransport() as me:
        peer = me.connect(child.descriptor)
        a, b = pattern(10, 3 * MiB), pattern(11, 4096)
        me.write(peer, [(a, "a", 0), (b, "b", 0)], timeout_s=10)
        assert child.call(op="digests") == {"a": digest(a), "b": digest(b)}
        back = torch.empty_like(a)
        me.read(peer, [("a", 0, back)], timeout_s=10)
        assert torch.equal(back, a)
        z = pattern(12, MiB)
        zpeer = me.connect(zmq_child.descriptor)  # a plain ZmqTransport speaks the same protocol
        me.write(zpeer, [(z, "z", 0)], timeout_s=10)
        assert zmq_child.call(op="digests") == {"z": digest(z)}
    assert child.call(op="close") == "closed"


def test_a_descriptor_from_another_host_is_refused_with_the_reason():
    with CudaIpcTransport() as me, CudaIpcTransport() as other:
        descriptor = other.descriptor()
        for host in ({"hostname": "elsewhere"}, {"boot_id": "another-boot"}):
            with pytest.raises(TransferError, match="CUDA IPC works only within one host.*zmq"):
                me.connect(fake_cuda_region(descriptor, **host))
        with pytest.raises(TransferError, match="same transport backend"):
            me.connect({"backend": "ucx", "address": "x", "regions": {}})


@pytest.mark.skipif(CUDA, reason="checks the message of a process without CUDA")
def test_cuda_regions_need_cuda_in_the_connecting_process():
    with CudaIpcTransport() as me, CudaIpcTransport() as other:
        forged = fake_cuda_region(other.descriptor())
        forged["instance"] = "not-in-this-process"
        with pytest.raises(TransferError, match=r"exports CUDA regions \['gpu'\] but this process has no CUDA"):
            me.connect(forged)


def test_killed_peer_fails_notify_within_the_deadline(spawn_ipc):
    child = spawn_ipc({"kv": (4096, "cpu")})
    with CudaIpcTransport() as me:
        peer = me.connect(child.descriptor)
        me.notify(peer, b"hello", timeout_s=5)
        child.kill()
        start = time.monotonic()
        with pytest.raises(PeerTimeout):
            me.notify(peer, b"anyone?", timeout_s=1.0)
        assert time.monotonic() - start < 1.5
        with pytest.raises(TransferError, match="not connected"):
            me.write(peer, [(torch.zeros(1, dtype=torch.uint8), "kv", 0)])


def test_a_strided_source_is_refused_and_close_is_final():
    # The registration errors themselves are in the shared contract (test_cuda_ipc_contract.py).
    t = CudaIpcTransport()
    t.register("kv", torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(TransferError, match="contiguous"):
        t.write(t.connect(t.descriptor()), [(torch.zeros(4, 4, dtype=torch.uint8)[:, 0], "kv", 0)])
    t.deregister("kv")
    with pytest.raises(TransferError, match="not registered"):
        t.deregister("kv")
    t.close()
    t.close()
    with pytest.raises(TransferError, match="closed"):
        t.register("kv", torch.zeros(4, dtype=torch.uint8))


# -- on a GPU ----------------------------------------------------------------------------------

PLACEMENTS = [("cuda:0", "cuda:0"), ("cuda:1", "cuda:0"), ("cuda:0", "cuda:1")]


@needs_cuda
@pytest.mark.parametrize("region_device,source_device", PLACEMENTS)
def test_gpu_writes_and_reads_of_every_size_are_bit_exact(spawn_ipc, pattern, digest, region_device, source_device):
    if max(int(d[-1]) for d in (region_device, source_device)) >= GPUS:
        pytest.skip(f"needs {region_device} and {source_device}; {GPUS} GPU(s) visible")
    gen = torch.Generator().manual_seed(7)
    offsets, span = layout(SIZES, gen)
    child = spawn_ipc({"kv": (span + 4096, region_device)})
    payloads = [pattern(i, n) for i, n in enumerate(SIZES)]
    expected = torch.zeros(span + 4096, dtype=torch.uint8)
    ops = []
    for i, (data, offset) in enumerate(zip(payloads, offsets)):
        expected[offset : offset + data.numel()] = data
        # every third source stays in host memory; even sizes travel as bfloat16
        src = data if i % 3 == 2 else data.to(source_device)
        ops.append((src.view(torch.bfloat16) if src.numel() % 2 == 0 else src, "kv", offset))
    with CudaIpcTransport() as me:
        peer = me.connect(child.descriptor)
        assert set(me._peers[peer].mapped) == {"kv"}
        me.write(peer, ops, timeout_s=30)
        ranges = [["kv", o, d.numel()] for d, o in zip(payloads, offsets)]
        assert child.call(op="digests", ranges=ranges) == [digest(d) for d in payloads]
        assert child.call(op="digests") == {"kv": digest(expected)}  # and nothing around them

        dests = [
            torch.empty(d.numel(), dtype=torch.uint8, device="cpu" if i % 3 == 1 else source_device)
            for i, d in enumerate(payloads)
        ]
        me.read(peer, [("kv", o, dst) for o, dst in zip(offsets, dests)], timeout_s=30)
        for data, dst in zip(payloads, dests):
            assert torch.equal(dst.cpu(), data), data.numel()


@needs_cuda
def test_gpu_write_waits_for_work_queued_on_the_callers_stream(pattern):
    # The source is filled behind a ~50 ms sleep kernel; a copy that did not wait would read zeros.
    data = pattern(3, 64 * MiB).cuda()
    with CudaIpcTransport() as sender, CudaIpcTransport() as receiver:
        region = torch.zeros(64 * MiB, dtype=torch.uint8, device="cuda")
        receiver.register("kv", region)
        peer = sender.connect(receiver.descriptor())  # same process: no IPC mapping needed
        for stream in (torch.cuda.current_stream(), torch.cuda.Stream()):
            with torch.cuda.stream(stream):
                src = torch.zeros_like(data)
                torch.cuda._sleep(100_000_000)
                src.copy_(data)
                sender.write(peer, [(src, "kv", 0)], timeout_s=10)
            assert torch.equal(region, data)
            region.zero_()
            torch.cuda.synchronize()


class _CudaMemory:
    """A raw device address as ``__cuda_array_interface__``, the way kvtier's PD wraps SGLang's pool."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}


@needs_cuda
def test_gpu_regions_wrapped_around_a_pointer_export_from_an_allocation_start_only(pattern):
    pool = torch.zeros(4 * MiB, dtype=torch.uint8, device="cuda")
    whole = torch.as_tensor(_CudaMemory(pool.data_ptr(), pool.numel()), device="cuda")
    inner = torch.as_tensor(_CudaMemory(pool.data_ptr() + MiB, MiB), device="cuda")
    with CudaIpcTransport() as sender, CudaIpcTransport() as receiver:
        receiver.register("pool", whole)
        with pytest.raises(TransferError, match="cannot export region 'inner'.*caching allocator"):
            receiver.register("inner", inner)
        peer = sender.connect(receiver.descriptor())
        data = pattern(9, MiB).cuda()
        sender.write(peer, [(data, "pool", MiB)], timeout_s=10)
        assert torch.equal(pool[MiB : 2 * MiB], data) and not pool[:MiB].any()


@needs_cuda
def test_gpu_notification_arrives_only_after_the_data_it_follows(spawn_ipc, pattern, digest):
    nbytes, rounds = 4 * MiB + 1, 10
    with CudaIpcTransport() as me:
        region = torch.zeros(rounds * nbytes, dtype=torch.uint8, device="cuda")
        me.register("kv", region)
        child = spawn_ipc({})
        assert child.call(op="connect", descriptor=me.descriptor()) == "ok"
        child.send(op="write_then_notify", region="kv", nbytes=nbytes, rounds=rounds, device="cuda:0")
        for seed in range(rounds):
            note = me.recv_notification(timeout_s=30)
            assert note.message == str(seed).encode()
            slot = region[seed * nbytes : (seed + 1) * nbytes].cpu()
            assert torch.equal(slot, pattern(seed, nbytes)), f"round {seed}: notified before data"
        assert child.reply() == "ok"

        # and the other direction: the child hashes each slot the moment its notification lands
        child2 = spawn_ipc({"kv": (rounds * nbytes, f"cuda:{GPUS - 1}")})
        peer = me.connect(child2.descriptor)
        child2.send(op="await_notifications", count=rounds, timeout_s=30)
        for seed in range(rounds):
            me.write(peer, [(pattern(seed, nbytes).cuda(), "kv", seed * nbytes)], timeout_s=30)
            me.notify(peer, json.dumps(["kv", seed * nbytes, nbytes]).encode(), timeout_s=30)
        assert child2.reply() == [digest(pattern(s, nbytes)) for s in range(rounds)]


@needs_cuda
def test_gpu_bad_writes_are_refused_and_change_nothing(spawn_ipc, digest):
    child = spawn_ipc({"kv": (MiB, "cuda:0"), "other": (4096, "cuda:0")})
    assert child.call(op="fill", name="kv", seed=5) == "ok"
    before = child.call(op="digests")
    data = torch.ones(100, dtype=torch.uint8, device="cuda")
    with CudaIpcTransport() as me:
        peer = me.connect(child.descriptor)
        with pytest.raises(TransferError, match="out of bounds"):
            me.write(peer, [(data, "kv", 0), (data, "kv", MiB - 99)])
        with pytest.raises(TransferError, match="unknown region 'nope'"):
            me.write(peer, [(data, "kv", 0), (data, "nope", 0)])
        with pytest.raises(TransferError, match="bad range"):
            me.write(peer, [(data, "kv", -1)])
        with pytest.raises(TransferError, match="out of bounds"):
            me.read(peer, [("other", 4000, data)])
        assert child.call(op="digests") == before

        # a region deregistered after the descriptor was taken: refused, not written
        assert child.call(op="deregister", name="kv") == "ok"
        with pytest.raises(RemoteError, match="'kv' was deregistered"):
            me.write(peer, [(data, "other", 0), (data, "kv", 0)])
        assert child.call(op="digests") == before
        me.connect(child.call(op="descriptor"))
        with pytest.raises(TransferError, match="unknown region 'kv'"):
            me.write(peer, [(data, "kv", 0)])
        me.write(peer, [(data, "other", 0)], timeout_s=10)  # the rest still works
        expected = torch.zeros(4096, dtype=torch.uint8)
        expected[:100] = 1
        assert child.call(op="digests", ranges=[["other", 0, 4096]]) == [digest(expected)]


@needs_cuda
def test_gpu_exporter_killed_fails_fast_and_unmaps(spawn_ipc, pattern):
    child = spawn_ipc({"kv": (64 * MiB, "cuda:0")})
    data = pattern(0, 64 * MiB).cuda()
    with CudaIpcTransport() as me:
        peer = me.connect(child.descriptor)
        me.write(peer, [(data, "kv", 0)], timeout_s=10)
        refs = [StorageWeakRef(m.tensor.untyped_storage()) for m in me._peers[peer].mapped.values()]
        child.kill()
        start = time.monotonic()
        with pytest.raises(PeerTimeout):
            me.notify(peer, b"anyone?", timeout_s=1.0)
        assert time.monotonic() - start < 1.5
        gc.collect()
        assert all(r.expired() for r in refs), "the dead peer's memory is still mapped"
        with pytest.raises(TransferError, match="not connected"):
            me.write(peer, [(data, "kv", 0)])
        with pytest.raises(TransferError, match="closed or died"):
            me.connect(child.descriptor)


@needs_cuda
def test_gpu_writer_killed_fails_the_waiting_receiver_in_time(spawn_ipc, pattern):
    nbytes = 64 * MiB
    with CudaIpcTransport() as me:
        region = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
        me.register("kv", region)
        child = spawn_ipc({})
        assert child.call(op="connect", descriptor=me.descriptor()) == "ok"
        assert child.call(op="write_forever", region="kv", nbytes=nbytes, device="cuda:0") == "writing"
        time.sleep(0.3)
        child.kill()
        start = time.monotonic()
        with pytest.raises(PeerTimeout):
            me.recv_notification(timeout_s=1.0)
        assert time.monotonic() - start < 1.5
        assert torch.equal(region.cpu(), pattern(1, nbytes))
        # the survivor still serves other peers
        with CudaIpcTransport() as other:
            peer = other.connect(me.descriptor())
            other.write(peer, [(pattern(3, nbytes).cuda(), "kv", 0)], timeout_s=10)
            other.notify(peer, b"after", timeout_s=5)
        assert me.recv_notification(timeout_s=5).message == b"after"
        assert torch.equal(region.cpu(), pattern(3, nbytes))


@needs_cuda
def test_close_releases_every_mapping_and_the_exporter_gets_its_memory_back(spawn_ipc, pattern):
    nbytes = 256 * MiB
    child = spawn_ipc({"kv": (nbytes, "cuda:0"), "small": (4096, "cuda:0")})
    me = CudaIpcTransport()
    peer = me.connect(child.descriptor)
    me.write(peer, [(pattern(4, nbytes).cuda(), "kv", 0)], timeout_s=30)
    refs = [StorageWeakRef(m.tensor.untyped_storage()) for m in me._peers[peer].mapped.values()]
    free_mapped = torch.cuda.mem_get_info(0)[0]
    me.close()
    gc.collect()
    assert all(r.expired() for r in refs), "close() left a peer mapping alive"

    assert child.call(op="deregister", name="kv", free=True) == "ok"
    assert child.call(op="deregister", name="small", free=True) == "ok"
    mem = child.call(op="memory")
    # torch keeps a shared block out of its allocator while the export holds it; ours is given back
    assert mem["now"] == mem["baseline"], mem
    assert torch.cuda.mem_get_info(0)[0] - free_mapped >= nbytes - 16 * MiB
    assert child.call(op="close") == "closed"


def test_peer_regions_are_only_a_peers_cuda_regions():
    with CudaIpcTransport() as sender, CudaIpcTransport() as receiver:
        receiver.register("kv", torch.zeros(4096, dtype=torch.uint8))
        peer = sender.connect(receiver.descriptor())
        assert sender.peer_regions(peer, []) == []
        with pytest.raises(TransferError, match=r"has no CUDA regions \['kv'\].*register them on a GPU"):
            sender.peer_regions(peer, ["kv"])
        with pytest.raises(TransferError, match="not connected to 'nobody'"):
            sender.peer_regions("nobody", [])


@needs_cuda
@pytest.mark.parametrize("pool_device", ["cuda:0", "cuda:1"])
def test_gpu_direct_rows_into_another_process_pool_are_bit_exact(spawn_ipc, digest, pool_device):
    # PD's direct path: pool rows on cuda:0 stored by one kernel into a pool that another process
    # allocated (on cuda:1 over NVLink), mapped here by CUDA IPC.
    from kvtier.kernels.kv_pages import copy_kv_rows
    from kvtier.transfer.cuda_ipc import descriptor_devices

    if int(pool_device[-1]) >= GPUS:
        pytest.skip(f"needs {pool_device}; {GPUS} GPU(s) visible")
    layers, rows, row_bytes, n = 4, 5000, 2048, 3000
    names = [f"kv{i}" for i in range(2 * layers)]
    child = spawn_ipc({name: (rows * row_bytes, pool_device) for name in names})
    gen = torch.Generator().manual_seed(11)
    src = [torch.randint(0, 256, (rows, row_bytes), dtype=torch.uint8, generator=gen).to("cuda:0") for _ in names]
    src_rows = torch.randperm(rows, generator=gen)[:n]
    dst_rows = torch.randperm(rows, generator=gen)[:n]
    with CudaIpcTransport() as me:
        assert descriptor_devices(child.descriptor, names) == [int(pool_device[-1])]
        # Opened where the kernel runs, as PD's prefill does; connect enables peer access itself (the
        # prefill's own enable_peer_access beforehand is left out so that this one is what is tested).
        peer = me.connect(child.descriptor, map_device=0)
        dst = [t.view(rows, row_bytes) for t in me.peer_regions(peer, names)]
        assert {t.device for t in dst} == {torch.device("cuda:0")}
        with torch.cuda.device(0):
            copy_kv_rows(src[:layers], src[layers:], dst[:layers], dst[layers:], src_rows, dst_rows)
        torch.cuda.synchronize(0)
        expected = {}
        for name, s in zip(names, src):
            e = torch.zeros(rows, row_bytes, dtype=torch.uint8)
            e[dst_rows] = s.cpu()[src_rows]
            expected[name] = digest(e)
        assert child.call(op="digests") == expected

        assert child.call(op="deregister", name="kv3") == "ok"
        with pytest.raises(RemoteError, match="region 'kv3' was deregistered"):
            me.peer_regions(peer, names)
        child.kill()
        with pytest.raises(PeerTimeout, match="may have died"):
            me.peer_regions(peer, names[:1])


def test_descriptor_devices_name_what_is_missing_or_invisible():
    from kvtier.transfer.cuda_ipc import descriptor_devices

    with CudaIpcTransport() as receiver:
        forged = fake_cuda_region(receiver.descriptor(), "kv0")  # on a GPU whose UUID no GPU here has
        with pytest.raises(TransferError, match=r"has no CUDA regions \['kv1'\]"):
            descriptor_devices(forged, ["kv0", "kv1"])
        with pytest.raises(TransferError, match="region 'kv0' .* lives on GPU x, which this process cannot see"):
            descriptor_devices(forged, ["kv0"])
        assert descriptor_devices(forged, []) == []
