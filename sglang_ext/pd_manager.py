"""The per-rank half of kvtier's PD backend: ``KvtierKVManager`` and its protocol threads.

SGLang creates one manager per scheduler rank (``get_kv_class(..., MANAGER)``); the per-request
classes in ``pd_conn`` talk to it. It owns the transport, the pool views (``pd_io.Packer``) and
two threads per side:

- prefill: a control thread on SGLang's ZMQ PULL socket (decode registrations with their
  ``PDLayout``, request metadata, refusals, slot acks, aborts) and a worker that moves each queued
  chunk: gather its pages into the staging buffer, write them into a free slot of the decode's
  stage (a credit), notify ``K``; after the last chunk notify ``D``, which carries the request's
  metadata rows (one round trip, not a write and a notify), Success.
  On the direct path (cuda_ipc, same TP layout, the decode's KV buffers registered with its
  transport and reachable from this GPU; ``pd_layout.data_path`` decides at registration) the
  worker instead stores the chunk's pages into the decode's pages with one kernel launch through
  the mapped buffers, waits for it, and notifies ``K``: no staging, no credits, no acks. The ``K``
  of a last chunk rides in its ``D``: a one-chunk request costs the decode one message.
  With a decode of a larger TP size, each of the ``required_dst`` decode ranks of a request gets
  its own head slice (``_DecodePeer.src_heads``).
- decode: a control thread (refusals and failures from the prefill) and a notification thread
  that scatters each ``K`` slot into the request's pages (into the heads the note names when the
  prefill has a larger TP size), returns the slot (a direct ``K`` only counts the bytes already
  in its pages), puts the metadata rows of each ``D`` into the request's row, and marks Success
  once ``D`` came from every prefill rank the request needs (SGLang's ``required_prefill_response_num``).

Control messages are ZMQ multipart ``[tag, json, (pages)]`` on the peers' PULL sockets; the data
notifications go over the transport, whose ordering puts them after the writes they describe.
"""


from __future__ import annotations

import contextlib
import json
import logging
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import requests
import torch
import zmq
from sglang.srt.disaggregation.base.conn import KVArgs, KVPoll
from sglang.srt.disaggregation.common.conn import CommonKVManager, PrefillServerInfo
from sglang.srt.disaggregation.common.utils import FastQueue
from sglang.srt.disaggregation.utils import DisaggregationMode
from sglang.srt.utils.network import NetworkAddress

from kvtier.kernels.kv_pages import RowCopy
from kvtier.sglang_ext.config import load_config
from kvtier.sglang_ext.metrics import PDMetrics, pd_metrics_on
from kvtier.sglang_ext.pd_io import CopyTarget, Packer, staging_buffer, transport_kind, wrap_memory
from kvtier.transfer.backends import open_transport
from kvtier.transfer.base import TransferError
from kvtier.transfer.pd_heads import HeadSlice, head_range, head_slice
from kvtier.transfer.pd_layout import (
    DIRECT,
    STAGED,
    PDLayout,
    SlotCredits,
    compare,
    data_path,
    pool_regions,
    slot_bytes_for,
    slot_chunks,
)

logger = logging.getLogger(__name__)

REG, META, REFUSE, ACK, ABORT = b"KVTIER_REG", b"KVTIER_META", b"KVTIER_REFUSE", b"KVTIER_ACK", b"ABORT"
REFUSED, FAIL = b"KVTIER_REFUSED", b"KVTIER_FAIL"
_POLL_MS = 100


def control_message(tag: bytes, obj: dict, *extra: bytes) -> list[bytes]:
    """A control message: its tag, a JSON body, and binary parts (a page list)."""
    return [tag, json.dumps(obj).encode(), *extra]


_DONE_HEAD = struct.Struct("<I")


def done_message(head: dict, rows: list[torch.Tensor]) -> bytes:
    """A ``D`` notification: ``D``, the JSON head's length, the head, then the metadata rows (CPU
    uint8 tensors) back to back."""
    body = json.dumps(head).encode()
    return b"".join([b"D", _DONE_HEAD.pack(len(body)), body, *(r.numpy().tobytes() for r in rows)])


def metadata_rows(aux: list[torch.Tensor], item_lens: Sequence[int], index: int) -> list[torch.Tensor]:
    """Row ``index`` of each metadata buffer (a request's row: what ``D`` carries), as views."""
    return [t.view(-1, int(item))[index] for t, item in zip(aux, item_lens)]


def direct_note(room: int, stage: str, start: int, n: int) -> dict:
    """The ``K`` of a direct store: pages ``start .. start + n`` of the request are already in place."""
    return {"room": room, "stage": stage, "slot": None, "start": start, "n": n, "heads": None, "direct": True}


def parse_done(message: bytes) -> tuple[dict, memoryview]:
    """The head and the metadata rows of a ``done_message``."""
    end = 1 + _DONE_HEAD.size
    if len(message) < end:
        raise ValueError(f"a D notification of {len(message)} bytes is too short")
    (n,) = _DONE_HEAD.unpack_from(message, 1)
    if len(message) < end + n:
        raise ValueError(f"a D notification announces a {n}-byte head but has {len(message) - end} bytes after it")
    return json.loads(message[end : end + n]), memoryview(message)[end + n :]


@dataclass
class _DecodePeer:
    """A registered decode rank, as the prefill sees it."""

    endpoint: str  # its ZMQ PULL socket
    transport_peer: str
    stage: str
    slot_bytes: int
    pages_per_slot: int
    credits: SlotCredits
    src_heads: Optional[tuple[int, int, int]] = None
    """(start, stop, of) heads of this prefill rank's rows it gets; None: whole pages."""
    dst_heads: Optional[tuple[int, int, int]] = None
    """Where they go among its own heads; None: whole pages."""
    page_bytes: int = 0
    """Bytes of one packed page (of the slice) in its staging slots."""
    direct: Optional[list[str]] = None
    """On the direct path: the decode's KV buffers, as its transport regions; None: staged."""
    target: Optional[CopyTarget] = None
    """On the direct path: the mapped regions last handed out for ``direct`` and the copies into them
    (``Packer.copy_target``), reused while the transport hands out the same mappings."""

    @property
    def path(self) -> str:
        return STAGED if self.direct is None else DIRECT


@dataclass
class _Destination:
    """Where a request's KV goes: the decode peer, its pages after the prefix, its metadata row."""

    peer: str
    pages: np.ndarray
    aux_index: int
    required: int = 1
    """How many decode ranks (one per head slice) the request goes to."""


@dataclass
class Chunk:
    """One ``send`` of a request: prefill pages, their place among the destination pages, and the
    CUDA event after which the scheduler's KV writes are done."""

    room: int
    pages: np.ndarray
    index_slice: slice
    is_last: bool
    aux_index: Optional[int]
    event: Optional[object]


@dataclass
class Stage:
    """A staging area at the decode for one prefill rank."""

    name: str
    tensor: torch.Tensor
    slot_bytes: int
    prefill_endpoint: str


@dataclass
class PDStats:
    """Totals of this rank's KV movement (both directions count on the side that does the copy),
    mirrored into Prometheus counters when ``metrics`` is set."""

    bytes: int = 0
    pages: int = 0
    seconds: float = 0.0
    """Wall time of the thread moving KV (``kvtier_pd_busy_seconds``)."""
    requests: int = 0
    failures: int = 0
    role: str = ""
    path_bytes: dict[str, int] = field(default_factory=dict)
    """Of ``bytes``, by data path (direct, staged)."""
    peers: dict[str, int] = field(default_factory=dict)
    """Decode ranks registered, by data path (prefill)."""
    copy_seconds: dict[str, float] = field(default_factory=dict)
    """Of ``seconds``, the copies themselves, by data path (``Packer``'s timing: GPU time on CUDA,
    the torch copy's wall time on CPU)."""
    metrics: Optional[PDMetrics] = field(default=None, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_peer(self, path: str) -> None:
        with self.lock:
            self.peers[path] = self.peers.get(path, 0) + 1
        if self.metrics is not None:
            self.metrics.peers.labels(self.role, path).inc()

    def add(self, nbytes: int = 0, pages: int = 0, seconds: float = 0.0, requests: int = 0, failures: int = 0,
            path: str = "", copy_seconds: float = 0.0) -> None:
        with self.lock:
            self.bytes += nbytes
            self.pages += pages
            self.seconds += seconds
            self.requests += requests
            self.failures += failures
            if path and nbytes:
                self.path_bytes[path] = self.path_bytes.get(path, 0) + nbytes
            if path and copy_seconds:
                self.copy_seconds[path] = self.copy_seconds.get(path, 0.0) + copy_seconds
        m, role = self.metrics, self.role
        if m is not None:
            if path and nbytes:
                m.path_bytes.labels(role, path).inc(nbytes)
            if path and copy_seconds:
                m.copy.labels(role, path).inc(copy_seconds)
            for counter, value in ((m.bytes, nbytes), (m.pages, pages), (m.busy, seconds)):
                if value:
                    counter.labels(role).inc(value)
            if requests:
                m.requests.labels(role, "success").inc(requests)
            if failures:
                m.requests.labels(role, "failed").inc(failures)


@dataclass
class _Timing:
    """A request's transfer as the prefill times it: slots written and not yet acknowledged."""

    start: float
    in_flight: int = 0
    sent_at: Optional[float] = None  # when the last chunk went out


class KvtierKVManager(CommonKVManager):
    """One rank's end of kvtier PD: the transport, the pool views and the protocol threads."""

    def __init__(self, args: KVArgs, disaggregation_mode: DisaggregationMode, server_args,
                 is_mla_backend: bool = False):
        if is_mla_backend or getattr(args, "state_types", None) or getattr(args, "is_hybrid_mla_backend", False):
            raise ValueError("--disaggregation-transfer-backend kvtier supports MHA KV pools only (not MLA, hybrid, "
                             "SWA or Mamba models); use mooncake or nixl for this model")
        super().__init__(args, disaggregation_mode, server_args, is_mla_backend)
        self.cfg = load_config()
        if self.cfg.pd_switch_interval_ms > 0:
            sys.setswitchinterval(self.cfg.pd_switch_interval_ms / 1e3)
            logger.info("kvtier PD: Python thread switch interval set to %g ms", self.cfg.pd_switch_interval_ms)
        on_gpu = str(server_args.device).startswith("cuda")
        self.device = torch.device(f"cuda:{args.gpu_id}") if on_gpu else torch.device("cpu")
        self.transport_kind = transport_kind(self.cfg, self.device)
        self.transport = open_transport(self.transport_kind, self.local_ip, 0)
        self.on_device = bool(self.transport.device_regions) and self.device.type == "cuda"
        self.packer = Packer(args.kv_data_ptrs, args.kv_data_lens, args.kv_item_lens, args.page_size, self.device)
        self.slot_bytes = slot_bytes_for(int(self.cfg.pd_stage_slot_mb * (1 << 20)), self.packer.page_bytes)
        self.timeout_s = self.cfg.pd_timeout_s
        self.aux = [wrap_memory(p, n, torch.device("cpu")) for p, n in zip(args.aux_data_ptrs, args.aux_data_lens)]
        prefill = disaggregation_mode == DisaggregationMode.PREFILL
        self.stats = PDStats(role="prefill" if prefill else "decode", metrics=self._open_metrics(args))
        self.room_seconds: dict[int, float] = {}
        self._timing_lock = threading.Lock()
        self.timings: dict[int, _Timing | float] = {}  # prefill: room -> its transfer; decode: first slot's time
        self.slot_rooms: dict[tuple[str, int], int] = {}  # prefill: (decode peer, slot) -> room written there
        address = (f"{self.bootstrap_host}:{self.bootstrap_port}" if prefill else f"{self.local_ip}:{self.rank_port}")
        self.layout = PDLayout(
            role="prefill" if prefill else "decode", address=address,
            model=self.cfg.pd_model_id or _model_id(server_args),
            kv_dtype=str(args.kv_cache_dtype_str), page_size=int(args.page_size), tp_size=self.attn_tp_size,
            tp_rank=int(args.engine_rank) % self.attn_tp_size, total_kv_heads=_total_kv_heads(args, self.attn_tp_size),
            pp_size=self.pp_size, cp_size=self.attn_cp_size, transport=self.transport_kind,
            kv_item_lens=tuple(int(x) for x in args.kv_item_lens),
            aux_item_lens=tuple(int(x) for x in args.aux_item_lens),
        )
        self._status_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve_socket, name="kvtier-pd-control", daemon=True)]
        if prefill:
            self.peers: dict[str, _DecodePeer] = {}
            self.refused: dict[str, str] = {}
            self.early_failures: dict[int, str] = {}
            self.queue = FastQueue()
            self.gather_buf = staging_buffer(self.slot_bytes, self.device, self.on_device)
            self._threads.append(threading.Thread(target=self._serve_queue, name="kvtier-pd-send", daemon=True))
        else:
            self.rooms: dict[int, tuple[set[str], np.ndarray]] = {}
            self.stages: dict[str, Stage] = {}
            self.stage_lock = threading.Lock()
            self.refused_addrs: dict[str, str] = {}
            self.refused_endpoints: dict[tuple[str, int], str] = {}
            self.refused_peers: dict[str, str] = {}
            self.direct_offer = self._offer_pool()
            self._threads.append(threading.Thread(target=self._serve_notifications, name="kvtier-pd-recv", daemon=True))
            self._start_heartbeat_checker_thread()
        for t in self._threads:
            t.start()

    # -- shared ---------------------------------------------------------------------------------

    def _open_metrics(self, args: KVArgs) -> Optional[PDMetrics]:
        """The PD counters on ``metrics_port`` + this rank, or None where metrics are off."""
        if not self.cfg.metrics_port:
            return None
        port = self.cfg.metrics_port + int(args.engine_rank)
        try:
            return pd_metrics_on(port)
        except OSError as e:  # metrics are no reason to refuse serving (a by-hand PD pair may share one config)
            logger.warning("kvtier PD: no PD metrics: cannot serve them on port %d (%s); give this server another "
                           "metrics_port (KVTIER_METRICS_PORT), e.g. where prefill and decode share a host", port, e)
            return None

    def fail(self, room: int, why: str) -> None:
        """Fail ``room`` with ``why`` unless it already succeeded or failed (the first reason stays)."""
        with self._status_lock:
            if self.request_status.get(room) in (KVPoll.Success, KVPoll.Failed):
                return
            self.record_failure(room, why)
            self.update_status(room, KVPoll.Failed)
        self.stats.add(failures=1)
        self.forget(room)

    def forget(self, room: int, unfinished_only: bool = False) -> None:
        """Drop ``room``'s transfer timing; with ``unfinished_only`` not one whose last chunk went out
        (its acknowledgements are still counted)."""
        with self._timing_lock:
            t = self.timings.get(room)
            if t is not None and not (unfinished_only and isinstance(t, _Timing) and t.sent_at is not None):
                del self.timings[room]

    def _observe(self, seconds: float) -> None:
        if self.stats.metrics is not None:
            self.stats.metrics.transfer.labels(self.stats.role).observe(seconds)

    def succeed(self, room: int) -> None:
        """Mark ``room`` done unless it failed meanwhile (update_status would overwrite Failed)."""
        with self._status_lock:
            if self.request_status.get(room) not in (None, KVPoll.Failed):
                self.update_status(room, KVPoll.Success)

    def send_control(self, endpoint: str, frames: list[bytes]) -> None:
        """Best effort and never blocking: a control message to a peer's ZMQ socket. A peer that is
        gone drops it at once (it is found dead by the heartbeat or a deadline), so neither the
        scheduler nor a protocol thread waits on it."""
        try:
            sock = self._connect(endpoint)
            with self._socket_send_locks[endpoint]:
                sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.warning("kvtier PD: could not send %s to %s: %s", frames[0].decode(), endpoint, e)

    def _bind_device(self) -> None:
        """A new thread's current CUDA device is 0; kernels must launch on the pool's GPU."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _serve_socket(self) -> None:
        handlers = ({REG: self._on_register, META: self._on_metadata, REFUSE: self._on_refuse, ACK: self._on_ack,
                     ABORT: self._on_abort} if self.disaggregation_mode == DisaggregationMode.PREFILL
                    else {REFUSED: self._on_refused, FAIL: self._on_fail})
        while not self._stop.is_set():
            if not self.server_socket.poll(_POLL_MS):
                continue
            frames = self.server_socket.recv_multipart()
            handler = handlers.get(frames[0])
            try:
                if handler is None:
                    raise ValueError(f"unknown message {frames[0][:32]!r}")
                handler(frames)
            except Exception:  # a bad message must not stop the thread serving every request
                logger.exception("kvtier PD: dropped a %r message", frames[0][:32])

    def close(self) -> None:
        """Stop the threads and the transport (tests; SGLang never closes a manager)."""
        self._stop.set()
        if self.disaggregation_mode == DisaggregationMode.PREFILL:
            self.queue.put(None)
        for t in self._threads:
            t.join()
        self.transport.close()

    # -- prefill: control -------------------------------------------------------------------------

    def _on_register(self, frames: list[bytes]) -> None:
        msg = json.loads(frames[1])
        peer_id, remote = msg["peer"], PDLayout.from_dict(msg["layout"])
        endpoint = NetworkAddress(msg["ip"], int(msg["port"])).to_tcp()
        why = compare(self.layout, remote)
        heads = None
        if why is None and remote.tp_size != self.layout.tp_size:
            heads, why = self._heads_for(remote)
        transport_peer = None
        path, reason = data_path(self.transport_kind, msg.get("direct"), len(self.packer.views), heads is not None)
        if path == DIRECT and not self.cfg.pd_direct:
            path, reason = STAGED, "pd_direct is off in this prefill's config"
        if why is None and path == DIRECT:
            try:
                self._reach_pool(msg["descriptor"], msg["direct"]["regions"])
            except TransferError as e:
                path, reason = STAGED, f"this prefill cannot store into the decode's pool: {e}"
        if why is None:
            try:
                if path == DIRECT:  # mapped on this GPU: the copy kernel runs here
                    transport_peer = self.transport.connect(msg["descriptor"], map_device=self.device.index)
                else:
                    transport_peer = self.transport.connect(msg["descriptor"])
            except TransferError as e:
                why = (f"kvtier PD: cannot reach decode {remote.address} over {self.transport_kind} ({e}); "
                       f"cuda_ipc works within one host only, set pd_transport: zmq for servers on different hosts")
        if why is not None:
            self.refused[peer_id] = why
            logger.error("%s", why)
            refusal = {"peer": peer_id, "layout": self.layout.to_dict(), "reason": why}
            self.send_control(endpoint, control_message(REFUSED, refusal))
            return
        self.refused.pop(peer_id, None)
        direct = target = None
        if path == DIRECT:
            try:
                direct = msg["direct"]["regions"]
                regions = self.transport.peer_regions(transport_peer, direct)
                target = self.packer.reuse_target(None, regions)
            except (TransferError, ValueError, RuntimeError) as e:
                path, reason, direct = STAGED, f"this prefill cannot store into the decode's pool: {e}", None
        old = self.peers.get(peer_id)
        if old is not None and old.slot_bytes == msg["slot_bytes"] and old.credits.n_slots == msg["slots"]:
            old.transport_peer = transport_peer
            if old.path != path:
                logger.info("kvtier PD: decode %s now uses the %s path (%s)", remote.address, path, reason)
                self.stats.add_peer(path)
            old.direct, old.target = direct, target
            return
        slot_bytes = int(msg["slot_bytes"])
        src_heads = dst_heads = None
        if heads is not None:
            src_heads = None if heads.src_full else (*heads.src, heads.src_heads)
            dst_heads = None if heads.dst_full else (*heads.dst, heads.dst_heads)
        page_bytes = self.packer.packed_bytes(src_heads)
        self.peers[peer_id] = _DecodePeer(
            endpoint, transport_peer, msg["stage"], slot_bytes,
            min(self.slot_bytes, slot_bytes) // page_bytes, SlotCredits(int(msg["slots"])), src_heads, dst_heads,
            page_bytes, direct, target,
        )
        self.stats.add_peer(path)
        logger.info("kvtier PD: decode %s registered: %s, page %d B x %d KV buffers, transport %s, %s path (%s), "
                    "stage %d x %.1f MiB%s", remote.address, remote.model, page_bytes, len(self.layout.kv_item_lens),
                    self.transport_kind, path, reason, msg["slots"], slot_bytes / (1 << 20),
                    "" if heads is None else f", KV heads {heads.heads} (decode TP rank {remote.tp_rank} of "
                    f"{remote.tp_size}, this prefill rank {self.layout.tp_rank} of {self.layout.tp_size})")

    def _reach_pool(self, descriptor: dict, names: list[str]) -> None:
        """Lets kernels on this prefill's GPU store into the GPUs holding the decode's KV buffers
        ``names`` (peer access). ``connect(map_device=...)`` would enable it too, but fails the whole
        registration where it cannot; checked first, such a decode falls back to the staged path."""
        from kvtier.transfer.cuda_ipc import descriptor_devices, enable_peer_access

        for device in descriptor_devices(descriptor, names):
            enable_peer_access(self.device.index, device)

    def _heads_for(self, remote: PDLayout) -> tuple[Optional[HeadSlice], Optional[str]]:
        """(the heads this prefill rank and decode rank ``remote`` of another TP size share, or why none)."""
        me, total = self.layout, self.layout.total_kv_heads
        if total is None or remote.tp_rank is None:
            return None, (f"kvtier PD: decode {remote.address} has attention tp_size={remote.tp_size}, this prefill "
                          f"has {me.tp_size}, and the KV head count or TP rank is unknown here; start both with the "
                          f"same --tp")
        try:
            heads = head_slice(head_range(total, me.tp_size, me.tp_rank), head_range(total, remote.tp_size,
                                                                                     remote.tp_rank))
        except ValueError as e:
            return None, f"kvtier PD: decode {remote.address} cannot take KV heads from this prefill rank: {e}"
        if heads is None:
            return None, (f"kvtier PD: decode {remote.address} (attention TP rank {remote.tp_rank} of "
                          f"{remote.tp_size}) shares no KV head with this prefill rank ({me.tp_rank} of {me.tp_size})")
        return heads, None

    def _on_metadata(self, frames: list[bytes]) -> None:
        msg = json.loads(frames[1])
        room, peer_id = int(msg["room"]), msg["peer"]
        why = self.refused.get(peer_id)
        if why is None and peer_id not in self.peers:
            why = f"kvtier PD: decode {peer_id} sent request {room} without registering its KV layout first"
        if why is not None:
            self._fail_early(room, why)
            endpoint = NetworkAddress(msg["ip"], int(msg["port"])).to_tcp()
            self.send_control(endpoint, control_message(FAIL, {"room": room, "reason": why}))
            return
        pages = np.frombuffer(frames[2], dtype=np.int32).astype(np.int64)
        dsts = self.transfer_infos.setdefault(room, {})
        dsts[peer_id] = _Destination(peer_id, pages, int(msg["aux_index"]), int(msg.get("required_dst", 1)))
        if len(dsts) >= dsts[peer_id].required:
            self.req_to_decode_prefix_len[room] = int(msg["prefix_len"])
            self.update_status(room, KVPoll.WaitingForInput)

    def _on_refuse(self, frames: list[bytes]) -> None:
        msg = json.loads(frames[1])
        remote = PDLayout.from_dict(msg["layout"])
        why = (compare(self.layout, remote)
               or f"kvtier PD: decode {remote.address} refused this prefill: {msg['reason']}")
        logger.error("%s", why)
        self._fail_early(int(msg["room"]), why)

    def _on_ack(self, frames: list[bytes]) -> None:
        msg = json.loads(frames[1])
        peer = self.peers.get(msg["peer"])
        if peer is not None:
            self._slot_acked(msg["peer"], int(msg["slot"]))
            peer.credits.give(int(msg["slot"]))

    def _started(self, room: int) -> _Timing:
        """``room``'s timing, started now if it is its first write; call with ``_timing_lock`` held."""
        t = self.timings.get(room)
        if t is None:
            now = time.perf_counter()
            # Entries whose acknowledgements never came (a decode gone after the last write).
            for old in [r for r, x in self.timings.items() if x.sent_at is not None and
                        now - x.sent_at > self.timeout_s]:
                del self.timings[old]
            t = self.timings[room] = _Timing(now)
        return t

    def _slot_written(self, room: int, peer_id: str, slot: int) -> None:
        with self._timing_lock:
            self._started(room).in_flight += 1
            self.slot_rooms[(peer_id, slot)] = room

    def _slot_acked(self, peer_id: str, slot: int) -> None:
        with self._timing_lock:
            room = self.slot_rooms.pop((peer_id, slot), None)
            t = self.timings.get(room)
            if t is None:
                return
            t.in_flight -= 1
            done = t.sent_at is not None and t.in_flight == 0
            if done:
                del self.timings[room]
        if done:
            self._observe(time.perf_counter() - t.start)

    def _last_chunk_sent(self, room: int) -> None:
        with self._timing_lock:
            t = self.timings.get(room)
            if t is None:  # no page moved (the decode held the whole prompt): nothing to time
                return
            t.sent_at = time.perf_counter()
            done = t.in_flight == 0
            if done:
                del self.timings[room]
        if done:
            self._observe(t.sent_at - t.start)

    def _on_abort(self, frames: list[bytes]) -> None:
        room = int(frames[1].decode("ascii"))
        if room in self.request_status or room in self.transfer_infos:
            self._fail_early(room, f"kvtier PD: the decode server aborted request {room}")

    def tell_decode(self, room: int, why: str) -> None:
        """Tell the decode ranks of ``room`` that are known that the request failed and why."""
        for dst in list(self.transfer_infos.get(room, {}).values()):
            peer = self.peers.get(dst.peer)
            if peer is not None:
                self.send_control(peer.endpoint, control_message(FAIL, {"room": room, "reason": why}))

    def _fail_early(self, room: int, why: str) -> None:
        """Fail ``room`` now, or when its sender is created if the scheduler has not made it yet."""
        if room in self.request_status:
            self.fail(room, why)
        else:
            self.early_failures[room] = why
            self.record_failure(room, why)

    # -- prefill: data ------------------------------------------------------------------------------

    def add_chunk(self, chunk: Chunk) -> None:
        self.queue.put(chunk)

    def _serve_queue(self) -> None:
        self._bind_device()
        while True:
            chunk = self.queue.get()
            if chunk is None:
                return
            try:
                self._transfer(chunk)
            except Exception as e:
                why = f"kvtier PD: sending KV of request {chunk.room} failed: {e}"
                logger.error("%s", why)
                self.fail(chunk.room, why)
                self.tell_decode(chunk.room, why)

    def _transfer(self, chunk: Chunk) -> None:
        room = chunk.room
        if self.request_status.get(room, KVPoll.Failed) == KVPoll.Failed:
            return
        start = time.perf_counter()
        dsts = sorted(self.transfer_infos[room].values(), key=lambda d: d.peer)
        held: dict[str, dict] = {}
        for dst in dsts:
            if not self._send_to(chunk, dst, held):
                return
        if chunk.is_last:
            # D only once every decode rank has its pages: none reports Success while another fails.
            for dst in dsts:
                self._send_done(chunk, dst, held.get(dst.peer))
            self._last_chunk_sent(room)
        seconds = time.perf_counter() - start
        self.stats.add(seconds=seconds, requests=int(chunk.is_last))
        self.room_seconds[room] = self.room_seconds.get(room, 0.0) + seconds
        if chunk.is_last:
            self.succeed(room)

    def _send_to(self, chunk: Chunk, dst: _Destination, held: dict[str, dict]) -> bool:
        """Move ``chunk`` to one decode rank (its head slice); False if the request failed meanwhile.
        On the direct path the ``K`` of a last chunk is left in ``held`` for its ``D`` to carry."""
        room = chunk.room
        peer = self.peers[dst.peer]
        dst_pages = dst.pages[chunk.index_slice]
        src = chunk.pages[: len(dst_pages)]
        if peer.direct is not None:
            if self.request_status.get(room, KVPoll.Failed) == KVPoll.Failed:
                return False
            if len(src):
                note = self._send_direct(chunk, peer, src, dst_pages)
                if chunk.is_last:  # one message to the decode instead of two round trips
                    held[dst.peer] = note
                else:
                    self.transport.notify(peer.transport_peer, b"K" + json.dumps(note).encode(),
                                          timeout_s=self.timeout_s)
            return True
        for first, n in slot_chunks(len(src), peer.pages_per_slot):
            if self.request_status.get(room, KVPoll.Failed) == KVPoll.Failed:
                return False
            deadline = time.monotonic() + self.timeout_s
            slot = peer.credits.take(self.timeout_s)
            try:
                self._slot_written(room, dst.peer, slot)
                copy_s = self.packer.gather(src[first : first + n], self.gather_buf, chunk.event, peer.src_heads)
                nbytes = n * peer.page_bytes
                op = (self.gather_buf[:nbytes], peer.stage, slot * peer.slot_bytes)
                self.transport.write(peer.transport_peer, [op], timeout_s=max(deadline - time.monotonic(), 0.001))
                note = {"room": room, "stage": peer.stage, "slot": slot, "start": chunk.index_slice.start + first,
                        "n": n, "heads": peer.dst_heads}
                self.transport.notify(peer.transport_peer, b"K" + json.dumps(note).encode(), timeout_s=self.timeout_s)
            except BaseException:
                self._slot_acked(dst.peer, slot)
                peer.credits.give(slot)
                raise
            self.stats.add(nbytes=nbytes, pages=n, path=STAGED, copy_seconds=copy_s)
        return True

    def _send_direct(self, chunk: Chunk, peer: _DecodePeer, src: np.ndarray, dst_pages: np.ndarray) -> dict:
        """Store ``src`` into the decode's ``dst_pages`` through its mapped pool; returns the ``K``
        note that tells the decode (to be sent only now that the copy has completed)."""
        room, n = chunk.room, len(src)
        with self._timing_lock:
            self._started(room)
        copy_s = self.packer.copy_rows(src, self._direct_target(peer), dst_pages, chunk.event)
        self.stats.add(nbytes=n * peer.page_bytes, pages=n, path=DIRECT, copy_seconds=copy_s)
        return direct_note(room, peer.stage, chunk.index_slice.start, n)

    def _direct_target(self, peer: _DecodePeer) -> list[RowCopy]:
        """The decode's pool as ``copy_rows``' target. Asks the transport each time, which refuses a dead decode
        or a deregistered pool before the launch (the mapping keeps the memory alive until we drop
        it, so a decode that dies during the copy cannot fault it); the target is rebuilt only when
        it hands out other mappings than last time."""
        try:
            regions = self.transport.peer_regions(peer.transport_peer, peer.direct)
        except TransferError:
            peer.target = None  # holding the mappings would keep a dead decode's pool allocated
            raise
        peer.target = self.packer.reuse_target(peer.target, regions)
        return peer.target[1]

    def _send_done(self, chunk: Chunk, dst: _Destination, kv: Optional[dict] = None) -> None:
        """Notify ``D`` to one decode rank, carrying the request's metadata rows (and the last
        chunk's ``K`` note ``kv``, if held back): one round trip where a write, a ``K`` and a ``D``
        took three."""
        peer = self.peers[dst.peer]
        rows = metadata_rows(self.aux, self.kv_args.aux_item_lens, chunk.aux_index)
        head = {"room": chunk.room, "stage": peer.stage, "aux_index": dst.aux_index}
        if kv is not None:
            head["kv"] = kv
        self.transport.notify(peer.transport_peer, done_message(head, rows), timeout_s=self.timeout_s)

    # -- decode ---------------------------------------------------------------------------------------

    def try_ensure_parallel_info(self, bootstrap_addr: str) -> bool:
        """SGLang's check, except that a mismatch fails the requests with a message instead of
        raising (which would stop the decode scheduler)."""
        if bootstrap_addr in self.prefill_info_table:
            return True
        url = f"http://{bootstrap_addr}/route?prefill_dp_rank=-1&prefill_cp_rank=-1&target_tp_rank=-1&target_pp_rank=-1"
        try:
            response = requests.get(url, timeout=5)
        except requests.RequestException as e:
            logger.error("kvtier PD: cannot reach the prefill bootstrap server %s: %s", bootstrap_addr, e)
            return False
        if response.status_code != 200:
            logger.error("kvtier PD: prefill bootstrap server %s answered %s: %s", bootstrap_addr,
                         response.status_code, response.text)
            return False
        info = PrefillServerInfo(**response.json())
        remote = PDLayout(role="prefill", address=bootstrap_addr, kv_dtype=info.kv_cache_dtype,
                          page_size=info.page_size, tp_size=info.attn_tp_size, pp_size=info.pp_size,
                          cp_size=info.attn_cp_size)
        why = compare(self.layout, remote)
        if why is not None:
            logger.error("%s", why)
            self.refused_addrs[bootstrap_addr] = why
        else:
            self._resolve_rank_mapping(info)
        self.prefill_info_table[bootstrap_addr] = info
        return True

    def _handle_node_failure(self, failed_bootstrap_addr: str) -> None:
        self.refused_addrs.pop(failed_bootstrap_addr, None)  # a restarted prefill is checked again
        for key in [k for k in self.refused_endpoints if k[0] == failed_bootstrap_addr]:
            del self.refused_endpoints[key]
        super()._handle_node_failure(failed_bootstrap_addr)

    def stage_for(self, rank_ip: str, rank_port: int) -> Stage:
        """The staging area for one prefill rank, allocated and registered on first use."""
        endpoint = NetworkAddress(rank_ip, int(rank_port)).to_tcp()
        name = f"stage/{rank_ip}:{rank_port}"
        with self.stage_lock:
            stage = self.stages.get(name)
            if stage is None:
                tensor = staging_buffer(self.cfg.pd_stage_slots * self.slot_bytes, self.device, self.on_device)
                self.transport.register(name, tensor)
                stage = self.stages[name] = Stage(name, tensor, self.slot_bytes, endpoint)
                logger.info("kvtier PD: staging for prefill rank %s:%s: %d x %.1f MiB on %s, transport %s, "
                            "layout %s", rank_ip, rank_port, self.cfg.pd_stage_slots, self.slot_bytes / (1 << 20),
                            tensor.device, self.transport_kind, self.layout)
        return stage

    def _offer_pool(self) -> Optional[dict]:
        """Registers this decode's KV buffers with its transport for the direct path; returns the
        ``direct`` field of its registrations (None where the transport cannot map GPU memory)."""
        if not (self.on_device and self.transport_kind == "cuda_ipc"):
            return None
        names = pool_regions(len(self.packer.views))
        try:
            for name, view in zip(names, self.packer.views):
                self.transport.register(name, view.view(-1))
        except TransferError as e:
            for name in names:
                with contextlib.suppress(TransferError):
                    self.transport.deregister(name)
            logger.warning("kvtier PD: this decode's KV pool cannot be exported for direct writes (%s); prefill "
                           "ranks will send through staging", e)
            return {"error": str(e)}
        return {"regions": names}

    def peer_id(self, stage: Stage) -> str:
        return f"{self.local_ip}:{self.rank_port}>{stage.name}"

    def _on_refused(self, frames: list[bytes]) -> None:
        msg = json.loads(frames[1])
        remote = PDLayout.from_dict(msg["layout"])
        why = compare(self.layout, remote) or msg["reason"]
        logger.error("%s", why)
        self.refused_peers[msg["peer"]] = why
        for room, (peers, _) in list(self.rooms.items()):
            if msg["peer"] in peers:
                self.fail(room, why)

    def _on_fail(self, frames: list[bytes]) -> None:
        msg = json.loads(frames[1])
        self.fail(int(msg["room"]), msg["reason"])

    def _serve_notifications(self) -> None:
        self._bind_device()
        while not self._stop.is_set():
            try:
                note = self.transport.recv_notification(_POLL_MS / 1000)
            except TransferError:
                continue
            try:
                kind = note.message[:1]
                if kind == b"K":
                    self._on_kv(json.loads(note.message[1:]))
                elif kind == b"D":
                    self._on_done(*parse_done(note.message))
                else:
                    raise ValueError(f"unknown notification {note.message[:32]!r}")
            except Exception:
                logger.exception("kvtier PD: dropped a notification from %s", note.sender)

    def _on_done(self, msg: dict, rows: memoryview) -> None:
        """A prefill rank's last message of a request: its held ``K``, the metadata rows, ``D``."""
        room = int(msg["room"])
        if msg.get("kv") is not None:
            self._on_kv(msg["kv"])
        if room not in self.rooms or self.request_status.get(room) == KVPoll.Failed:
            return  # cleared or aborted here (its metadata row may be another's by now), or failed
        try:
            self._write_aux(int(msg["aux_index"]), rows)
        except ValueError as e:
            self.fail(room, f"kvtier PD: the metadata of request {room} from the prefill does not fit this "
                            f"decode: {e}")
            return
        if self._all_prefill_ranks_done(room, msg["stage"]):
            self.succeed(room)
            self.stats.add(requests=1)
            with self._timing_lock:
                first = self.timings.pop(room, None)
            if first is not None:
                self._observe(time.perf_counter() - first)

    def _write_aux(self, index: int, rows: memoryview) -> None:
        """Put one request's metadata rows (one per metadata buffer, back to back) at ``index``."""
        items = [int(x) for x in self.kv_args.aux_item_lens]
        if len(rows) != sum(items):
            raise ValueError(f"{len(rows)} bytes of metadata rows, this decode's rows take {sum(items)} "
                             f"({items}); start both servers with the same model and arguments")
        n_rows = min(t.numel() // item for t, item in zip(self.aux, items))
        if not 0 <= index < n_rows:
            raise ValueError(f"metadata row {index} is outside this decode's {n_rows} rows")
        offset = 0
        for row, item in zip(metadata_rows(self.aux, items, index), items):
            row.numpy()[:] = np.frombuffer(rows, np.uint8, item, offset)
            offset += item

    def _all_prefill_ranks_done(self, room: int, stage: str) -> bool:
        """Count ``stage``'s prefill rank as done with ``room``; whether every rank it needs is."""
        done = self.prefill_response_tracker[room]
        done.add(stage)
        return len(done) >= self.required_prefill_response_num_table.get(room, 1)

    def _on_kv(self, msg: dict) -> None:
        room, stage = int(msg["room"]), self.stages[msg["stage"]]
        start, n, direct = int(msg["start"]), int(msg["n"]), bool(msg.get("direct"))
        slot = None if direct else int(msg["slot"])
        try:
            entry = self.rooms.get(room)
            if entry is not None and self.request_status.get(room) not in (None, KVPoll.Failed):
                begin = time.perf_counter()
                with self._timing_lock:
                    self.timings.setdefault(room, begin)
                pages = entry[1][start : start + n]
                if len(pages) != n:
                    raise TransferError(f"prefill sent pages {start}..{start + n} but the request has {len(entry[1])}")
                heads = tuple(msg["heads"]) if msg.get("heads") else None
                copy_s = 0.0
                if not direct:  # a direct K follows a copy into these pages that has completed
                    copy_s = self.packer.scatter(stage.tensor, slot * stage.slot_bytes, pages, heads)
                self.stats.add(nbytes=n * self.packer.packed_bytes(heads), pages=n,
                               seconds=time.perf_counter() - begin, path=DIRECT if direct else STAGED,
                               copy_seconds=copy_s)
        except Exception as e:
            self.fail(room, f"kvtier PD: writing KV of request {room} into the decode pool failed: {e}")
        finally:
            if not direct:
                self.send_control(stage.prefill_endpoint,
                                  control_message(ACK, {"peer": self.peer_id(stage), "slot": slot}))


def _total_kv_heads(args: KVArgs, tp_size: int) -> Optional[int]:
    """The model's KV heads: SGLang fills ``total_kv_head_num`` on a prefill, a decode may not know it."""
    total = int(getattr(args, "total_kv_head_num", 0) or 0)
    if total <= 0 and getattr(args, "kv_head_num", 0):
        total = int(args.kv_head_num) * tp_size
    return total or None


def _model_id(server_args) -> str:
    return (f"{server_args.model_path}@{getattr(server_args, 'revision', None) or ''}"
            f"|q={getattr(server_args, 'quantization', None) or ''}|load={getattr(server_args, 'load_format', '')}")
