"""kvtier PD between different attention TP sizes, each TP rank its own real process (CPU).

A TP-2 prefill (two rank processes, each a real ``MHATokenToKVPool`` with half the KV heads, one
bootstrap server) feeds a TP-1 decode (all heads): the decode pages must equal both prefill ranks'
head slices side by side, bit for bit. The reverse: a TP-1 prefill feeds a TP-2 decode whose two
ranks (two processes, each with its own destination pages) get their halves. SGLang's own rank
mapping (``_resolve_rank_mapping``: ``target_tp_ranks``, ``required_dst_info_num``,
``required_prefill_response_num``) decides who talks to whom; the tests play the schedulers' steps.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from kvtier.sglang_ext.pd_io import cuda_ipc_available

# The process harness of test_pd_conn (pytest runs with --import-mode=importlib: no sys.path entry).
_spec = importlib.util.spec_from_file_location("kvtier_test_pd_conn_for_tp",
                                               Path(__file__).with_name("test_pd_conn.py"))
_conn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conn)
ADDR_HOST, ENV, SUCCESS, WAITING = _conn.ADDR_HOST, _conn.ENV, _conn.SUCCESS, _conn.WAITING
Process, Rank, free_port, new_room, peer_env = _conn.Process, _conn.Rank, _conn.free_port, _conn.new_room, _conn.peer_env

HEADS = 4  # the model's KV heads


@pytest.fixture(scope="module")
def procs():
    """Three processes: ``a`` and ``b`` hold the two ranks of every TP-2 server, ``c`` the TP-1 ones."""
    env = peer_env()
    env.update(ENV)
    procs = {name: Process(env) for name in ("a", "b", "c")}
    try:
        for p in procs.values():
            assert p.reply() == {"ready": True}
        yield procs
    finally:
        for p in procs.values():
            p.kill()


def layout(rng: np.random.Generator) -> dict:
    return {"page_size": int(rng.choice([1, 4, 8])), "head_dim": int(rng.choice([8, 16])),
            "layers": int(rng.integers(1, 4)), "dtype": str(rng.choice(["bfloat16", "float32"])),
            "pool_tokens": 64 * 8}


def move(prefills: list[Rank], decodes: list[Rank], addr: str, rng: np.random.Generator, ps: int,
         pool_pages: int = 60) -> tuple[int, list[int], list[list[int]], int]:
    """One request through both schedulers' steps on every rank, in two chunks; returns the room, the
    prefill pages (the same on every prefill rank, as SGLang's TP ranks allocate alike), each decode
    rank's destination pages and the decode prefix in pages."""
    room, n_pages = new_room(rng), int(rng.integers(4, 10))
    prompt_len = (n_pages - 1) * ps + int(rng.integers(1, ps + 1))
    prefix = int(rng.integers(0, 2))
    src = rng.choice(np.arange(1, pool_pages), n_pages, replace=False).tolist()
    dsts = [rng.choice(np.arange(1, pool_pages), n_pages, replace=False).tolist() for _ in decodes]
    for p in prefills:
        p.call("sender", room=room)
    for d, dst in zip(decodes, dsts):
        assert d.call("receiver", room=room, addr=addr) == WAITING
        d.call("send_metadata", room=room, pages=dst[prefix:], aux_index=5, prefix_len=prefix * ps)
    for p in prefills:
        assert p.call("wait", room=room, want=[WAITING], timeout_s=10)["status"] == WAITING
        got = p.call("init", room=room, prompt_len=prompt_len, aux_index=3, first_token=23)
        assert got == {"prefix_len": prefix * ps, "num_pages": n_pages - prefix}
    cut = int(rng.integers(prefix, n_pages))
    for p in prefills:
        if src[prefix:cut]:
            p.call("send", room=room, pages=src[prefix:cut], last=False, tokens=(cut - prefix) * ps)
        p.call("send", room=room, pages=src[cut:], last=True, tokens=prompt_len - cut * ps)
    for end in prefills + decodes:
        assert end.call("wait", room=room, want=[SUCCESS], timeout_s=20)["status"] == SUCCESS
    for d in decodes:
        assert d.call("aux", index=5) == {"first_token": 23, "room": room}
    return room, src, dsts, prefix


def finish(room: int, ranks: list[Rank]) -> None:
    for r in ranks:
        r.call("clear", room=room)


@pytest.mark.parametrize("seed", range(3))
def test_two_prefill_ranks_fill_their_halves_of_a_tp1_decode(procs, seed):
    rng = np.random.default_rng(700 + seed)
    lay, port = layout(rng), free_port()
    prefills = [procs[name].rank(f"p2_{seed}_{r}", role="prefill", bootstrap_port=port, seed=seed * 10 + r,
                                 tp_size=2, tp_rank=r, heads=HEADS // 2, **lay) for r, name in enumerate("ab")]
    decode = procs["c"].rank(f"d1_{seed}", role="decode", bootstrap_port=0, seed=99, heads=HEADS, **lay)
    addr = f"{ADDR_HOST}:{port}"
    for _ in range(2):  # the second request reuses both registrations and staging areas
        before = decode.call("digests", pages=list(range(60)))
        room, src, (dst,), prefix = move(prefills, [decode], addr, rng, lay["page_size"])
        moved = dst[prefix:]
        for r, p in enumerate(prefills):
            half = [r * HEADS // 2, (r + 1) * HEADS // 2]
            assert decode.call("digests", pages=moved, heads=half) == p.call("digests", pages=src[prefix:])
        after = decode.call("digests", pages=list(range(60)))
        assert all(after[i] == before[i] for i in range(60) if i not in moved)
        sent = sum(p.call("stats")["bytes"] for p in prefills)
        assert sent == decode.call("stats")["bytes"]
        finish(room, prefills + [decode])


@pytest.mark.parametrize("seed", range(3))
def test_a_tp1_prefill_splits_heads_over_two_decode_ranks(procs, seed):
    rng = np.random.default_rng(800 + seed)
    lay, port = layout(rng), free_port()
    prefill = procs["c"].rank(f"p1_{seed}", role="prefill", bootstrap_port=port, seed=seed + 40, heads=HEADS, **lay)
    decodes = [procs[name].rank(f"d2_{seed}_{r}", role="decode", bootstrap_port=0, seed=90 + r, tp_size=2, tp_rank=r,
                                heads=HEADS // 2, **lay) for r, name in enumerate("ab")]
    addr = f"{ADDR_HOST}:{port}"
    for _ in range(2):
        befores = [d.call("digests", pages=list(range(60))) for d in decodes]
        room, src, dsts, prefix = move([prefill], decodes, addr, rng, lay["page_size"])
        for r, (d, dst, before) in enumerate(zip(decodes, dsts, befores)):
            half = [r * HEADS // 2, (r + 1) * HEADS // 2]
            assert d.call("digests", pages=dst[prefix:]) == prefill.call("digests", pages=src[prefix:], heads=half)
            after = d.call("digests", pages=list(range(60)))
            assert all(after[i] == before[i] for i in range(60) if i not in dst[prefix:])
        finish(room, [prefill] + decodes)


@pytest.mark.parametrize("prefill_tp, decode_tp", [(4, 2), (2, 4)])
def test_every_decode_rank_gets_its_heads_from_every_prefill_rank_holding_them(procs, prefill_tp, decode_tp):
    """Larger groups, ranks spread over the processes (several ranks of one server share one):
    4 -> 2 (each decode rank assembles two prefill ranks' heads) and 2 -> 4 (each prefill rank
    splits its heads over two decode ranks)."""
    rng = np.random.default_rng(950 + prefill_tp)
    lay, port = layout(rng), free_port()
    names = "abc"
    prefills = [procs[names[r % 3]].rank(f"p{prefill_tp}x{decode_tp}_{r}", role="prefill", bootstrap_port=port, seed=r,
                                         tp_size=prefill_tp, tp_rank=r, heads=HEADS // prefill_tp, **lay)
                for r in range(prefill_tp)]
    decodes = [procs[names[(r + 1) % 3]].rank(f"d{prefill_tp}x{decode_tp}_{r}", role="decode", bootstrap_port=0,
                                              seed=50 + r, tp_size=decode_tp, tp_rank=r, heads=HEADS // decode_tp,
                                              **lay) for r in range(decode_tp)]
    room, src, dsts, prefix = move(prefills, decodes, f"{ADDR_HOST}:{port}", rng, lay["page_size"])
    for d, (dec, dst) in enumerate(zip(decodes, dsts)):
        d0, d1 = d * HEADS // decode_tp, (d + 1) * HEADS // decode_tp
        for p, pre in enumerate(prefills):
            p0, p1 = p * HEADS // prefill_tp, (p + 1) * HEADS // prefill_tp
            lo, hi = max(d0, p0), min(d1, p1)
            if lo < hi:
                assert (dec.call("digests", pages=dst[prefix:], heads=[lo - d0, hi - d0])
                        == pre.call("digests", pages=src[prefix:], heads=[lo - p0, hi - p0])), (d, p)
    finish(room, prefills + decodes)


def test_the_decode_succeeds_only_once_every_prefill_rank_delivered(procs):
    """SGLang's required_prefill_response_num: one prefill rank's slices and metadata are not the request."""
    rng = np.random.default_rng(901)
    lay, port = layout(rng), free_port()
    ps = lay["page_size"]
    prefills = [procs[name].rank(f"p2_wait_{r}", role="prefill", bootstrap_port=port, seed=r, tp_size=2, tp_rank=r,
                                 heads=HEADS // 2, **lay) for r, name in enumerate("ab")]
    decode = procs["c"].rank("d1_wait", role="decode", bootstrap_port=0, seed=9, heads=HEADS, **lay)
    room = new_room(rng)
    for p in prefills:
        p.call("sender", room=room)
    assert decode.call("receiver", room=room, addr=f"{ADDR_HOST}:{port}") == WAITING
    decode.call("send_metadata", room=room, pages=[7, 8], aux_index=5, prefix_len=0)
    for p in prefills:
        assert p.call("wait", room=room, want=[WAITING], timeout_s=10)["status"] == WAITING
        p.call("init", room=room, prompt_len=2 * ps, aux_index=3, first_token=4)
    prefills[0].call("send", room=room, pages=[20, 21], last=True, tokens=2 * ps)
    assert prefills[0].call("wait", room=room, want=[SUCCESS], timeout_s=10)["status"] == SUCCESS
    assert decode.call("wait", room=room, want=[SUCCESS], timeout_s=1.5)["status"] == WAITING
    prefills[1].call("send", room=room, pages=[20, 21], last=True, tokens=2 * ps)
    assert decode.call("wait", room=room, want=[SUCCESS], timeout_s=10)["status"] == SUCCESS
    for r, p in enumerate(prefills):
        half = [r * HEADS // 2, (r + 1) * HEADS // 2]
        assert decode.call("digests", pages=[7, 8], heads=half) == p.call("digests", pages=[20, 21])
    finish(room, prefills + [decode])


def test_a_killed_decode_rank_fails_the_prefill_and_the_other_decode_rank(procs):
    """1 -> 2 with decode rank 1 killed before the pages move: the prefill fails within
    KVTIER_PD_TIMEOUT_S (5 s) and tells decode rank 0, which never reports Success for its half."""
    env = peer_env()
    env.update(ENV)
    doomed = Process(env)
    try:
        assert doomed.reply() == {"ready": True}
        rng = np.random.default_rng(990)
        lay, port = layout(rng), free_port()
        ps = lay["page_size"]
        prefill = procs["c"].rank("p1_doom", role="prefill", bootstrap_port=port, seed=3, heads=HEADS, **lay)
        decodes = [where.rank(f"d2_doom_{r}", role="decode", bootstrap_port=0, seed=r, tp_size=2, tp_rank=r,
                              heads=HEADS // 2, **lay) for r, where in enumerate((procs["a"], doomed))]
        room = new_room(rng)
        prefill.call("sender", room=room)
        for d in decodes:
            assert d.call("receiver", room=room, addr=f"{ADDR_HOST}:{port}") == WAITING
            d.call("send_metadata", room=room, pages=[4, 5, 6], aux_index=5, prefix_len=0)
        assert prefill.call("wait", room=room, want=[WAITING], timeout_s=10)["status"] == WAITING
        prefill.call("init", room=room, prompt_len=3 * ps, aux_index=3, first_token=4)
        doomed.kill()
        prefill.call("send", room=room, pages=[10, 11, 12], last=True, tokens=3 * ps)
        p = prefill.call("wait", room=room, want=[], timeout_s=20)
        assert p["status"] == 0 and p["seconds"] < 12 and f"sending KV of request {room} failed" in p["error"], p
        d = decodes[0].call("wait", room=room, want=[], timeout_s=20)
        assert d["status"] == 0 and f"sending KV of request {room} failed" in d["error"], d
    finally:
        doomed.kill()


def test_tp_sizes_that_do_not_split_the_heads_fail_with_the_fix(procs):
    """A TP-3 prefill and a TP-2 decode: neither size divides the other, so no rank mapping exists;
    the request fails on both sides with the message naming --tp, within seconds."""
    port = free_port()
    prefills = [procs[name].rank(f"p3_{r}", role="prefill", bootstrap_port=port, seed=r, tp_size=3, tp_rank=r, heads=1)
                for r, name in zip(range(3), "abc")]
    decode = procs["a"].rank("d2_bad", role="decode", bootstrap_port=0, seed=5, tp_size=2, tp_rank=0, heads=1)
    room = new_room(np.random.default_rng(5))
    addr = f"{ADDR_HOST}:{port}"
    prefills[0].call("sender", room=room)
    decode.call("receiver", room=room, addr=addr)
    d = decode.call("wait", room=room, want=[], timeout_s=10)
    assert d["status"] == 0 and "has attention tp_size=3, this decode has 2; kvtier PD moves KV between attention " \
                                "TP sizes that divide one another" in d["error"], d
    p = prefills[0].call("wait", room=room, want=[], timeout_s=10)
    assert p["status"] == 0 and "has attention tp_size=2, this prefill has 3" in p["error"], p


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("transport", ["zmq", "cuda_ipc"])
def test_tp2_and_tp1_between_cuda_pools(transport):
    """The GPU path: head slices gathered and scattered on CUDA pools (torch column copies) and
    whole pages by the Triton kernels; staging in pinned host memory (zmq) or on the GPU (cuda_ipc)."""
    if transport == "cuda_ipc" and not cuda_ipc_available():
        pytest.skip("kvtier.transfer.cuda_ipc is not available")
    env = peer_env()
    env.update(ENV, KVTIER_PD_TRANSPORT=transport)
    ps = {name: Process(env) for name in ("a", "b", "c")}
    try:
        for p in ps.values():
            assert p.reply() == {"ready": True}
        rng = np.random.default_rng(1000)
        lay = dict(layout(rng), device="cuda")
        for prefill_tp, decode_tp in ((2, 1), (1, 2)):
            port = free_port()
            prefills = [ps["ab"[r] if prefill_tp == 2 else "c"].rank(
                f"p{prefill_tp}_{r}", role="prefill", bootstrap_port=port, seed=r, tp_size=prefill_tp, tp_rank=r,
                heads=HEADS // prefill_tp, **lay) for r in range(prefill_tp)]
            decodes = [ps["ab"[r] if decode_tp == 2 else "c"].rank(
                f"d{decode_tp}_{r}", role="decode", bootstrap_port=0, seed=60 + r, tp_size=decode_tp, tp_rank=r,
                heads=HEADS // decode_tp, **lay) for r in range(decode_tp)]
            room, src, dsts, prefix = move(prefills, decodes, f"{ADDR_HOST}:{port}", rng, lay["page_size"])
            for d, (dec, dst) in enumerate(zip(decodes, dsts)):
                for p, pre in enumerate(prefills):
                    if decode_tp == 1:
                        half = [p * HEADS // 2, (p + 1) * HEADS // 2]
                        assert dec.call("digests", pages=dst[prefix:], heads=half) == pre.call("digests",
                                                                                               pages=src[prefix:])
                    else:
                        half = [d * HEADS // 2, (d + 1) * HEADS // 2]
                        assert dec.call("digests", pages=dst[prefix:]) == pre.call("digests", pages=src[prefix:],
                                                                                   heads=half)
            assert prefills[0].call("stats")["transport"] == transport
            finish(room, prefills + decodes)
    finally:
        for p in ps.values():
            p.kill()
