"""The ZMQ/TCP transport: writes and reads emulated by a receiver thread, always available.

Each endpoint binds one ROUTER socket that a background thread owns; it writes incoming pieces
straight into the registered region (``recv_into`` on a view of the destination, one copy out of
libzmq's buffer) and answers reads by sending views of the region. Callers reach a peer through
one DEALER socket per peer, used under a lock, sending views of their tensors (``copy=False``).
A batch is ``B`` (the plan: every piece's region, offset and size, checked against the region
before anything is written), ``D`` messages of up to ``PIECE_BYTES``, then ``C``, which the peer
acknowledges once every piece is in place. Everything on one DEALER arrives in order, which is
what orders a notification after the writes before it.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import zmq

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

PIECE_BYTES = 4 << 20
"""Payload per message: 256 MiB loopback writes moved 3-4 GB/s in 1-16 MiB pieces, 1.6 in 64 MiB."""

_POLL_MS = 50  # how soon the receiver thread sees close()
_SEQ = struct.Struct("<Q")
_PIECES = struct.Struct("<QQ")  # sequence number, index of the message's first piece
_ACK = struct.Struct("<QB")  # sequence number, 0 = done / 1 = rejected (reason follows)


class _Malformed(Exception):
    pass


@dataclass
class _Peer:
    address: str
    regions: dict[str, int]
    socket: Optional[zmq.Socket]
    lock: threading.Lock = field(default_factory=threading.Lock)
    seq: int = 0


@dataclass
class _Plan:
    """A write batch being received: destination views by piece index, or why it was rejected."""

    seq: int
    views: list[memoryview]
    error: Optional[str] = None


def _view(t: torch.Tensor) -> memoryview:
    return memoryview(t.numpy())


def _split(nbytes: int) -> range:
    return range(0, nbytes, PIECE_BYTES)


def _groups(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive pieces holding about PIECE_BYTES each."""
    runs, start, total = [], 0, 0
    for i, n in enumerate(sizes):
        if total and total + n > PIECE_BYTES:
            runs.append((start, i))
            start, total = i, 0
        total += n
    if start < len(sizes):
        runs.append((start, len(sizes)))
    return runs


def _plan(peer: "_Peer", ops: Sequence[tuple[str, int, torch.Tensor]], what: str, role: str) -> tuple[list, list]:
    """Checks (region, offset, local tensor) ranges against the peer's regions and cuts them
    into pieces of at most PIECE_BYTES: the JSON plan and the matching local memoryviews."""
    plan, pieces = [], []
    for name, offset, tensor in ops:
        data = as_bytes(tensor, role)
        error = check_range(peer.regions, name, offset, data.numel())
        if error:
            raise TransferError(f"{what}: {error}")
        for start in _split(data.numel()):
            piece = data[start : start + PIECE_BYTES]
            plan.append([name, offset + start, piece.numel()])
            pieces.append(_view(piece))
    return plan, pieces


class ZmqTransport(Transport):
    """Binds ``tcp://host:port`` (port 0: the OS picks); ``host`` must be what peers can reach."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.SNDHWM, 0)  # read replies are views, queueing costs no copy
        self._router.bind(f"tcp://{host}:{port}")
        self.address: str = self._router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._regions = HostRegions()
        self._peers: dict[str, _Peer] = {}
        self._peers_lock = threading.Lock()
        self._plans: dict[bytes, _Plan] = {}  # by sender identity; receiver thread only
        self._inbox = Inbox()
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(
            target=self._serve, name=f"kvtier-zmq {self.address}", daemon=True
        )
        self._thread.start()
        logger.info("kvtier transfer: ZMQ transport listening on %s", self.address)

    # -- receiver side -------------------------------------------------------------------------

    def register(self, name: str, region: torch.Tensor) -> None:
        self._regions.register(name, region)

    def deregister(self, name: str) -> None:
        self._regions.deregister(name)

    def descriptor(self) -> Descriptor:
        return {"backend": "zmq", "address": self.address, "regions": self._regions.sizes()}

    def recv_notification(self, timeout_s: float) -> Notification:
        return self._inbox.get(timeout_s, self.address)

    def _views(self, plan: list) -> tuple[list[memoryview], Optional[str]]:
        views, error = self._regions.views(plan)
        return [_view(v) for v in views], error

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                if self._router.poll(_POLL_MS):
                    self._handle()
        finally:
            self._router.close(linger=0)

    def _next(self) -> bytes:
        if not self._router.getsockopt(zmq.RCVMORE):
            raise _Malformed("message ended early")
        return self._router.recv()

    def _drain(self) -> None:
        while self._router.getsockopt(zmq.RCVMORE):
            self._router.recv_into(bytearray())

    def _ack(self, ident: bytes, seq: int, error: Optional[str]) -> None:
        status = _ACK.pack(seq, 0 if error is None else 1) + (error or "").encode()
        self._router.send_multipart([ident, b"A", status])

    def _handle(self) -> None:
        ident = self._router.recv()
        try:
            kind = self._next()
            header = self._next()
            if kind == b"D":
                self._receive_pieces(ident, *_PIECES.unpack(header))
            elif kind == b"B":
                (seq,) = _SEQ.unpack(header)
                views, error = self._views(json.loads(self._next()))
                self._plans[ident] = _Plan(seq, views, error)
            elif kind == b"C":
                (seq,) = _SEQ.unpack(header)
                plan = self._plans.pop(ident, None)
                begun = plan is not None and plan.seq == seq
                error = plan.error if begun else f"write batch {seq} was never begun"
                self._ack(ident, seq, error)
            elif kind == b"R":
                (seq,) = _SEQ.unpack(header)
                self._serve_read(ident, seq, json.loads(self._next()))
            elif kind == b"N":
                (seq,) = _SEQ.unpack(header)
                sender = ident.decode(errors="replace").rpartition("#")[0]
                self._inbox.put(Notification(sender, self._next()))
                self._ack(ident, seq, None)
            else:
                raise _Malformed(f"unknown message kind {kind!r}")
        except Exception as e:  # one peer's bad message must not stop serving the others
            logger.warning("kvtier transfer: dropped a malformed message from %r: %r", ident, e)
        finally:
            self._drain()

    def _receive_pieces(self, ident: bytes, seq: int, first: int) -> None:
        plan = self._plans.get(ident)
        if plan is None or plan.seq != seq or plan.error:
            return  # a rejected or abandoned batch: its frames are drained unread
        i = first
        while self._router.getsockopt(zmq.RCVMORE):
            if i >= len(plan.views):
                plan.error = f"write batch {seq} sent more pieces than it planned"
                return
            view = plan.views[i]
            got = self._router.recv_into(view)
            if got != len(view):
                plan.error = f"piece {i} of write batch {seq} has {got} bytes, planned {len(view)}"
                return
            i += 1

    def _serve_read(self, ident: bytes, seq: int, plan: list) -> None:
        views, error = self._views(plan)
        if error is None:
            for start, stop in _groups([len(v) for v in views]):
                frames = [ident, b"P", _PIECES.pack(seq, start), *views[start:stop]]
                self._router.send_multipart(frames, copy=False)
        self._ack(ident, seq, error)

    # -- sender side ---------------------------------------------------------------------------

    def connect(self, descriptor: Descriptor) -> str:
        if descriptor.get("backend") != "zmq":
            raise TransferError(
                f"peer descriptor is for backend {descriptor.get('backend')!r}; "
                "both ends must open the same transport backend"
            )
        address, regions = descriptor["address"], dict(descriptor["regions"])
        with self._peers_lock:
            check_open(self._closed, self.address)
            peer = self._peers.get(address)
            if peer is not None:
                peer.regions = regions
                return address
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a peer that is not connected
            sock.setsockopt(zmq.ROUTING_ID, f"{self.address}#{uuid.uuid4().hex[:8]}".encode())
            sock.connect(address)
            self._peers[address] = _Peer(address, regions, sock)
        return address

    def write(self, peer: str, ops: Sequence[WriteOp], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        p = self._peer(peer)
        plan, pieces = _plan(p, [(name, offset, src) for src, name, offset in ops], f"write to {peer}", "write source")
        with p.lock:
            seq = self._begin(p)
            self._send(p, [b"B", _SEQ.pack(seq), json.dumps(plan).encode()], deadline, "a write")
            for start, stop in _groups([len(v) for v in pieces]):
                frames = [b"D", _PIECES.pack(seq, start), *pieces[start:stop]]
                self._send(p, frames, deadline, "a write")
            self._send(p, [b"C", _SEQ.pack(seq)], deadline, "a write")
            self._wait_ack(p, seq, deadline, "a write", None)

    def read(self, peer: str, ops: Sequence[ReadOp], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        p = self._peer(peer)
        plan, pieces = _plan(p, ops, f"read from {peer}", "read destination")
        with p.lock:
            seq = self._begin(p)
            self._send(p, [b"R", _SEQ.pack(seq), json.dumps(plan).encode()], deadline, "a read")
            self._wait_ack(p, seq, deadline, "a read", pieces)

    def notify(self, peer: str, message: bytes, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        p = self._peer(peer)
        with p.lock:
            seq = self._begin(p)
            self._send(p, [b"N", _SEQ.pack(seq), bytes(message)], deadline, "a notification")
            self._wait_ack(p, seq, deadline, "a notification", None)

    def _peer(self, peer: str) -> _Peer:
        with self._peers_lock:
            return find_peer(self._peers, peer, self._closed, self.address)

    def _begin(self, p: _Peer) -> int:
        if p.socket is None:
            raise TransferError(
                f"the connection to {p.address} failed earlier; call connect(descriptor) again"
            )
        p.seq += 1
        return p.seq

    def _fail(self, p: _Peer, error: TransferError) -> TransferError:
        """Drops the connection: queued pieces must not land after the caller was told it failed."""
        with self._peers_lock:
            if self._peers.get(p.address) is p:
                del self._peers[p.address]
        if p.socket is not None:
            p.socket.close(linger=0)
            p.socket = None
        return error

    def _timeout(self, p: _Peer, what: str) -> TransferError:
        return self._fail(
            p,
            PeerTimeout(
                f"{p.address} did not complete {what} before the deadline; it may have died; "
                "call connect(descriptor) again once it is back"
            ),
        )

    def _send(self, p: _Peer, frames: list, deadline: float, what: str) -> None:
        assert p.socket is not None
        p.socket.setsockopt(zmq.SNDTIMEO, max(int((deadline - time.monotonic()) * 1000), 0))
        try:
            p.socket.send_multipart(frames, copy=False)
        except zmq.Again:
            raise self._timeout(p, what) from None

    def _wait_ack(
        self, p: _Peer, seq: int, deadline: float, what: str, dests: Optional[list[memoryview]]
    ) -> None:
        """Waits for the ack of ``seq``, receiving a read's pieces into ``dests`` on the way."""
        sock = p.socket
        assert sock is not None
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not sock.poll(remaining_ms):
                raise self._timeout(p, what)
            kind = sock.recv()
            header = sock.recv() if sock.getsockopt(zmq.RCVMORE) else b""
            if kind == b"A" and _ACK.unpack_from(header)[0] == seq:
                if header[_ACK.size - 1]:
                    raise RemoteError(f"{p.address} rejected {what}: {header[_ACK.size:].decode()}")
                return
            if kind == b"P" and dests is not None and _PIECES.unpack(header)[0] == seq:
                i = _PIECES.unpack(header)[1]
                while sock.getsockopt(zmq.RCVMORE):
                    if i >= len(dests) or sock.recv_into(dests[i]) != len(dests[i]):
                        error = f"{p.address} sent a piece {i} of {what} that was not asked for"
                        raise self._fail(p, RemoteError(error))
                    i += 1
            while sock.getsockopt(zmq.RCVMORE):  # keeps frame sync should a peer send anything else
                sock.recv_into(bytearray())

    def close(self) -> None:
        with self._peers_lock:
            if self._closed:
                return
            self._closed = True
            peers = list(self._peers.values())
            self._peers.clear()
        self._stop.set()
        self._thread.join()
        for p in peers:
            with p.lock:
                if p.socket is not None:
                    p.socket.close(linger=0)
                    p.socket = None
        self._regions.clear()
        self._plans.clear()
        self._ctx.term()
