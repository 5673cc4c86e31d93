"""One side of a kvtier PD pair in its own process: real SGLang 0.5.17 objects on CPU, JSON lines.

``python pd_peer.py`` prints ``{"ready": true}`` and then runs one JSON command per line, printing
one JSON reply each. ``{"op": "new", "name": N, "args": {"role": "prefill", "bootstrap_port": P,
...}}`` builds a server rank as SGLang's prefill (or decode) queue builds it: a real
``MHATokenToKVPool`` filled with a seeded byte pattern, ``MetadataBuffers``, ``KVArgs`` exactly as
``prefill.py`` / ``decode.py`` fill them, and ``KvtierKVManager`` (a prefill also runs the
bootstrap server); several ranks with different layouts can live in one process (each with its
own sockets). Every other command names its rank (``inst``); see ``Instance.run``.

SGLang's process-wide parallel state is not initialised outside a server, so the names that
``CommonKVManager`` reads from it are set here (docs/pd-design.md, "CPU test plan"): a single
rank, or attention TP rank ``tp_rank`` of ``tp_size`` while a rank is built (``heads`` is then the
rank's share; prefill rank 0 runs the bootstrap server, the other ranks register with it).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import types
from typing import Optional

import numpy as np
import torch


def single_rank_sglang(tp_size: int = 1, tp_rank: int = 0) -> None:
    import sglang.srt.disaggregation.common.conn as common

    common.get_parallel = lambda: types.SimpleNamespace(
        attn_tp_size=tp_size, attn_tp_rank=tp_rank, attn_cp_size=1, attn_cp_rank=0, dcp_rank=0, enable_dp_attention=False,
        dp_size=1, nnodes=1, load_balance_method="follow_bootstrap_room", enable_dsa_cache_layer_split=False)
    common.get_attention_dp_size = lambda: 1
    common.get_attention_dp_rank = lambda: 0
    common.get_pp_group = lambda: None
    common.get_serving = lambda: types.SimpleNamespace(port=30000)


def fill_pool(pool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for buf in pool.k_buffer + pool.v_buffer:
        raw = buf.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen).to(raw.device))


def page_digests(pool, pages: list[int], heads: Optional[list[int]] = None) -> list[str]:
    """A hash per page of every K and V buffer's rows, or of their heads ``[start, stop)`` only."""
    ps = pool.page_size
    start, stop = heads or (0, pool.head_num)
    out = []
    for p in pages:
        h = hashlib.sha256()
        for buf in pool.k_buffer + pool.v_buffer:
            h.update(buf[p * ps : (p + 1) * ps, start:stop].contiguous().view(torch.uint8).cpu().numpy().tobytes())
        out.append(h.hexdigest())
    return out


class Instance:
    """One server rank: a pool with its pattern, metadata rows, KVArgs and the kvtier manager."""

    def __init__(self, args: dict):
        from sglang.srt.disaggregation.base.conn import KVArgs
        from sglang.srt.disaggregation.utils import DisaggregationMode, MetadataBuffers, setup_state_kv_args
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

        from kvtier.sglang_ext.pd_conn import KvtierKVBootstrapServer, KvtierKVManager

        self.prefill = args["role"] == "prefill"
        self.port = args["bootstrap_port"]
        tp_size, tp_rank = args.get("tp_size", 1), args.get("tp_rank", 0)
        single_rank_sglang(tp_size, tp_rank)
        ps = self.page_size = args.get("page_size", 4)
        dtype = getattr(torch, args.get("dtype", "bfloat16"))
        self.pool = MHATokenToKVPool(args.get("pool_tokens", 256), ps, dtype, args.get("heads", 2),
                                     args.get("head_dim", 8), args.get("layers", 2), args.get("device", "cpu"), False)
        fill_pool(self.pool, args["seed"])
        self.meta = MetadataBuffers(8, 16, torch.float32)
        server_args = types.SimpleNamespace(
            host="127.0.0.1", disaggregation_bootstrap_port=self.port, dist_init_addr=None, dcp_size=1,
            pp_size=1, device=args.get("device", "cpu"), model_path=args.get("model", "tiny-llama"), revision=None,
            quantization=None, load_format="dummy")
        leader = self.prefill and tp_rank == 0
        self.server = KvtierKVBootstrapServer("127.0.0.1", self.port) if leader else None
        # KVArgs exactly as prefill.py / decode.py _init_kv_manager fill them for an MHA pool.
        kv_args = KVArgs()
        kv_args.engine_rank = tp_rank
        kv_args.pp_rank = 0
        kv_args.system_dp_rank = 0
        kv_args.kv_cache_dtype_str = args.get("dtype", "bfloat16")
        kv_args.prefill_start_layer = self.pool.start_layer
        kv_args.kv_data_ptrs, kv_args.kv_data_lens, kv_args.kv_item_lens = self.pool.get_contiguous_buf_infos()
        kv_args.kv_layer_ids = []
        if self.prefill:  # decode.py fills these only for mooncake's staging, after the manager exists
            kv_args.kv_head_num = self.pool.head_num
            kv_args.total_kv_head_num = self.pool.head_num * tp_size
        kv_args.page_size = ps
        kv_args.aux_data_ptrs, kv_args.aux_data_lens, kv_args.aux_item_lens = self.meta.get_buf_infos()
        kv_args.ib_device = None
        kv_args.gpu_id = torch.device(args.get("device", "cpu")).index or 0
        setup_state_kv_args(kv_args, self.pool, None, self.pool.layer_num)
        mode = DisaggregationMode.PREFILL if self.prefill else DisaggregationMode.DECODE
        self.mgr = KvtierKVManager(kv_args, mode, server_args, False)
        self.ends: dict[int, object] = {}

    def wait(self, room: int, want: list[int], timeout_s: float) -> dict:
        from sglang.srt.disaggregation.base.conn import KVPoll

        end = self.ends[room]
        start = time.monotonic()
        status = end.poll()
        while status not in want and status != KVPoll.Failed and time.monotonic() - start < timeout_s:
            time.sleep(0.02)
            status = end.poll()
        out = {"status": int(status), "seconds": time.monotonic() - start}
        if status == KVPoll.Failed:
            try:
                end.failure_exception()
            except Exception as e:  # KVTransferError, as SGLang's queues catch it
                out["error"] = str(e)
                out["type"] = type(e).__name__
        return out

    def run(self, cmd: dict) -> object:
        from kvtier.sglang_ext.pd_conn import KvtierKVReceiver, KvtierKVSender

        op, mgr, ps = cmd["op"], self.mgr, self.page_size
        if op == "sender":
            self.ends[cmd["room"]] = KvtierKVSender(mgr, f"127.0.0.1:{self.port}", cmd["room"], [0], 0)
            return "ok"
        if op == "receiver":
            room, addr = cmd["room"], cmd["addr"]
            self.ends[room] = receiver = KvtierKVReceiver(mgr=mgr, bootstrap_addr=addr, bootstrap_room=room)
            deadline = time.monotonic() + 20
            while not mgr.try_ensure_parallel_info(addr):  # the prefill may still be registering
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no prefill parallel info from {addr}")
                time.sleep(0.2)
            receiver.init(0)
            return int(receiver.poll())
        if op == "send_metadata":
            self.ends[cmd["room"]].send_metadata(np.array(cmd["pages"], dtype=np.int32), cmd["aux_index"], [],
                                                 decode_prefix_len=cmd["prefix_len"])
            return "ok"
        if op == "wait":
            return self.wait(cmd["room"], cmd["want"], cmd["timeout_s"])
        if op == "init":
            sender = self.ends[cmd["room"]]
            prefix = sender.pop_decode_prefix_len()
            n_pages = -(-(cmd["prompt_len"] - prefix) // ps)
            sender.init(n_pages, aux_index=cmd["aux_index"])
            self.meta.output_ids[cmd["aux_index"]][0] = cmd["first_token"]  # what set_buf writes
            self.meta.bootstrap_room[cmd["aux_index"], 0] = cmd["room"]
            return {"prefix_len": prefix, "num_pages": n_pages}
        if op == "send":
            self.ends[cmd["room"]].send(np.array(cmd["pages"], dtype=np.int32), [] if cmd["last"] else None,
                                        num_kv_tokens=cmd["tokens"])
            return "ok"
        if op == "done":  # a prefill's D as it would arrive: the rows of metadata row ``src`` (cut short with ``cut``)
            from kvtier.sglang_ext.pd_manager import direct_note, done_message, metadata_rows, parse_done

            src = cmd["src"]
            self.meta.output_ids[src][0] = cmd["first_token"]
            self.meta.bootstrap_room[src, 0] = cmd["room"]
            head = {"room": cmd["room"], "stage": next(iter(mgr.stages)), "aux_index": cmd["aux_index"]}
            if cmd.get("kv") is not None:  # a direct path's last K (pages start..start+n), as _send_direct makes it
                head["kv"] = direct_note(cmd["room"], head["stage"], cmd["kv"]["start"], cmd["kv"]["n"])
            message = done_message(head, metadata_rows(mgr.aux, mgr.kv_args.aux_item_lens, src))
            mgr._on_done(*parse_done(message[: len(message) - cmd.get("cut", 0)]))
            return "ok"
        if op == "aux":
            i = cmd["index"]
            return {"first_token": int(self.meta.output_ids[i][0]), "room": int(self.meta.bootstrap_room[i, 0])}
        if op == "digests":
            return page_digests(self.pool, cmd["pages"], cmd.get("heads"))
        if op == "abort":
            self.ends[cmd["room"]].abort()
            return "ok"
        if op == "clear":
            self.ends.pop(cmd["room"]).clear()
            return "ok"
        if op == "stats":
            s = mgr.stats
            return {"bytes": s.bytes, "pages": s.pages, "seconds": s.seconds, "requests": s.requests,
                    "failures": s.failures, "transport": mgr.transport_kind, "slot_bytes": mgr.slot_bytes, "path_bytes": dict(s.path_bytes),
                    "copy_seconds": dict(s.copy_seconds), "switch_interval_s": sys.getswitchinterval(),
                    "peers": dict(s.peers), "direct_offer": getattr(mgr, "direct_offer", None)}
        if op == "close":
            mgr.close()
            if self.server is not None:
                self.server.close()
            return "closed"
        raise ValueError(f"unknown op {op!r}")


def plugin_report() -> dict:
    """What SGLang resolves for "kvtier" after loading its plugins, as a fresh server process would."""
    import argparse

    from sglang.srt.plugins import load_plugins

    load_plugins()
    from sglang.srt.disaggregation import decode, prefill, utils
    from sglang.srt.disaggregation.utils import KVClassType, TransferBackend, get_kv_class
    from sglang.srt.managers import disagg_service
    from sglang.srt.server_args import ServerArgs

    backend = TransferBackend("kvtier")
    qualified = lambda c: f"{c.__module__}.{c.__name__}"  # noqa: E731
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    parsed = parser.parse_args(["--model-path", "m", "--disaggregation-mode", "prefill",
                                "--disaggregation-transfer-backend", "kvtier"])
    try:
        parser.parse_args(["--model-path", "m", "--disaggregation-transfer-backend", "nope"])
        rejects_unknown = False
    except SystemExit:
        rejects_unknown = True
    return {
        "member": f"{backend.name}={backend.value}", "is_attr": backend is TransferBackend.KVTIER,
        "listed": backend in list(TransferBackend),
        "classes": {module.__name__: {t.value: qualified(module.get_kv_class(backend, t)) for t in KVClassType}
                    for module in (utils, prefill, decode, disagg_service)},
        "fake_sender": get_kv_class(TransferBackend.FAKE, KVClassType.SENDER).__name__,
        "cli": parsed.disaggregation_transfer_backend, "cli_rejects_unknown": rejects_unknown,
    }


def main() -> None:
    single_rank_sglang()
    instances: dict[str, Instance] = {}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "plugin":
            reply = plugin_report()
        elif cmd["op"] == "new":
            instances[cmd["name"]] = Instance(cmd["args"])
            reply = {"rank_port": instances[cmd["name"]].mgr.rank_port}
        else:
            reply = instances[cmd["inst"]].run(cmd)
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
