"""kvtier's PD transfer backend for SGLang 0.5.17 (``--disaggregation-transfer-backend kvtier``).

SGLang's Common classes keep doing the bootstrap (HTTP ``/route``), rank mapping, status table,
timeouts and heartbeats; kvtier adds the data path over its own transport (docs/pd-design.md §6):

- A decode rank registers once per prefill rank: it allocates a staging area of
  ``pd_stage_slots`` slots, registers it with its transport, and sends its
  ``PDLayout`` and transport descriptor to the prefill rank's ZMQ socket. The prefill compares the
  layouts; on a mismatch every request between the two fails with a message naming the setting.
- With cuda_ipc the decode also registers its KV buffers themselves and offers them in that
  message (``direct``); a prefill rank of the same TP layout whose GPU can reach them stores each
  chunk's pages straight into the decode's pages (the direct path) instead of using the stage.
- Per request the decode sends its destination pages (those after its prefix) and metadata row.
- The prefill's worker thread gathers each chunk's pages into a staging buffer, writes them into a
  free slot at the decode (a credit), and notifies ``K``; the decode scatters the slot into its
  pages and returns the credit. After the last chunk it notifies ``D``, which carries the metadata
  rows (and, on the direct path, the last chunk's ``K``), after which both sides report Success.
  Failures travel as ``KVTIER_FAIL`` / ``KVTIER_REFUSED``.
- Between different attention TP sizes SGLang's rank mapping gives a decode rank several prefill
  ranks (a stage each, each sending its head slice; Success once all sent ``D``) or a prefill rank
  several decode ranks (each asks for its own heads; the metadata carries ``required_dst``).
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch
import zmq
from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.common.conn import (
    CommonKVBootstrapServer,
    CommonKVReceiver,
    CommonKVSender,
    KVTransferError,
)
from sglang.srt.utils.network import NetworkAddress

from kvtier.sglang_ext.pd_manager import META, REFUSE, REG, Chunk, KvtierKVManager, Stage, control_message

__all__ = ["KvtierKVBootstrapServer", "KvtierKVManager", "KvtierKVReceiver", "KvtierKVSender"]


def _raise_failure(obj) -> None:
    """SGLang's failure_exception contract: conclude Failed, clear, raise with the recorded reason."""
    if obj.conclude_state is None:
        obj.conclude_state = KVPoll.Failed
    obj.clear()
    with obj.kv_mgr.failure_lock:
        reason = obj.kv_mgr.failure_records.pop(obj.bootstrap_room, None)
    raise KVTransferError(obj.bootstrap_room, reason or "Failed due to an unknown reason from another rank",
                          is_from_another_rank=reason is None)


class KvtierKVSender(CommonKVSender):
    """Prefill side of one request: queues its chunks on the manager's worker."""

    def __init__(self, mgr: KvtierKVManager, bootstrap_addr: str, bootstrap_room: int, dest_tp_ranks, pp_rank: int,
                 req_has_disagg_prefill_dp_rank: bool = False):
        super().__init__(mgr, bootstrap_addr, bootstrap_room, dest_tp_ranks, pp_rank, req_has_disagg_prefill_dp_rank)
        self.init_time = time.time()
        why = mgr.early_failures.pop(bootstrap_room, None)
        if why is not None:
            mgr.fail(bootstrap_room, why)

    def send(self, kv_indices, state_indices=None, num_kv_tokens=None, **kwargs) -> None:
        kv_indices, index_slice, is_last, skip = self._prepare_send_indices(kv_indices, state_indices)
        if skip:
            return
        event = getattr(self, "_early_send_wait_event", None)
        self._early_send_wait_event = None
        if event is None and self.kv_mgr.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.kv_mgr.device))
        self.kv_mgr.add_chunk(Chunk(self.bootstrap_room, np.asarray(kv_indices, dtype=np.int64), index_slice, is_last,
                                     self.aux_index if is_last else None, event))
        self._record_transfer_indices(kv_indices, state_indices)

    def poll(self) -> KVPoll:
        if self.conclude_state is not None:
            return self.conclude_state
        status = self.kv_mgr.check_status(self.bootstrap_room)
        if status in (KVPoll.Success, KVPoll.Failed):
            self.conclude_state = status
            self._transfer_metric.transfer_latency_s = self.kv_mgr.room_seconds.pop(self.bootstrap_room, None)
        elif status == KVPoll.Bootstrapping:
            timeout = self._check_bootstrap_timeout()
            if timeout is not None:
                return timeout
        return status

    def failure_exception(self):
        _raise_failure(self)

    def clear(self) -> None:
        super().clear()
        self.kv_mgr.room_seconds.pop(self.bootstrap_room, None)
        self.kv_mgr.forget(self.bootstrap_room, unfinished_only=True)

    def abort(self) -> None:
        super().abort()
        self.kv_mgr.tell_decode(self.bootstrap_room, "kvtier PD: the prefill server aborted the request")


class KvtierKVReceiver(CommonKVReceiver):
    """Decode side of one request: registers with the prefill rank and sends its destination pages."""

    def init(self, prefill_dp_rank: int) -> None:
        why = self.kv_mgr.refused_addrs.get(self.bootstrap_addr)
        if why is not None:
            self._refuse(why, prefill_dp_rank)
            return
        super().init(prefill_dp_rank)
        if getattr(self, "bootstrap_infos", None) is not None:
            self._refused_by(self._stages())

    def _refused_by(self, stages: list[Stage]) -> bool:
        """Fail the request if a prefill rank of ``stages`` refused this decode, telling each such
        rank; whether one did."""
        refused = False
        for stage in stages:
            why = self.kv_mgr.refused_peers.get(self.kv_mgr.peer_id(stage))
            if why is not None:
                self._fail(why)
                self._tell_prefill(stage.prefill_endpoint, why)
                refused = True
        return refused

    def _fail(self, why: str) -> None:
        self.kv_mgr.fail(self.bootstrap_room, why)
        self.conclude_state = KVPoll.Failed

    def _refuse(self, why: str, prefill_dp_rank: int) -> None:
        """Fail a request to a prefill that decode refused, and tell that prefill why."""
        self._fail(why)
        mgr, key = self.kv_mgr, (self.bootstrap_addr, prefill_dp_rank)
        if key not in mgr.refused_endpoints:  # one lookup per prefill rank, not one per request
            info = mgr.prefill_info_table[self.bootstrap_addr]
            rank = self._get_bootstrap_info_from_server(prefill_dp_rank, 0, mgr.kv_args.engine_rank % info.attn_tp_size,
                                                        mgr.pp_rank)
            if rank is None:
                return
            mgr.refused_endpoints[key] = NetworkAddress(rank["rank_ip"], int(rank["rank_port"])).to_tcp()
        self._tell_prefill(mgr.refused_endpoints[key], why)

    def _tell_prefill(self, endpoint: str, why: str) -> None:
        """Fail the request on the prefill rank too; it words the reason from its side."""
        self.kv_mgr.send_control(endpoint, control_message(
            REFUSE, {"room": self.bootstrap_room, "layout": self.kv_mgr.layout.to_dict(), "reason": why}))

    def _stages(self) -> list[Stage]:
        return [self.kv_mgr.stage_for(b["rank_ip"], b["rank_port"]) for b in self.bootstrap_infos]

    def _register_kv_args(self) -> bool:
        mgr = self.kv_mgr
        for stage in self._stages():
            msg = {"peer": mgr.peer_id(stage), "ip": mgr.local_ip, "port": mgr.rank_port,
                   "layout": mgr.layout.to_dict(),
                   "descriptor": mgr.transport.descriptor(), "stage": stage.name, "slots": mgr.cfg.pd_stage_slots,
                   "slot_bytes": stage.slot_bytes, "direct": mgr.direct_offer}
            try:
                mgr._send_multipart_locked(stage.prefill_endpoint, control_message(REG, msg))
            except zmq.ZMQError as e:
                self._fail(f"kvtier PD: cannot register with prefill rank {stage.prefill_endpoint}: {e}")
                return False
        return True

    def send_metadata(self, kv_indices, aux_index: Optional[int] = None, state_indices=None,
                      decode_prefix_len: Optional[int] = None, **kwargs) -> None:
        if self.conclude_state == KVPoll.Failed:
            return
        if getattr(self, "bootstrap_infos", None) is None:
            self._fail(f"kvtier PD: no prefill rank is known for {self.bootstrap_addr}")
            return
        mgr = self.kv_mgr
        pages = np.asarray(kv_indices, dtype=np.int32)
        stages = self._stages()
        peers = [mgr.peer_id(stage) for stage in stages]
        mgr.rooms[self.bootstrap_room] = (set(peers), pages.astype(np.int64))
        # A refusal that came back after init and before the room was recorded (_on_refused fails
        # only recorded rooms).
        if self._refused_by(stages):
            return
        for stage, peer in zip(stages, peers):
            msg = {"room": self.bootstrap_room, "peer": peer, "ip": mgr.local_ip, "port": mgr.rank_port,
                   "aux_index": int(aux_index), "prefix_len": int(decode_prefix_len or 0),
                   "required_dst": int(self.required_dst_info_num or 1)}
            try:
                mgr._send_multipart_locked(stage.prefill_endpoint, control_message(META, msg, pages.tobytes()))
            except zmq.ZMQError as e:
                self._fail(f"kvtier PD: cannot send request {self.bootstrap_room} to {stage.prefill_endpoint}: {e}")
                return
        self.init_time = time.time()

    def poll(self) -> KVPoll:
        if self.conclude_state is not None:
            return self.conclude_state
        status = self.kv_mgr.check_status(self.bootstrap_room)
        if status in (KVPoll.Success, KVPoll.Failed):
            self.conclude_state = status
        elif status == KVPoll.WaitingForInput:
            timeout = self._check_waiting_timeout()
            if timeout is not None:
                return timeout
        return status

    def failure_exception(self):
        _raise_failure(self)

    def clear(self) -> None:
        super().clear()
        self.kv_mgr.rooms.pop(self.bootstrap_room, None)
        self.kv_mgr.forget(self.bootstrap_room)


class KvtierKVBootstrapServer(CommonKVBootstrapServer):
    pass
