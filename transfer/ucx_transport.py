"""The UCX transport: UCP tag rendezvous for data, active messages for control, one owned worker.

Design: each endpoint owns one UCP context and worker in ``UCS_THREAD_MODE_SINGLE``, reached
through ctypes on the ``libucp`` of the ``libucx-cu13`` wheel (the UCX build that ``ucxx-cu13``
0.52 pins; ucxx's own Python layer is not used, see below). Only the transport's own service thread
ever calls UCX: it progresses the worker, runs the commands that callers queue, and completes
requests from UCX's callbacks (polling every request instead made a batch of 1024 ranges of 64 KiB
quadratic: 0.6 GB/s against 1.3). Callers wait on an event with their deadline and never enter UCX,
so a peer that dies, a UCX request that never completes or even a UCX call that spins cannot hold a
caller past ``timeout_s``; at the deadline the caller asks the service thread to drop the
connection (force close, posted receives cancelled) and raises ``PeerTimeout``. Endpoints use
``UCP_ERR_HANDLING_MODE_PEER``: a peer's death reaches the error callback, which fails everything
waiting on that connection at once (a SIGKILLed peer on this host failed a write, read or notify
36-50 ms after its death, deadline 30 s). When idle the thread sleeps on the worker's event fd
(``ucp_worker_arm``) and a wake-up pipe, never longer than ``_IDLE_S``, so a transport whose
wake-up events are unreliable (cma) is slow, not stuck.

Protocol: a client connects to the peer's UCP listener (``host:port``) and says hello with its own
address. A write sends its plan (region, offset, size per range) as an active message; the receiver
checks every range against its regions, posts tag receives straight into the region, one per run of
ranges of up to ``GROUP_BYTES`` (an iovec, so a batch of KV pages is a few messages, not one per
page), and answers with the tags to use, or refuses with the reason (nothing written); the writer
then sends each run with ``ucp_tag_send_nbx`` (UCX picks eager or rendezvous per message; a large
run lands in place without a copy) and the receiver acknowledges when every run arrived. Between
two processes here, 256 MiB as 64 KiB ranges moved 2.6 GB/s (ZMQ 1.7; one range per message gave
0.8). A read posts the receives into the destinations first, then sends the plan; the peer checks
it and sends the ranges. The ranges of one batch land in no set order, so ranges that overlap
within a batch leave the overlap undefined. A notification is an active message acknowledged once
queued; since a write returns only after the receiver acknowledged all of its ranges, a
notification is always delivered after the writes before it. Two-sided rendezvous rather than
one-sided ``ucp_put_nbx`` keeps the receiver's checks (a stale or forged descriptor cannot write
outside a region, a deregistered region takes no bytes), and UCX still moves rendezvous data with
its zero-copy get/put where the transport has it.

Why not ucxx's Python endpoints (measured here with ucxx 0.52 core API, a peer SIGKILLed mid
``tag_send``, error handling on): the send in flight failed within 3-30 ms, but with the blocking
progress thread a ``tag_send`` posted afterwards on the failed endpoint never completed, and
``UCXEndpoint.close()`` on it returned a request whose ``completed`` segfaulted, in both blocking
and polling modes. Neither can be cut by a deadline from Python; owning the progress loop removes
both (a previous attempt also saw ``am_send`` spin). The wheel's UCX has TCP, shared memory and
CUDA transports but no InfiniBand; ``UCX_TLS`` is the user's (``tcp,self`` works on loopback; the
listener needs ``tcp``). Error handling mode PEER keeps shared memory lanes out unless
``UCX_MM_ERROR_HANDLING=y``, so same-host data runs over tcp/lo ("rendezvous zero-copy"). With
``UCX_MM_ERROR_HANDLING=y`` same-host transfers moved 16 GB/s here instead of 4.6, but after a
writing peer was SIGKILLed, a new peer's connection to the survivor stalled in 1 of 5 runs, and in
2 of 8 with the thread polling every 0.5 ms, so not from this module's sleeping (the caller got
``PeerTimeout`` at its deadline; the new endpoint never said hello), so it stays the user's choice,
not a default. Unless the user set them, TCP segments are 512 KiB
(``UCX_TCP_TX_SEG_SIZE``/``_RX_SEG_SIZE``), which a previous attempt needed for ucxx's eager and
fragmented sends (0.3-0.95 GB/s with the 8 KiB default against 2.85); this module's protocols
measured the same either way here (one 256 MiB range 4.3-4.8 GB/s, 1024 ranges of 64 KiB 0.7-1.45
GB/s, same memory), so here the default changes nothing measurable; it stays for UCX's eager and
fragmented paths. Regions are host memory (``device_regions = False``); GPU regions would need
``cuda_copy``/``cuda_ipc`` in ``UCX_TLS``, a CUDA context current on the service thread before the
worker is created, ``memory_type`` on each request, and the producing stream synchronized before a
send.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import queue
import select
import socket
import struct
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from kvtier.transfer.base import (
    Descriptor,
    HostRegions,
    Inbox,
    Notification,
    PeerTimeout,
    ReadOp,
    RemoteError,
    TransferError,
    Transport,
    WriteOp,
    as_bytes,
    check_open,
    check_range,
    find_peer,
)

logger = logging.getLogger(__name__)

UCX_DEFAULTS = {"TCP_TX_SEG_SIZE": "512k", "TCP_RX_SEG_SIZE": "512k"}
"""UCX settings applied unless ``UCX_<KEY>`` is set in the environment."""

GROUP_BYTES = 4 << 20
"""Ranges of a batch travel as one tag message (an iovec) per run of up to this many bytes."""
GROUP_RANGES = 256  # and at most this many ranges
_IDLE_S = 0.05  # longest sleep of the service thread between progress calls
_START_S = 30.0  # longest wait for the service thread to open UCX or run a command
_CLOSE_S = 2.0  # longest wait for endpoints to close at shutdown

# UCP constants (ucp/api/ucp.h, ucs/type/status.h of UCX 1.21)
_UCS_OK, _UCS_INPROGRESS, _UCS_ERR_UNREACHABLE, _UCS_ERR_BUSY = 0, 1, -6, -15
_UCS_ERR_CANCELED = -16
_UCS_ERR_LAST = -100
_FEATURE_TAG, _FEATURE_WAKEUP, _FEATURE_AM = 1 << 0, 1 << 4, 1 << 6
_EP_FIELD_ERR_MODE, _EP_FIELD_ERR_HANDLER = 1 << 1, 1 << 2
_EP_FIELD_SOCK_ADDR, _EP_FIELD_FLAGS, _EP_FIELD_CONN_REQUEST = 1 << 4, 1 << 5, 1 << 6
_EP_FLAG_CLIENT_SERVER = 1 << 0
_ERR_MODE_PEER = 1
_EP_CLOSE_FORCE = 1 << 0
_LISTENER_FIELD_SOCK_ADDR, _LISTENER_FIELD_CONN_HANDLER = 1 << 0, 1 << 2
_AM_FIELD_ID, _AM_FIELD_FLAGS, _AM_FIELD_CB = 1 << 0, 1 << 1, 1 << 2
_AM_FLAG_WHOLE_MSG = 1 << 0
_AM_SEND_REPLY, _AM_SEND_EAGER, _AM_SEND_COPY_HEADER = 1 << 0, 1 << 1, 1 << 3
_AM_RECV_REPLY_EP, _AM_RECV_RNDV = 1 << 0, 1 << 17
_OP_FIELD_CALLBACK, _OP_FIELD_USER_DATA, _OP_FIELD_DATATYPE = 1 << 1, 1 << 2, 1 << 3
_DATATYPE_IOV = 2  # ucp_dt_make_iov()
_OP_FIELD_FLAGS, _OP_FIELD_RECV_INFO = 1 << 4, 1 << 7

_AM_ID = 0
_HEADER = struct.Struct("<BQQ")  # message kind, batch sequence number, first tag
_HELLO, _PLAN_WRITE, _PLAN_READ, _NOTIFY, _READY, _DONE = range(6)


class _SockAddr(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_void_p), ("addrlen", ctypes.c_uint32)]


class _Callback(ctypes.Structure):
    _fields_ = [("cb", ctypes.c_void_p), ("arg", ctypes.c_void_p)]


class _Params(ctypes.Structure):
    _fields_ = [
        ("field_mask", ctypes.c_uint64),
        ("features", ctypes.c_uint64),
        ("rest", ctypes.c_byte * 256),
    ]


class _WorkerParams(ctypes.Structure):
    _fields_ = [
        ("field_mask", ctypes.c_uint64),
        ("thread_mode", ctypes.c_int),
        ("rest", ctypes.c_byte * 1024),
    ]


class _EpParams(ctypes.Structure):
    _fields_ = [
        ("field_mask", ctypes.c_uint64),
        ("address", ctypes.c_void_p),
        ("err_mode", ctypes.c_int),
        ("err_handler", _Callback),
        ("user_data", ctypes.c_void_p),
        ("flags", ctypes.c_uint),
        ("sockaddr", _SockAddr),
        ("conn_request", ctypes.c_void_p),
        ("name", ctypes.c_char_p),
        ("local_sockaddr", _SockAddr),
    ]


class _ListenerParams(ctypes.Structure):
    _fields_ = [
        ("field_mask", ctypes.c_uint64),
        ("sockaddr", _SockAddr),
        ("accept_handler", _Callback),
        ("conn_handler", _Callback),
    ]


class _ListenerAttr(ctypes.Structure):
    _fields_ = [("field_mask", ctypes.c_uint64), ("sockaddr", ctypes.c_byte * 128)]


class _AmHandlerParams(ctypes.Structure):
    _fields_ = [
        ("field_mask", ctypes.c_uint64),
        ("id", ctypes.c_uint),
        ("flags", ctypes.c_uint32),
        ("cb", ctypes.c_void_p),
        ("arg", ctypes.c_void_p),
    ]


class _AmRecvParam(ctypes.Structure):
    _fields_ = [("recv_attr", ctypes.c_uint64), ("reply_ep", ctypes.c_void_p)]


class _RequestParam(ctypes.Structure):
    _fields_ = [
        ("op_attr_mask", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("request", ctypes.c_void_p),
        ("cb", ctypes.c_void_p),
        ("datatype", ctypes.c_uint64),
        ("user_data", ctypes.c_void_p),
        ("reply_buffer", ctypes.c_void_p),
        ("memory_type", ctypes.c_int),
        ("recv_info", ctypes.c_void_p),
        ("memh", ctypes.c_void_p),
    ]


class _Iov(ctypes.Structure):
    _fields_ = [("buffer", ctypes.c_void_p), ("length", ctypes.c_size_t)]


class _TagRecvInfo(ctypes.Structure):
    _fields_ = [("sender_tag", ctypes.c_uint64), ("length", ctypes.c_size_t)]


_AM_CB = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.POINTER(_AmRecvParam),
)
_ERR_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
_CONN_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
_SEND_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
_RECV_CB = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_TagRecvInfo), ctypes.c_void_p
)

_lib_lock = threading.Lock()
_libs: Optional[tuple[ctypes.CDLL, ctypes.CDLL]] = None


def _ucx() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libucp and libucs from the libucx wheel, with the signatures used here."""
    global _libs
    with _lib_lock:
        if _libs is not None:
            return _libs
        try:
            import libucx
        except ImportError as e:
            raise TransferError(
                "the UCX transport needs the libucx wheel; pip install 'kvtier[ucx]' "
                "(ucxx-cu13) or use the zmq backend"
            ) from e
        ucs, _, _, ucp = libucx.load_library()
        if ucp is None or ucs is None:
            raise TransferError(
                "libucx is installed but libucp.so was not found in it; reinstall libucx-cu13"
            )
        vp, st, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        sigs: dict[str, tuple[Any, list]] = {
            "ucp_config_read": (st, [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(vp)]),
            "ucp_config_modify": (st, [vp, ctypes.c_char_p, ctypes.c_char_p]),
            "ucp_config_release": (None, [vp]),
            "ucp_init_version": (
                st,
                [ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(_Params), vp, ctypes.POINTER(vp)],
            ),
            "ucp_cleanup": (None, [vp]),
            "ucp_worker_create": (st, [vp, ctypes.POINTER(_WorkerParams), ctypes.POINTER(vp)]),
            "ucp_worker_destroy": (None, [vp]),
            "ucp_worker_progress": (ctypes.c_uint, [vp]),
            "ucp_worker_get_efd": (st, [vp, ctypes.POINTER(ctypes.c_int)]),
            "ucp_worker_arm": (st, [vp]),
            "ucp_worker_set_am_recv_handler": (st, [vp, ctypes.POINTER(_AmHandlerParams)]),
            "ucp_listener_create": (st, [vp, ctypes.POINTER(_ListenerParams), ctypes.POINTER(vp)]),
            "ucp_listener_query": (st, [vp, ctypes.POINTER(_ListenerAttr)]),
            "ucp_listener_destroy": (None, [vp]),
            "ucp_ep_create": (st, [vp, ctypes.POINTER(_EpParams), ctypes.POINTER(vp)]),
            "ucp_ep_close_nbx": (vp, [vp, ctypes.POINTER(_RequestParam)]),
            "ucp_am_send_nbx": (
                vp,
                [vp, ctypes.c_uint, vp, sz, vp, sz, ctypes.POINTER(_RequestParam)],
            ),
            "ucp_tag_send_nbx": (vp, [vp, vp, sz, ctypes.c_uint64, ctypes.POINTER(_RequestParam)]),
            "ucp_tag_recv_nbx": (
                vp,
                [vp, vp, sz, ctypes.c_uint64, ctypes.c_uint64, ctypes.POINTER(_RequestParam)],
            ),
            "ucp_request_check_status": (st, [vp]),
            "ucp_request_cancel": (None, [vp, vp]),
            "ucp_request_free": (None, [vp]),
        }
        for name, (restype, argtypes) in sigs.items():
            fn = getattr(ucp, name)
            fn.restype, fn.argtypes = restype, argtypes
        ucs.ucs_status_string.restype, ucs.ucs_status_string.argtypes = ctypes.c_char_p, [st]
        _libs = (ucp, ucs)
        return _libs


_open: "weakref.WeakSet[UcxTransport]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Stops service threads before interpreter exit: UCX torn down under a live one aborts."""
    for transport in list(_open):
        transport.close()


def _status_of(ptr: Optional[int]) -> int:
    """UCS_PTR_STATUS: OK for NULL, an error code for an error pointer, INPROGRESS for a request."""
    if not ptr:
        return _UCS_OK
    signed = ctypes.c_int64(ptr).value
    return signed if _UCS_ERR_LAST <= signed < 0 else _UCS_INPROGRESS


def _groups(buffers: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The non-empty ranges of a batch in runs of up to GROUP_BYTES, one tag message per run;
    both sides cut the same plan the same way."""
    groups: list[list[torch.Tensor]] = []
    total = GROUP_BYTES
    for buf in buffers:
        n = buf.numel()
        if not n:
            continue
        if total + n > GROUP_BYTES or len(groups[-1]) == GROUP_RANGES:
            groups.append([])
            total = 0
        groups[-1].append(buf)
        total += n
    return groups


def _buffer(group: list[torch.Tensor]) -> tuple[int, int, Any]:
    """(buffer, count, what to keep alive) for a tag message: contiguous bytes or an iovec."""
    if len(group) == 1:
        return group[0].data_ptr(), group[0].numel(), group
    iov = (_Iov * len(group))(*[_Iov(t.data_ptr(), t.numel()) for t in group])
    return ctypes.addressof(iov), len(group), (iov, group)


def _sockaddr(host: str, port: int) -> ctypes.Array:
    """A struct sockaddr_in or sockaddr_in6 for host:port, as raw bytes."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise TransferError(
            f"cannot resolve host {host!r} ({e}); pass an IP address this host owns"
        ) from e
    if family == socket.AF_INET:
        raw = (
            struct.pack("=H", family)
            + struct.pack("!H", addr[1])
            + socket.inet_aton(addr[0])
            + bytes(8)
        )
    else:
        raw = (
            struct.pack("=H", family)
            + struct.pack("!HI", addr[1], addr[2])
            + socket.inet_pton(socket.AF_INET6, addr[0])
            + struct.pack("=I", addr[3])
        )
    return ctypes.create_string_buffer(raw, len(raw))


@dataclass
class _Op:
    """A caller's batch as the service thread drives it; ``done`` is set once it ended."""

    kind: str
    ranges: list  # [region, offset, nbytes] checked by the peer
    buffers: list[torch.Tensor]  # the local side of each range
    seq: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    error: Optional[TransferError] = None
    pending: int = 0  # local requests still in flight
    acked: bool = False
    recvs: set[int] = field(default_factory=set)  # receives still posted, to cancel on failure


@dataclass
class _Conn:
    """One UCP endpoint: to a peer we connected to, or from a peer that connected to us."""

    ep: int
    address: str
    regions: dict[str, int] = field(default_factory=dict)
    outgoing: bool = True
    seq: int = 0
    ops: dict[int, _Op] = field(default_factory=dict)
    recvs: set[int] = field(default_factory=set)  # receives posted into our regions for it
    failed: Optional[TransferError] = None  # set by the service thread when it dropped the endpoint
    abandoned: Optional[TransferError] = None  # set by a caller whose deadline passed

    def broken(self) -> Optional[TransferError]:
        return self.failed or self.abandoned


@dataclass
class _Batch:
    """A write being received: ranges still to land, and the first error seen."""

    left: int
    error: str = ""


@dataclass
class _Req:
    ptr: int
    keep: Any  # what UCX reads from or writes into until the request completes
    on_done: Callable[[int, int], None]  # (status, received length)
    owner: Optional[set[int]] = None  # a receive: the set that lists it while it is posted


class UcxTransport(Transport):
    """Listens on ``host:port`` through UCX (port 0: the OS picks); ``host`` must be reachable."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._ucp, self._ucs = _ucx()
        self._regions = HostRegions()
        self._peers: dict[str, _Conn] = {}  # outgoing, by peer address; service thread writes
        self._peers_lock = threading.Lock()
        self._inbox = Inbox()
        self._commands: "queue.SimpleQueue[Callable[[], None]]" = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._closed = False
        self._stop = False
        # service-thread state
        self._conns: dict[int, _Conn] = {}  # every endpoint, by handle
        self._pending: dict[int, _Req] = {}  # requests in flight, by their callback key
        self._next_key = 0
        self._early: dict[int, tuple[int, int]] = {}
        self._closing: list[int] = []  # ep close requests in flight
        self._to_close: list[_Conn] = []
        self._next_tag = 1  # tags of receives posted on this worker, never reused
        self._callbacks = (
            _AM_CB(self._on_am),
            _ERR_CB(self._on_error),
            _CONN_CB(self._on_conn_request),
            _SEND_CB(self._on_send_done),
            _RECV_CB(self._on_recv_done),
        )
        self._send_cb = ctypes.cast(self._callbacks[3], ctypes.c_void_p).value
        self._recv_cb = ctypes.cast(self._callbacks[4], ctypes.c_void_p).value
        self._ready = threading.Event()
        self._start_error: Optional[BaseException] = None
        self.address = ""
        self._thread = threading.Thread(
            target=self._serve, args=(host, port), name="kvtier-ucx", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(_START_S):
            raise TransferError(f"UCX did not start within {_START_S}s on {host}:{port}")
        if self._start_error is not None:
            self._thread.join()
            self._close_pipe()
            raise self._start_error
        self._thread.name = f"kvtier-ucx {self.address}"
        _open.add(self)
        logger.info("kvtier transfer: UCX transport listening on %s", self.address)

    # -- public interface ---------------------------------------------------------------------

    def register(self, name: str, region: torch.Tensor) -> None:
        self._regions.register(name, region)

    def deregister(self, name: str) -> None:
        self._regions.deregister(name)

    def descriptor(self) -> Descriptor:
        return {"backend": "ucx", "address": self.address, "regions": self._regions.sizes()}

    def connect(self, descriptor: Descriptor) -> str:
        if descriptor.get("backend") != "ucx":
            raise TransferError(
                f"peer descriptor is for backend {descriptor.get('backend')!r}; "
                "both ends must open the same transport backend"
            )
        address, regions = descriptor["address"], dict(descriptor["regions"])
        with self._peers_lock:
            check_open(self._closed, self.address)
            conn = self._peers.get(address)
            if conn is not None and conn.broken() is None:
                conn.regions = regions
                return address
        done = threading.Event()
        outcome: list = []

        def open_ep() -> None:
            try:
                conn = self._connect(address)
                conn.regions = regions
                outcome.append(conn)
            except TransferError as e:
                outcome.append(e)
            done.set()

        self._submit(open_ep)
        if not done.wait(_START_S):
            raise PeerTimeout(f"opening a UCX endpoint to {address} took over {_START_S}s")
        if isinstance(outcome[0], TransferError):
            raise outcome[0]
        return address

    def write(self, peer: str, ops: Sequence[WriteOp], timeout_s: float = 30.0) -> None:
        plan = [(name, offset, src) for src, name, offset in ops]
        self._run(peer, "write", f"write to {peer}", plan, "write source", timeout_s)

    def read(self, peer: str, ops: Sequence[ReadOp], timeout_s: float = 30.0) -> None:
        self._run(peer, "read", f"read from {peer}", ops, "read destination", timeout_s)

    def notify(self, peer: str, message: bytes, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        conn = self._peer(peer)
        op = _Op("notification", [], [])
        self._wait(conn, op, deadline, timeout_s, bytes(message))

    def recv_notification(self, timeout_s: float) -> Notification:
        return self._inbox.get(timeout_s, self.address)

    def close(self) -> None:
        with self._peers_lock:
            if self._closed:
                return
            self._closed = True
            self._peers.clear()
        _open.discard(self)
        self._submit(self._request_stop)
        self._thread.join(_START_S)
        if self._thread.is_alive():
            logger.error("kvtier transfer: the UCX service thread of %s did not stop", self.address)
            return
        self._close_pipe()
        self._regions.clear()

    # -- caller side --------------------------------------------------------------------------

    def _peer(self, peer: str) -> _Conn:
        with self._peers_lock:
            conn = find_peer(self._peers, peer, self._closed, self.address)
        error = conn.broken()
        if error is not None:
            raise type(error)(str(error))
        return conn

    def _run(
        self,
        peer: str,
        kind: str,
        what: str,
        ops: Sequence[tuple[str, int, torch.Tensor]],
        role: str,
        timeout_s: float,
    ) -> None:
        deadline = time.monotonic() + timeout_s
        conn = self._peer(peer)
        ranges, buffers = [], []
        for name, offset, tensor in ops:
            data = as_bytes(tensor, role)
            error = check_range(conn.regions, name, offset, data.numel())
            if error:
                raise TransferError(f"{what}: {error}")
            ranges.append([name, offset, data.numel()])
            buffers.append(data)
        self._wait(conn, _Op(kind, ranges, buffers), deadline, timeout_s, None)

    def _wait(
        self, conn: _Conn, op: _Op, deadline: float, timeout_s: float, message: Optional[bytes]
    ) -> None:
        """Hands ``op`` to the service thread and waits for it until the deadline, no longer."""
        self._submit(lambda: self._start(conn, op, message))
        if not op.done.wait(max(deadline - time.monotonic(), 0.0)):
            error = PeerTimeout(
                f"{conn.address} did not complete a {op.kind} within {timeout_s}s; it may have died; "
                "call connect(descriptor) again once it is back"
            )
            conn.abandoned = error  # a connect() right after this opens a new endpoint
            self._submit(lambda: self._fail(conn, error))
            raise error
        if op.error is not None:
            raise op.error

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full: the thread is awake already

    def _close_pipe(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- service thread: setup and loop ------------------------------------------------------

    def _check(self, status: int, what: str) -> None:
        if status != _UCS_OK:
            raise TransferError(
                f"UCX {what} failed: {self._ucs.ucs_status_string(status).decode()}"
            )

    def _serve(self, host: str, port: int) -> None:
        try:
            self._open(host, port)
        except BaseException as e:
            self._start_error = (
                e if isinstance(e, TransferError) else TransferError(f"UCX failed to start: {e!r}")
            )
            self._teardown()
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop()
        finally:
            self._teardown()

    def _open(self, host: str, port: int) -> None:
        ucp = self._ucp
        self._context = self._worker = self._listener = None
        config = ctypes.c_void_p()
        self._check(ucp.ucp_config_read(None, None, ctypes.byref(config)), "config read")
        try:
            for key, value in UCX_DEFAULTS.items():
                if f"UCX_{key}" not in os.environ:
                    self._check(
                        ucp.ucp_config_modify(config, key.encode(), value.encode()),
                        f"setting {key}",
                    )
            params = _Params(field_mask=1, features=_FEATURE_TAG | _FEATURE_AM | _FEATURE_WAKEUP)
            context = ctypes.c_void_p()
            self._check(
                ucp.ucp_init_version(1, 21, ctypes.byref(params), config, ctypes.byref(context)),
                "init",
            )
            self._context = context.value
        finally:
            ucp.ucp_config_release(config)
        worker = ctypes.c_void_p()
        wparams = _WorkerParams(field_mask=1, thread_mode=0)  # single: only this thread calls UCX
        self._check(
            ucp.ucp_worker_create(self._context, ctypes.byref(wparams), ctypes.byref(worker)),
            "worker create",
        )
        self._worker = worker.value
        efd = ctypes.c_int()
        self._check(ucp.ucp_worker_get_efd(self._worker, ctypes.byref(efd)), "worker event fd")
        self._poller = select.poll()  # not select.select: a server's fds may exceed 1024
        self._poller.register(efd.value, select.POLLIN)
        self._poller.register(self._wake_r, select.POLLIN)
        am = _AmHandlerParams(
            field_mask=_AM_FIELD_ID | _AM_FIELD_FLAGS | _AM_FIELD_CB,
            id=_AM_ID,
            flags=_AM_FLAG_WHOLE_MSG,
            cb=ctypes.cast(self._callbacks[0], ctypes.c_void_p),
        )
        self._check(
            ucp.ucp_worker_set_am_recv_handler(self._worker, ctypes.byref(am)),
            "active message handler",
        )
        addr = _sockaddr(host, port)
        lparams = _ListenerParams(
            field_mask=_LISTENER_FIELD_SOCK_ADDR | _LISTENER_FIELD_CONN_HANDLER,
            sockaddr=_SockAddr(ctypes.cast(addr, ctypes.c_void_p), len(addr)),
            conn_handler=_Callback(ctypes.cast(self._callbacks[2], ctypes.c_void_p), None),
        )
        listener = ctypes.c_void_p()
        status = ucp.ucp_listener_create(
            self._worker, ctypes.byref(lparams), ctypes.byref(listener)
        )
        if status != _UCS_OK:
            raise TransferError(
                f"UCX could not listen on {host}:{port}: {self._ucs.ucs_status_string(status).decode()}; "
                "pick a free port on an address of this host, and keep tcp in UCX_TLS"
            )
        self._listener = listener.value
        attr = _ListenerAttr(field_mask=1)
        self._check(ucp.ucp_listener_query(self._listener, ctypes.byref(attr)), "listener query")
        (bound_port,) = struct.unpack_from("!H", bytes(attr.sockaddr), 2)
        self.address = f"ucx://{host}:{bound_port}"

    def _loop(self) -> None:
        ucp, worker = self._ucp, self._worker
        while not self._stop:
            busy = ucp.ucp_worker_progress(worker) > 0
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                busy = True
                try:
                    command()
                except Exception:  # a bug in one command must not stop the others
                    logger.exception("kvtier transfer: a UCX command failed on %s", self.address)
            if self._to_close:
                self._close_failed()
            if busy or self._stop:
                continue
            if ucp.ucp_worker_arm(worker) == _UCS_ERR_BUSY:
                continue
            for fd, _ in self._poller.poll(_IDLE_S * 1000):
                if fd == self._wake_r:
                    os.read(self._wake_r, 4096)

    def _request_stop(self) -> None:
        self._stop = True

    def _teardown(self) -> None:
        """Fails what is left, force-closes every endpoint (bounded) and frees UCX."""
        ucp = self._ucp
        for conn in list(self._conns.values()):
            self._fail(conn, TransferError(f"transport {self.address} is closed; open a new one"))
        self._close_failed()
        end = time.monotonic() + _CLOSE_S
        while (self._closing or self._pending) and time.monotonic() < end and self._worker:
            ucp.ucp_worker_progress(self._worker)
            self._closing = [r for r in self._closing if self._in_flight(r)]
        if self._closing or self._pending:
            logger.warning("kvtier transfer: UCX requests still open at close of %s", self.address)
        if self._listener:
            ucp.ucp_listener_destroy(self._listener)
        if self._worker:
            ucp.ucp_worker_destroy(self._worker)
        if self._context:
            ucp.ucp_cleanup(self._context)
        self._listener = self._worker = self._context = None

    def _in_flight(self, req: int) -> bool:
        """Frees a closing endpoint's request once done; True while it is still in flight."""
        if self._ucp.ucp_request_check_status(req) == _UCS_INPROGRESS:
            return True
        self._ucp.ucp_request_free(req)
        return False

    # -- service thread: requests -------------------------------------------------------------

    def _issue(
        self,
        call: Callable[[_RequestParam], Optional[int]],
        keep: Any,
        on_done: Callable[[int, int], None],
        owner: Optional[set[int]] = None,
        flags: int = 0,
        iov: bool = False,
    ) -> None:
        """Starts one ``*_nbx`` operation whose completion calls ``on_done(status, length)``:
        from the UCX callback, or at once if the operation completed inside the call."""
        self._next_key += 1
        key, info = self._next_key, _TagRecvInfo()
        param = _RequestParam(
            op_attr_mask=_OP_FIELD_CALLBACK | _OP_FIELD_USER_DATA | _OP_FIELD_FLAGS,
            flags=flags,
            cb=self._recv_cb if owner is not None else self._send_cb,
            user_data=key,
        )
        if owner is not None:
            param.op_attr_mask |= _OP_FIELD_RECV_INFO
            param.recv_info = ctypes.addressof(info)
        if iov:
            param.op_attr_mask |= _OP_FIELD_DATATYPE
            param.datatype = _DATATYPE_IOV
        ptr = call(param)
        status = _status_of(ptr)
        if status != _UCS_INPROGRESS:
            on_done(status, info.length if status == _UCS_OK else 0)
            return
        early = self._early.pop(key, None)
        if early is not None:
            on_done(*early)
            return
        self._pending[key] = _Req(ptr, keep, on_done, owner)
        if owner is not None:
            owner.add(ptr)

    def _complete(self, request: int, status: int, length: int, key: int) -> None:
        self._ucp.ucp_request_free(request)
        length = length if status == _UCS_OK else 0
        req = self._pending.pop(key, None)
        if req is None:  # completed inside the *_nbx call that returned its request
            self._early[key] = (status, length)
            return
        if req.owner is not None:
            req.owner.discard(req.ptr)
        req.on_done(status, length)

    def _send_am(self, conn: _Conn, kind: int, seq: int, tag: int, payload: bytes) -> None:
        header = _HEADER.pack(kind, seq, tag)

        def sent(status: int, _: int) -> None:
            if status != _UCS_OK:
                self._fail(conn, self._lost(conn, status))

        self._issue(
            lambda param: self._ucp.ucp_am_send_nbx(
                conn.ep, _AM_ID, header, len(header), payload or None, len(payload), param
            ),
            payload,
            sent,
            flags=_AM_SEND_REPLY | _AM_SEND_EAGER | _AM_SEND_COPY_HEADER,
        )

    def _send_tag(
        self, conn: _Conn, group: list[torch.Tensor], tag: int, on_done: Callable[[int, int], None]
    ) -> None:
        buffer, count, keep = _buffer(group)
        self._issue(
            lambda param: self._ucp.ucp_tag_send_nbx(conn.ep, buffer, count, tag, param),
            keep,
            on_done,
            iov=len(group) > 1,
        )

    def _post_recv(
        self,
        group: list[torch.Tensor],
        tag: int,
        owner: set[int],
        on_done: Callable[[int, int], None],
    ) -> None:
        buffer, count, keep = _buffer(group)
        self._issue(
            lambda param: self._ucp.ucp_tag_recv_nbx(
                self._worker, buffer, count, tag, (1 << 64) - 1, param
            ),
            keep,
            on_done,
            owner,
            iov=len(group) > 1,
        )

    def _take_tags(self, count: int) -> int:
        first = self._next_tag
        self._next_tag += count
        return first

    def _cancel(self, recvs: set[int]) -> None:
        for req in list(recvs):
            self._ucp.ucp_request_cancel(self._worker, req)

    def _lost(self, conn: _Conn, status: int) -> PeerTimeout:
        reason = self._ucs.ucs_status_string(status).decode()
        if status == _UCS_ERR_UNREACHABLE:
            hint = (
                "no transport in UCX_TLS reaches it with peer error handling; keep tcp in "
                "UCX_TLS (shared memory alone also needs UCX_MM_ERROR_HANDLING=y)"
            )
        else:
            hint = "it may have died; call connect(descriptor) again once it is back"
        return PeerTimeout(f"the UCX connection to {conn.address} failed ({reason}); {hint}")

    def _fail(self, conn: _Conn, error: TransferError) -> None:
        """Ends every batch on ``conn`` with ``error``, cancels its receives and closes it."""
        if conn.failed is not None:
            return
        conn.failed = error
        logger.debug(
            "kvtier transfer: UCX connection %s -> %s dropped: %s",
            self.address,
            conn.address,
            error,
        )
        ops = list(conn.ops.values())
        conn.ops.clear()
        for op in ops:  # before cancelling: cancelled receives complete inside the cancel call
            self._finish(op, error)
        for op in ops:
            self._cancel(op.recvs)
        self._cancel(conn.recvs)
        self._to_close.append(conn)

    def _close_failed(self) -> None:
        param = _RequestParam(op_attr_mask=_OP_FIELD_FLAGS, flags=_EP_CLOSE_FORCE)
        while self._to_close:  # closing completes sends, whose callbacks may fail more
            conn = self._to_close.pop()
            if self._conns.pop(conn.ep, None) is None:
                continue
            ptr = self._ucp.ucp_ep_close_nbx(conn.ep, ctypes.byref(param))
            if _status_of(ptr) == _UCS_INPROGRESS:
                self._closing.append(ptr)
        self._closing = [r for r in self._closing if self._in_flight(r)]

    def _finish(self, op: _Op, error: Optional[TransferError]) -> None:
        if not op.done.is_set():
            op.error = error
            op.done.set()

    # -- service thread: the sending side -----------------------------------------------------

    def _connect(self, address: str) -> _Conn:
        with self._peers_lock:
            check_open(self._closed, self.address)
            conn = self._peers.get(address)
            if conn is not None and conn.broken() is None:
                return conn
        host, _, port = address.removeprefix("ucx://").rpartition(":")
        addr = _sockaddr(host.strip("[]"), int(port))
        params = _EpParams(
            field_mask=_EP_FIELD_ERR_MODE
            | _EP_FIELD_ERR_HANDLER
            | _EP_FIELD_SOCK_ADDR
            | _EP_FIELD_FLAGS,
            err_mode=_ERR_MODE_PEER,
            err_handler=_Callback(ctypes.cast(self._callbacks[1], ctypes.c_void_p), None),
            flags=_EP_FLAG_CLIENT_SERVER,
            sockaddr=_SockAddr(ctypes.cast(addr, ctypes.c_void_p), len(addr)),
        )
        ep = ctypes.c_void_p()
        status = self._ucp.ucp_ep_create(self._worker, ctypes.byref(params), ctypes.byref(ep))
        if status != _UCS_OK:
            reason = self._ucs.ucs_status_string(status).decode()
            raise PeerTimeout(f"cannot open a UCX endpoint to {address}: {reason}; is the peer up?")
        conn = _Conn(ep.value, address)
        self._conns[conn.ep] = conn
        with self._peers_lock:
            self._peers[address] = conn
        self._send_am(conn, _HELLO, 0, 0, self.address.encode())
        return conn

    def _start(self, conn: _Conn, op: _Op, message: Optional[bytes]) -> None:
        try:
            self._post(conn, op, message)
        except Exception as e:
            error = TransferError(f"UCX failed to start a {op.kind} to {conn.address}: {e!r}")
            self._fail(conn, error)
            self._finish(op, error)
            raise

    def _post(self, conn: _Conn, op: _Op, message: Optional[bytes]) -> None:
        if conn.failed is not None:
            self._finish(op, type(conn.failed)(str(conn.failed)))
            return
        conn.seq += 1
        op.seq = conn.seq
        conn.ops[op.seq] = op
        if op.kind == "notification":
            self._send_am(conn, _NOTIFY, op.seq, 0, message or b"")
        elif op.kind == "write":
            self._send_am(conn, _PLAN_WRITE, op.seq, 0, json.dumps(op.ranges).encode())
        else:
            groups = _groups(op.buffers)
            first = self._take_tags(len(groups))
            for i, group in enumerate(groups):
                op.pending += 1
                self._post_recv(group, first + i, op.recvs, self._piece_done(conn, op, group))
            self._send_am(conn, _PLAN_READ, op.seq, first, json.dumps(op.ranges).encode())

    def _piece_done(
        self, conn: _Conn, op: _Op, group: list[torch.Tensor]
    ) -> Callable[[int, int], None]:
        expected = sum(t.numel() for t in group)

        def done(status: int, length: int) -> None:
            op.pending -= 1
            if op.done.is_set():
                return
            if status != _UCS_OK:
                self._fail(conn, self._lost(conn, status))
            elif op.kind == "read" and length != expected:
                self._fail(
                    conn,
                    RemoteError(f"{conn.address} sent {length} bytes for a range of {expected}"),
                )
            else:
                self._settle(conn, op)

        return done

    def _settle(self, conn: _Conn, op: _Op) -> None:
        if op.acked and op.pending == 0:
            conn.ops.pop(op.seq, None)
            self._finish(op, None)

    def _on_reply(self, conn: _Conn, kind: int, seq: int, tag: int, payload: bytes) -> None:
        op = conn.ops.get(seq)
        if op is None:
            return  # a batch that already failed
        if kind == _READY:
            for i, group in enumerate(_groups(op.buffers)):
                op.pending += 1
                self._send_tag(conn, group, tag + i, self._piece_done(conn, op, group))
            return
        reason = payload.decode(errors="replace")
        if reason:
            conn.ops.pop(seq, None)
            self._finish(op, RemoteError(f"{conn.address} rejected a {op.kind}: {reason}"))
            self._cancel(op.recvs)
            return
        op.acked = True
        self._settle(conn, op)

    # -- service thread: the receiving side ---------------------------------------------------

    def _views(self, payload: bytes) -> tuple[list[torch.Tensor], Optional[str]]:
        """Views of our regions for a plan of [region, offset, nbytes], or why it is invalid."""
        try:
            plan = json.loads(payload)
        except ValueError:
            return [], "malformed plan"
        return self._regions.views(plan)

    def _on_request(self, conn: _Conn, kind: int, seq: int, tag: int, payload: bytes) -> None:
        if kind == _HELLO:
            conn.address = payload.decode(errors="replace")
        elif kind == _NOTIFY:
            self._inbox.put(Notification(conn.address, payload))
            self._send_am(conn, _DONE, seq, 0, b"")
        elif kind == _PLAN_READ:
            views, error = self._views(payload)
            if error is None:
                for i, group in enumerate(_groups(views)):
                    self._send_tag(conn, group, tag + i, self._served(conn))
            self._send_am(conn, _DONE, seq, 0, (error or "").encode())
        elif kind == _PLAN_WRITE:
            views, error = self._views(payload)
            if error is not None:
                self._send_am(conn, _DONE, seq, 0, error.encode())
                return
            groups = _groups(views)
            first = self._take_tags(len(groups))
            batch = _Batch(len(groups) + 1)  # + 1 until READY is sent
            for i, group in enumerate(groups):
                landed = self._landed(conn, seq, batch, group)
                self._post_recv(group, first + i, conn.recvs, landed)
            self._send_am(conn, _READY, seq, first, b"")
            self._landed(conn, seq, batch, [])(_UCS_OK, 0)

    def _served(self, conn: _Conn) -> Callable[[int, int], None]:
        def done(status: int, _: int) -> None:
            if status != _UCS_OK and status != _UCS_ERR_CANCELED:
                self._fail(conn, self._lost(conn, status))

        return done

    def _landed(
        self, conn: _Conn, seq: int, batch: _Batch, group: list[torch.Tensor]
    ) -> Callable[[int, int], None]:
        expected = sum(t.numel() for t in group)

        def done(status: int, length: int) -> None:
            if conn.failed is not None:
                return
            if status != _UCS_OK:
                batch.error = batch.error or self._ucs.ucs_status_string(status).decode()
            elif length != expected:
                batch.error = batch.error or f"a range of {expected} bytes got {length}"
            batch.left -= 1
            if batch.left == 0:
                self._send_am(conn, _DONE, seq, 0, batch.error.encode())

        return done

    # -- service thread: UCX callbacks (run inside ucp_worker_progress) -----------------------

    def _on_am(self, _arg, header, header_len, data, length, param) -> int:
        try:
            if header_len != _HEADER.size or param[0].recv_attr & _AM_RECV_RNDV:
                logger.warning(
                    "kvtier transfer: dropped a foreign UCX active message on %s", self.address
                )
                return _UCS_OK
            kind, seq, tag = _HEADER.unpack(ctypes.string_at(header, header_len))
            payload = ctypes.string_at(data, length) if length else b""
            conn = (
                self._conns.get(param[0].reply_ep)
                if param[0].recv_attr & _AM_RECV_REPLY_EP
                else None
            )
            if conn is None or conn.failed is not None:
                return _UCS_OK
            if kind in (_READY, _DONE) and conn.outgoing:
                self._on_reply(conn, kind, seq, tag, payload)
            elif not conn.outgoing:
                self._on_request(conn, kind, seq, tag, payload)
        except Exception:
            logger.exception("kvtier transfer: dropped a UCX active message on %s", self.address)
        return _UCS_OK

    def _on_send_done(self, request, status, key) -> None:
        try:
            self._complete(request, status, 0, key)
        except Exception:
            logger.exception("kvtier transfer: a UCX send completion failed on %s", self.address)

    def _on_recv_done(self, request, status, info, key) -> None:
        try:
            self._complete(request, status, info[0].length, key)
        except Exception:
            logger.exception("kvtier transfer: a UCX receive completion failed on %s", self.address)

    def _on_error(self, _arg, ep, status) -> None:
        conn = self._conns.get(ep)
        if conn is not None:
            self._fail(conn, self._lost(conn, status))

    def _on_conn_request(self, conn_request, _arg) -> None:
        params = _EpParams(
            field_mask=_EP_FIELD_ERR_MODE | _EP_FIELD_ERR_HANDLER | _EP_FIELD_CONN_REQUEST,
            err_mode=_ERR_MODE_PEER,
            err_handler=_Callback(ctypes.cast(self._callbacks[1], ctypes.c_void_p), None),
            conn_request=conn_request,
        )
        ep = ctypes.c_void_p()
        status = self._ucp.ucp_ep_create(self._worker, ctypes.byref(params), ctypes.byref(ep))
        if status != _UCS_OK:
            logger.warning(
                "kvtier transfer: could not accept a UCX connection on %s: %s",
                self.address,
                self._ucs.ucs_status_string(status).decode(),
            )
            return
        self._conns[ep.value] = _Conn(ep.value, "(unknown peer)", outgoing=False)
