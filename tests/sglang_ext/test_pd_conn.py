"""kvtier's PD backend between two real processes: a prefill and a decode over real sockets.

Each side is ``pd_peer.py``: real SGLang 0.5.17 classes (bootstrap server, KVArgs, pools,
MetadataBuffers) around ``KvtierKVManager``; the test plays the two schedulers' part of the
protocol (docs/pd-design.md §1) and checks the decode pool byte for byte against the prefill's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kvtier.sglang_ext.pd_io import cuda_ipc_available

PEER = Path(__file__).with_name("pd_peer.py")


def peer_env() -> dict[str, str]:
    """A peer process's environment: none of our KVTIER_* settings, and no TRITON_INTERPRET (the kernel
    tests set it for the session): Triton's interpreter is not thread-safe and a PD process gathers and
    scatters from several threads, so peers use the kernels' torch reference."""
    return {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_") and k != "TRITON_INTERPRET"}
FAILED, WAITING, SUCCESS = 0, 2, 4
ADDR_HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((ADDR_HOST, 0))
        return s.getsockname()[1]


class Process:
    """``pd_peer.py`` in a child process; ``call`` sends one command and returns its reply."""

    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, str(PEER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def reply(self) -> Any:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"pd_peer exited with {self.proc.wait()}; its stderr is above")
        return json.loads(line)

    def call(self, **cmd: Any) -> Any:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def rank(self, name: str, **args: Any) -> "Rank":
        self.call(op="new", name=name, args=args)
        return Rank(self, name)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


class Rank:
    """One server rank inside a ``Process``."""

    def __init__(self, process: Process, name: str):
        self.process, self.name = process, name

    def call(self, op: str, **cmd: Any) -> Any:
        return self.process.call(op=op, inst=self.name, **cmd)


ENV = {
    "SGLANG_HOST_IP": ADDR_HOST, "KVTIER_CONFIG": "", "KVTIER_PD_TRANSPORT": "zmq",
    # 2 slots of 2 pages (a page is 4 tokens x 2 layers x K,V x 2 heads x 8 dims x bf16 = 512 B)
    "KVTIER_PD_STAGE_SLOTS": "2", "KVTIER_PD_STAGE_SLOT_MB": str(1100 / (1 << 20)),
    "KVTIER_PD_TIMEOUT_S": "5", "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "8",
    "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "8", "SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": "1",
    "SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "1",
    "KVTIER_PD_SWITCH_INTERVAL_MS": "1",  # Python's default is 5
}


@pytest.fixture(scope="module")
def cluster():
    """Processes started together (SGLang's imports take seconds each): a prefill, a prefill and
    a decode that tests kill, and one process holding every other decode rank the tests create."""
    env = peer_env()
    env.update(ENV)
    procs = {name: Process(env) for name in ("prefill", "doomed", "decode", "doomed_decode")}
    try:
        for p in procs.values():
            assert p.reply() == {"ready": True}
        ports = {"prefill": free_port(), "doomed": free_port()}
        ranks = {name: procs[name].rank(name, role="prefill", bootstrap_port=ports[name], seed=1) for name in ports}
        yield procs, ranks, ports
    finally:
        for p in procs.values():
            p.kill()


@pytest.fixture
def prefill(cluster):
    procs, ranks, ports = cluster
    return ranks["prefill"], f"{ADDR_HOST}:{ports['prefill']}"


_decodes: dict[str, Rank] = {}


def decode_rank(cluster, name: str, **args: Any) -> Rank:
    """A decode rank in the shared decode process, created on first use."""
    if name not in _decodes:
        _decodes[name] = cluster[0]["decode"].rank(name, role="decode", bootstrap_port=0, seed=2, **args)
    return _decodes[name]


def new_room(rng: np.random.Generator) -> int:
    return int(rng.integers(1, 2**63 - 1))


def bootstrap(prefill: Rank, decode: Rank, addr: str, room: int, dst_pages: list[int], prefix_len: int,
              aux_index: int = 5) -> int:
    """Both schedulers' steps up to the prefill's WaitingForInput; returns the decode's poll."""
    prefill.call("sender", room=room)
    status = decode.call("receiver", room=room, addr=addr)
    if status == WAITING:
        decode.call("send_metadata", room=room, pages=dst_pages, aux_index=aux_index, prefix_len=prefix_len)
    return status


def check_lifecycle(prefill: Rank, decode: Rank, addr: str, seed: int, ps: int = 4, page_bytes: int = 512,
                    pool_pages: int = 64) -> None:
    """One request through every step of both schedulers, in chunks as send_kv_chunk cuts them
    (page-aligned, the last one partial); the decode pool is compared byte for byte."""
    rng = np.random.default_rng(seed)
    room, n_pages = new_room(rng), int(rng.integers(6, 12))
    prompt_len = (n_pages - 1) * ps + int(rng.integers(1, ps + 1))
    prefix_pages = int(rng.integers(0, 3))
    cut = int(rng.integers(prefix_pages, n_pages))  # pages of the middle chunk end here
    src_pages = rng.choice(np.arange(1, pool_pages), n_pages, replace=False).tolist()  # prefill's pool pages
    dst_pages = rng.choice(np.arange(1, pool_pages), n_pages, replace=False).tolist()  # decode's, scattered
    decode_before = decode.call("digests", pages=list(range(pool_pages)))
    sent_before, received_before = prefill.call("stats"), decode.call("stats")

    assert bootstrap(prefill, decode, addr, room, dst_pages[prefix_pages:], prefix_pages * ps) == WAITING
    assert prefill.call("wait", room=room, want=[WAITING], timeout_s=10)["status"] == WAITING
    got = prefill.call("init", room=room, prompt_len=prompt_len, aux_index=3, first_token=17)
    assert got == {"prefix_len": prefix_pages * ps, "num_pages": n_pages - prefix_pages}
    first, second = src_pages[prefix_pages:cut], src_pages[cut:]
    if first:
        prefill.call("send", room=room, pages=first, last=False, tokens=len(first) * ps)
    prefill.call("send", room=room, pages=second, last=True, tokens=prompt_len - cut * ps)

    assert prefill.call("wait", room=room, want=[SUCCESS], timeout_s=20)["status"] == SUCCESS
    assert decode.call("wait", room=room, want=[SUCCESS], timeout_s=20)["status"] == SUCCESS
    moved_src = prefill.call("digests", pages=src_pages[prefix_pages:])
    assert decode.call("digests", pages=dst_pages[prefix_pages:]) == moved_src
    decode_after = decode.call("digests", pages=list(range(pool_pages)))
    for page in range(pool_pages):
        if page not in dst_pages[prefix_pages:]:  # the prefix pages and every other page are untouched
            assert decode_after[page] == decode_before[page], page
    assert decode.call("aux", index=5) == {"first_token": 17, "room": room}
    moved = n_pages - prefix_pages
    sent, received = prefill.call("stats"), decode.call("stats")
    assert sent["pages"] - sent_before["pages"] == received["pages"] - received_before["pages"] == moved
    assert sent["bytes"] - sent_before["bytes"] == received["bytes"] - received_before["bytes"] == moved * page_bytes
    # Slots of KVTIER_PD_STAGE_SLOT_MB (1100 B) hold whole pages, at least one: fewer than the request.
    assert sent["slot_bytes"] == max(1100 // page_bytes, 1) * page_bytes < moved * page_bytes
    prefill.call("clear", room=room)
    decode.call("clear", room=room)


def test_pd_workers_take_the_configured_thread_switch_interval(cluster, prefill):
    assert prefill[0].call("stats")["switch_interval_s"] == pytest.approx(0.001)


def test_full_lifecycle_moves_exactly_the_pages_beyond_the_decode_prefix(cluster, prefill):
    prefill, addr = prefill
    decode = decode_rank(cluster, "d")
    for seed in range(3):  # later requests reuse the registration and the staging slots
        check_lifecycle(prefill, decode, addr, seed)
    stats = prefill.call("stats")
    assert stats["transport"] == "zmq"
    # zmq cannot map the decode's pool: the decode offers none, and the prefill stages every byte
    assert decode.call("stats")["direct_offer"] is None
    assert stats["peers"].get("direct") is None and stats["peers"]["staged"] >= 1
    assert stats["path_bytes"] == {"staged": stats["bytes"]}


@pytest.mark.parametrize("seed", range(3))
def test_lifecycle_over_random_pool_layouts(cluster, seed):
    """Page size, heads, head dim, layers and dtype drawn at random; a pair of ranks per layout."""
    procs, _, _ = cluster
    rng = np.random.default_rng(100 + seed)
    layout = {"page_size": int(rng.choice([1, 2, 8, 16])), "heads": int(rng.integers(1, 5)),
              "head_dim": int(rng.choice([8, 16, 24])), "layers": int(rng.integers(1, 4)),
              "dtype": str(rng.choice(["bfloat16", "float16", "float32"])), "pool_tokens": 64 * 16}
    itemsize = 4 if layout["dtype"] == "float32" else 2
    page_bytes = layout["page_size"] * layout["heads"] * layout["head_dim"] * itemsize * 2 * layout["layers"]
    port = free_port()
    prefill = procs["prefill"].rank(f"p{seed}", role="prefill", bootstrap_port=port, seed=seed + 10, **layout)
    decode = decode_rank(cluster, f"d{seed}", **layout)
    check_lifecycle(prefill, decode, f"{ADDR_HOST}:{port}", seed, layout["page_size"], page_bytes)


def test_a_last_chunk_without_pages_still_delivers_the_metadata(cluster, prefill):
    """The decode prefix covers the whole prompt: the last chunk carries no page, only the aux row."""
    prefill, addr = prefill
    decode = decode_rank(cluster, "d")
    room = new_room(np.random.default_rng(9))
    pages_before = decode.call("stats")["pages"]
    assert bootstrap(prefill, decode, addr, room, [], prefix_len=16, aux_index=2) == WAITING
    assert prefill.call("wait", room=room, want=[WAITING], timeout_s=10)["status"] == WAITING
    assert prefill.call("init", room=room, prompt_len=16, aux_index=4, first_token=99)["num_pages"] == 0
    prefill.call("send", room=room, pages=[], last=True, tokens=0)
    assert prefill.call("wait", room=room, want=[SUCCESS], timeout_s=10)["status"] == SUCCESS
    assert decode.call("wait", room=room, want=[SUCCESS], timeout_s=10)["status"] == SUCCESS
    assert decode.call("aux", index=2) == {"first_token": 99, "room": room}
    assert decode.call("stats")["pages"] == pages_before


@pytest.mark.parametrize(
    "name, args, decode_says, prefill_says",
    [
        ("d_page", {"page_size": 8}, "has page_size=4, this decode has 8; start both with the same --page-size",
         "has page_size=8, this prefill has 4; start both with the same --page-size"),
        ("d_dtype", {"dtype": "float16"}, "has kv_cache_dtype=bfloat16, this decode has float16",
         "has kv_cache_dtype=float16, this prefill has bfloat16"),
        ("d_heads", {"heads": 4}, "has 128 bytes per page in KV buffer 0, this decode has 256",
         "has 256 bytes per page in KV buffer 0, this prefill has 128"),
        ("d_model", {"model": "other-model"}, "has model=tiny-llama@|q=|load=dummy, this decode has "
                                              "other-model@|q=|load=dummy", "has model=other-model@"),
    ],
)
def test_mismatched_layouts_fail_the_request_on_both_sides_with_the_fix(cluster, prefill, name, args, decode_says,
                                                                         prefill_says):
    prefill, addr = prefill
    decode = decode_rank(cluster, name, **args)
    for seed in (1, 2):  # the first request is refused at registration, the next one by the cached verdict
        room = new_room(np.random.default_rng(seed * 100 + len(name)))
        bootstrap(prefill, decode, addr, room, [1, 2], prefix_len=0)
        d = decode.call("wait", room=room, want=[], timeout_s=10)
        p = prefill.call("wait", room=room, want=[], timeout_s=10)
        assert d["status"] == FAILED and d["type"] == "KVTransferError"
        assert f"kvtier PD: prefill {addr} {decode_says}" in d["error"], d["error"]
        assert p["status"] == FAILED and p["type"] == "KVTransferError"
        assert "kvtier PD: decode 127.0.0.1:" in p["error"] and prefill_says in p["error"], p["error"]
        assert d["seconds"] < 5 and p["seconds"] < 5


def test_decode_abort_fails_the_prefill_side(cluster, prefill):
    prefill, addr = prefill
    decode = decode_rank(cluster, "d")
    room = new_room(np.random.default_rng(11))
    assert bootstrap(prefill, decode, addr, room, [7, 8, 9], prefix_len=0) == WAITING
    assert prefill.call("wait", room=room, want=[WAITING], timeout_s=10)["status"] == WAITING
    decode.call("abort", room=room)
    p = prefill.call("wait", room=room, want=[], timeout_s=10)
    assert p["status"] == FAILED and "the decode server aborted request" in p["error"]
    d = decode.call("wait", room=room, want=[], timeout_s=1)
    assert d["status"] == FAILED and "Aborted" in d["error"]


def test_prefill_abort_fails_the_decode_side(cluster, prefill):
    prefill, addr = prefill
    decode = decode_rank(cluster, "d")
    room = new_room(np.random.default_rng(15))
    assert bootstrap(prefill, decode, addr, room, [3, 4], prefix_len=0) == WAITING
    assert prefill.call("wait", room=room, want=[WAITING], timeout_s=10)["status"] == WAITING
    prefill.call("abort", room=room)
    d = decode.call("wait", room=room, want=[], timeout_s=5)
    assert d["status"] == FAILED and "the prefill server aborted the request" in d["error"], d
    assert d["seconds"] < 2


def test_a_prefill_killed_mid_transfer_fails_the_decode_side_quickly(cluster):
    procs, ranks, ports = cluster
    prefill, addr = ranks["doomed"], f"{ADDR_HOST}:{ports['doomed']}"
    decode = decode_rank(cluster, "d_doomed")
    room = new_room(np.random.default_rng(12))
    assert bootstrap(prefill, decode, addr, room, list(range(10, 20)), prefix_len=0) == WAITING
    assert prefill.call("wait", room=room, want=[WAITING], timeout_s=10)["status"] == WAITING
    prefill.call("init", room=room, prompt_len=40, aux_index=1, first_token=5)
    prefill.call("send", room=room, pages=list(range(30, 34)), last=False, tokens=16)
    procs["doomed"].kill()
    d = decode.call("wait", room=room, want=[], timeout_s=20)
    assert d["status"] == FAILED and d["seconds"] < 12, d
    assert "Lost connection with prefill" in d["error"] or "timed out" in d["error"], d["error"]


def test_a_decode_killed_mid_transfer_fails_the_prefill_side_within_the_timeout(cluster, prefill):
    prefill, addr = prefill
    procs = cluster[0]
    decode = procs["doomed_decode"].rank("dd", role="decode", bootstrap_port=0, seed=2)
    room = new_room(np.random.default_rng(13))
    assert bootstrap(prefill, decode, addr, room, list(range(10, 18)), prefix_len=0) == WAITING
    assert prefill.call("wait", room=room, want=[WAITING], timeout_s=10)["status"] == WAITING
    prefill.call("init", room=room, prompt_len=32, aux_index=6, first_token=5)
    procs["doomed_decode"].kill()
    prefill.call("send", room=room, pages=list(range(40, 48)), last=True, tokens=32)
    p = prefill.call("wait", room=room, want=[], timeout_s=20)
    assert p["status"] == FAILED and p["seconds"] < 12, p  # KVTIER_PD_TIMEOUT_S=5
    assert f"kvtier PD: sending KV of request {room} failed" in p["error"], p["error"]
    check_lifecycle(prefill, decode_rank(cluster, "d"), addr, seed=14)  # other decode ranks are still served


def test_the_plugin_registers_the_transfer_backend_for_sglang(cluster):
    """load_plugins() in a child process (the decode ranks' one) as every SGLang process runs it."""
    report = cluster[0]["decode"].call(op="plugin")
    assert report["member"] == "KVTIER=kvtier" and report["is_attr"] and report["listed"]
    ours = {"kvargs": "sglang.srt.disaggregation.base.conn.KVArgs"} | {
        kind: f"kvtier.sglang_ext.pd_conn.KvtierKV{name}" for kind, name in
        (("sender", "Sender"), ("receiver", "Receiver"), ("bootstrap_server", "BootstrapServer"))}
    ours["manager"] = "kvtier.sglang_ext.pd_manager.KvtierKVManager"
    assert len(report["classes"]) == 4  # utils, prefill, decode, disagg_service all see the hook
    for module, classes in report["classes"].items():
        assert classes == ours, module
    assert report["fake_sender"] == "FakeKVSender"  # other backends resolve as before
    assert report["cli"] == "kvtier" and report["cli_rejects_unknown"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("transport", ["zmq", "cuda_ipc"])
def test_full_lifecycle_between_cuda_pools(transport):
    """The GPU path: the Triton gather/scatter kernels on CUDA pools; staging in pinned host memory
    (zmq) or on the GPU (cuda_ipc, written device to device)."""
    if transport == "cuda_ipc" and not cuda_ipc_available():
        pytest.skip("kvtier.transfer.cuda_ipc is not available")
    env = peer_env()
    env.update(ENV, KVTIER_PD_TRANSPORT=transport, KVTIER_PD_DIRECT="true")
    procs = [Process(env), Process(env)]
    try:
        for p in procs:
            assert p.reply() == {"ready": True}
        port = free_port()
        prefill = procs[0].rank("p", role="prefill", bootstrap_port=port, seed=1, device="cuda")
        decode = procs[1].rank("d", role="decode", bootstrap_port=0, seed=2, device="cuda")
        for seed in range(3):
            check_lifecycle(prefill, decode, f"{ADDR_HOST}:{port}", seed)
        stats = prefill.call("stats")
        assert stats["transport"] == transport
        # cuda_ipc, same TP layout: the prefill's kernel stores into the decode's pool (same GPU here)
        path = "direct" if transport == "cuda_ipc" else "staged"
        assert stats["peers"] == {path: 1} and stats["path_bytes"] == {path: stats["bytes"]}
        received = decode.call("stats")
        assert received["path_bytes"] == {path: stats["bytes"]}
        # GPU time of the copies (CUDA events), part of the sending thread's busy time; a direct
        # copy is the prefill's alone, a staged one has the decode's scatter too
        assert list(stats["copy_seconds"]) == [path] and 0 < stats["copy_seconds"][path] < stats["seconds"]
        if path == "direct":
            assert received["copy_seconds"] == {}
        else:
            assert list(received["copy_seconds"]) == [path] and 0 < received["copy_seconds"][path] < received["seconds"]
    finally:
        for p in procs:
            p.kill()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_direct_path_across_two_gpus_and_a_decode_killed_on_it():
    """Prefill pool on GPU 0, decode pool on GPU 1 (NVLink or PCIe peer-to-peer): each chunk is one
    kernel on GPU 0 storing into the decode's pages; a killed decode fails the next request at once."""
    if not torch.cuda.can_device_access_peer(0, 1):
        pytest.skip("GPU 0 cannot access GPU 1")
    env = peer_env()
    env.update(ENV, KVTIER_PD_TRANSPORT="cuda_ipc", KVTIER_PD_DIRECT="true")
    procs = [Process(env), Process(env)]
    try:
        for p in procs:
            assert p.reply() == {"ready": True}
        port = free_port()
        addr = f"{ADDR_HOST}:{port}"
        prefill = procs[0].rank("p", role="prefill", bootstrap_port=port, seed=1, device="cuda:0")
        decode = procs[1].rank("d", role="decode", bootstrap_port=0, seed=2, device="cuda:1")
        assert decode.call("stats")["direct_offer"] == {"regions": [f"kv{i}" for i in range(4)]}
        for seed in range(3):
            check_lifecycle(prefill, decode, addr, seed)
        stats = prefill.call("stats")
        assert stats["peers"] == {"direct": 1} and stats["path_bytes"] == {"direct": stats["bytes"]}
        assert 0 < stats["copy_seconds"]["direct"] < stats["seconds"]

        # Pages past the decode's pool (256 tokens + a padding page: 65 pages of 4): the kernel would
        # store there, so the copy is refused and both sides fail.
        bad = new_room(np.random.default_rng(20))
        assert bootstrap(prefill, decode, addr, bad, [1, 2, 1000], prefix_len=0) == WAITING
        assert prefill.call("wait", room=bad, want=[WAITING], timeout_s=10)["status"] == WAITING
        prefill.call("init", room=bad, prompt_len=12, aux_index=7, first_token=5)
        prefill.call("send", room=bad, pages=[3, 4, 5], last=True, tokens=12)
        p, d = (r.call("wait", room=bad, want=[], timeout_s=10) for r in (prefill, decode))
        assert p["status"] == d["status"] == FAILED and "pages [1, 1000] outside a pool of 65 pages" in d["error"], d

        room = new_room(np.random.default_rng(21))
        assert bootstrap(prefill, decode, addr, room, list(range(10, 18)), prefix_len=0) == WAITING
        assert prefill.call("wait", room=room, want=[WAITING], timeout_s=10)["status"] == WAITING
        prefill.call("init", room=room, prompt_len=32, aux_index=6, first_token=5)
        procs[1].kill()
        prefill.call("send", room=room, pages=list(range(40, 48)), last=True, tokens=32)
        p = prefill.call("wait", room=room, want=[], timeout_s=20)
        assert p["status"] == FAILED and p["seconds"] < 3, p  # the state-file lock is gone: no deadline wait
        assert "may have died" in p["error"], p["error"]
    finally:
        for p in procs:
            p.kill()


def test_the_last_message_carries_its_head_and_the_metadata_rows_bit_for_bit():
    """``D`` carries the metadata rows (one round trip instead of a write and a notify); random rows
    of random sizes come out byte for byte, and a cut message is refused with what is wrong."""
    from kvtier.sglang_ext.pd_manager import done_message, parse_done

    rng = np.random.default_rng(4)
    for _ in range(20):
        rows = [torch.from_numpy(rng.integers(0, 256, int(n), dtype=np.uint8)) for n in rng.integers(1, 300, 6)]
        head = {"room": int(rng.integers(1, 2**63 - 1)), "stage": "stage/127.0.0.1:1", "aux_index": 3,
                "kv": {"room": 1, "start": 0, "n": 9, "direct": True} if rng.random() < 0.5 else None}
        message = done_message(head, rows)
        got_head, payload = parse_done(message)
        assert got_head == head and bytes(payload) == b"".join(r.numpy().tobytes() for r in rows)
    with pytest.raises(ValueError, match="announces a .*-byte head but has"):
        parse_done(message[:8])
    with pytest.raises(ValueError, match="too short"):
        parse_done(b"D")


def test_the_decode_puts_the_rows_of_d_in_the_request_row_and_fails_rows_that_do_not_fit(cluster, prefill):
    """A real decode rank takes ``D`` as its notification thread does: the rows land in the
    request's metadata row (SGLang's gate reads bootstrap_room there) and the request succeeds; rows
    a byte short, or a row index outside its buffers, fail the request with what is wrong."""
    prefill, addr = prefill
    decode = decode_rank(cluster, "d_done")
    rng = np.random.default_rng(9)
    for cut, aux_index, why in ((0, 4, None), (1, 4, "bytes of metadata rows"), (0, 99, "row 99 is outside")):
        room = new_room(rng)
        assert bootstrap(prefill, decode, addr, room, [3, 4], prefix_len=0, aux_index=aux_index) == WAITING
        decode.call("done", room=room, src=7, first_token=int(rng.integers(1, 1000)), aux_index=aux_index, cut=cut)
        got = decode.call("wait", room=room, want=[SUCCESS], timeout_s=10)
        if why is None:
            assert got["status"] == SUCCESS
            assert decode.call("aux", index=aux_index) == decode.call("aux", index=7)
            assert decode.call("aux", index=aux_index)["room"] == room
        else:
            assert got["status"] == FAILED and why in got["error"] and "does not fit this decode" in got["error"]
        prefill.call("clear", room=room)
        decode.call("clear", room=room)


def test_a_direct_k_carried_in_d_counts_the_pages_before_the_request_succeeds(cluster, prefill):
    """On the direct path the last chunk's ``K`` rides in its ``D``: the decode counts those pages
    as moved (direct bytes, nothing scattered), then succeeds the request; a ``K`` naming pages the
    request does not have fails it, and the ``D`` after it does not succeed it."""
    prefill, addr = prefill
    decode = decode_rank(cluster, "d_direct")
    rng = np.random.default_rng(12)
    for start, n, ok in ((0, 2, True), (1, 2, False)):
        room = new_room(rng)
        assert bootstrap(prefill, decode, addr, room, [3, 4], prefix_len=0, aux_index=2) == WAITING
        before = decode.call("stats")
        decode.call("done", room=room, src=5, first_token=int(rng.integers(1, 1000)), aux_index=2,
                    kv={"start": start, "n": n})
        got = decode.call("wait", room=room, want=[SUCCESS], timeout_s=10)
        after = decode.call("stats")
        if ok:
            assert got["status"] == SUCCESS
            assert decode.call("aux", index=2) == decode.call("aux", index=5)
            assert after["pages"] - before["pages"] == n and after["bytes"] > before["bytes"]
            moved = after["path_bytes"].get("direct", 0) - before["path_bytes"].get("direct", 0)
            assert moved == after["bytes"] - before["bytes"]
            assert after["copy_seconds"].get("direct") is None  # the prefill's kernel did the copy
        else:
            assert got["status"] == FAILED and "prefill sent pages 1..3" in got["error"], got
            assert after["pages"] == before["pages"]
        prefill.call("clear", room=room)
        decode.call("clear", room=room)
