"""A ``TierStore`` served to other processes over the transfer layer: the remote tier of ``launch.store``.

Requests and replies are JSON notifications; chunk bytes move one-sidedly between the client's
tensors and the server's CPU slab (registered as region ``slab``), so the server never copies them:

    hello   {token, chunk_bytes}  -> {regions}            (anything else first is refused)
    contains{keys}                -> {found: [bool]}
    get     {keys}                -> {lease, offsets}     client reads, then  release {lease}
    reserve {keys}                -> {lease, keys, offsets} client writes, then commit {lease}

Every request carries an ``id`` that its reply echoes. Chunks handed out are pinned by a store lease
until ``release``/``commit`` or the lease deadline, so a client that dies cannot pin them forever.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from typing import TYPE_CHECKING, Any

from kvtier.sglang_ext.tiers.cpu import Lease
from kvtier.transfer.base import PeerTimeout, TransferError, Transport

if TYPE_CHECKING:  # the store imports the client side of this protocol
    from kvtier.sglang_ext.tiers.store import TierStore

logger = logging.getLogger(__name__)


class StoreServer:
    """Answers store requests arriving on ``transport`` from clients that know ``token``."""

    def __init__(self, store: "TierStore", transport: Transport, token: str) -> None:
        self.store = store
        self.transport = transport
        self._token = token
        self._clients: set[str] = set()
        self._leases: dict[int, Lease] = {}
        self._next_lease = 1
        transport.register("slab", store.cpu.slab.tensor)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kvtier-store-server", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                note = self.transport.recv_notification(0.1)
            except PeerTimeout:
                continue
            try:
                request = json.loads(note.message)
                reply = self._handle(note.sender, request)
            except (ValueError, KeyError, TypeError) as exc:
                reply = {"error": f"malformed request: {exc}"}
                request = {}
            reply["id"] = request.get("id")
            try:
                peer = self.transport.connect({"backend": "zmq", "address": note.sender, "regions": {}})
                self.transport.notify(peer, json.dumps(reply).encode(), timeout_s=2.0)
            except TransferError as exc:
                logger.warning("kvtier store: could not answer %s: %s", note.sender, exc)

    def _handle(self, sender: str, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        if op == "hello":
            if not hmac.compare_digest(str(req.get("token", "")), self._token):
                logger.warning("kvtier store: refused %s: wrong token", sender)
                return {"error": "wrong token: set the token this store was started with"}
            if req.get("chunk_bytes") != self.store.chunk_bytes:
                return {"error": f"this store holds chunks of {self.store.chunk_bytes} bytes, the client's are {req.get('chunk_bytes')}"}
            self._clients.add(sender)
            return {"regions": self.transport.descriptor()["regions"]}
        if sender not in self._clients:
            return {"error": "say hello with the store's token first"}
        keys = [bytes.fromhex(k) for k in req.get("keys", [])]
        if op == "contains":
            cpu = self.store.cpu.contains(keys)
            disk = self.store.disk.contains(keys) if self.store.disk else [False] * len(keys)
            return {"found": [a or b for a, b in zip(cpu, disk)]}
        if op == "get":
            return self._hand_out(self.store.acquire(keys, wait_s=1.0))
        if op == "reserve":
            return self._hand_out(self.store.reserve(keys, wait_s=1.0))
        if op in ("release", "commit"):
            lease = self._leases.pop(int(req["lease"]), None)
            ok = lease is not None and (self.store.commit(lease) if op == "commit" else lease.release())
            return {"ok": bool(ok)}
        return {"error": f"unknown op {op!r}"}

    def _hand_out(self, lease: Lease) -> dict[str, Any]:
        base = self.store.cpu.slab.tensor.data_ptr()
        lease_id = self._next_lease
        self._next_lease += 1
        if lease.keys:
            self._leases[lease_id] = lease
        return {
            "lease": lease_id,
            "keys": [k.hex() for k in lease.keys],
            "offsets": [v.data_ptr() - base for v in lease.views],
        }

    def close(self) -> None:
        """Stop answering, release what clients still hold, then close the store (persisting it)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        for lease in self._leases.values():
            lease.release()
        self._leases.clear()
        self.transport.close()
        self.store.close()

