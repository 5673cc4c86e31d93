"""The PD layout record, its mismatch messages, and the packing arithmetic (pages, slots, credits)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from kvtier.kernels.kv_pages import gather_kv_reference, scatter_kv_reference
from kvtier.transfer.base import PeerTimeout, TransferError
from kvtier.transfer.pd_layout import (
    PDLayout,
    SlotCredits,
    compare,
    kv_groups,
    page_rows,
    pages_outside,
    slot_bytes_for,
    slot_chunks,
)


def layout(role: str = "decode", address: str = "127.0.0.1:5000", **changes) -> PDLayout:
    base = dict(model="llama@|q=|load=dummy", kv_dtype="bfloat16", page_size=16, tp_size=1, pp_size=1, cp_size=1,
                total_kv_heads=8,
                transport="zmq", kv_item_lens=(256,) * 4, aux_item_lens=(64, 64, 32))
    base.update(changes)
    return PDLayout(role=role, address=address, **base)


def test_equal_layouts_agree_and_survive_json():
    a = layout("prefill", "127.0.0.1:8998")
    assert compare(a, layout()) is None
    assert PDLayout.from_dict(a.to_dict()) == a
    assert compare(layout(), PDLayout(role="prefill", address="x", page_size=16)) is None  # None fields are skipped


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"page_size": 1}, "kvtier PD: prefill 127.0.0.1:8998 has page_size=1, this decode has 16; "
                           "start both with the same --page-size"),
        ({"kv_dtype": "float8_e4m3fn"}, "has kv_cache_dtype=float8_e4m3fn, this decode has bfloat16; "
                                        "start both with the same --kv-cache-dtype"),
        ({"model": "qwen@|q=|load=auto"}, "has model=qwen@|q=|load=auto, this decode has llama@|q=|load=dummy; "
                                          "serve the same model"),
        ({"tp_size": 2}, "has 256 bytes per page in KV buffer 0 at attention tp_size=2, this decode has 256 at "
                         "tp_size=1 (all heads: 512 vs 256 bytes"),
        ({"tp_size": 16, "kv_item_lens": (16,) * 4},
         "has attention tp_size=16, this decode has 1; the model's 8 KV heads do not split evenly over both"),
        ({"total_kv_heads": 4}, "has 4 KV heads in all, this decode has 8; serve the same model on both"),
        ({"pp_size": 2}, "has pp_size=2, this decode has 1; start both with the same --pp-size"),
        ({"transport": "cuda_ipc"}, "has transport=cuda_ipc, this decode has zmq; set the kvtier key pd_transport"),
        ({"kv_item_lens": (128,) * 4}, "has 128 bytes per page in KV buffer 0, this decode has 256 "
                                       "(head count, head dim or dtype per rank differ)"),
        ({"kv_item_lens": (256,) * 6}, "has 6 KV buffers (layers x K,V, plus a draft model's), this decode has 4"),
        ({"aux_item_lens": (64, 64, 48)}, "has metadata rows of [64, 64, 48] bytes, this decode has [64, 64, 32]"),
        ({"proto": "kvtier-pd-0"}, "has protocol=kvtier-pd-0, this decode has kvtier-pd-1"),
    ],
)
def test_each_mismatch_names_the_setting_to_change(changes, expected):
    why = compare(layout(), layout("prefill", "127.0.0.1:8998", **changes))
    assert why is not None and why.startswith("kvtier PD: prefill 127.0.0.1:8998 ")
    assert expected in why


@pytest.mark.parametrize("prefill_tp, decode_tp", [(2, 1), (1, 2), (4, 2), (2, 4), (8, 1)])
def test_tp_sizes_that_split_the_heads_evenly_agree(prefill_tp, decode_tp):
    """A rank's page holds 1/tp of the heads: 8 heads x 32 B at TP-1 is 256 B per page."""
    prefill = layout("prefill", "127.0.0.1:8998", tp_size=prefill_tp, tp_rank=prefill_tp - 1, total_kv_heads=8,
                     kv_item_lens=(256 // prefill_tp,) * 4)
    decode = layout(tp_size=decode_tp, tp_rank=0, kv_item_lens=(256 // decode_tp,) * 4, total_kv_heads=None)
    assert compare(decode, prefill) is None and compare(prefill, decode) is None
    assert PDLayout.from_dict(prefill.to_dict()) == prefill


def test_tp_sizes_that_do_not_map_are_refused_with_the_fix():
    why = compare(layout(tp_size=2, kv_item_lens=(384,) * 4, total_kv_heads=6),
                  layout("prefill", "127.0.0.1:8998", tp_size=3, kv_item_lens=(256,) * 4, total_kv_heads=6))
    assert why == ("kvtier PD: prefill 127.0.0.1:8998 has attention tp_size=3, this decode has 2; kvtier PD moves KV "
                   "between attention TP sizes that divide one another; start both with such --tp sizes (for "
                   "example equal ones)")
    why = compare(layout(tp_size=4, kv_item_lens=(128,) * 4, total_kv_heads=2),
                  layout("prefill", "127.0.0.1:8998", tp_size=1, kv_item_lens=(512,) * 4, total_kv_heads=2))
    assert "the model's 2 KV heads do not split evenly over both (a KV head replicated on several ranks is not " \
           "supported); start both with --tp sizes that divide 2" in why


def test_pages_outside_a_pool_are_named_with_the_pool_size():
    assert pages_outside(np.array([0, 5, 9]), 10) is None
    assert pages_outside(np.array([], dtype=np.int64), 0) is None
    assert pages_outside(np.array([3, 10]), 10) == "pages [3, 10] outside a pool of 10 pages"
    assert pages_outside(np.array([-1, 2]), 10) == "pages [-1, 2] outside a pool of 10 pages"


def test_page_rows_expand_pages_in_order():
    assert page_rows(np.array([3, 0, 7]), 4).tolist() == [12, 13, 14, 15, 0, 1, 2, 3, 28, 29, 30, 31]
    assert page_rows(np.array([5], dtype=np.int32), 1).tolist() == [5]
    assert page_rows(np.array([], dtype=np.int64), 16).size == 0


def test_slot_chunks_cover_every_page_once():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, per = int(rng.integers(0, 100)), int(rng.integers(1, 20))
        chunks = slot_chunks(n, per)
        assert all(0 < c <= per for _, c in chunks)
        covered = [p for s, c in chunks for p in range(s, s + c)]
        assert covered == list(range(n))
    assert slot_chunks(0, 4) == []
    with pytest.raises(ValueError):
        slot_chunks(3, 0)


def test_slot_size_holds_whole_pages():
    assert slot_bytes_for(1000, 256) == 768
    assert slot_bytes_for(100, 256) == 256  # never less than one page
    assert slot_bytes_for(32 << 20, 131072) == 32 << 20


def test_kv_groups_pair_k_and_v_buffers():
    assert kv_groups([256] * 4) == [([0, 1], [2, 3])]
    assert kv_groups([256, 256, 128, 128]) == [([0, 1], [2, 3])]  # K and V of different head dims
    # a draft model's KV (another size) appended after the target's
    assert kv_groups([256] * 4 + [64] * 2) == [([0, 1], [2, 3]), ([4], [5])]
    with pytest.raises(ValueError, match="cannot be paired"):
        kv_groups([256, 128, 64, 64])


def test_grouped_packing_round_trips_between_pools_with_different_pages():
    """gather over kv_groups' lists on one pool, scatter on another: the bytes of each page move."""
    gen = torch.Generator().manual_seed(1)
    item_lens = [64] * 4 + [32] * 2
    page_size, rows = 4, 64
    src = [torch.randint(0, 256, (rows, n // page_size), dtype=torch.uint8, generator=gen) for n in item_lens]
    dst = [torch.zeros_like(t) for t in src]
    page_bytes = sum(item_lens)
    src_pages, dst_pages = np.array([9, 2, 5]), np.array([0, 14, 3])
    buf = torch.zeros(len(src_pages) * page_bytes, dtype=torch.uint8)
    offset = 0
    for ks, vs in kv_groups(item_lens):
        offs = torch.arange(3, dtype=torch.int64) * page_bytes + offset
        gather_kv_reference([src[i] for i in ks], [src[i] for i in vs], torch.from_numpy(page_rows(src_pages, 4)),
                            buf, offs, page_size)
        scatter_kv_reference(buf, offs, torch.from_numpy(page_rows(dst_pages, 4)), [dst[i] for i in ks],
                             [dst[i] for i in vs], page_size)
        offset += sum(item_lens[i] for i in ks + vs)
    for s, d in zip(src, dst):
        for sp, dp in zip(src_pages, dst_pages):
            assert torch.equal(d[dp * 4 : dp * 4 + 4], s[sp * 4 : sp * 4 + 4])
        moved = set(page_rows(dst_pages, 4).tolist())
        untouched = [r for r in range(rows) if r not in moved]
        assert not d[untouched].any()


def test_credits_bound_slots_in_flight_and_come_back():
    credits = SlotCredits(2)
    a, b = credits.take(1), credits.take(1)
    assert {a, b} == {0, 1}
    start = time.monotonic()
    with pytest.raises(PeerTimeout, match="no staging slot came back"):  # both are out
        credits.take(0.2)
    assert 0.15 < time.monotonic() - start < 2
    giver = threading.Timer(0.1, credits.give, args=(a,))
    giver.start()
    assert credits.take(5) == a
    giver.join()
    with pytest.raises(TransferError, match="was not taken"):
        credits.give(7)
    credits.give(b)
    with pytest.raises(TransferError, match="was not taken"):
        credits.give(b)


def test_data_path_is_direct_only_for_cuda_ipc_whole_pages_and_an_offered_pool():
    from kvtier.transfer.pd_layout import DIRECT, STAGED, data_path, pool_regions

    offer = {"regions": pool_regions(4)}
    assert pool_regions(3) == ["kv0", "kv1", "kv2"]
    assert data_path("cuda_ipc", offer, 4, head_slice=False) == (DIRECT, "pages go straight into the decode's pool "
                                                                         "over CUDA IPC")
    cases = [
        (("zmq", offer, 4, False), "transport zmq cannot map the decode's pool"),
        (("cuda_ipc", offer, 4, True), "the TP sizes differ, so a head slice moves through staging"),
        (("cuda_ipc", None, 4, False), "the decode did not offer its KV pool"),
        (("cuda_ipc", {"error": "cannot export region 'kv0'"}, 4, False),
         "the decode could not export its KV pool: cannot export region 'kv0'"),
        (("cuda_ipc", {"regions": pool_regions(2)}, 4, False), "offered regions ['kv0', 'kv1'], not its 4 KV buffers"),
    ]
    for args, why in cases:
        path, reason = data_path(*args)
        assert path == STAGED and why in reason, (args, reason)
