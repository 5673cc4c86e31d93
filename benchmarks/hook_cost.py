"""Scheduler-thread time of kvtier's hooks per request, on a GPU, without a server.

Scheduling a request with a host hit runs ``match_prefix`` and ``init_load_back`` on SGLang's
scheduler thread, and under the overlap schedule a batch is launched only once that work is done.
(It was suspected of a lone-request TTFT gap against HiCache that profiles later showed to be a
misreading: ``ab/long_doc_profiled24_63ef699.json``; cutting it by 1 ms per request did not move
TTFT, ``ab/long_doc_lg8_9992635.json``.) This measures that thread's time per hook on the real ``KVTierRadixCache``
over a real SGLang pool on the GPU (Llama-3-8B shape), replaying the rag workload's pattern:
``--docs`` documents of ``--doc-len`` tokens + a question + decoded tokens, cold, then warm in
another order through a pool that holds few of them, so each warm request loads a whole document
and evicts another. Each request holds its prefix, inserts its prompt after the prefill (SGLang's
``cache_unfinished_req``; up to d340f56 only at finish, so no inner node's tail was
left to copy at eviction), and its reply at finish; it is matched twice before, as SGLang's
scheduler does (its schedule policy, then the prefill adder; once until 0c0d77d). The GPU is synchronized before each request so that a hook's time is its own
(launches, not waits behind earlier work). Each ``--variant`` (kvtier settings) gets its own cache;
the first is then replayed once more under cProfile (top functions by cumulative time): a replay of
its own, since the profiler slows the hooks 1.5-1.8x and the timed runs must compare (before, the
first variant was timed under it). On CUDA every call inside a hook that makes the CPU wait for the
GPU is listed (``warm_syncs``, torch's sync debug mode); ``--busy-ms`` queues GPU work before each
hook, as the forward pass the scheduler runs beside, so a wait torch does not flag shows as time. On
CPU (``--device cpu``, copies in torch) the tree and store work still shows in kvtier's own timers
(``warm_hook_seconds``); ``--no-copies`` turns the copies themselves off there, leaving the
hooks' bookkeeping alone (tree, keys, tiers, each copy's argument checks; until 7b1b4ab the
checks were left out too), comparable between variants. ``warm_launches`` counts the warm pass's
copy launches by kind (spills at eviction, in the background, loads).

    python benchmarks/hook_cost.py --out benchmarks/results/ab/hook_cost.json
    python benchmarks/hook_cost.py --device cpu --layers 2 --docs 46 --pool-tokens 100000 --cpu-gb 4 \
        --variant sa25:spill_ahead=0.25 --out /tmp/hook_cost_cpu.json
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib.util
import io
import json
import pstats
import random
import time
import warnings
from array import array
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from bench_common import (
    BENCHMARKS_DIR,
    LLAMA3_8B,
    REPO,
    add_commit_option,
    counter_delta,
    kvtier_summary,
    parse_metrics,
    parse_variant,
    percentile,
    run_facts,
    write_dummy_model,
)
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.managers.schedule_policy import match_prefix_for_req
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InitLoadBackParams, InsertParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.plugins.hook_registry import HookRegistry
from sglang.srt.sampling.sampling_params import SamplingParams

from kvtier.kernels import kv_pages
from kvtier.sglang_ext import plugin
from kvtier.sglang_ext.config import load_config
from kvtier.sglang_ext.radix_cache import KVTierRadixCache

QUESTION_TOKENS, OUTPUT_TOKENS = 30, 100


def _sglang_objects():
    """The tests' builders of real SGLang objects (one place builds pools as SGLang does)."""
    path = REPO / "tests" / "sglang_ext" / "sglang_objects.py"
    spec = importlib.util.spec_from_file_location("kvtier_sglang_objects", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ms(seconds: list[float]) -> dict[str, float]:
    return {"mean": round(sum(seconds) / len(seconds) * 1e3, 3),
            **{f"p{q}": round(percentile(seconds, q) * 1e3, 3) for q in (50, 99)}}


def _counters(cache: KVTierRadixCache) -> dict[str, float]:
    return parse_metrics(cache.store.metrics.exposition().decode())


def _synchronize(cache: KVTierRadixCache) -> None:
    if cache.io.device.type == "cuda":
        torch.cuda.synchronize(cache.io.device)


@contextmanager
def _watching_syncs(found: set[str], hook: str, device: torch.device) -> Iterator[None]:
    """Add to ``found`` each CUDA call inside that makes the CPU wait for the GPU (torch's sync debug
    mode warns on those), as ``hook: file:line: message``."""
    if device.type != "cuda":
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # Only the warnings of synchronizing calls: turning the mode on also warns, once, that it is a prototype.
    found.update(f"{hook}: {w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in caught
                 if "called a synchronizing CUDA operation" in str(w.message))


def skip_copies() -> None:
    """``--no-copies``: a copy moves no byte (neither the kernel, interpreted on CPU, nor the torch
    copies standing in for it); every other step of a spill or load runs, the checks of each copy's
    arguments included."""
    kv_pages._launch = kv_pages._gather_torch = kv_pages._scatter_torch = lambda *_, **__: None


def _sleep_cycles_per_ms() -> int:
    """GPU clock cycles of ``torch.cuda._sleep`` per millisecond on the current device, measured."""
    cycles = 10_000_000
    torch.cuda._sleep(cycles)  # the first launch loads the kernel
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return int(cycles / start.elapsed_time(end))


class Replay:
    """The scheduler's calls for one request at a time, timed per hook."""

    def __init__(self, cache: KVTierRadixCache, rnd: random.Random, busy_ms: float = 0.0) -> None:
        self.cache, self.rnd = cache, rnd
        self.times: dict[str, list[float]] = {}
        self.syncs: set[str] = set()
        self.loaded_tokens = 0
        self.busy_cycles = int(busy_ms * _sleep_cycles_per_ms()) if busy_ms else 0

    def _timed(self, name: str, fn, *args, **kwargs):
        if self.busy_cycles:
            # A forward pass runs while the scheduler works: a hook that waits for the GPU waits for it.
            torch.cuda._sleep(self.busy_cycles)
        with _watching_syncs(self.syncs, name, self.cache.io.device):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.times.setdefault(name, []).append(time.perf_counter() - start)
        return out

    def serve(self, doc: list[int], rid: str) -> None:
        cache, rnd = self.cache, self.rnd
        _synchronize(cache)
        prompt = doc + [rnd.randrange(1000) for _ in range(QUESTION_TOKENS)]
        req = Req(rid, "", array("q", prompt), SamplingParams(max_new_tokens=OUTPUT_TOKENS))
        # Matched twice, as SGLang's scheduler does: its schedule policy matches the waiting queue,
        # then the prefill adder matches the request it takes.
        self._timed("match_prefix", match_prefix_for_req, cache, req, None, include_req=True)
        self._timed("match_prefix", req.init_next_round_input, cache)
        prefix_node = req.last_node
        if req.host_hit_length > 0:
            rows, prefix_node = self._timed("init_load_back", cache.init_load_back, InitLoadBackParams(
                best_match_node=req.best_match_node, host_hit_length=req.host_hit_length, req=req))
            self.loaded_tokens += len(rows)
            req.prefix_indices = torch.cat([req.prefix_indices, rows])
        cache.inc_lock_ref(prefix_node)  # the running request holds its prefix, as the scheduler does
        # The batch is formed (the plugin's hook on get_new_batch_prefill): its loads launch as one copy.
        self._timed("launch_loads", cache.launch_loads)
        _synchronize(cache)
        # The scheduler's next step (the same hook): the load is done, the walk's held copies launch.
        self._timed("spill_deferred", cache.spill_deferred)
        # The prompt past its prefix is prefilled and inserted, as SGLang's cache_unfinished_req does,
        # and locked while the reply decodes; the scheduler's next step follows; the reply's rows are
        # then inserted with it at finish (cache_finished_req). The question is new: nothing to free.
        value = torch.cat([req.prefix_indices, self._alloc(len(prompt) - len(req.prefix_indices))])
        node = self._timed("insert", cache.insert, InsertParams(key=RadixKey(array("q", prompt)), value=value)).last_device_node
        cache.inc_lock_ref(node)
        self._timed("spill_deferred", cache.spill_deferred)
        value = torch.cat([value, self._alloc(OUTPUT_TOKENS)])
        tokens = prompt + [rnd.randrange(1000) for _ in range(OUTPUT_TOKENS)]
        self._timed("insert", cache.insert, InsertParams(key=RadixKey(array("q", tokens)), value=value))
        cache.dec_lock_ref(node)
        cache.dec_lock_ref(prefix_node)
        cache.flush()

    def _alloc(self, n: int) -> torch.Tensor:
        allocator = self.cache.token_to_kv_pool_allocator
        rows = allocator.alloc(n)
        if rows is None:
            self._timed("evict", self.cache.evict, EvictParams(num_tokens=n))
            rows = allocator.alloc(n)
        return rows


def count_launches(io) -> dict[str, int]:
    """Count ``io``'s copy launches from now on, by kind: spills at eviction (guarded: the freed rows
    wait for them), spills in the background (ahead of eviction, at insert) and loads."""
    counts = {"spill_at_eviction": 0, "spill_background": 0, "load": 0}
    to_host, to_device = io.to_host, io.to_device

    def counted_to_host(slots, views, on_done, guard=True, owners=()):
        counts["spill_at_eviction" if guard else "spill_background"] += 1
        return to_host(slots, views, on_done, guard, owners)

    def counted_to_device(*a, **k):
        counts["load"] += 1
        return to_device(*a, **k)

    io.to_host, io.to_device = counted_to_host, counted_to_device
    return counts


def run_variant(objects, base_args, env: dict[str, str], args: argparse.Namespace, profile: bool) -> dict:
    plugin.register()  # as every SGLang scheduler process does before it builds the cache
    HookRegistry.apply_hooks()
    ctx = objects.build_context(base_args, page_size=1, pool_tokens=args.pool_tokens)
    cache = KVTierRadixCache(ctx, load_config(env=env, cpu_size_gb=args.cpu_gb))
    try:
        rnd = random.Random(args.seed)
        docs = [[rnd.randrange(1000) for _ in range(args.doc_len)] for _ in range(args.docs)]
        replay = Replay(cache, rnd, args.busy_ms)
        for i, doc in enumerate(docs):
            replay.serve(doc, f"cold{i}")
        replay.times.clear()
        replay.syncs.clear()
        launches = count_launches(cache.io)
        before = _counters(cache)
        order = list(range(args.docs))
        rnd.shuffle(order)
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        for i in order:
            replay.serve(docs[i], f"warm{i}")
        if profiler:
            profiler.disable()
        summary = kvtier_summary(counter_delta(before, _counters(cache)))
        result = {
            "settings": env,
            "load_layer_groups": len(cache.io.load_groups),
            "warm_loaded_tokens": replay.loaded_tokens,
            "warm_ms": {hook: _ms(t) for hook, t in replay.times.items()},
            "warm_syncs": sorted(replay.syncs),  # CUDA only
            # kvtier's own timers over the warm pass, as the servers report them (long_doc's hook_seconds)
            "warm_hook_seconds": summary["hook_seconds"],
            "warm_gpu_copies": summary["gpu_copies"],
            "warm_spilled_chunks": summary["spilled_chunks"],
            "warm_tier_evictions": summary["tier_evictions"],
            "warm_launches": launches,
        }
        if profiler:
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.profile_top)
            result["warm_profile_by_cumulative_time"] = [line.rstrip() for line in out.getvalue().splitlines() if line.strip()]
        return result
    finally:
        cache.flush()
        cache.store.close()
        del cache
        # The tree's cycles hold views of the pinned tier: without a collection each variant's tier
        # stays (three 64 GB tiers would outgrow the H100 host's 128 GiB; such a run ended without its file).
        gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=12)
    ap.add_argument("--doc-len", type=int, default=10_000)
    ap.add_argument("--pool-tokens", type=int, default=40_000, help="GPU pool: a few documents fit")
    ap.add_argument("--cpu-gb", type=float, default=20, help="kvtier's CPU tier: every document fits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                    help="kvtier settings of one run, e.g. lg8:load_layer_groups=8 (default: the defaults, "
                         "load_layer_groups 32, load_layer_groups 1)")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only checks that the script runs (no launches)")
    ap.add_argument("--no-copies", action="store_true",
                    help="cpu: skip the KV copies (the loaded and spilled bytes are not moved; bookkeeping only)")
    ap.add_argument("--busy-ms", type=float, default=0.0,
                    help="cuda: queue this much GPU work before each hook, as a forward pass running beside "
                         "the scheduler; a hook that waits for the GPU then shows it in its time")
    ap.add_argument("--profile-top", type=int, default=30, help="0: no profiled replay")
    ap.add_argument("--layers", type=int, default=32,
                    help="fewer than Llama-3-8B's 32 keep a CPU run's pool and tier small (the tree work is the same)")
    ap.add_argument("--model-dir", default="/tmp/llama3-8b-dummy-hook-cost")
    ap.add_argument("--out", default=str(BENCHMARKS_DIR / "results" / "ab" / "hook_cost.json"))
    add_commit_option(ap)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("hook_cost.py times kernel launches of the load path: it needs a CUDA GPU")
    if args.busy_ms and args.device != "cuda":
        raise SystemExit("--busy-ms queues GPU work: it needs --device cuda")
    if args.no_copies:
        if args.device != "cpu":
            raise SystemExit("--no-copies is for --device cpu, where copies are synchronous torch work")
        skip_copies()
    variants = dict(parse_variant(spec) for spec in args.variant) or {
        "defaults": {}, **dict(parse_variant(spec) for spec in ("lg32:load_layer_groups=32", "lg1:load_layer_groups=1"))}

    objects = _sglang_objects()
    model = {**LLAMA3_8B, "num_hidden_layers": args.layers}
    base_args = objects.server_args(str(write_dummy_model(args.model_dir, model)), device=args.device)
    report = {
        "benchmark": "hook_cost",
        "workload": {"docs": args.docs, "doc_len": args.doc_len, "question_tokens": QUESTION_TOKENS,
                     "output_tokens": OUTPUT_TOKENS, "pool_tokens": args.pool_tokens, "cpu_gb": args.cpu_gb,
                     "model": f"Llama-3-8B shape with {args.layers} layers (8 KV heads, head dim 128, bf16)",
                     "seed": args.seed, "copies": not args.no_copies, "busy_ms": args.busy_ms},
        **run_facts(args.commit),
        "variants": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:  # after every run: a later run's crash keeps the ones before
        out.write_text(json.dumps(report, indent=2) + "\n")

    for name, env in variants.items():
        report["variants"][name] = result = run_variant(objects, base_args, env, args, profile=False)
        print(f"[{name}] warm ms (mean/p50/p99): " + ", ".join(
            f"{hook} {t['mean']}/{t['p50']}/{t['p99']}" for hook, t in result["warm_ms"].items()), flush=True)
        print(f"[{name}] calls that waited for the GPU: {result['warm_syncs']}", flush=True)
        write()
    if args.profile_top > 0:
        name, env = next(iter(variants.items()))
        profiled = run_variant(objects, base_args, env, args, profile=True)
        report["variants"][name]["warm_profile_by_cumulative_time"] = profiled["warm_profile_by_cumulative_time"]
        write()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
