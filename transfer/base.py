"""The transport interface: registered regions, batched writes and reads, ordered notifications.

A receiver registers named regions once (contiguous 1-D uint8 tensors) and hands its
``descriptor()``, a JSON-serializable dict, to peers through any control channel. A peer
``connect``s with it and then, from its side one-sidedly, writes byte ranges into those regions,
reads ranges out of them, and sends notifications. Every call waits at most ``timeout_s``; a peer
that dies or hangs makes it raise ``PeerTimeout`` instead of blocking. A notification is delivered
only after every write that the same sender issued before it to the same peer is visible, so
"write the data, then notify" is safe. A batch that fails leaves its destination ranges undefined.
"""

from __future__ import annotations

import abc
import queue
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, TypeVar

import torch

Descriptor = dict[str, Any]
"""What a receiver publishes about itself: backend, address, and region sizes in bytes."""

WriteOp = tuple[torch.Tensor, str, int]
"""(source tensor, destination region name, byte offset in that region)."""

ReadOp = tuple[str, int, torch.Tensor]
"""(source region name, byte offset in that region, destination tensor)."""


class TransferError(RuntimeError):
    """A transfer failed; the message says which peer and what to change."""


class PeerTimeout(TransferError, TimeoutError):
    """A peer did not answer within the deadline (it died, hangs, or is unreachable)."""


class RemoteError(TransferError):
    """The peer refused the request; a batch refused at planning (region, range) wrote nothing."""


@dataclass(frozen=True)
class Notification:
    sender: str  # the sending transport's address
    message: bytes


def as_bytes(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """A flat uint8 view of a contiguous host tensor, sharing its memory."""
    if not tensor.is_contiguous():
        raise TransferError(f"{what} must be contiguous; pass tensor.contiguous()")
    if tensor.device.type != "cpu":
        raise TransferError(
            f"{what} is on {tensor.device}; this transport moves host memory, "
            "so stage device data through a pinned host buffer first"
        )
    return tensor.reshape(-1).view(torch.uint8)


def check_range(regions: dict[str, int], name: Any, offset: Any, nbytes: Any) -> str | None:
    """Why the byte range [offset, offset + nbytes) of region ``name`` is invalid, or None."""
    if not isinstance(name, str) or name not in regions:
        return f"unknown region {name!r}; registered: {sorted(regions)}"
    if not (isinstance(offset, int) and isinstance(nbytes, int)) or offset < 0 or nbytes < 0:
        return f"bad range offset={offset!r} nbytes={nbytes!r} in region {name!r}"
    if offset + nbytes > regions[name]:
        return (
            f"range [{offset}, {offset + nbytes}) is out of bounds of region {name!r} "
            f"({regions[name]} bytes)"
        )
    return None


def check_region(name: str, region: torch.Tensor) -> None:
    """Refuses a region that is not a 1-D uint8 tensor, as every backend's ``register`` must."""
    if region.dtype != torch.uint8 or region.dim() != 1:
        raise TransferError(
            f"region {name!r} must be a 1-D uint8 tensor, got {region.dtype} {tuple(region.shape)}; "
            "pass tensor.view(-1).view(torch.uint8)"
        )


class HostRegions:
    """The host-memory regions a transport receives into, by name, and the views that a peer's plan
    of ``[region, offset, nbytes]`` entries names (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._regions: dict[str, torch.Tensor] = {}

    def register(self, name: str, region: torch.Tensor) -> None:
        check_region(name, region)
        region = as_bytes(region, f"region {name!r}")
        with self._lock:
            if name in self._regions:
                raise TransferError(f"region {name!r} is already registered; deregister it first")
            self._regions[name] = region

    def deregister(self, name: str) -> None:
        with self._lock:
            if self._regions.pop(name, None) is None:
                raise TransferError(f"region {name!r} is not registered")

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {name: t.numel() for name, t in self._regions.items()}

    def views(self, plan: Any) -> tuple[list[torch.Tensor], Optional[str]]:
        """Views of the ranges ``plan`` names, or why it is invalid (then no views)."""
        if not isinstance(plan, list):
            return [], "malformed plan"
        with self._lock:
            sizes = {name: t.numel() for name, t in self._regions.items()}
            views = []
            for entry in plan:
                if not (isinstance(entry, list) and len(entry) == 3):
                    return [], f"malformed range {entry!r}"
                name, offset, nbytes = entry
                error = check_range(sizes, name, offset, nbytes)
                if error:
                    return [], error
                views.append(self._regions[name][offset : offset + nbytes])
        return views, None

    def clear(self) -> None:
        with self._lock:
            self._regions.clear()


class Inbox:
    """The notifications a transport received, in arrival order."""

    def __init__(self) -> None:
        self._queue: "queue.Queue[Notification]" = queue.Queue()

    def put(self, note: Notification) -> None:
        self._queue.put(note)

    def get(self, timeout_s: float, address: str) -> Notification:
        """The next one; ``PeerTimeout`` naming the transport's ``address`` if none comes in time."""
        try:
            return self._queue.get(timeout=max(timeout_s, 0.0))
        except queue.Empty:
            raise PeerTimeout(f"no notification reached {address} within {timeout_s}s") from None


P = TypeVar("P")


def find_peer(peers: Mapping[str, P], peer: str, closed: bool, address: str) -> P:
    """``peers[peer]`` of the transport at ``address``, refused once it is closed or before ``connect``."""
    check_open(closed, address)
    found = peers.get(peer)
    if found is None:
        raise TransferError(f"not connected to {peer!r}; call connect(descriptor) first")
    return found


def check_open(closed: bool, address: str) -> None:
    if closed:
        raise TransferError(f"transport {address} is closed; open a new one")


class Transport(abc.ABC):
    """One endpoint: it receives into its registered regions and writes to or reads from peers."""

    device_regions: bool = False
    """Whether regions and op tensors may live in GPU memory; when False they must be host memory."""

    @abc.abstractmethod
    def register(self, name: str, region: torch.Tensor) -> None:
        """Expose a contiguous 1-D uint8 tensor to peers as ``name``; keep it alive and in place."""

    @abc.abstractmethod
    def deregister(self, name: str) -> None:
        """Stop accepting transfers into and out of ``name``; later requests for it are rejected."""

    @abc.abstractmethod
    def descriptor(self) -> Descriptor:
        """What peers need to ``connect``, JSON-serializable; fetch it again after ``register``."""

    @abc.abstractmethod
    def connect(self, descriptor: Descriptor) -> str:
        """Prepare to talk to the peer described; returns the id that the other calls take."""

    @abc.abstractmethod
    def write(self, peer: str, ops: Sequence[WriteOp], timeout_s: float = 30.0) -> None:
        """Copy each source into the peer's region at its offset; returns once all are visible."""

    @abc.abstractmethod
    def read(self, peer: str, ops: Sequence[ReadOp], timeout_s: float = 30.0) -> None:
        """Copy each range of the peer's region into its destination; returns once all arrived."""

    @abc.abstractmethod
    def notify(self, peer: str, message: bytes, timeout_s: float = 30.0) -> None:
        """Deliver ``message`` after the writes before it; returns once the peer queued it."""

    @abc.abstractmethod
    def recv_notification(self, timeout_s: float) -> Notification:
        """The next notification sent to this endpoint; ``PeerTimeout`` if none comes in time."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release sockets, threads and registrations; safe to call more than once."""

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
