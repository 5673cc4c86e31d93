"""The CUDA IPC transport: one-sided GPU-to-GPU copies between processes of one host.

A receiver exports each CUDA region once through PyTorch's own IPC machinery
(``UntypedStorage._share_cuda_``); its ``descriptor()`` carries the handle (base64), where the
region lies in the shared allocation, the GPU's UUID and the host's identity (hostname and boot
id). A peer on the same host maps the allocation once at ``connect`` (``_new_shared_cuda``) and
then writes and reads on a dedicated stream per GPU, synchronizing once per batch before
returning, so a later notification never overtakes the data: copies within one GPU with torch's
``copy_``, copies between GPUs (NVLink or PCIe peer-to-peer) with ``cudaMemcpyAsync`` on the
destination GPU's stream with peer access enabled, because torch's cross-device ``copy_`` into
IPC-mapped memory costs ~280 us per call (34 GB/s for 10 MB pieces on H200 NVLink, against 317 GB/s
this way; without peer access the driver stages through host memory, 36 GB/s).
``peer_regions`` hands a peer's mapped regions to kernels that store into them directly; such a
peer is connected with ``map_device``, so its handles are opened in the kernel's GPU context (a
kernel storing into a mapping opened on the owner's GPU faults). Host regions, notifications and
their deadlines go through a composed ``ZmqTransport`` on the same address, so this transport can
also connect to plain ZMQ peers. Each exporter keeps a small state file in ``/dev/shm``: one generation number
per CUDA region (zero once deregistered), so a peer holding a stale descriptor is refused
instead of writing into memory that may be reused, and a shared ``flock`` held for the
exporter's lifetime, so a peer learns at once that the exporter died.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import fcntl
import functools
import mmap
import os
import socket
import struct
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from kvtier.transfer.base import (
    Descriptor,
    Notification,
    PeerTimeout,
    ReadOp,
    RemoteError,
    TransferError,
    Transport,
    WriteOp,
    check_open,
    check_range,
    check_region,
    find_peer,
)
from kvtier.transfer.zmq_transport import ZmqTransport

STATE_SLOTS = 4096
"""CUDA regions one transport can have registered at a time (8 bytes of state file each)."""

_GEN = struct.Struct("<q")
_NO_REFCOUNT = b"/kvtier-cuda-ipc-no-refcount"  # the exporter owns the lifetime, see _Export
_NO_EVENT = bytes(64)  # sizeof(cudaIpcEventHandle_t); unused with event_sync_required=False

_MEMCPY_DEVICE_TO_DEVICE = 3  # cudaMemcpyDeviceToDevice
_PEER_ACCESS_ALREADY_ENABLED = 704  # cudaErrorPeerAccessAlreadyEnabled

_LOCAL: "weakref.WeakValueDictionary[str, CudaIpcTransport]" = weakref.WeakValueDictionary()
"""Transports of this process by instance id: CUDA cannot open its own process's IPC handles."""


def host_identity() -> dict[str, str]:
    """What two processes compare to know they share a host: hostname and kernel boot id."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = ""
    return {"hostname": socket.gethostname(), "boot_id": boot_id}


def _flat(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor on any device, sharing its memory."""
    if not tensor.is_contiguous():
        raise TransferError(f"{what} must be contiguous; pass tensor.contiguous()")
    if tensor.device.type not in ("cpu", "cuda"):
        raise TransferError(f"{what} is on {tensor.device}; use a CUDA or host tensor")
    return tensor.reshape(-1).view(torch.uint8)


@functools.lru_cache(maxsize=1)
def cuda_runtime() -> ctypes.CDLL:
    """The CUDA runtime that torch has loaded (found again by its soname)."""
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                        ctypes.c_void_p]
        lib.cudaDeviceEnablePeerAccess.argtypes = [ctypes.c_int, ctypes.c_uint]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        return lib
    raise TransferError("cannot load the CUDA runtime (libcudart.so.13, .12 or libcudart.so) that torch uses; "
                        "put its directory on LD_LIBRARY_PATH")


def _cuda_error(lib: ctypes.CDLL, err: int) -> str:
    lib.cudaGetLastError()  # the runtime keeps the error as "last"; torch's next check would raise it
    return f"{lib.cudaGetErrorString(err).decode()} (CUDA error {err})"


def enable_peer_access(device: int, peer: int) -> None:
    """Let kernels on GPU ``device`` load and store memory of GPU ``peer`` (already enabled is fine);
    ``TransferError`` if the two GPUs cannot reach each other."""
    if device == peer:
        return
    if not torch.cuda.can_device_access_peer(device, peer):
        raise TransferError(f"GPU {device} cannot access GPU {peer} directly (no NVLink or PCIe peer-to-peer "
                            "between them)")
    lib = cuda_runtime()
    with torch.cuda.device(device):
        err = lib.cudaDeviceEnablePeerAccess(peer, 0)
    if err == _PEER_ACCESS_ALREADY_ENABLED:
        lib.cudaGetLastError()
    elif err:
        raise TransferError(f"cannot enable peer access from GPU {device} to GPU {peer}: {_cuda_error(lib, err)}")


def open_handle(device: int, handle: bytes, size: int, offset: int) -> torch.UntypedStorage:
    """The allocation behind a CUDA IPC ``handle`` (as ``UntypedStorage._share_cuda_`` gives it),
    opened in GPU ``device``'s context; its exporter owns the lifetime (no reference counting)."""
    return torch.UntypedStorage._new_shared_cuda(device, handle, size, offset, _NO_REFCOUNT, 0, _NO_EVENT, False)


def descriptor_devices(descriptor: Descriptor, names: Sequence[str]) -> list[int]:
    """This process's indices of the GPUs that hold the CUDA regions ``names`` of a peer's
    descriptor (to enable peer access to them before mapping them at ``connect``)."""
    cuda = descriptor.get("cuda_regions") or {}
    missing = [name for name in names if name not in cuda]
    if missing:
        raise TransferError(f"{descriptor.get('address')} has no CUDA regions {missing}; the peer must register "
                            "them on a GPU before publishing its descriptor")
    return sorted({_visible_device(cuda[name]["storage"]["device_uuid"], name, descriptor.get("address"))
                   for name in names})


def _visible_device(device_uuid: str, name: str, address: Optional[str]) -> int:
    """This process's index of the GPU ``device_uuid`` that holds region ``name`` of ``address``."""
    device = _visible_gpus().get(device_uuid)
    if device is None:
        raise TransferError(f"region {name!r} of {address} lives on GPU {device_uuid}, which this process cannot "
                            "see; make it visible here (CUDA_VISIBLE_DEVICES)")
    return device


@functools.lru_cache(maxsize=1)
def _visible_gpus() -> dict[str, int]:
    """This process's GPU indices by UUID (fixed for its lifetime)."""
    return {_gpu_uuid(i): i for i in range(torch.cuda.device_count())}


def _gpu_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _state_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class _StateFile:
    """The exporter's side: generations by slot, and the lock that says this process lives."""

    def __init__(self) -> None:
        self.path = os.path.join(_state_dir(), f"kvtier-ipc-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, STATE_SLOTS * _GEN.size)
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._map = mmap.mmap(fd, STATE_SLOTS * _GEN.size)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        self._fd = fd
        self._free = list(range(STATE_SLOTS - 1, -1, -1))
        self._next_gen = 1
        # also at exit without close(), but never from a forked child
        self._unlink = weakref.finalize(self, _unlink, self.path, os.getpid())

    def claim(self) -> tuple[int, int]:
        if not self._free:
            raise TransferError(
                f"more than {STATE_SLOTS} CUDA regions registered on one transport; "
                "register fewer, larger regions"
            )
        slot, gen = self._free.pop(), self._next_gen
        self._next_gen += 1
        _GEN.pack_into(self._map, slot * _GEN.size, gen)
        return slot, gen

    def release(self, slot: int) -> None:
        _GEN.pack_into(self._map, slot * _GEN.size, 0)
        self._free.append(slot)

    def close(self) -> None:
        self._map[:] = bytes(len(self._map))
        self._map.close()
        os.close(self._fd)
        self._unlink()


def _unlink(path: str, owner: int | None = None) -> None:
    if owner is None or owner == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class _PeerState:
    """A peer's state file, read-only: is the peer alive, and is a region's generation current."""

    def __init__(self, path: str, address: str) -> None:
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise TransferError(
                f"cannot open the state file {path} of {address} ({e.strerror}); the peer closed "
                "or died, or the two processes do not share /dev/shm (CUDA IPC needs the same "
                "host and, in containers, a shared IPC namespace such as --ipc=host)"
            ) from None
        self.path = path
        self._map = mmap.mmap(self._fd, STATE_SLOTS * _GEN.size, prot=mmap.PROT_READ)

    def alive(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # the exporter's shared lock is still held
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        _unlink(self.path)  # a dead exporter cannot clean up after itself
        return False

    def generation(self, slot: int) -> int:
        return _GEN.unpack_from(self._map, slot * _GEN.size)[0]

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


@dataclass
class _Export:
    """One shared storage: torch's IPC share of it and how many registered regions use it.

    ``_share_cuda_`` puts the storage behind a reference count that starts at 1 and that torch
    checks when the storage is freed (a count above 0 keeps the block out of the caching
    allocator). Peers map without touching that count, since one descriptor may serve many
    peers; instead the exporter holds the 1 while any region on the storage is registered and
    gives it back when the last one is deregistered, and the generation in the state file
    turns away peers that still hold the old descriptor.
    """

    storage: torch.UntypedStorage
    info: dict
    ref_counter: bytes
    ref_counter_offset: int
    users: int = 0


@dataclass
class _Region:
    tensor: torch.Tensor
    export: _Export
    slot: int
    gen: int


@dataclass
class _Mapped:
    """A peer's CUDA region as this process sees it."""

    tensor: torch.Tensor
    slot: int
    gen: int
    key: tuple


@dataclass
class _Peer:
    address: str
    sizes: dict[str, int]
    mapped: dict[str, _Mapped] = field(default_factory=dict)
    state: Optional[_PeerState] = None

    def release(self) -> None:
        self.mapped.clear()  # the last reference to a mapping closes its IPC handle
        if self.state is not None:
            self.state.close()
            self.state = None


class CudaIpcTransport(Transport):
    """CUDA regions move by CUDA IPC, host regions and notifications over ZMQ at ``host:port``.

    When a peer that exported CUDA regions dies, our next write, read or notify to it raises
    ``PeerTimeout`` at once (its lock is gone) and drops it, unmapping its memory; until then,
    or until we close or reconnect, that memory stays mapped here and so stays allocated on its
    GPU. A copy cannot hang on a dead peer (the mapping keeps the memory alive), so GPU copies
    are not cut short by ``timeout_s``; ZMQ calls (host regions, notifications) keep their
    deadlines. When a peer that only writes to us dies, ``recv_notification`` times out as usual.
    """

    device_regions = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._zmq = ZmqTransport(host, port)
        self.address: str = self._zmq.address
        self._instance = uuid.uuid4().hex
        self._host = host_identity()
        self._lock = threading.Lock()
        self._cuda: dict[str, _Region] = {}
        self._host_regions: set[str] = set()
        self._exports: dict[tuple[int, int], _Export] = {}  # by storage data pointer and size
        self._state: Optional[_StateFile] = None
        self._peers: dict[str, _Peer] = {}
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._peer_pairs: set[tuple[int, int]] = set()
        self._closed = False
        _LOCAL[self._instance] = self

    # -- receiver side -------------------------------------------------------------------------

    def register(self, name: str, region: torch.Tensor) -> None:
        check_region(name, region)
        with self._lock:
            check_open(self._closed, self.address)
            if name in self._cuda or name in self._host_regions:
                raise TransferError(f"region {name!r} is already registered; deregister it first")
            if not region.is_cuda:
                self._zmq.register(name, region)
                self._host_regions.add(name)
                return
            if not region.is_contiguous() or region.numel() == 0:
                raise TransferError(
                    f"region {name!r} must be contiguous and not empty; pass tensor.contiguous()"
                )
            if self._state is None:
                self._state = _StateFile()
            slot, gen = self._state.claim()
            try:
                export = self._export(name, region)
            except BaseException:
                self._state.release(slot)
                raise
            export.users += 1
            self._cuda[name] = _Region(region, export, slot, gen)

    def _export(self, name: str, region: torch.Tensor) -> _Export:
        storage = region.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        export = self._exports.get(key)
        if export is not None:
            return export
        try:
            device, handle, size, offset, ref_counter, ref_offset, _, _ = storage._share_cuda_()
        except RuntimeError as e:
            raise TransferError(
                f"cannot export region {name!r} for CUDA IPC ({e}); register memory allocated "
                "by PyTorch's CUDA caching allocator in this process (not memory received from "
                "another process)"
            ) from None
        info = {
            "handle": base64.b64encode(handle).decode(),
            "offset": offset,
            "size": size,
            "device": device,
            "device_uuid": _gpu_uuid(device),
        }
        export = self._exports[key] = _Export(storage, info, ref_counter, ref_offset)
        return export

    def deregister(self, name: str) -> None:
        with self._lock:
            if name in self._host_regions:
                self._host_regions.discard(name)
                self._zmq.deregister(name)
                return
            region = self._cuda.pop(name, None)
            if region is None:
                raise TransferError(f"region {name!r} is not registered")
            self._unexport(region)

    def _unexport(self, region: _Region) -> None:
        assert self._state is not None
        self._state.release(region.slot)
        export = region.export
        export.users -= 1
        if export.users == 0:
            del self._exports[(export.storage.data_ptr(), export.storage.nbytes())]
            torch.UntypedStorage._release_ipc_counter_cuda(export.ref_counter, export.ref_counter_offset)

    def descriptor(self) -> Descriptor:
        descriptor = self._zmq.descriptor()
        with self._lock:
            cuda = {
                name: {
                    "size": r.tensor.numel(),
                    "offset": r.tensor.storage_offset(),
                    "storage": r.export.info,
                    "slot": r.slot,
                    "gen": r.gen,
                }
                for name, r in self._cuda.items()
            }
            state = self._state.path if self._state is not None else None
        sizes = {**descriptor["regions"], **{name: c["size"] for name, c in cuda.items()}}
        return {
            "backend": "cuda_ipc",
            "address": self.address,
            "regions": sizes,
            "cuda_regions": cuda,
            "host": self._host,
            "instance": self._instance,
            "state_file": state,
        }

    def recv_notification(self, timeout_s: float) -> Notification:
        return self._zmq.recv_notification(timeout_s)

    # -- sender side ---------------------------------------------------------------------------

    def connect(self, descriptor: Descriptor, map_device: Optional[int] = None) -> str:
        """Connect to a peer (see ``Transport.connect``). ``map_device``: open the peer's CUDA
        regions in the context of this process's GPU ``map_device``, with peer access from it to
        theirs, so that kernels on that GPU can load and store them (the way NCCL maps its peers'
        buffers); their tensors then report ``map_device``. By default each region is opened on its
        own GPU, which serves copies: a kernel on another GPU storing into such a mapping hits an
        illegal address (2x H200, benchmarks/results/ab/ipc_kernel_owner.json)."""
        backend = descriptor.get("backend")
        if backend not in ("cuda_ipc", "zmq"):
            raise TransferError(
                f"peer descriptor is for backend {backend!r}; both ends must open the same "
                "transport backend (cuda_ipc also talks to zmq peers)"
            )
        cuda = dict(descriptor.get("cuda_regions") or {})
        if cuda and descriptor.get("host") != self._host:
            raise TransferError(
                f"peer {descriptor.get('address')} runs on host {descriptor.get('host')}, this "
                f"process on {self._host}; CUDA IPC works only within one host (and one boot), "
                "so open a transport that crosses hosts (zmq) for this peer"
            )
        sizes = dict(descriptor["regions"])
        host_sizes = {name: n for name, n in sizes.items() if name not in cuda}
        address = self._zmq.connect({"backend": "zmq", "address": descriptor["address"], "regions": host_sizes})
        with self._lock:
            check_open(self._closed, self.address)
            old = self._peers.pop(address, None)
        peer = _Peer(address, sizes)
        try:
            if cuda:
                self._map_all(peer, descriptor, cuda, old, map_device)
        except BaseException:
            peer.release()
            raise
        finally:
            if old is not None:
                old.release()
        with self._lock:
            check_open(self._closed, self.address)
            self._peers[address] = peer
        return address

    def _map_all(self, peer: _Peer, descriptor: Descriptor, cuda: dict, old: Optional[_Peer],
                 map_device: Optional[int]) -> None:
        exporter = _LOCAL.get(descriptor.get("instance", ""))
        if exporter is None and not torch.cuda.is_available():
            raise TransferError(
                f"{peer.address} exports CUDA regions {sorted(cuda)} but this process has no "
                "CUDA; run it on a GPU of the same host, or have the peer register host regions"
            )
        peer.state = _PeerState(descriptor.get("state_file") or "", peer.address)
        if not peer.state.alive():
            raise PeerTimeout(
                f"{peer.address} may have died (it no longer holds the lock on its state file); "
                "connect to it again once it is back"
            )
        storages: dict[tuple, torch.UntypedStorage] = {}
        for name, c in cuda.items():
            info = c["storage"]
            key = (info["handle"], info["offset"], c["gen"], map_device)
            previous = old.mapped.get(name) if old is not None else None
            if previous is not None and previous.key == key:
                peer.mapped[name] = previous
                continue
            if exporter is not None:
                with exporter._lock:
                    region = exporter._cuda.get(name)
                if region is None or region.gen != c["gen"]:
                    raise RemoteError(f"{peer.address} no longer has region {name!r}; fetch a fresh descriptor")
                tensor = region.tensor
            else:
                storage = storages.get(key[:2])
                if storage is None:
                    storage = storages[key[:2]] = self._map(peer.address, name, info, map_device)
                if c["offset"] + c["size"] > storage.nbytes():
                    raise TransferError(f"region {name!r} of {peer.address} lies outside its shared storage")
                tensor = torch.empty(0, dtype=torch.uint8, device=storage.device)
                tensor.set_(storage, c["offset"], (c["size"],), (1,))
            peer.mapped[name] = _Mapped(tensor, c["slot"], c["gen"], key)

    def _map(self, address: str, name: str, info: dict, map_device: Optional[int]) -> torch.UntypedStorage:
        device = _visible_device(info["device_uuid"], name, address)
        if map_device is not None and map_device != device:
            enable_peer_access(map_device, device)
            device = map_device
        try:
            return open_handle(device, base64.b64decode(info["handle"]), info["size"], info["offset"])
        except RuntimeError as e:
            raise TransferError(
                f"cannot map region {name!r} of {address} by CUDA IPC ({e}); both processes "
                "must run on the same host and, in containers, share the IPC namespace"
            ) from None

    def write(self, peer: str, ops: Sequence[WriteOp], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        p = self._peer(peer)
        copies, host_ops = [], []
        for src, name, offset in ops:
            data = _flat(src, "write source")
            error = check_range(p.sizes, name, offset, data.numel())
            if error:
                raise TransferError(f"write to {peer}: {error}")
            mapped = p.mapped.get(name)
            if mapped is not None:
                copies.append((mapped.tensor[offset : offset + data.numel()], data))
            else:
                host_ops.append((data.cpu(), name, offset))
        self._check_current(p, [name for _, name, _ in ops], "a write")
        if host_ops:
            self._zmq_call(p, self._zmq.write, host_ops, deadline)
        self._copy(copies)

    def read(self, peer: str, ops: Sequence[ReadOp], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        p = self._peer(peer)
        copies, host_ops, staged = [], [], []
        for name, offset, dst in ops:
            data = _flat(dst, "read destination")
            error = check_range(p.sizes, name, offset, data.numel())
            if error:
                raise TransferError(f"read from {peer}: {error}")
            mapped = p.mapped.get(name)
            if mapped is not None:
                copies.append((data, mapped.tensor[offset : offset + data.numel()]))
            elif data.is_cuda:
                stage = torch.empty(data.numel(), dtype=torch.uint8)
                host_ops.append((name, offset, stage))
                staged.append((data, stage))
            else:
                host_ops.append((name, offset, data))
        self._check_current(p, [name for name, _, _ in ops], "a read")
        if host_ops:
            self._zmq_call(p, self._zmq.read, host_ops, deadline)
        self._copy(copies + staged)

    def notify(self, peer: str, message: bytes, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        p = self._peer(peer)
        self._check_current(p, [], "a notification")
        self._zmq_call(p, self._zmq.notify, message, deadline)

    def _peer(self, peer: str) -> _Peer:
        with self._lock:
            return find_peer(self._peers, peer, self._closed, self.address)

    def _drop(self, p: _Peer) -> None:
        with self._lock:
            if self._peers.get(p.address) is p:
                del self._peers[p.address]
        p.release()

    def _check_current(self, p: _Peer, names: list[str], what: str) -> None:
        """Refuses a batch for a dead exporter or a region it deregistered, before any copy."""
        if p.state is None:
            return
        if not p.state.alive():
            self._drop(p)
            raise PeerTimeout(
                f"{p.address} did not complete {what}: it may have died (it no longer holds the "
                "lock on its state file); its GPU memory is unmapped here; call "
                "connect(descriptor) again once it is back"
            )
        for name in names:
            mapped = p.mapped.get(name)
            if mapped is not None and p.state.generation(mapped.slot) != mapped.gen:
                raise RemoteError(
                    f"{p.address} rejected {what}: region {name!r} was deregistered; "
                    "fetch a fresh descriptor and connect again"
                )

    def _zmq_call(self, p: _Peer, call, arg, deadline: float) -> None:
        try:
            call(p.address, arg, timeout_s=max(deadline - time.monotonic(), 0.0))
        except PeerTimeout:
            self._drop(p)  # the ZMQ side forgot this peer too; both reconnect together
            raise

    def _stream(self, device: int) -> torch.cuda.Stream:
        with self._lock:
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device=device)
        return stream

    def _copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copies each (dst, src) on this transport's streams, after the callers' work, and waits.

        Every stream used first waits for the callers' current streams on all GPUs of the batch.
        A pair within one GPU (or with host memory) is a torch ``copy_``; a pair between two GPUs
        is a ``cudaMemcpyAsync`` on the destination GPU's stream, so that GPU's copy engine pulls
        the bytes.
        """
        if not pairs:
            return
        devices = sorted({t.device.index for pair in pairs for t in pair if t.is_cuda})
        streams = {d: self._stream(d) for d in devices}
        for stream in streams.values():
            for device in devices:
                stream.wait_stream(torch.cuda.current_stream(device))
        local, cross = [], []
        for dst, src in pairs:
            (cross if dst.is_cuda and src.is_cuda and dst.device != src.device else local).append((dst, src))
        with torch.cuda.device(devices[0]), contextlib.ExitStack() as stack:
            for stream in streams.values():
                stack.enter_context(torch.cuda.stream(stream))
            for dst, src in local:
                dst.copy_(src, non_blocking=True)
        if cross:
            lib = cuda_runtime()
            for dst, src in cross:
                device = dst.device.index
                self._peer_access(device, src.device.index)
                with torch.cuda.device(device):
                    err = lib.cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), dst.numel(), _MEMCPY_DEVICE_TO_DEVICE,
                                              streams[device].cuda_stream)
                if err:
                    for stream in streams.values():
                        stream.synchronize()
                    raise TransferError(f"copy of {dst.numel()} bytes from GPU {src.device.index} to GPU {device} "
                                        f"failed: {_cuda_error(lib, err)}")
        for stream in streams.values():
            stream.synchronize()

    def _peer_access(self, device: int, peer: int) -> None:
        # Without peer access the driver stages a device-to-device copy through host memory:
        # 36 GB/s instead of 316 on two NVLink H200s.
        if (device, peer) not in self._peer_pairs:
            with contextlib.suppress(TransferError):  # GPUs without peer-to-peer: the driver's staged copy
                enable_peer_access(device, peer)
            self._peer_pairs.add((device, peer))

    def peer_regions(self, peer: str, names: Sequence[str]) -> list[torch.Tensor]:
        """The peer's CUDA regions ``names`` as tensors of this process (mapped by CUDA IPC), for a
        kernel that stores into them directly; refused like a write (``PeerTimeout`` for a dead peer,
        ``RemoteError`` for a deregistered region, ``TransferError`` for a host or unknown one).
        Checked only now: call it again right before each use, and finish the kernel before
        notifying the peer."""
        p = self._peer(peer)
        missing = [name for name in names if name not in p.mapped]
        if missing:
            raise TransferError(f"{peer} has no CUDA regions {missing} (its CUDA regions: {sorted(p.mapped)}); "
                                "the peer must register them on a GPU before publishing its descriptor")
        self._check_current(p, list(names), "a direct copy")
        return [p.mapped[name].tensor for name in names]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            peers = list(self._peers.values())
            self._peers.clear()
            regions = list(self._cuda.values())
            self._cuda.clear()
            self._host_regions.clear()
        _LOCAL.pop(self._instance, None)
        for p in peers:
            p.release()
        for stream in self._streams.values():
            stream.synchronize()
        self._streams.clear()
        for region in regions:
            self._unexport(region)
        if self._state is not None:
            self._state.close()
            self._state = None
        self._zmq.close()
