"""The tree hook on real SGLang 0.5.17 classes on CPU: evict -> spill -> match -> load back, bit-exact."""

from __future__ import annotations

from array import array
from typing import Optional

import pytest
import torch

from kvtier.sglang_ext.config import load_config

CHUNK_TOKENS = 64


@pytest.fixture
def make_cache(make_build_context, monkeypatch, tmp_path):
    """A KVTierRadixCache over a real CPU pool whose K/V buffers hold random data, in a process whose
    SGLang applied kvtier's plugin hooks (as every scheduler process does at start)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    from kvtier.sglang_ext import plugin
    from kvtier.sglang_ext.radix_cache import KVTierRadixCache

    plugin.register()
    HookRegistry.apply_hooks()

    made = []

    def make(page_size: int, pool_tokens: int = 2048, prefill_graph: Optional[str] = None, **cfg):
        ctx = make_build_context(page_size=page_size, pool_tokens=pool_tokens)
        if prefill_graph is not None:
            # What SGLang resolves on a GPU host; on CPU (torch-native attention) it turns graphs off.
            ctx.server_args.cuda_graph_config.prefill.backend = prefill_graph
        pool = ctx.params.token_to_kv_pool_allocator.get_kvcache()
        gen = torch.Generator().manual_seed(page_size)
        for buf in pool.k_buffer + pool.v_buffer:
            buf.copy_(torch.randn(buf.shape, generator=gen).to(buf.dtype))
        settings = {"chunk_tokens": CHUNK_TOKENS, "cpu_size_gb": 0.02, **cfg}
        if "disk_path" in cfg:
            settings["disk_path"] = str(tmp_path / "disk")
        cache = KVTierRadixCache(ctx, load_config(env={}, **settings))
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.store.close()


def kv_rows(cache, rows: torch.Tensor) -> list[torch.Tensor]:
    pool = cache.token_to_kv_pool_allocator.get_kvcache()
    return [buf[rows].clone() for buf in pool.k_buffer + pool.v_buffer]


def same_kv(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.view(torch.int16), y.view(torch.int16)) for x, y in zip(a, b))


def clear_pool(cache) -> None:
    """Zero every K and V row: what a load-back brings must come from the store. Eviction leaves a
    row's bytes in place and the allocator may hand the same rows out again, so without this a
    load that copied nothing could still compare equal."""
    pool = cache.token_to_kv_pool_allocator.get_kvcache()
    for buf in pool.k_buffer + pool.v_buffer:
        buf.zero_()


def make_req(tokens: list[int], rid: str = "r0"):
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    return Req(rid, "", array("q", tokens), SamplingParams(max_new_tokens=4))


def insert(cache, tokens: list[int]) -> torch.Tensor:
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    rows = cache.token_to_kv_pool_allocator.alloc(len(tokens))
    cache.insert(InsertParams(key=RadixKey(array("q", tokens)), value=rows))
    return rows


def evict_all(cache) -> None:
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    cache.evict(EvictParams(num_tokens=10**9))
    cache.flush()
    assert cache.total_size() == 0


def match_and_load(cache, req, flush: bool = True):
    """What the scheduler does: ``init_next_round_input`` matches, the prefill adder loads back; then
    (``flush``) the queued loads launch and every copy is waited for."""
    from sglang.srt.mem_cache.base_prefix_cache import InitLoadBackParams

    req.init_next_round_input(cache)
    device_len, host_hit = len(req.prefix_indices), req.host_hit_length
    rows, node = cache.init_load_back(
        InitLoadBackParams(best_match_node=req.best_match_node, host_hit_length=host_hit, req=req)
    )
    if flush:
        cache.flush()
    return device_len, host_hit, rows, node


@pytest.mark.parametrize("copy", [{}, {"load_layer_groups": 1},
                                  {"load_layer_groups": 2, "spill_max_programs": 2, "load_max_programs": 3},
                                  {"spill_staging_chunks": 2}], ids=["defaults", "one_launch", "groups", "staged_spill"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_evicted_prefix_comes_back_bit_exact(make_cache, page_size, copy):
    cache = make_cache(page_size, **copy)
    doc = list(range(1000, 1000 + 4 * CHUNK_TOKENS + 32))  # 4 whole chunks + a 32-token tail
    rows = insert(cache, doc)
    expected = kv_rows(cache, rows)
    evict_all(cache)
    keys = cache.namespace.chunk_keys(doc)
    assert cache.store.prefix_hits(keys) == 4
    assert cache.store.cpu.contains(cache.namespace.tail_keys(doc, keys)) == [False, True]  # 16, 32 tokens

    clear_pool(cache)
    req = make_req(doc + [7, 8, 9])  # the document continued: whole chunks and tail come back
    device_len, host_hit, loaded, node = match_and_load(cache, req)
    assert (device_len, host_hit) == (0, len(doc))
    assert len(loaded) == len(doc)
    assert same_kv(kv_rows(cache, loaded), expected)
    assert node is not cache.root_node
    # The loaded prefix is now an ordinary GPU hit.
    again = make_req(doc + [1], "r1")
    again.init_next_round_input(cache)
    assert torch.equal(again.prefix_indices, loaded) and again.host_hit_length == 0
    assert not cache.store.cpu._leases  # load-back pins released


@pytest.mark.parametrize("policy", ["write_back", "write_through"])
def test_one_evict_copies_every_leaf_it_deletes_in_one_copy(make_cache, monkeypatch, policy):
    """Three documents with tails, evicted by one call: one copy for all their chunks (write_back) or
    tails (write_through stored the whole chunks at insert), launched before evict returns; each
    comes back bit-exact. An evict that deletes two of them copies those two, again in one copy."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    cache = make_cache(1, write_policy=policy, spill_on_insert=False)
    docs = [list(range(base, base + 2 * CHUNK_TOKENS + 16)) for base in (1000, 3000, 5000, 7000)]
    rows = [insert(cache, doc) for doc in docs]
    expected = [kv_rows(cache, r) for r in rows]
    cache.flush()
    launches = []
    to_host = cache.io.to_host
    monkeypatch.setattr(cache.io, "to_host", lambda *a, **k: launches.append(len(a[1])) or to_host(*a, **k))

    before = spilled_chunks(cache, "eviction")
    cache.evict(EvictParams(num_tokens=2 * len(docs[0])))  # the two least recently used
    per_doc = 3 if policy == "write_back" else 1  # two whole chunks and a tail, or the tail alone
    assert launches == [2 * per_doc] and spilled_chunks(cache, "eviction") - before == 2 * per_doc
    cache.evict(EvictParams(num_tokens=10**9))
    assert launches == [2 * per_doc, 2 * per_doc]
    cache.flush()
    assert cache.total_size() == 0

    clear_pool(cache)
    for i, doc in enumerate(docs):
        req = make_req(doc + [1], f"r{i}")
        _, host_hit, loaded, _ = match_and_load(cache, req)
        assert host_hit == len(doc) and same_kv(kv_rows(cache, loaded), expected[i])


def test_a_leaf_deleted_outside_evict_is_copied_at_once(make_cache, monkeypatch):
    """SGLang 0.5.17 deletes leaves only in evict; should another path delete one, its chunks must not
    wait for an evict that may never come: they are copied before the deletion returns."""
    cache = make_cache(1, spill_on_insert=False)
    doc = list(range(1000, 1000 + 2 * CHUNK_TOKENS))
    rows = insert(cache, doc)
    expected = kv_rows(cache, rows)
    launches = []
    to_host = cache.io.to_host
    monkeypatch.setattr(cache.io, "to_host", lambda *a, **k: launches.append(len(a[1])) or to_host(*a, **k))
    leaf = next(iter(cache.root_node.children.values()))
    cache.token_to_kv_pool_allocator.free(leaf.value)
    cache._delete_leaf(leaf)
    assert launches == [2]
    cache.flush()
    clear_pool(cache)
    _, host_hit, loaded, _ = match_and_load(cache, make_req(doc + [1]))
    assert host_hit == len(doc) and same_kv(kv_rows(cache, loaded), expected)


@pytest.mark.parametrize("page_size", [1, 16])
def test_load_continues_a_partial_gpu_match(make_cache, page_size):
    cache = make_cache(page_size)
    doc = list(range(5000, 5000 + 3 * CHUNK_TOKENS))
    rows = insert(cache, doc)
    expected = kv_rows(cache, rows)
    evict_all(cache)
    clear_pool(cache)
    # The first 96 tokens come back onto the GPU (recomputed, say): 1.5 chunks.
    head = insert(cache, doc[:96])
    pool = cache.token_to_kv_pool_allocator.get_kvcache()
    for buf, e in zip(pool.k_buffer + pool.v_buffer, expected):
        buf[head] = e[:96]
    head_before = kv_rows(cache, head)
    req = make_req(doc + [1])
    device_len, host_hit, loaded, _ = match_and_load(cache, req)
    assert (device_len, host_hit) == (96, 3 * CHUNK_TOKENS - 96)
    assert same_kv(kv_rows(cache, loaded), [e[96:] for e in expected])
    assert same_kv(kv_rows(cache, head), head_before)  # skipped rows of chunk 1 left untouched


def test_write_through_stores_on_insert(make_cache):
    """Stored at insert, once: the scheduler's next step (where write_back's ``spill_on_insert``
    copies run) copies nothing more."""
    cache = make_cache(16, write_policy="write_through")
    doc = list(range(2 * CHUNK_TOKENS + 10))
    insert(cache, doc)
    scheduler_step()(_hooked_scheduler(cache))
    cache.flush()
    assert cache.store.prefix_hits(cache.namespace.chunk_keys(doc)) == 2
    # Eviction then needs no copy: the chunks are already there.
    evict_all(cache)
    assert cache.store.metrics.registry.get_sample_value("kvtier_bytes_total", {"tier": "cpu", "direction": "in"}) == 2 * cache.store.chunk_bytes
    assert [spilled_chunks(cache, when) for when in ("insert", "ahead", "eviction")] == [2, 0, 0]


def tail_tokens(cache) -> int:
    return int(cache.store.metrics.registry.get_sample_value("kvtier_tail_tokens_total") or 0)


@pytest.mark.parametrize("whole", [4, 0], ids=["chunks_and_tail", "tail_only"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_the_next_chat_turn_loads_the_last_turn_s_tail(make_cache, page_size, whole):
    """The last turn's prompt and answer (whole chunks + 40 tokens) were evicted; the next prompt
    continues them with a new message. The whole chunks and a 32-token tail (40 cut to the 16-token
    granule) come back bit-exact: 8 tokens and the message are left to compute."""
    cache = make_cache(page_size)
    turn = list(range(3000, 3000 + whole * CHUNK_TOKENS + 40))
    expected = kv_rows(cache, insert(cache, turn))
    evict_all(cache)
    assert spilled_chunks(cache, "eviction") == whole + 1
    clear_pool(cache)
    req = make_req(turn + list(range(90_000, 90_100)))
    device_len, host_hit, loaded, _ = match_and_load(cache, req)
    assert (device_len, host_hit) == (0, whole * CHUNK_TOKENS + 32)
    assert same_kv(kv_rows(cache, loaded), [e[: whole * CHUNK_TOKENS + 32] for e in expected])
    assert tail_tokens(cache) == 32 and not cache.store.cpu._leases


def test_a_tail_is_loaded_only_for_its_own_tokens(make_cache):
    cache = make_cache(1)
    turn = list(range(3000, 3000 + 2 * CHUNK_TOKENS + 40))
    insert(cache, turn)
    evict_all(cache)
    # The same whole chunks, then a token inside the stored 32-token tail differs.
    other = turn[: 2 * CHUNK_TOKENS + 20] + [7] + turn[2 * CHUNK_TOKENS + 21 :] + [1, 2, 3]
    _, host_hit, loaded, _ = match_and_load(cache, make_req(other))
    assert host_hit == len(loaded) == 2 * CHUNK_TOKENS and tail_tokens(cache) == 0


def test_without_tail_chunks_only_whole_chunks_are_stored(make_cache):
    cache = make_cache(1, tail_chunks=False)
    turn = list(range(3000, 3000 + 2 * CHUNK_TOKENS + 40))
    insert(cache, turn)
    evict_all(cache)
    assert spilled_chunks(cache, "eviction") == 2
    _, host_hit, _, _ = match_and_load(cache, make_req(turn + [1, 2, 3]))
    assert host_hit == 2 * CHUNK_TOKENS


def test_a_tail_spill_writes_only_the_tail_s_rows_of_its_slot(make_cache):
    """A tail's slot past the tail stays as it was (the copy moves 32 tokens' rows, not 64); a load
    of the tail skips those rows, so what it left there never matters."""
    from kvtier.kernels.kv_pages import gather_kv_reference

    cache = make_cache(1)
    cpu = cache.store.cpu
    for slot in range(cpu.num_slots):
        cpu.view(slot).fill_(0xAB)
    doc = list(range(1000, 1000 + 2 * CHUNK_TOKENS + 32))
    rows = insert(cache, doc)
    pool = cache.token_to_kv_pool_allocator.get_kvcache()
    # The slot as it should be: the tail's 32 rows gathered by the reference over the untouched slot.
    want = torch.full((cache.store.chunk_bytes,), 0xAB, dtype=torch.uint8)
    tail_slots = torch.cat([rows[2 * CHUNK_TOKENS :], torch.full((CHUNK_TOKENS - 32,), -1)])
    gather_kv_reference(pool.k_buffer, pool.v_buffer, tail_slots, want, torch.zeros(1, dtype=torch.int64), CHUNK_TOKENS)
    evict_all(cache)
    tail_key = cache.namespace.tail_keys(doc, cache.namespace.chunk_keys(doc))[-1]
    got = cpu.view(cpu._lru[tail_key].slot)
    assert torch.equal(got, want)
    row_bytes = pool.k_buffer[0][0].numel() * pool.k_buffer[0].element_size()  # K and V rows alike here
    assert (got == 0xAB).sum() >= (CHUNK_TOKENS - 32) * 2 * len(pool.k_buffer) * row_bytes  # rows past the tail


def test_write_through_stores_a_tail_when_its_node_is_evicted(make_cache):
    cache = make_cache(16, write_policy="write_through")
    turn = list(range(3000, 3000 + 2 * CHUNK_TOKENS + 40))
    expected = kv_rows(cache, insert(cache, turn))
    cache.flush()
    assert [spilled_chunks(cache, when) for when in ("insert", "eviction")] == [2, 0]
    evict_all(cache)  # the whole chunks are stored already: only the tail is copied
    assert [spilled_chunks(cache, when) for when in ("insert", "eviction")] == [2, 1]
    clear_pool(cache)
    _, host_hit, loaded, _ = match_and_load(cache, make_req(turn + [1, 2, 3]))
    assert host_hit == 2 * CHUNK_TOKENS + 32
    assert same_kv(kv_rows(cache, loaded), [e[: 2 * CHUNK_TOKENS + 32] for e in expected])


@pytest.mark.parametrize("page_size", [1, 16])
def test_a_tail_load_continues_a_gpu_match_that_ends_inside_it(make_cache, page_size):
    cache = make_cache(page_size)
    turn = list(range(3000, 3000 + 2 * CHUNK_TOKENS + 40))
    expected = kv_rows(cache, insert(cache, turn))
    evict_all(cache)
    clear_pool(cache)
    # The whole chunks and the tail's first 16 tokens are on the GPU again (recomputed, say).
    on_gpu = 2 * CHUNK_TOKENS + 16
    head = insert(cache, turn[:on_gpu])
    pool = cache.token_to_kv_pool_allocator.get_kvcache()
    for buf, e in zip(pool.k_buffer + pool.v_buffer, expected):
        buf[head] = e[:on_gpu]
    head_before = kv_rows(cache, head)
    device_len, host_hit, loaded, _ = match_and_load(cache, make_req(turn + [1, 2, 3]))
    assert (device_len, host_hit) == (on_gpu, 16)
    assert same_kv(kv_rows(cache, loaded), [e[on_gpu : on_gpu + 16] for e in expected])
    assert same_kv(kv_rows(cache, head), head_before) and tail_tokens(cache) == 16


def spilled_bytes(cache) -> float:
    return cache.store.metrics.registry.get_sample_value("kvtier_bytes_total", {"tier": "cpu", "direction": "in"}) or 0.0


@pytest.mark.parametrize("page_size", [1, 16])
def test_spill_ahead_copies_what_eviction_takes_next(make_cache, page_size, monkeypatch):
    """A request that would leave less than ``spill_ahead`` of the pool free gets the nodes that
    eviction takes first copied out when it is matched, in one copy; evicting them later copies
    nothing, and what comes back is bit-exact. A document shared by two requests is an inner node:
    it is copied once both of its leaves are counted, as ``RadixCache.evict`` would take it."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    T = CHUNK_TOKENS
    # spill_on_insert off: the walk's copies alone.
    cache = make_cache(page_size, pool_tokens=24 * T, spill_ahead=0.35, spill_on_insert=False)  # ~8.4 chunks' rows ready
    shared = list(range(10_000, 10_000 + 4 * T))
    oldest = [shared + list(range(20_000, 20_000 + 2 * T)), shared + list(range(30_000, 30_000 + 2 * T))]
    newer = [list(range(n, n + 4 * T)) for n in (40_000, 50_000)]
    # insert() allocates rows for a whole document, the shared part twice: 20 of 24 chunks in use.
    expected = {doc[-1]: kv_rows(cache, insert(cache, doc)) for doc in oldest + newer}
    assert spilled_bytes(cache) == 0
    copies = []
    to_host = cache.io.to_host
    monkeypatch.setattr(cache.io, "to_host", lambda *a, **kw: copies.append(kw["owners"]) or to_host(*a, **kw))

    # 3 chunks arriving would leave about one free (less the allocator's padding page): the two
    # leaves of the shared document (2 chunks each), then the document itself (4) are copied out,
    # which covers the reserve; the newer documents are not.
    req = make_req(list(range(60_000, 60_000 + 3 * T)), "incoming")
    req.init_next_round_input(cache)
    cache.flush()
    keys = cache.namespace.chunk_keys
    assert [cache.store.prefix_hits(keys(doc)) for doc in oldest] == [6, 6]
    assert [cache.store.cpu.contains(keys(doc)) for doc in newer] == [[False] * 4] * 2
    assert spilled_bytes(cache) == 8 * cache.store.chunk_bytes
    assert len(copies) == 1 and len(copies[0]) == 3  # the three nodes' chunks went as one copy

    req.init_next_round_input(cache)  # matched again: nothing new to copy
    cache.evict(EvictParams(num_tokens=8 * T))  # takes the shared document: no copy at eviction
    cache.flush()
    assert spilled_bytes(cache) == 8 * cache.store.chunk_bytes
    assert [cache.store.cpu.contains(keys(doc)) for doc in newer] == [[False] * 4] * 2

    clear_pool(cache)
    for doc in oldest:
        device_len, host_hit, loaded, _ = match_and_load(cache, make_req(doc + [1], f"back{doc[-1]}"))
        assert device_len + host_hit == 6 * T and host_hit >= 2 * T
        assert same_kv(kv_rows(cache, loaded), [e[device_len : 6 * T] for e in expected[doc[-1]]])


def test_spill_ahead_walks_again_once_the_tree_changed(make_cache, monkeypatch):
    """A request matched again in the same state, or one needing less, does not walk the tree
    again (a cache-aware policy matches every waiting request each round); after an insert the
    pool is fuller, and a request needing more sees a fuller pool too: the next node in eviction
    order is copied out."""
    T = CHUNK_TOKENS
    cache = make_cache(16, pool_tokens=16 * T, spill_ahead=0.25, spill_on_insert=False)  # 4 chunks' rows ready
    walked = []  # the nodes each walk ranks
    priority = cache.eviction_strategy.get_priority
    monkeypatch.setattr(cache.eviction_strategy, "get_priority", lambda node: walked.append(node) or priority(node))
    docs = [list(range(n, n + 3 * T)) for n in (10_000, 20_000, 30_000, 40_000)]
    for doc in docs[:3]:
        insert(cache, doc)  # 9 of 16 chunks in use
    incoming = make_req(list(range(90_000, 90_000 + 4 * T)), "incoming")
    incoming.init_next_round_input(cache)  # ~3 free after it: the oldest document goes
    assert len(walked) == 3  # the three leaves
    incoming.init_next_round_input(cache)
    make_req(list(range(95_000, 95_000 + 3 * T + T // 2)), "smaller").init_next_round_input(cache)  # needs less
    assert len(walked) == 3
    cache.flush()
    stored = [cache.store.prefix_hits(cache.namespace.chunk_keys(doc)) for doc in docs[:3]]
    assert stored == [3, 0, 0]
    insert(cache, docs[3])  # ~0 free after the incoming request now: the next one goes too
    incoming.init_next_round_input(cache)
    cache.flush()
    assert [cache.store.prefix_hits(cache.namespace.chunk_keys(doc)) for doc in docs] == [3, 3, 0, 0]
    assert spilled_bytes(cache) == 6 * cache.store.chunk_bytes
    walks = len(walked)
    make_req(list(range(100_000, 100_000 + 7 * T)), "larger").init_next_round_input(cache)  # same state, needs more
    cache.flush()
    assert len(walked) > walks
    assert [cache.store.prefix_hits(cache.namespace.chunk_keys(doc)) for doc in docs] == [3, 3, 3, 0]


def spilled_chunks(cache, when: str) -> int:
    return int(cache.store.metrics.registry.get_sample_value("kvtier_spilled_chunks_total", {"when": when}) or 0)


def test_spill_ahead_keeps_up_with_requests_of_one_size(make_cache):
    """Requests of one size, one after another (offload_ttft's cold and warm passes): once the pool is full each
    leaves the free and evictable sizes as they were, yet the tree changed (a document out, one in),
    so each must still get the next document in eviction order copied out ahead and no eviction
    copies on the critical path (``kvtier_spilled_chunks_total{when="eviction"}`` stays 0). At
    2e583df the walk was skipped as "same state" from the third such request on, and on an H100
    each later request waited ~25 ms for a write-back spill."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    T = CHUNK_TOKENS
    cache = make_cache(16, pool_tokens=16 * T, spill_ahead=0.25, spill_on_insert=False)  # 4 chunks' rows ready
    docs = [list(range(n, n + 4 * T)) for n in range(10_000, 130_000, 10_000)]  # 12 documents of 4 chunks
    at_eviction = []  # chunks copied as their rows were freed, per request
    for i, doc in enumerate(docs):
        make_req(doc, f"doc{i}").init_next_round_input(cache)  # matched: the spill-ahead walk
        short = len(doc) - cache.token_to_kv_pool_allocator.available_size()
        if short > 0:
            cache.evict(EvictParams(num_tokens=short))
        insert(cache, doc)
        cache.flush()
        at_eviction.append(spilled_chunks(cache, "eviction"))
    assert at_eviction == [0] * len(docs)
    # The pool holds at most four documents: the first eight were evicted, each after its copy.
    assert [cache.store.prefix_hits(cache.namespace.chunk_keys(doc)) for doc in docs[:8]] == [4] * 8
    assert spilled_chunks(cache, "ahead") >= 8 * 4 and spilled_chunks(cache, "insert") == 0

    # The warm pass: the same documents again, each loaded back from the CPU tier (its spill ahead
    # runs after the load), evicting what the cold pass left: still no copy at eviction.
    for i, doc in enumerate(docs[:8]):
        device_len, host_hit, _, _ = match_and_load(cache, make_req(doc + [1], f"warm{i}"))
        assert (device_len, host_hit) == (0, 4 * T)
        at_eviction.append(spilled_chunks(cache, "eviction"))
    assert at_eviction == [0] * (len(docs) + 8)


def test_a_request_with_a_host_hit_spills_ahead_after_its_load(make_cache, monkeypatch):
    """The spill ahead of a request loading from the CPU tier is launched after its load (so that
    on a GPU it runs behind the load, not beside it), both from the plugin's hook once the batch is
    formed, and it still copies out what eviction takes next; the loaded KV is bit-exact."""
    from sglang.srt.mem_cache.base_prefix_cache import InitLoadBackParams

    from kvtier.sglang_ext.pool_io import PoolIO

    T = CHUNK_TOKENS
    cache = make_cache(16, pool_tokens=16 * T, spill_ahead=0.4, spill_on_insert=False)  # ~6 chunks' rows ready
    launched = []  # the copies in launch order, each as (op, chunks)
    for op, method in (("spill", "to_host"), ("load", "to_device")):
        real = getattr(PoolIO, method)
        monkeypatch.setattr(cache.io, method, lambda *a, _real=real, _op=op, **k: (
            launched.append((_op, len(a[1] if _op == "spill" else a[0]))), _real(cache.io, *a, **k))[1])
    doc = list(range(10_000, 10_000 + 4 * T))
    expected = kv_rows(cache, insert(cache, doc))
    evict_all(cache)  # doc now only in the CPU tier
    launched.clear()
    others = [list(range(n, n + 3 * T)) for n in (20_000, 30_000, 40_000)] + [list(range(50_000, 50_000 + 4 * T))]
    for other in others:
        insert(cache, other)  # 13 of 16 chunks in use
    clear_pool(cache)
    req = make_req(doc + [1])
    req.init_next_round_input(cache)
    assert req.host_hit_length == 4 * T and launched == []  # matched: nothing copied yet
    loaded, _ = cache.init_load_back(
        InitLoadBackParams(best_match_node=req.best_match_node, host_hit_length=req.host_hit_length, req=req)
    )
    # SGLang's evict(256 tokens) takes the two oldest documents, copied in one copy as it returns;
    # the load waits for the batch to be formed, and the spill ahead for the load.
    assert launched == [("spill", 6)]
    scheduler_step()(_hooked_scheduler(cache))  # the batch is formed: the load, then, ahead, the next
    cache.flush()                               # document eviction would take
    assert launched == [("spill", 6), ("load", 4), ("spill", 3)]
    assert same_kv(kv_rows(cache, loaded), expected)
    keys = cache.namespace.chunk_keys
    assert [cache.store.prefix_hits(keys(o)) for o in others] == [3, 3, 3, 0]


class Flag:
    """Stands in for a copy's CUDA event on a CPU pool, where copies finish at once: running until
    the test sets ``done``."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


def scheduler_step(form_batch=None):
    """``Scheduler.get_new_batch_prefill`` as the plugin's AFTER hook makes it, built by SGLang's own
    hook wrapper around ``form_batch(scheduler)`` (default: schedule nothing; the real method needs a
    whole running scheduler): the hook must take what the wrapper passes and leave the plan alone."""
    from sglang.srt.plugins.hook_registry import HookType, _wrap_fn

    from kvtier.sglang_ext import plugin

    def get_new_batch_prefill(scheduler, running_batch):
        if form_batch is not None:
            form_batch(scheduler)
        return "plan"

    wrapped = _wrap_fn(get_new_batch_prefill, plugin._after_prefill_scheduled, HookType.AFTER)

    def step(scheduler):
        assert wrapped(scheduler, running_batch=None) == "plan"

    return step


def test_spill_ahead_waits_until_no_load_runs(make_cache):
    """While a load runs on the GPU the walk's copies are held back (beside a load they share PCIe),
    and launched at the scheduler's next step once it finished, through the plugin's hook; a held
    node evicted before that is copied at its eviction, once."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    from kvtier.sglang_ext.pool_io import Completion

    T = CHUNK_TOKENS
    cache = make_cache(16, pool_tokens=16 * T, spill_ahead=0.25, spill_on_insert=False)  # 4 chunks' rows ready
    step = scheduler_step()
    docs = [list(range(n, n + 3 * T)) for n in (10_000, 20_000, 30_000, 40_000)]
    for doc in docs[:3]:
        insert(cache, doc)  # 9 of 16 chunks in use
    load = Flag()
    cache.io._last_load = Completion(load, lambda: None)  # the latest load, still copying
    assert cache.io.loads_running()
    scheduler = _hooked_scheduler(cache)

    stored = lambda: [cache.store.prefix_hits(cache.namespace.chunk_keys(doc)) for doc in docs]  # noqa: E731
    make_req(list(range(90_000, 90_000 + 4 * T)), "incoming").init_next_round_input(cache)  # the oldest goes
    step(scheduler)  # a scheduler step during the load
    cache.flush()
    assert stored() == [0, 0, 0, 0] and spilled_chunks(cache, "ahead") == 0
    load.done = True
    step(scheduler)  # the next step
    cache.flush()
    assert stored() == [3, 0, 0, 0] and spilled_chunks(cache, "ahead") == 3
    steps = cache.store.metrics.registry.get_sample_value("kvtier_op_seconds_count", {"tier": "hook", "op": "spill_deferred"})
    assert steps == 1  # timed as a hook when a step launched copies, not at the steps that had none

    load.done = False
    insert(cache, docs[3])  # fuller: the next walk takes the second document
    make_req(list(range(95_000, 95_000 + 4 * T)), "incoming2").init_next_round_input(cache)
    cache.evict(EvictParams(num_tokens=6 * T))  # the first two documents, before the held copy launched
    cache.flush()
    assert stored() == [3, 3, 0, 0] and spilled_chunks(cache, "eviction") == 3
    load.done = True
    step(scheduler)
    cache.flush()
    assert spilled_chunks(cache, "ahead") == 3 and spilled_chunks(cache, "eviction") == 3


@pytest.mark.parametrize("on", [False, True], ids=["off", "on"])
def test_spill_on_insert_copies_each_inserted_node_at_the_next_step(make_cache, on):
    """``spill_on_insert``: a prefilled prompt and then the finished request's reply under it are each
    copied out at the scheduler's next step once no load runs, though the pool is far from the spill
    ahead reserve; their eviction then copies nothing, and they come back bit-exact. Off, the same
    steps copy nothing and eviction copies it all."""
    from kvtier.sglang_ext.pool_io import Completion

    T = CHUNK_TOKENS
    cache = make_cache(16, pool_tokens=32 * T, spill_on_insert=on)  # 7 of 32 chunks in use below: no walk copies
    step = scheduler_step()
    scheduler = _hooked_scheduler(cache)
    prompt, reply = list(range(10_000, 10_000 + 3 * T)), list(range(20_000, 20_000 + T))
    expected = kv_rows(cache, insert(cache, prompt))
    load = Flag()
    cache.io._last_load = Completion(load, lambda: None)  # the latest load, still copying
    step(scheduler)
    cache.flush()
    assert spilled_chunks(cache, "ahead") == 0
    load.done = True
    step(scheduler)
    cache.flush()
    assert spilled_chunks(cache, "ahead") == (3 if on else 0)
    expected = [torch.cat([a, b]) for a, b in zip(expected, kv_rows(cache, insert(cache, prompt + reply)[3 * T :]))]
    step(scheduler)
    cache.flush()
    assert spilled_chunks(cache, "ahead") == (4 if on else 0)

    evict_all(cache)
    assert spilled_chunks(cache, "eviction") == (0 if on else 4)
    clear_pool(cache)
    device_len, host_hit, loaded, _ = match_and_load(cache, make_req(prompt + reply + [1]))
    assert (device_len, host_hit) == (0, 4 * T)
    assert same_kv(kv_rows(cache, loaded), expected)


def test_a_tail_the_tier_dropped_after_its_node_was_copied_is_not_copied_again_at_eviction(make_cache):
    """spill_on_insert copied a chat turn's whole chunks and its tail at the next step; the CPU tier,
    full, then dropped the tail first (tails are the first to go). Evicting the turn from the GPU
    copies nothing: the tail would be copied on the path of the request that wants the rows, only
    to be dropped again. The next turn loads the whole chunks back bit-exact. (A node evicted before
    its copy ran still gets its tail: test_the_next_chat_turn_loads_the_last_turn_s_tail.)"""
    T = CHUNK_TOKENS
    cache = make_cache(16, pool_tokens=32 * T)
    step, scheduler = scheduler_step(), _hooked_scheduler(cache)
    turn = list(range(3000, 3000 + 4 * T + 40))
    expected = kv_rows(cache, insert(cache, turn))
    step(scheduler)
    cache.flush()
    assert spilled_chunks(cache, "ahead") == 5  # 4 whole chunks and a 32-token tail
    keys = cache.namespace.chunk_keys(turn)
    tail = cache.namespace.tail_keys(turn, keys)[-1]
    tier = cache.store.cpu
    others = [bytes([1, i % 256, i // 256]) * 11 for i in range(tier.num_slots - len(tier) + 1)]
    cache.store.commit(cache.store.reserve(others))  # one more than the tier has free
    assert tier.contains([tail]) == [False] and all(tier.contains(keys))

    evict_all(cache)
    assert spilled_chunks(cache, "eviction") == 0
    clear_pool(cache)
    device_len, host_hit, loaded, _ = match_and_load(cache, make_req(turn + [1, 2, 3]))
    assert (device_len, host_hit) == (0, 4 * T)
    assert same_kv(kv_rows(cache, loaded), [e[: 4 * T] for e in expected])


def test_a_request_s_chunk_keys_are_hashed_once_and_always_right(make_cache, monkeypatch):
    """A request is matched twice and loaded once: its prompt's chunks are hashed the first time only,
    and an extension hashes only its new chunks. Whatever tokens it is asked about next (a prefix, an
    extension, a changed token, another extra key, a list instead of an array), the keys are those
    of a fresh hash."""
    from kvtier.sglang_ext import radix_cache
    from kvtier.sglang_ext.chunk_keys import KVNamespace

    T = CHUNK_TOKENS
    cache = make_cache(1)
    hashed, chunk_keys = [], KVNamespace.chunk_keys

    def counted(self, token_ids, extra_key=None, known=()):
        hashed.append(len(token_ids) // T - len(known))
        return chunk_keys(self, token_ids, extra_key, known)

    monkeypatch.setattr(KVNamespace, "chunk_keys", counted)
    prompt = array("q", range(7000, 7000 + 5 * T + 9))
    req = make_req(list(prompt))
    req.init_next_round_input(cache)
    req.init_next_round_input(cache)
    assert sum(hashed) == 5
    changed = array("q", prompt)
    changed[3 * T + 1] = 1
    for tokens, extra, fresh in ((prompt[: 2 * T + 5], None, 0), (prompt + array("q", range(2 * T)), None, 2),
                                 (changed, None, 5), (changed, "salt", 5), (list(changed), "salt", 5),
                                 (prompt, None, 5)):
        hashed.clear()
        assert cache._request_keys(req, tokens, extra) == chunk_keys(cache.namespace, tokens, extra)
        assert sum(hashed) == fresh
    # Kept up to a budget of tokens, the oldest going first; a request loaded back runs: its keys go.
    # A match leaves the prompt's last token to compute: it asks about 2 * T of these.
    others = [make_req(list(range(i * 10_000, i * 10_000 + 2 * T + 1)), rid=f"o{i}") for i in range(3)]
    monkeypatch.setattr(radix_cache, "_KEPT_TOKENS", 4 * T + 1)  # the prompt above goes first, then others[0]
    for other in others:
        other.init_next_round_input(cache)
    assert set(cache._req_keys) == {id(others[1]), id(others[2])} and cache._req_keys_tokens == 4 * T
    insert(cache, list(range(10_000, 10_000 + 2 * T)))
    evict_all(cache)
    device_len, host_hit, _, _ = match_and_load(cache, others[1])
    assert host_hit == 2 * T and set(cache._req_keys) == {id(others[2])} and cache._req_keys_tokens == 2 * T


def test_each_hook_is_a_span_in_a_torch_profiler_trace(make_cache):
    """What SGLang's ``/start_profile`` records, without Python stacks: ``kvtier.<op>`` spans."""
    from torch.profiler import ProfilerActivity, profile

    cache = make_cache(16)
    doc = list(range(5000, 5000 + 2 * CHUNK_TOKENS))
    insert(cache, doc)
    evict_all(cache)
    with profile(activities=[ProfilerActivity.CPU], with_stack=False) as prof:
        match_and_load(cache, make_req(doc + [1]))
    names = {e.name for e in prof.events()}
    assert {"kvtier.match_prefix", "kvtier.init_load_back"} <= names


def test_the_plugin_hooks_the_scheduler_step():
    """``launch_loads`` and ``spill_deferred`` run after every ``get_new_batch_prefill`` of SGLang's
    scheduler, which its normal and PD prefill loops both call: the hook is applied to the method
    SGLang 0.5.17 has (a renamed method would leave it silently unapplied)."""
    import importlib
    import inspect

    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from kvtier.sglang_ext import plugin

    hook = plugin._after_prefill_scheduled
    plugin.register()
    HookRegistry.apply_hooks()
    hooks = HookRegistry._hooks[plugin.STEP_HOOK_TARGET]
    assert [(t, f) for t, f, _ in hooks if f is hook] == [(HookType.AFTER, hook)]
    module, cls, method = plugin.STEP_HOOK_TARGET.rsplit(".", 2)
    applied = getattr(getattr(importlib.import_module(module), cls), method)
    assert hasattr(applied, "__wrapped__") and hook in inspect.getclosurevars(applied).nonlocals.values()
    from sglang.srt.disaggregation.prefill import SchedulerDisaggregationPrefillMixin
    from sglang.srt.managers.scheduler import Scheduler

    for loop in (Scheduler.get_next_batch_to_run, SchedulerDisaggregationPrefillMixin.get_next_disagg_prefill_batch_to_run):
        assert "self.get_new_batch_prefill(" in inspect.getsource(loop)


def test_without_spill_ahead_nothing_is_copied_before_eviction(make_cache):
    """``spill_ahead`` 0 and ``spill_on_insert`` off: write_back copies at eviction only."""
    cache = make_cache(16, pool_tokens=8 * CHUNK_TOKENS, spill_ahead=0, spill_on_insert=False)
    insert(cache, list(range(6 * CHUNK_TOKENS)))
    make_req(list(range(90_000, 90_000 + 2 * CHUNK_TOKENS))).init_next_round_input(cache)
    cache.flush()
    assert spilled_bytes(cache) == 0
    evict_all(cache)  # every chunk is copied as its rows are freed, on the critical path
    assert [spilled_chunks(cache, when) for when in ("insert", "ahead", "eviction")] == [0, 0, 6]


class InFlight:
    """The GPU's ordering of unguarded copies, on a CPU pool (where every copy is synchronous): a
    copy the cache leaves unguarded (spill ahead, write-through, a load in layer groups) is taken
    to run until ``guard_pending`` names its owner (or no owner; every copy when called without
    one), as ``PoolIO.guard_pending`` promises; rows the allocator hands out while such a copy
    still touches them would be overwritten under it on a GPU. That checks the cache's choice of
    owners against SGLang's own order of splits, deletions and frees."""

    def __init__(self, cache, monkeypatch):
        io, allocator = cache.io, cache.token_to_kv_pool_allocator
        self.running: list[tuple[object, set[int]]] = []
        self.copies: list[str] = []
        self.touched: set[int] = set()
        self.reused = 0  # rows handed out again that an unguarded copy had touched
        self.races: list[tuple[object, int]] = []
        to_host, to_device, guard, alloc = io.to_host, io.to_device, io.guard_pending, allocator.alloc

        def track(kind, owners, slots):
            rows = set(slots.tolist()) - {-1}
            self.running.append((tuple(owners), rows))
            self.touched |= rows
            self.copies.append(kind)

        def on_host(slots, views, on_done, guard=True, owners=()):
            if not guard:
                track("spill", owners, slots)
            return to_host(slots, views, on_done, guard=guard, owners=owners)

        def on_device(views, slots, on_done, owners=()):
            if len(io.load_groups) > 1:
                track("load", owners, slots)
            return to_device(views, slots, on_done, owners=owners)

        def guarded(owner=None):
            self.running = [(os, r) for os, r in self.running
                            if not (owner is None or not os or any(o is owner for o in os))]
            return guard(owner)

        def allocated(n):
            rows = alloc(n)
            if rows is not None:
                got = set(rows.tolist())
                self.reused += len(got & self.touched)
                self.races += [(o, len(got & r)) for o, r in self.running if got & r]
            return rows

        monkeypatch.setattr(io, "to_host", on_host)
        monkeypatch.setattr(io, "to_device", on_device)
        monkeypatch.setattr(io, "guard_pending", guarded)
        monkeypatch.setattr(allocator, "alloc", allocated)
        self.allocator = allocator

    def hand_out_every_free_row(self) -> None:
        rows = self.allocator.alloc(self.allocator.available_size())
        assert not self.races, self.races
        self.allocator.free(rows)

    def evict_one_by_one(self, cache) -> None:
        from sglang.srt.mem_cache.base_prefix_cache import EvictParams

        while cache.evictable_size():
            cache.evict(EvictParams(num_tokens=1))  # one leaf, whose rows are handed out at once
            self.hand_out_every_free_row()


@pytest.mark.parametrize("policy", ["write_back", "write_through"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_no_row_is_handed_out_while_a_copy_still_touches_it(make_cache, monkeypatch, page_size, policy):
    """Copies of rows the tree still owns name their deepest node; that node is deleted before its
    ancestors, and a split keeps it as the deeper part: so guarding the copies of each deleted node
    (and all of them at reset) covers every row before the allocator hands it out again. Driven
    through spill ahead, a split of a copied node, eviction, a load in layer groups, a split of the
    loaded node, and SGLang's flush (reset, then the allocator cleared)."""
    T = CHUNK_TOKENS
    cache = make_cache(page_size, pool_tokens=24 * T, spill_ahead=0.35, load_layer_groups=2, write_policy=policy)
    flight = InFlight(cache, monkeypatch)
    shared = list(range(10_000, 10_000 + 4 * T))
    oldest = [shared + list(range(20_000, 20_000 + 2 * T)), shared + list(range(30_000, 30_000 + 2 * T))]
    for doc in oldest + [list(range(n, n + 4 * T)) for n in (40_000, 50_000)]:
        insert(cache, doc)
    make_req(list(range(60_000, 60_000 + 3 * T)), "incoming").init_next_round_input(cache)  # spills ahead
    make_req(shared[: 2 * T] + [1], "split").init_next_round_input(cache)  # splits the copied shared node
    assert "spill" in flight.copies
    flight.evict_one_by_one(cache)

    for doc in oldest:
        device_len, host_hit, _, _ = match_and_load(cache, make_req(doc + [1], f"back{doc[-1]}"))
        assert device_len + host_hit == len(doc) and host_hit >= 2 * T
    assert "load" in flight.copies
    make_req(oldest[0][: 5 * T] + [1], "split2").init_next_round_input(cache)  # splits the loaded node
    flight.evict_one_by_one(cache)
    assert flight.reused > 0  # rows the copies touched were handed out again

    insert(cache, list(range(70_000, 70_000 + 8 * T)))
    make_req(list(range(80_000, 80_000 + 12 * T)), "incoming2").init_next_round_input(cache)
    assert flight.running  # copies of rows still in the tree: SGLang's flush_cache frees all rows
    cache.reset()
    cache.token_to_kv_pool_allocator.clear()
    flight.hand_out_every_free_row()


def test_no_room_to_load_releases_everything(make_cache):
    cache = make_cache(16, pool_tokens=512)
    doc = list(range(4 * CHUNK_TOKENS))
    insert(cache, doc)
    evict_all(cache)
    allocator = cache.token_to_kv_pool_allocator
    hog = allocator.alloc(allocator.available_size())  # the pool is full of running requests
    req = make_req(doc + [1])
    device_len, host_hit, loaded, node = match_and_load(cache, req)
    assert host_hit == 4 * CHUNK_TOKENS and len(loaded) == 0 and node is cache.root_node
    assert not cache.store.cpu._leases
    allocator.free(hog)
    _, _, loaded, _ = match_and_load(cache, make_req(doc + [1], "r2"))
    assert len(loaded) == 4 * CHUNK_TOKENS


def _disk_only_docs(cache) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Three two-chunk documents through a CPU tier of four chunks: the first ends on disk only."""
    docs = [list(range(n * 1000, n * 1000 + 2 * CHUNK_TOKENS)) for n in range(1, 4)]
    expected = []
    for doc in docs:
        expected.append(kv_rows(cache, insert(cache, doc)))
        evict_all(cache)
        cache.store.disk.flush(timeout_s=10)  # let the early demotions land, as time would
    keys = cache.namespace.chunk_keys(docs[0])
    assert cache.store.cpu.contains(keys) == [False, False] and cache.store.disk.contains(keys) == [True, True]
    clear_pool(cache)
    return docs, expected


def test_disk_resident_chunks_are_prefetched_then_hit(make_cache):
    import time

    chunk_bytes = 2 * 2 * 2 * 32 * 2 * CHUNK_TOKENS  # layers x heads x (K,V) x dim x bf16 x tokens
    cache = make_cache(16, cpu_size_gb=4.5 * chunk_bytes / 1e9, disk_path="x", disk_size_gb=0.01)
    docs, expected = _disk_only_docs(cache)
    keys = cache.namespace.chunk_keys(docs[0])

    req = make_req(docs[0] + [1])
    req.init_next_round_input(cache)
    assert req.host_hit_length == 0  # on disk only: recompute now rather than wait, and prefetch
    deadline = time.monotonic() + 10
    while cache._prefetching and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.store.cpu.contains(keys) == [True, True]
    _, host_hit, loaded, _ = match_and_load(cache, make_req(docs[0] + [1], "r2"))
    assert host_hit == 2 * CHUNK_TOKENS
    assert same_kv(kv_rows(cache, loaded), expected[0])


def test_with_a_wait_a_disk_only_prefix_is_a_hit_at_once(make_cache):
    """lower_tier_wait_s > 0: the first lookup waits for the disk fetch instead of recomputing."""
    chunk_bytes = 2 * 2 * 2 * 32 * 2 * CHUNK_TOKENS
    cache = make_cache(16, cpu_size_gb=4.5 * chunk_bytes / 1e9, disk_path="x", disk_size_gb=0.01,
                       lower_tier_wait_s=10.0)
    docs, expected = _disk_only_docs(cache)
    _, host_hit, loaded, _ = match_and_load(cache, make_req(docs[0] + [1]))
    assert host_hit == 2 * CHUNK_TOKENS
    assert same_kv(kv_rows(cache, loaded), expected[0])
    cold = make_req(list(range(90_000, 90_000 + 2 * CHUNK_TOKENS)) + [1], "cold")
    cold.init_next_round_input(cache)  # in no tier: nothing to wait for
    assert cold.host_hit_length == 0 and not cache._prefetching


def running_after_load(cache, doc: list[int], committed_extra: int):
    """A request for ``doc`` + 20 tokens whose ``doc`` came back from the CPU tier (page_size 1),
    taken as far as the prefill adder and the batch take it: node locked, rows for the KV of
    ``committed_extra`` tokens past ``doc`` allocated, ``req_to_token`` filled. Returns the request,
    the KV of ``doc`` as first inserted, and the rows committed."""
    expected = kv_rows(cache, insert(cache, doc))
    evict_all(cache)
    clear_pool(cache)
    req = make_req(doc + list(range(9000, 9020)))
    _, host_hit, loaded, node = match_and_load(cache, req)
    assert host_hit == len(doc) and same_kv(kv_rows(cache, loaded), expected)
    req.prefix_indices = torch.cat([req.prefix_indices, loaded])
    req.last_node, req.cache_protected_len = node, len(req.prefix_indices)
    cache.inc_lock_ref(node)
    cache.req_to_token_pool.alloc([req])
    committed = len(doc) + committed_extra
    tail = cache.token_to_kv_pool_allocator.alloc(committed_extra)
    cache.req_to_token_pool.write((req.req_pool_idx, slice(0, committed)), torch.cat([req.prefix_indices, tail]))
    return req, expected, committed


@pytest.mark.parametrize("is_insert", [True, False], ids=["finished", "aborted"])
def test_a_loaded_request_that_finishes_or_aborts_leaks_nothing(make_cache, is_insert):
    """Scheduler bookkeeping after a load-back: rows and pins all come back (page_size 1)."""
    cache = make_cache(1)
    allocator = cache.token_to_kv_pool_allocator
    free_at_start = allocator.available_size()
    req, _, committed = running_after_load(cache, list(range(3 * CHUNK_TOKENS)), 20)
    cache.cache_finished_req(req, is_insert=is_insert, kv_len_to_handle=committed)
    cache.req_to_token_pool.free(req)
    evict_all(cache)
    assert allocator.available_size() == free_at_start
    assert not cache.store.cpu._leases and cache.protected_size() == 0


def test_a_loaded_request_retracted_in_decode_leaks_nothing_and_loads_again(make_cache, base_server_args):
    """SGLang's own retraction (``schedule_batch.release_req``, what ``retract_decode`` runs for each
    request it retracts) of a request whose prefix came back from the CPU tier, five tokens into its
    decode: its rows and pins all come back, and when it is scheduled again its prefix is a hit
    again, bit-exact."""
    from sglang.srt.managers.schedule_batch import ReqKvInfo, release_req
    from sglang.srt.runtime_context import publish

    publish(base_server_args, role="test")  # the process-wide config a scheduler process publishes, read by release_req
    cache = make_cache(1)
    allocator = cache.token_to_kv_pool_allocator
    free_at_start = allocator.available_size()
    doc = list(range(3 * CHUNK_TOKENS))
    req, expected, committed = running_after_load(cache, doc, 20 + 5)  # the prompt and five decode steps
    req.output_ids.extend(range(6))  # the sixth token's KV is not computed yet
    req.kv_committed_len, req.kv = committed, ReqKvInfo(kv_allocated_len=committed, swa_evicted_seqlen=0)

    release_req(req=req, remaing_req_count=1, server_args=base_server_args, req_to_token_pool=cache.req_to_token_pool,
                token_to_kv_pool_allocator=allocator, tree_cache=cache, hisparse_coordinator=None)
    assert req.is_retracted and req.kv is None and req.req_pool_idx is None
    assert not cache.store.cpu._leases and cache.protected_size() == 0
    evict_all(cache)
    assert allocator.available_size() == free_at_start

    clear_pool(cache)
    _, host_hit, loaded, _ = match_and_load(cache, req)  # scheduled again
    assert host_hit == len(doc) and same_kv(kv_rows(cache, loaded), expected)


def test_write_through_stores_each_chunked_prefill_step(make_cache):
    """Chunked prefill inserts the prompt piece by piece (cache_unfinished_req); each piece's
    whole chunks are stored as it lands, bit-exact, and finishing leaks nothing."""
    from kvtier.kernels.kv_pages import gather_kv_reference

    cache = make_cache(16, write_policy="write_through")
    allocator = cache.token_to_kv_pool_allocator
    free_at_start = allocator.available_size()
    doc = list(range(100, 100 + 4 * CHUNK_TOKENS))
    keys = cache.namespace.chunk_keys(doc)
    req = make_req(doc + [7])
    req.init_next_round_input(cache)
    cache.req_to_token_pool.alloc([req])
    for step, end in enumerate((2 * CHUNK_TOKENS, 4 * CHUNK_TOKENS), start=1):
        start = end - 2 * CHUNK_TOKENS
        rows = allocator.alloc(end - start)
        cache.req_to_token_pool.write((req.req_pool_idx, slice(start, end)), rows)
        req.set_extend_range(start, end)
        cache.cache_unfinished_req(req, chunked=True)
        cache.flush()
        assert cache.store.prefix_hits(keys) == 2 * step
    pool = allocator.get_kvcache()
    all_rows = cache.req_to_token_pool.req_to_token[req.req_pool_idx, : len(doc)].to(torch.int64)
    want = torch.zeros(4 * cache.store.chunk_bytes, dtype=torch.uint8)
    offsets = torch.arange(4, dtype=torch.int64) * cache.store.chunk_bytes
    gather_kv_reference(pool.k_buffer, pool.v_buffer, all_rows, want, offsets, CHUNK_TOKENS)
    got = [torch.empty(cache.store.chunk_bytes, dtype=torch.uint8) for _ in keys]
    assert cache.store.get_into(keys, got) == 4
    assert torch.equal(torch.cat(got), want)
    cache.cache_finished_req(req, kv_len_to_handle=len(doc))
    cache.req_to_token_pool.free(req)
    evict_all(cache)
    assert allocator.available_size() == free_at_start


def test_a_restarted_server_loads_what_it_spilled_to_disk(make_cache):
    import time

    chunk_bytes = 2 * 2 * 2 * 32 * 2 * CHUNK_TOKENS
    settings = dict(cpu_size_gb=4.5 * chunk_bytes / 1e9, disk_path="x", disk_size_gb=0.01)
    first = make_cache(16, **settings)
    doc = list(range(40_000, 40_000 + 3 * CHUNK_TOKENS))
    expected = kv_rows(first, insert(first, doc))
    evict_all(first)
    first.store.close()  # the server stops; its CPU tier is gone, the disk slab stays

    again = make_cache(16, **settings)
    clear_pool(again)  # its pool was filled from the same seed as the first one's
    req = make_req(doc + [1])
    req.init_next_round_input(again)  # disk only: prefetch starts
    deadline = time.monotonic() + 10
    while again._prefetching and time.monotonic() < deadline:
        time.sleep(0.01)
    _, host_hit, loaded, _ = match_and_load(again, make_req(doc + [1], "r2"))
    assert host_hit == 3 * CHUNK_TOKENS
    assert same_kv(kv_rows(again, loaded), expected)


def test_a_pd_decode_server_reports_no_host_hits(make_build_context, monkeypatch, tmp_path):
    """Decode promises its prefix to prefill, which then skips it: only GPU hits may count."""
    from kvtier.sglang_ext.radix_cache import KVTierRadixCache

    ctx = make_build_context(page_size=16, disaggregation_mode="decode")
    cache = KVTierRadixCache(ctx, load_config(env={}, chunk_tokens=CHUNK_TOKENS, cpu_size_gb=0.02))
    doc = list(range(2 * CHUNK_TOKENS))
    insert(cache, doc)
    evict_all(cache)
    assert cache.store.prefix_hits(cache.namespace.chunk_keys(doc)) == 2  # still spilled
    req = make_req(doc + [1])
    req.init_next_round_input(cache)
    assert req.host_hit_length == 0
    cache.store.close()


def test_a_decode_server_without_radix_cache_is_told_what_to_add(make_build_context):
    """SGLang runs a PD decode server without a radix cache; the error names the flag that adds it."""
    import dataclasses

    from kvtier.sglang_ext.radix_cache import build

    ctx = dataclasses.replace(make_build_context(page_size=16, disaggregation_mode="decode"), disable_radix_cache=True)
    with pytest.raises(ValueError, match="--disaggregation-decode-enable-radix-cache"):
        build(ctx)


def test_finished_copies_are_published_without_another_call_into_the_cache(make_cache):
    """An idle server: nothing calls the cache after the last spill, yet its commit must happen.

    On CPU copies finish at once, so the copy here is one whose completion flag the test sets
    (standing in for the CUDA event the reaper polls); the reaper thread is the thing under test."""
    import threading
    import time

    from kvtier.sglang_ext.pool_io import Completion

    cache = make_cache(16)
    flag, published = Flag(), threading.Event()
    cache._track(Completion(flag, published.set))
    time.sleep(0.2)
    assert not published.is_set()  # still copying
    flag.done = True
    assert published.wait(2.0)  # no call into the cache in between
    cache.store.close()  # and the reaper ends with the store
    cache._reaper.join(timeout=2.0)
    assert not cache._reaper.is_alive()


def test_a_queued_request_fetches_its_disk_chunks_before_it_is_scheduled(make_cache, monkeypatch):
    """The real scheduler method, hooked by the plugin: queuing a request starts its disk fetch, so
    the prefix match at scheduling time is a CPU-tier hit without any wait, and its prompt is not
    hashed again."""
    import time

    chunk_bytes = 2 * 2 * 2 * 32 * 2 * CHUNK_TOKENS
    cache = make_cache(16, cpu_size_gb=4.5 * chunk_bytes / 1e9, disk_path="x", disk_size_gb=0.01)
    docs, expected = _disk_only_docs(cache)
    scheduler = _hooked_scheduler(cache)
    req = make_req(docs[0] + [1])
    scheduler._add_request_to_queue(req)
    assert scheduler.waiting_queue == [req]
    deadline = time.monotonic() + 10
    while cache._prefetching and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.store.cpu.contains(cache.namespace.chunk_keys(docs[0])) == [True, True]
    hashed, namespace = [], type(cache.namespace)
    chunk_keys = namespace.chunk_keys
    monkeypatch.setattr(namespace, "chunk_keys", lambda *a, **k: hashed.append(1) or chunk_keys(*a, **k))
    _, host_hit, loaded, _ = match_and_load(cache, req)
    assert host_hit == 2 * CHUNK_TOKENS and same_kv(kv_rows(cache, loaded), expected[0])
    assert not hashed  # the keys hashed at arrival served the match and the load

    cold = make_req(list(range(90_000, 90_000 + 2 * CHUNK_TOKENS)) + [1], "cold")
    scheduler._add_request_to_queue(cold)  # in no tier: no background work
    assert scheduler.waiting_queue == [req, cold] and not cache._prefetching


def _hooked_scheduler(tree_cache):
    """SGLang's Scheduler with the plugin's hooks applied, holding only the attributes
    ``_add_request_to_queue`` reads on a scheduler without PD, priorities or HiCache."""
    from sglang.srt.disaggregation.utils import DisaggregationMode
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.plugins.hook_registry import HookRegistry

    from kvtier.sglang_ext import plugin

    plugin.register()
    HookRegistry.apply_hooks()
    scheduler = Scheduler.__new__(Scheduler)
    scheduler.__dict__.update(tree_cache=tree_cache, disaggregation_mode=DisaggregationMode.NULL, waiting_queue=[],
                              enable_priority_scheduling=False, abort_on_priority_when_disabled=False,
                              max_queued_requests=None, enable_hicache_storage=False)
    return scheduler


def test_a_failing_arrival_prefetch_still_queues_the_request(caplog):
    class Broken:
        def prefetch_on_arrival(self, req):
            raise OSError("disk gone")

    scheduler = _hooked_scheduler(Broken())
    req = make_req([1, 2, 3], "r9")
    scheduler._add_request_to_queue(req)  # the real method, through the plugin's hook
    assert scheduler.waiting_queue == [req]
    assert "prefetching request r9 on arrival failed" in caplog.text


@pytest.mark.parametrize("prefill_graph", ["breakable", "tc_piecewise", "full"])
def test_loads_go_layer_by_layer_unless_a_full_prefill_graph_replays_attention(make_cache, prefill_graph):
    """The layer gate is asked from attention in Python; a full prefill graph never asks, so its
    loads must finish before the forward pass; a load-back still lands bit for bit either way."""
    cache = make_cache(16, prefill_graph=prefill_graph)
    layers = len(cache.token_to_kv_pool_allocator.get_kvcache().k_buffer)
    assert cache.cfg.load_layer_groups == 0  # auto: 8 under these graphs, at most one per layer
    assert len(cache.io.load_groups) == (1 if prefill_graph == "full" else layers)
    doc = list(range(3000, 3000 + 2 * CHUNK_TOKENS))
    expected = kv_rows(cache, insert(cache, doc))
    evict_all(cache)
    clear_pool(cache)
    _, host_hit, loaded, _ = match_and_load(cache, make_req(doc + [1]))
    assert host_hit == 2 * CHUNK_TOKENS and same_kv(kv_rows(cache, loaded), expected)


@pytest.mark.parametrize("prefill_graph, auto", [("disabled", 32), ("breakable", 8), ("tc_piecewise", 8), ("full", 1)])
def test_load_layer_groups_auto_follows_the_prefill_graph_and_a_setting_wins_unless_full(
        make_build_context, prefill_graph, auto):
    """0 (the default) picks the groups by how the prefill forward runs; a set value is kept,
    except under a full graph, where attention never asks the gate."""
    from kvtier.sglang_ext.radix_cache import _load_layer_groups

    ctx = make_build_context(page_size=16)
    ctx.server_args.cuda_graph_config.prefill.backend = prefill_graph
    assert _load_layer_groups(ctx, load_config(env={})) == auto
    assert _load_layer_groups(ctx, load_config(env={}, load_layer_groups=4)) == (1 if prefill_graph == "full" else 4)


def test_chunk_keys_kept_for_a_loaded_node_stay_right_after_it_is_split(make_cache):
    """_node_spill keeps a node's path keys instead of hashing the path again; a load-back records
    them for the node it inserts. Splitting that node (another document sharing its first chunks)
    must leave the kept keys equal to a fresh hash of the node's path, and eviction after the split
    still brings both documents back bit for bit."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    cache = make_cache(1)
    T = CHUNK_TOKENS
    doc = list(range(5000, 5000 + 4 * T))
    other = doc[: 2 * T] + list(range(9000, 9000 + 2 * T))
    expected = kv_rows(cache, insert(cache, doc))
    evict_all(cache)
    clear_pool(cache)
    _, host_hit, loaded, node = match_and_load(cache, make_req(doc + [1]))
    assert host_hit == 4 * T and same_kv(kv_rows(cache, loaded), expected)
    assert len(cache._node_keys[node.id]) == 4

    tail = insert(cache, other)[2 * T:]  # splits the loaded node after 2 chunks
    pool = cache.token_to_kv_pool_allocator.get_kvcache()
    for buf in pool.k_buffer + pool.v_buffer:
        buf[tail] = torch.randn(buf[tail].shape).to(buf.dtype)  # the tail's KV, as a forward pass would write it
    expected_other = kv_rows(cache, cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", other)))).device_indices)
    assert node.parent is not cache.root_node and len(node.value) == 2 * T
    path, n = [], node
    while n is not cache.root_node:
        path[:0] = n.key.raw_token_ids()
        n = n.parent
    assert cache._node_keys[node.id] == cache.namespace.chunk_keys(array("q", path))

    evict_all(cache)
    assert not cache._node_keys
    for tokens, kv in ((doc, expected), (other, expected_other)):
        clear_pool(cache)
        _, host_hit, loaded, _ = match_and_load(cache, make_req(tokens + [1]))
        assert host_hit == 4 * T and same_kv(kv_rows(cache, loaded), kv)
        evict_all(cache)


def _adder(cache, server_args, rem_chunk_tokens: Optional[int] = None):
    """SGLang's own PrefillAdder, as ``get_new_batch_prefill`` makes it, in a process that published its
    config as a scheduler process does (the adder reads it)."""
    from sglang.srt.managers.schedule_policy import PrefillAdder
    from sglang.srt.runtime_context import publish

    publish(server_args, role="test")

    return PrefillAdder(cache.page_size, cache, cache.token_to_kv_pool_allocator, None, new_token_ratio=0.5,
                        rem_input_tokens=10**6, rem_chunk_tokens=rem_chunk_tokens)


def _spilled_docs(cache, n: int, chunks: int = 3) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    T = CHUNK_TOKENS
    docs = [list(range(10_000 * (i + 1), 10_000 * (i + 1) + chunks * T)) for i in range(n)]
    kv = [kv_rows(cache, insert(cache, doc)) for doc in docs]
    evict_all(cache)
    clear_pool(cache)
    return docs, kv


@pytest.mark.parametrize("batch_loads", [True, False])
def test_a_prefill_batch_s_loads_go_as_one_copy_once_it_is_formed(make_cache, monkeypatch, base_server_args,
                                                                  batch_loads):
    """SGLang's PrefillAdder calls init_load_back per request; the loads wait until the batch is
    formed and go as one copy (one launch per layer group across all requests) from the plugin's
    hook on get_new_batch_prefill, and bring every request's KV back bit-exact. With
    ``batch_loads: false`` each goes when its request is added."""
    from sglang.srt.managers.schedule_policy import AddReqResult

    cache = make_cache(16, pool_tokens=16 * CHUNK_TOKENS, load_layer_groups=2, batch_loads=batch_loads)
    docs, kv = _spilled_docs(cache, 3)
    copies = []
    to_device = cache.io.to_device
    monkeypatch.setattr(cache.io, "to_device", lambda views, slots, *a, **k: copies.append(len(views)) or
                        to_device(views, slots, *a, **k))
    reqs = [make_req(doc + [1], f"r{i}") for i, doc in enumerate(docs)]
    adder = _adder(cache, base_server_args)

    def form_batch(scheduler):
        for i, req in enumerate(reqs):
            req.init_next_round_input(cache)
            assert req.host_hit_length == len(docs[i])
            assert adder.add_one_req(req, has_chunked_req=False, truncation_align_size=None) == AddReqResult.CONTINUE
            assert copies == ([] if batch_loads else [3] * (i + 1))
        assert not batch_loads or all(torch.count_nonzero(t) == 0 for t in kv_rows(cache, reqs[0].prefix_indices))

    scheduler_step(form_batch)(_hooked_scheduler(cache))
    assert copies == ([9] if batch_loads else [3, 3, 3])
    cache.flush()
    for req, doc_kv in zip(reqs, kv):
        assert same_kv(kv_rows(cache, req.prefix_indices), doc_kv)
    assert not cache.store.cpu._leases  # load-back pins released


def test_a_node_loaded_for_a_request_then_refused_is_copied_before_its_rows_go_again(make_cache, monkeypatch,
                                                                                    base_server_args):
    """A request whose load was queued but that the adder then refused leaves an unlocked node;
    evicting it in the same batch launches the queued loads first, so the copy lands before its
    rows are handed out again; the accepted request's KV still arrives bit-exact."""
    from sglang.srt.managers.schedule_policy import AddReqResult
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    cache = make_cache(16, pool_tokens=16 * CHUNK_TOKENS, load_layer_groups=2)
    docs, kv = _spilled_docs(cache, 2)
    launched = []
    to_device = cache.io.to_device
    monkeypatch.setattr(cache.io, "to_device", lambda views, slots, *a, **k: launched.append(set(slots.tolist()))
                        or to_device(views, slots, *a, **k))
    accepted, refused = make_req(docs[0] + [1], "accepted"), make_req(docs[1] + [1], "refused")
    # Chunked prefill with room for one page of question tokens and half of another: the second
    # request is loaded, then refused (no whole page left for its chunk).
    adder = _adder(cache, base_server_args, rem_chunk_tokens=16 + 8)

    def form_batch(scheduler):
        for req, result in ((accepted, AddReqResult.CONTINUE), (refused, AddReqResult.OTHER)):
            req.init_next_round_input(cache)
            assert adder.add_one_req(req, has_chunked_req=False, truncation_align_size=None) == result
        assert adder.can_run_list == [accepted]
        assert launched == [] and len(refused.prefix_indices) == len(docs[1])
        freed = set(refused.prefix_indices.tolist())
        cache.evict(EvictParams(num_tokens=10**9))  # only the refused request's node is unlocked
        assert len(launched) == 1 and freed <= launched[0]
        assert freed <= set(cache.token_to_kv_pool_allocator.alloc(len(docs[1])).tolist())

    scheduler_step(form_batch)(_hooked_scheduler(cache))
    assert len(launched) == 1  # nothing left for the hook
    cache.flush()
    assert same_kv(kv_rows(cache, accepted.prefix_indices), kv[0])


def test_without_the_step_hook_applied_each_load_goes_when_queued(make_cache, monkeypatch, caplog):
    """SGLang logs and skips a hook target it cannot resolve (a renamed method): then nothing would
    launch queued loads, so the cache says so at start and launches each load in init_load_back."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    from kvtier.sglang_ext import plugin

    make_cache(16)  # registers and applies the plugin's hooks, as a scheduler process does
    monkeypatch.setattr(HookRegistry, "_patched", HookRegistry._patched - {plugin.STEP_HOOK_TARGET})
    with caplog.at_level("WARNING", logger="kvtier.sglang_ext.radix_cache"):
        cache = make_cache(16, load_layer_groups=2)
    assert "did not apply kvtier's hook" in caplog.text
    docs, kv = _spilled_docs(cache, 1)
    req = make_req(docs[0] + [1])
    _, host_hit, rows, _ = match_and_load(cache, req, flush=False)
    assert host_hit == len(docs[0]) and not cache._queued  # launched, not waiting for a hook
    cache.flush()
    assert same_kv(kv_rows(cache, rows), kv[0])



def test_two_requests_for_one_prefix_in_a_batch_load_it_once_and_leak_nothing(make_cache, monkeypatch,
                                                                               base_server_args):
    """The scheduler matches every waiting request before it adds any, so two requests for one
    evicted prefix both report it as a host hit. The second to be added finds it in the tree
    already (the first's load, queued): it shares those rows, nothing is loaded twice, and once
    both finished every row is back (rows loaded outside the tree would never be freed: SGLang
    leaves a request's protected prefix to the tree)."""
    from sglang.srt.managers.schedule_policy import AddReqResult

    cache = make_cache(1, pool_tokens=16 * CHUNK_TOKENS, load_layer_groups=2)
    allocator = cache.token_to_kv_pool_allocator
    docs, kv = _spilled_docs(cache, 1)
    free_at_start = allocator.available_size()
    copies = []
    to_device = cache.io.to_device
    monkeypatch.setattr(cache.io, "to_device", lambda views, slots, *a, **k: copies.append(len(views)) or
                        to_device(views, slots, *a, **k))
    reqs = [make_req(docs[0] + [n], f"r{n}") for n in (1, 2)]
    adder = _adder(cache, base_server_args)

    def form_batch(scheduler):
        for req in reqs:
            req.init_next_round_input(cache)
            assert req.host_hit_length == len(docs[0])
        for req in reqs:
            assert adder.add_one_req(req, has_chunked_req=False, truncation_align_size=None) == AddReqResult.CONTINUE

    scheduler_step(form_batch)(_hooked_scheduler(cache))
    cache.flush()
    assert copies == [3]  # three chunks, once
    assert torch.equal(reqs[0].prefix_indices, reqs[1].prefix_indices)
    assert same_kv(kv_rows(cache, reqs[1].prefix_indices), kv[0])
    for req in reqs:  # both finish, as the scheduler's batch and cache_finished_req take them
        n = len(req.origin_input_ids)
        cache.req_to_token_pool.alloc([req])
        tail = allocator.alloc(n - len(req.prefix_indices))
        cache.req_to_token_pool.write((req.req_pool_idx, slice(0, n)), torch.cat([req.prefix_indices, tail]))
        cache.cache_finished_req(req, is_insert=True, kv_len_to_handle=n)
        cache.req_to_token_pool.free(req)
    evict_all(cache)
    assert allocator.available_size() == free_at_start
    assert not cache.store.cpu._leases and cache.protected_size() == 0
