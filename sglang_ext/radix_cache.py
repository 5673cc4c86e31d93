"""The ``kvtier`` radix-cache backend: SGLang's RadixCache whose evicted KV spills to the tiers.

- Spill (``write_back``, the default): ``RadixCache.evict`` frees a leaf's pool rows and then
  calls ``_delete_leaf``; nothing can be given those rows before ``evict`` returns, so the whole
  chunks of every leaf it deleted are copied out as it returns, in one copy on a side stream (see
  ``pool_io``), into CPU-tier slots that are published when the copy completed. ``write_through``
  copies new whole chunks when they are inserted instead.
  ``spill_ahead`` moves most write-back copies off the critical path: when a scheduled request
  would leave less than that fraction of the pool free, the nodes eviction would take first are
  copied out in the background (not guarded: their rows stay in the tree), so their eviction
  finds the chunks stored and frees the rows at once. These copies are held back while a load
  runs on the GPU (beside one they share PCIe and halve its speed) and launched once none does:
  by the next walk or match, or at the scheduler's next step (``spill_deferred``,
  called by the plugin after every ``get_new_batch_prefill``), so they run in the decode steps
  between loads. A node evicted before its copy was launched is copied at its eviction; one
  copied before gets only whole chunks the tier lost since, not its tail again (the tier drops
  tails first: re-copying one would cost the request that wants the rows).
  ``spill_on_insert`` (on by default) holds every inserted node for such a copy, whatever the
  pool's pressure, so a round's KV is stored before the next round's loads want the link.
- Load-back: ``match_prefix`` reports the chunks beyond the GPU match that the CPU tier holds as
  ``host_hit_length`` (and starts prefetching the rest from disk or remote, waiting for that up to
  ``lower_tier_wait_s``). SGLang matches a prefix only when it schedules a request, so the plugin
  also starts that prefetch when the request is queued (``prefetch_on_arrival``): the fetch then
  overlaps the request's wait in the queue. The scheduler then calls
  ``init_load_back``, which allocates pool rows, copies the chunks in and inserts them into the
  tree, returning the new rows as SGLang's HiCache does. The copies of one prefill batch are
  queued while the scheduler forms it and launched as one (``launch_loads``, called by the plugin
  after ``get_new_batch_prefill``), layer group after layer group across the batch's requests; the
  forward pass waits for each layer where attention asks the pool for it (the pool's
  ``layer_transfer_counter``), except under a ``full`` prefill CUDA graph, which never asks. Until
  the launch, a queued load's rows are only promised: deleting the node that holds them launches
  the queue first, and spills held back wait for it.

This module and ``plugin.py`` are the only ones that import SGLang; everything specific to SGLang
0.5.17 (pool classes, build-context fields, which methods evict and load) is read here.
"""

from __future__ import annotations

import atexit
import heapq
import logging
import threading
import weakref
from array import array
from concurrent.futures import Future, wait
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Callable, Iterator, Literal, NamedTuple, Optional, Sequence

import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    InitLoadBackParams,
    InsertParams,
    InsertResult,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode
from sglang.srt.mem_cache.registry import TreeCacheBuildContext
from sglang.srt.model_executor.cuda_graph_config import Backend

from kvtier.sglang_ext.chunk_keys import ChunkKey, KVNamespace
from kvtier.sglang_ext.config import KVTierConfig, check_page_size, load_config
from kvtier.sglang_ext.plugin import STEP_HOOK_TARGET, step_hook_applied
from kvtier.sglang_ext.pool_io import Completion, PoolIO
from kvtier.sglang_ext.tiers.cpu import Lease
from kvtier.sglang_ext.tiers.store import TierStore

logger = logging.getLogger(__name__)

REAP_INTERVAL_S = 0.05
_KEPT_TOKENS = 1 << 22  # tokens of the requests whose chunk keys are kept (_request_keys): 32 MiB


def kv_pool_layout(pool: object) -> tuple[str, int]:
    """The layout string of an SGLang KV pool and its bytes per token (all layers, K and V)."""
    if type(pool) is not MHATokenToKVPool:
        raise ValueError(
            f"kvtier supports MHA KV pools (Llama, Qwen2/3 and similar); this model uses "
            f"{type(pool).__name__} (MLA, hybrid or quantized pools are not supported yet): "
            "remove --radix-cache-backend kvtier"
        )
    itemsize = pool.store_dtype.itemsize
    per_token = pool.layer_num * pool.head_num * (pool.head_dim + pool.v_head_dim) * itemsize
    layout = (
        f"mha-{pool.kv_cache_layout}:L{pool.layer_num}:H{pool.head_num}:"
        f"D{pool.head_dim}:V{pool.v_head_dim}:S{pool.start_layer}"
    )
    return layout, per_token


def model_identity(ctx: TreeCacheBuildContext) -> str:
    """What makes two servers' KV interchangeable: weights source, revision, quantization."""
    args = ctx.server_args
    mc = ctx.model_config
    return f"{mc.model_path}@{mc.revision or ''}|q={mc.quantization or ''}|load={args.load_format}"


class KVTierRadixCache(RadixCache):
    """SGLang's RadixCache over a kvtier ``TierStore`` sized for this server's KV pool."""

    def __init__(self, ctx: TreeCacheBuildContext, cfg: KVTierConfig) -> None:
        super().__init__(ctx.params)  # calls reset()
        if self.is_eagle:
            raise ValueError("--radix-cache-backend kvtier does not support EAGLE speculative decoding yet")
        check_page_size(cfg, self.page_size)
        pool = self.token_to_kv_pool_allocator.get_kvcache()
        layout, per_token = kv_pool_layout(pool)
        self.cfg = cfg
        self.chunk_tokens = cfg.chunk_tokens
        self.namespace = KVNamespace(
            model=model_identity(ctx),
            kv_dtype=str(pool.store_dtype).removeprefix("torch."),
            layout=layout,
            page_size=self.page_size,
            tp_rank=ctx.tp_rank,
            tp_size=ctx.tp_size,
            chunk_tokens=cfg.chunk_tokens,
        )
        self.store = TierStore(cfg, self.namespace, cfg.chunk_tokens * per_token)
        latency = self.store.metrics.latency
        self.io = PoolIO(
            pool.k_buffer,
            pool.v_buffer,
            cfg.chunk_tokens,
            self.store.cpu.slab.tensor,
            observe=lambda op, seconds: latency.labels("gpu", op).observe(seconds),
            spill_max_programs=cfg.spill_max_programs or None,
            load_max_programs=cfg.load_max_programs or None,
            load_layer_groups=_load_layer_groups(ctx, cfg),
            spill_staging_chunks=cfg.spill_staging_chunks,
        )
        self.io.warm_up()
        logger.info("kvtier: load-backs go in %d launch(es) over groups of layers (load_layer_groups %d, prefill "
                    "CUDA graph %s)", len(self.io.load_groups), cfg.load_layer_groups,
                    ctx.server_args.cuda_graph_config.prefill.backend)
        if self.io.stream is not None and len(self.io.load_groups) > 1:
            # SGLang's pool calls gate.wait_until(layer) before attention reads a layer.
            pool.register_layer_transfer_counter(self.io.gate)
        self._tp_group = ctx.params.tp_cache_group if ctx.tp_size > 1 else None
        # A PD decode server promises its prefix hit to the prefill server, which then skips
        # those pages; only HiCache loads host hits back there, so kvtier must report none.
        self._report_host_hits = ctx.server_args.disaggregation_mode != "decode"
        self._inflight: list[Completion] = []
        self._inflight_lock = threading.Lock()
        # Copies are published (spills committed, load pins released) as they finish, also while
        # no request comes: an idle server's last spills must still reach the tiers.
        stop = threading.Event()
        self._reaper = threading.Thread(target=_reap_until, args=(weakref.ref(self), stop), name="kvtier-reaper",
                                        daemon=True)
        self._reaper.start()
        # Stopped before the interpreter tears down: a daemon thread inside torch then aborts it.
        atexit.register(_stop_thread, stop, self._reaper)
        self._prefetching: dict[ChunkKey, Future] = {}
        self._req_keys: dict[int, tuple[array, Optional[str], list[ChunkKey]]] = {}  # id(req) -> tokens, extra, keys
        self._req_keys_tokens = 0
        self._spill_ahead_on = cfg.write_policy == "write_back" and cfg.spill_ahead > 0
        self._batch_loads = cfg.batch_loads and step_hook_applied()
        if cfg.batch_loads and not self._batch_loads:
            logger.warning("kvtier: SGLang did not apply kvtier's hook on %s, so each load-back is launched when its "
                           "request is scheduled (batch_loads needs the hook)", STEP_HOOK_TARGET)

    @contextmanager
    def _hook(self, op: str) -> Iterator[None]:
        """Time a hook on the scheduler's thread (``kvtier_op_seconds{tier="hook",op=...}``) and, while a
        torch profiler records (SGLang's ``/start_profile``), name it ``kvtier.<op>`` in its trace,
        stacks recorded or not (a span costs ~8 us of that thread even when no profiler records)."""
        profiling = getattr(torch.autograd.profiler, "_is_profiler_enabled", True)  # torch's flag; absent: assume on
        with self.store.metrics.timed("hook", op), (
                torch.profiler.record_function(f"kvtier.{op}") if profiling else nullcontext()):
            yield

    # -- completions ---------------------------------------------------------------------------

    def _reap(self) -> None:
        """Publish finished spills and release the pins of finished loads."""
        with self._inflight_lock:
            self._inflight = [c for c in self._inflight if not c.poll()]

    def _track(self, copy: Completion) -> None:
        with self._inflight_lock:
            self._inflight.append(copy)

    def flush(self) -> None:
        """Launch the queued loads and wait for every copy in flight (tests, shutdown)."""
        self.launch_loads()
        with self._inflight_lock:
            for c in self._inflight:
                c.wait()
            self._inflight.clear()

    # -- spill -----------------------------------------------------------------------------------

    def _node_spill(self, node: TreeNode, part: Literal["all", "whole", "tail"] = "all") -> Optional[_Spill]:
        """The copy of the chunks that end inside ``node`` and no tier holds yet: its whole chunks
        (unless ``part`` is "tail") and, with ``tail_chunks``, the tail ending its path (unless
        ``part`` is "whole"). The chunk keys of its
        path are hashed once per node and kept (a split keeps a node's end, so they stay right):
        spill ahead and eviction look at the same documents again and again, most of them already
        stored, and hashing a 10K-token path costs the scheduler's thread ~0.2 ms each time."""
        nodes = []
        while node is not self.root_node:
            nodes.append(node)
            node = node.parent
        nodes.reverse()
        length = sum(len(n.value) for n in nodes)
        start = length - len(nodes[-1].value)
        T = self.chunk_tokens
        whole = length // T * T
        if part == "tail":
            start = max(start, whole)
        granule = self.namespace.tail_granule
        tail = (length - whole) // granule * granule if self.cfg.tail_chunks and part != "whole" else 0
        if whole <= start // T * T and whole + tail <= start:
            return None  # no whole chunk and no tail ends inside the node

        def path_tokens() -> array:
            tokens = array("q")
            for n in nodes:
                tokens.extend(n.key.raw_token_ids())
            return tokens

        tokens, extra_key = None, nodes[0].key.extra_key
        keys = self._node_keys.get(nodes[-1].id)
        if keys is None:
            # A new leaf under a document hashes only its own chunks: the document's keys are kept.
            known = next((self._node_keys[n.id] for n in reversed(nodes[:-1]) if n.id in self._node_keys), ())
            tokens = path_tokens()
            keys = self._node_keys[nodes[-1].id] = self.namespace.chunk_keys(tokens, extra_key, known)
        tail_key = None
        if whole + tail > start and tail:
            tokens = path_tokens() if tokens is None else tokens
            tail_key = self.namespace.tail_keys(tokens, keys, extra_key)[-1]
        return self._plan_spill(keys, lambda: torch.cat([n.value for n in nodes])[: whole + tail], start, tail_key)

    def _plan_spill(
        self, keys: list[ChunkKey], rows: Callable[[], torch.Tensor], start: int, tail_key: Optional[ChunkKey] = None
    ) -> Optional[_Spill]:
        """CPU slots for the chunks of ``keys`` (those of a token path whose pool rows ``rows()``
        gives) that end after token ``start``, and the tail ``tail_key`` after them, that no tier
        holds yet, and the pool rows to copy into them; None if there are none."""
        T = self.chunk_tokens
        first = start // T
        index = {k: i for i, k in enumerate(keys[first:], start=first)}
        leases = [self.store.reserve(keys[first:])] if first < len(keys) else []
        if tail_key is not None:  # kept in the CPU tier only, the first to go when it is full
            index[tail_key] = len(keys)
            leases.append(self.store.reserve([tail_key], expendable=True))
        leases = [lease for lease in leases if lease.keys]
        if not leases:
            return None
        path_rows = rows()

        def chunk_rows(i: int) -> torch.Tensor:
            part = path_rows[i * T : (i + 1) * T]
            # A tail's slot past the tail is left unwritten (-1): the copy moves only the tail's
            # rows (16 tokens of a 256-token slot: 2 of 32 MiB), and a load of the tail skips them.
            return part if len(part) == T else torch.cat([part, part.new_full((T - len(part),), -1)])

        return _Spill(torch.cat([chunk_rows(index[k]) for lease in leases for k in lease.keys]), leases)

    def _spill(
        self, spills: list[Optional[_Spill]], when: Literal["eviction", "ahead", "insert"], owners: Sequence[TreeNode] = ()
    ) -> None:
        """Copy ``spills`` out in one launch. At an ``eviction`` the rows were just freed and wait for
        the copy; otherwise they are still in the tree, held by ``owners`` and their ancestors: the
        deletion of any owner, which must come before theirs, waits for the copy."""
        spills = [s for s in spills if s is not None]
        if not spills:
            return
        leases = [lease for s in spills for lease in s.leases]
        self.store.metrics.spills.labels(when).inc(sum(len(lease.keys) for lease in leases))
        slots = spills[0].slots if len(spills) == 1 else torch.cat([s.slots for s in spills])
        self._track(self.io.to_host(slots, [v for lease in leases for v in lease.views],
                                    partial(_commit_all, self.store, leases), guard=when == "eviction", owners=owners))

    def _timed_spill_ahead(self, incoming: int) -> None:
        if self._spill_ahead_on:
            with self._hook("spill_ahead"):
                self._spill_ahead(incoming)

    def _spill_ahead(self, incoming: int) -> None:
        """write_back: copy out, in the background, the nodes that eviction would take first while
        the pool would keep less than ``spill_ahead`` of its rows free after ``incoming`` more
        tokens; evicting them later frees their rows without a copy on the critical path."""
        allocator = self.token_to_kv_pool_allocator
        reserve = int(self.cfg.spill_ahead * allocator.size)
        free = allocator.available_size()
        covered = free - incoming
        if covered >= reserve or not self.evictable_leaves:
            return
        # A cache-aware schedule policy matches every waiting request each round: walk the tree
        # again only once it changed (sizes alone miss requests of one size: one node out, one in,
        # same sizes) or for a request needing more than the last walk.
        state = (free, self.evictable_size_, self._tree_version)
        last_state, last_incoming = self._ahead_walk
        if state == last_state and incoming <= last_incoming:
            return
        self._ahead_walk = (state, incoming)
        priority = self.eviction_strategy.get_priority
        # RadixCache.evict's order: leaves by priority, a parent once its last child is gone.
        heap = [(priority(n), n) for n in self.evictable_leaves]
        heapq.heapify(heap)
        children_left: dict[int, int] = {}
        while heap and covered < reserve:
            _, node = heapq.heappop(heap)
            covered += len(node.value)
            self._defer(node)
            parent = node.parent
            if parent is not self.root_node and parent.lock_ref == 0:
                children_left[parent.id] = children_left.get(parent.id, len(parent.children)) - 1
                if children_left[parent.id] == 0:
                    heapq.heappush(heap, (priority(parent), parent))
        self.spill_deferred()

    def _defer(self, node: TreeNode) -> None:
        """Hold ``node`` for the next ``spill_deferred``, unless it was copied out (or held) already."""
        if node.id not in self._spilled_ahead:
            self._spilled_ahead.add(node.id)
            self._deferred[node.id] = node

    def spill_deferred(self) -> None:
        """Launch the spill-ahead copies held back, unless a load still runs on the GPU; timed as hook
        ``spill_deferred`` when it launches (inside match_prefix's or spill_ahead's time when called
        from them). Cheap when there are none: the plugin calls it at every step of the scheduler."""
        if not self._deferred or self._queued or self.io.loads_running():
            return
        with self._hook("spill_deferred"):
            nodes, self._deferred = list(self._deferred.values()), {}
            # One copy for all: each launch costs the scheduler's thread ~1 ms (tails made every
            # request's node worth a copy: 98 launches in a rag warm pass at fda5359).
            self._spill([self._node_spill(node) for node in nodes], "ahead", owners=nodes)

    def reset(self) -> None:
        io = getattr(self, "io", None)  # RadixCache.__init__ resets before the copies exist
        if io is not None:
            # Every row is freed at once: nothing may overwrite rows that copies still read or write.
            self.launch_loads()
            io.guard_pending()
        super().reset()
        self._spilled_ahead: set[int] = set()  # ids of nodes copied out (or due to be) ahead of eviction
        self._deferred: dict[int, TreeNode] = {}  # spill-ahead nodes whose copy waits for the loads, in order
        self._node_keys: dict[int, list[ChunkKey]] = {}  # node id -> chunk keys of its path (_node_spill)
        self._tree_version = 0  # bumped by every insert and leaf deletion
        self._ahead_walk: tuple[tuple[int, int, int], int] = ((-1, -1, -1), 0)  # (free, evictable, version), incoming
        self._queued: list[_QueuedLoad] = []  # loads of the prefill batch being formed (launch_loads)
        # Copies of the leaves the running evict deleted, launched as it returns; None outside evict.
        self._evicted: Optional[list[Optional[_Spill]]] = None

    def _delete_leaf(self, node: TreeNode) -> None:
        if any(q.owner is node for q in self._queued):
            # A request loaded while this batch formed and then not scheduled: its queued load must
            # run before these rows are read or handed out again. (A split keeps the owner as the
            # deeper part, so the owner goes before any node holding the rest of its rows.)
            self.launch_loads()
        # The leaf's rows were just freed: nothing may overwrite them before its copies are done.
        self.io.guard_pending(node)
        held = self._deferred.pop(node.id, None) is not None  # held for a copy not launched: copied below
        copied = node.id in self._spilled_ahead and not held
        self._spilled_ahead.discard(node.id)
        self._tree_version += 1
        if node.value is not None and len(node.value):
            spill = None
            if self.cfg.write_policy == "write_back":
                # A tail copied out with its node before is not copied again: the CPU tier drops tails
                # first, and copying one it dropped sits on the path of the request that wants the rows
                # (all 54 chunks copied at eviction in hook_cost's CPU replay of the rag warm pass).
                spill = self._node_spill(node, "whole" if copied else "all")
            elif self.cfg.tail_chunks:  # write_through stored the whole chunks at insert
                spill = self._node_spill(node, "tail")
            if self._evicted is not None:
                self._evicted.append(spill)
            else:  # deleted outside evict (not in SGLang 0.5.17): its rows may go at once
                self._spill([spill], "eviction")
        self._node_keys.pop(node.id, None)
        super()._delete_leaf(node)

    def evict(self, params: EvictParams):
        """SGLang's evict; the chunks of every leaf it deletes go out in one copy at its end, before
        anything can be given the freed rows (a launch costs the scheduler's thread ~1 ms; in the
        CPU replay of the rag warm pass, hook_cost.py, an evict deleted ~3 leaves)."""
        self._reap()
        with self._hook("evict"):
            self._evicted = []
            try:
                return super().evict(params)
            finally:
                spills, self._evicted = self._evicted, None
                self._spill(spills, "eviction")

    def insert(self, params: InsertParams) -> InsertResult:
        result = super().insert(params)
        self._tree_version += 1
        node = result.last_device_node
        if node is None or node is self.root_node:
            return result
        if self.cfg.write_policy == "write_through":
            # The new tokens end the path in ``node`` (insert split off whatever matched): its whole
            # chunks are the new ones; a tail is stored when the node is evicted.
            self._spill([self._node_spill(node, "whole")], "insert", owners=(node,))
        elif self.cfg.spill_on_insert:
            self._defer(node)
        return result

    # -- load-back -----------------------------------------------------------------------------

    def _agree(self, n: int) -> int:
        """The smallest ``n`` over the TP group: every rank must load the same chunks."""
        return n if self._tp_group is None else self._agree_each([n])[0]

    def _agree_each(self, values: list[int]) -> list[int]:
        """Each of ``values`` at its smallest over the TP group, in one all-reduce."""
        t = torch.tensor(values, dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self._tp_group)
        return t.tolist()

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        with self._hook("match_prefix"):  # SGLang's own tree walk included
            return self._match_prefix(params)

    def _match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        self._reap()
        self.spill_deferred()  # also where no step hook runs (SGLang's PD loops schedule with other methods)
        result = super().match_prefix(params)
        key = params.key
        if self.disable or not self._report_host_hits or params.req is None or len(key) == 0:
            return result
        matched = len(result.device_indices)
        host_hit = self._host_hit(key, matched, params.req)
        if host_hit <= 0:
            # With a host hit, init_load_back walks once the load is queued, so that the walk's
            # copies wait for it (spill_deferred) instead of starting beside it now.
            self._timed_spill_ahead(len(key) - matched)
            return result
        return result._replace(host_hit_length=host_hit)

    def _host_hit(self, key: RadixKey, matched: int, req) -> int:
        """Tokens past the ``matched`` GPU prefix of ``key`` in CPU-tier chunks (and a tail after the
        last whole one), after waiting up to ``lower_tier_wait_s`` for the disk or remote tier to
        bring more whole chunks there."""
        T = self.chunk_tokens
        # The raw int64 array, not a list: hashing a 10K-token prompt takes 0.1 ms instead of 0.4.
        tokens = key.page_aligned(self.page_size).raw_token_ids()
        keys = self._request_keys(req, tokens, key.extra_key)
        first, hits = matched // T, 0
        if first < len(keys):
            rest = keys[first:]
            hits = self._cpu_hits(rest)
            fetching = self._prefetch(rest[hits:])
            if fetching is not None and self.cfg.lower_tier_wait_s > 0:
                wait([fetching], timeout=self.cfg.lower_tier_wait_s)
                hits = self._cpu_hits(rest)
            hits = self._agree(hits)
        end = (first + hits) * T
        if self.cfg.tail_chunks:  # a chat turn: the last turn's tail, then the new message
            end += self._tail_hit(tokens, keys[: first + hits], key.extra_key, matched)
        return max(end - matched, 0)

    def _tail_hit(self, tokens: Sequence[int], keys: list[ChunkKey], extra_key: Optional[str], matched: int) -> int:
        """Tokens of the longest CPU-tier tail after the leading whole chunks ``keys`` of ``tokens``
        that reaches past the ``matched`` GPU prefix, the same on every TP rank; 0 if none."""
        tails = self.namespace.tail_keys(tokens, keys, extra_key)
        held = [int(h) for h in self.store.cpu.contains(tails)]
        if self._tp_group is not None and held:  # the same number of candidates on every rank
            held = self._agree_each(held)  # each rank holds the tails it spilled: those every one holds
        granule, whole = self.namespace.tail_granule, len(keys) * self.chunk_tokens
        n = next((j + 1 for j in reversed(range(len(held))) if held[j]), 0)
        return n * granule if whole + n * granule > matched else 0

    def _request_keys(self, req, tokens: array, extra_key: Optional[str], keep: bool = True) -> list[ChunkKey]:
        """``namespace.chunk_keys(tokens, extra_key)`` for tokens of ``req``. SGLang matches a request
        twice before it runs and the load-back needs the keys again: hashing a 10K-token prompt each
        time took the scheduler's thread ~0.15 ms. So a request's last tokens and keys are kept (unless
        ``keep`` is False: the load-back, after which the request runs), and the whole chunks that the
        new tokens share with them (compared, never assumed) keep theirs."""
        T = self.chunk_tokens
        known: list[ChunkKey] = []
        kept = self._req_keys.pop(id(req), None)
        if kept is not None:
            self._req_keys_tokens -= len(kept[0])
            old, old_keys = kept[0], kept[2]
            n = min(len(old), len(tokens)) // T * T
            if kept[1] == extra_key and n and (old if len(old) == n else old[:n]) == (
                    tokens if len(tokens) == n else tokens[:n]):
                known = old_keys[: n // T]
                if len(old) >= len(tokens):  # a prefix of the kept tokens: nothing new to hash
                    if keep:
                        self._keep_keys(id(req), kept)
                    return known
        keys = self.namespace.chunk_keys(tokens, extra_key, known)
        if keep:
            self._keep_keys(id(req), (array("q", tokens), extra_key, keys))
        return keys

    def _keep_keys(self, req_id: int, kept: tuple[array, Optional[str], list[ChunkKey]]) -> None:
        """Keep a request's tokens and keys; the oldest go while more than ``_KEPT_TOKENS`` are kept
        (requests matched and never loaded back, e.g. GPU hits, are never asked about again)."""
        self._req_keys[req_id] = kept
        self._req_keys_tokens += len(kept[0])
        while self._req_keys_tokens > _KEPT_TOKENS and len(self._req_keys) > 1:
            self._req_keys_tokens -= len(self._req_keys.pop(next(iter(self._req_keys)))[0])

    def prefetch_on_arrival(self, req) -> None:
        """Start fetching the disk- or remote-tier chunks of a request just queued into the CPU tier
        (called by the plugin's hook on the scheduler's ``_add_request_to_queue``)."""
        if self.disable or not self._report_host_hits or (self.store.disk is None and self.store.remote is None):
            return
        with self._hook("arrival"):
            # Whole chunks are whole pages (check_page_size): no page alignment needed first. Kept for
            # the request's matches, whose tokens start with these.
            keys = self._request_keys(req, array("q", req.origin_input_ids), req.extra_key)
            self._prefetch(keys[self._cpu_hits(keys):])

    def _cpu_hits(self, keys: list[ChunkKey]) -> int:
        in_cpu = self.store.cpu.contains(keys)
        return in_cpu.index(False) if False in in_cpu else len(keys)

    def _prefetch(self, keys: list[ChunkKey]) -> Optional[Future]:
        """Start loading chunks from the disk or remote tier into the CPU tier; the fetch, if any."""
        store = self.store
        if (store.disk is None and store.remote is None) or not keys:
            return None
        running = self._prefetching.get(keys[0])  # the fetch thread removes finished ones
        if running is not None:
            return running
        if store.remote is None and not store.disk.contains(keys[:1])[0]:
            return None  # nothing below to load: no background work for a cold prompt
        future = store.prefetch(keys)
        self._prefetching.update(dict.fromkeys(keys, future))
        future.add_done_callback(lambda _: [self._prefetching.pop(k, None) for k in keys])
        return future

    def init_load_back(self, params: InitLoadBackParams):
        with self._hook("init_load_back"):
            rows, node = self._load_back(params)
        req = params.req
        if req is not None:
            self._timed_spill_ahead(len(req.origin_input_ids) + len(req.output_ids) - len(req.prefix_indices) - len(rows))
        return rows, node

    def _load_back(self, params: InitLoadBackParams):
        node = params.best_match_node
        req = params.req
        empty = self._empty_match_result.device_indices
        if req is None or params.host_hit_length <= 0:
            return empty, node
        T = self.chunk_tokens
        matched = len(req.prefix_indices)
        end = matched + params.host_hit_length
        tokens = array("q", req.origin_input_ids)
        tokens.extend(req.output_ids)
        tokens = tokens[:end]
        present, node = self._gained_since_match(node, tokens, matched, req.extra_key)
        prefix = torch.cat([req.prefix_indices.to(present.device), present]) if len(present) else req.prefix_indices
        matched = len(prefix)
        if matched >= end:
            return present, node
        keys = self._request_keys(req, tokens, req.extra_key, keep=False)
        first, whole = matched // T, len(keys) * T
        wanted = keys[first:]
        if end > whole:  # a tail (match_prefix found one of end - whole tokens)
            tails = self.namespace.tail_keys(tokens, keys, req.extra_key)
            wanted.extend(tails[-1:])
            end = whole + len(tails) * self.namespace.tail_granule
        # match_prefix promised CPU-resident chunks only: never read disk or network here.
        lease = self.store.acquire(wanted, wait_s=0.0, lower=False)
        got = self._agree(len(lease.keys))
        end = min(end, (first + got) * T)
        self.inc_lock_ref(node)  # the rows gained since the match are this request's now: not evictable
        rows = self._alloc(end - matched) if end > matched else None
        self.dec_lock_ref(node)
        if rows is None:
            lease.release()
            return present, node
        if end > whole:
            self.store.metrics.tail_tokens.inc(end - max(whole, matched))
        # Tokens of the first chunk that the GPU already holds are skipped (-1), not overwritten, and
        # so are a tail slot's rows past the tail.
        skip = torch.full((matched - first * T,), -1, dtype=torch.int64, device=rows.device)
        past = torch.full(((first + got) * T - end,), -1, dtype=torch.int64, device=rows.device)
        inserted = super().insert(
            InsertParams(key=RadixKey(tokens[:end], req.extra_key), value=torch.cat([prefix.to(rows.device), rows]))
        ).last_device_node
        self._node_keys[inserted.id] = keys[: first + got]  # its path ends at ``end``: no hashing again
        self._queued.append(_QueuedLoad(lease, lease.views[:got], torch.cat([skip, rows, past]), inserted))
        if not self._batch_loads:
            self.launch_loads()
        return (torch.cat([present.to(rows.device), rows]) if len(present) else rows), inserted

    def _gained_since_match(
        self, node: TreeNode, tokens: array, matched: int, extra_key: Optional[str]
    ) -> tuple[torch.Tensor, TreeNode]:
        """The GPU rows the tree got for ``tokens`` past the ``matched`` ones ending at ``node`` since
        the request was matched, and the node where they end. The scheduler matches every waiting
        request before it adds any to the batch, so an earlier request of the batch may have loaded
        (part of) the same prefix since: loading it again would put it in rows outside the tree, which
        SGLang never frees (it leaves a request's protected prefix to the tree). One dict lookup
        when nothing was inserted there."""
        empty = self._empty_match_result.device_indices
        if RadixKey(tokens[matched : matched + self.page_size], extra_key).child_key(self.page_size) not in node.children:
            return empty, node
        found = super().match_prefix(MatchPrefixParams(key=RadixKey(tokens, extra_key)))
        return found.device_indices[matched:], found.last_device_node

    def launch_loads(self) -> None:
        """Launch the loads queued while a prefill batch formed, as one copy: layer group after layer
        group across all its requests, so the forward pass starts once every request's first group
        landed (launched one by one, the first layers would wait for the last request's load).
        Called by the plugin after every ``get_new_batch_prefill``; cheap when none are queued."""
        if not self._queued:
            return
        queued, self._queued = self._queued, []
        with self._hook("launch_loads"):
            views = [view for q in queued for view in q.views]
            slots = torch.cat([q.slots for q in queued])
            self._track(self.io.to_device(views, slots, partial(_release_all, queued),
                                          owners=[q.owner for q in queued]))

    def _alloc(self, n: int) -> Optional[torch.Tensor]:
        allocator = self.token_to_kv_pool_allocator
        rows = allocator.alloc(n)
        if rows is None:
            self.evict(EvictParams(num_tokens=n))
            rows = allocator.alloc(n)
        if rows is None:
            logger.debug("kvtier: no room for %d loaded tokens; recomputing them", n)
        return rows


class _Spill(NamedTuple):
    """A copy out of the pool: ``slots`` (pool rows, chunk after chunk) into the reserved slots of
    ``leases``, committed once it is done."""

    slots: torch.Tensor
    leases: list[Lease]


class _QueuedLoad(NamedTuple):
    """A load-back waiting for its prefill batch to be formed: CPU-tier chunks pinned by ``lease``
    (its ``views``) for the pool rows ``slots`` (-1: skip), which the tree node ``owner`` holds."""

    lease: Lease
    views: list[torch.Tensor]
    slots: torch.Tensor
    owner: TreeNode


def _commit_all(store: TierStore, leases: list[Lease]) -> None:
    for lease in leases:
        store.commit(lease)


def _release_all(queued: list[_QueuedLoad]) -> None:
    for q in queued:
        q.lease.release()


def _reap_until(cache_ref: "weakref.ref[KVTierRadixCache]", stop: threading.Event) -> None:
    """The reaper thread: publishes finished copies until stopped or the cache or its store is gone."""
    cache = cache_ref()
    if cache is not None and cache.io.device.type == "cuda":
        # CUDA calls from a new thread would otherwise start a context on GPU 0 as well.
        torch.cuda.set_device(cache.io.device)
    del cache
    while not stop.wait(REAP_INTERVAL_S):
        cache = cache_ref()
        if cache is None or cache.store.closed:
            return
        cache._reap()
        del cache


def _stop_thread(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    thread.join(timeout=5)


# load_layer_groups 0 (auto) by how SGLang 0.5.17 runs the prefill forward (see KVTierConfig).
_AUTO_LOAD_LAYER_GROUPS = {Backend.DISABLED: 32, Backend.BREAKABLE: 8, Backend.TC_PIECEWISE: 8}


def _load_layer_groups(ctx: TreeCacheBuildContext, cfg: KVTierConfig) -> int:
    """``cfg.load_layer_groups``, chosen by the prefill CUDA graph when 0, and 1 where the graph
    captures attention.

    The forward pass waits for a layer's copy when attention asks the pool for that layer, from
    Python. SGLang's breakable and tc_piecewise prefill graphs run attention eagerly, so that still
    happens; a ``full`` prefill graph replays attention without asking, so it must wait for the
    whole copy before it starts. (The start-up log line names the count and the graph.)
    """
    backend = ctx.server_args.cuda_graph_config.prefill.backend
    if backend == Backend.FULL:
        return 1
    return cfg.load_layer_groups or _AUTO_LOAD_LAYER_GROUPS.get(backend, 1)


def build(ctx: TreeCacheBuildContext) -> KVTierRadixCache:
    """Factory registered as ``--radix-cache-backend kvtier``; reads ``$KVTIER_CONFIG``."""
    if ctx.enable_hierarchical_cache:
        raise ValueError("--radix-cache-backend kvtier replaces HiCache: remove --enable-hierarchical-cache")
    if ctx.disable_radix_cache:
        if ctx.server_args.disaggregation_mode == "decode":
            raise ValueError("--radix-cache-backend kvtier needs the radix cache, which a PD decode server runs "
                             "without: add --disaggregation-decode-enable-radix-cache or drop --radix-cache-backend")
        raise ValueError("--radix-cache-backend kvtier needs the radix cache: remove --disable-radix-cache")
    return KVTierRadixCache(ctx, load_config())
