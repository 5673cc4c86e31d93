"""Long documents shared by concurrent users: kvtier vs radix-only vs SGLang HiCache, TTFT and latency.

The workload of LMCache's RAG benchmark: ``--docs`` documents of ``--doc-len`` random token ids
(fixed seed), ``--concurrency`` users at a time, each request one document plus a short question
(20 to 50 tokens, different for every request), ``--output-len`` tokens decoded (``ignore_eos``).
Pass ``cold`` sends every document once; pass ``warm`` sends the same documents in another order,
so with a GPU pool smaller than the documents (``--pool-tokens``) a warm hit must come from a tier
below the GPU (``--warm-passes N``: N such passes, ``warm``, ``warm2``, ...). ``--workload chat``
runs several users whose turns grow their history (each turn is the previous turn plus a reply and
a new user message), ``--workload noreuse`` two passes of distinct documents (the cost of a tier on
misses).

Each ``--config`` starts its own SGLang 0.5.17 server on the same GPU (dummy-weight Llama-3-8B
shape unless ``--model-path``), streams ``/generate`` with ``input_ids`` (TTFT = first streamed
chunk), and records per pass TTFT and latency mean/p50/p99, output tokens/s, the prompt tokens
SGLang reports as cached on the GPU (``device``) or loaded from host or storage, and for kvtier the
delta of its Prometheus counters (chunk hits per tier, GB moved). Results of several invocations
merge into one JSON file, with every configuration's ratios to ``radix`` recomputed each time.
``--profile-requests N`` then sends the warm pass's first N prompts again under SGLang's torch
profiler (traces for ``trace_summary.py``), apart from the measured passes:

    python benchmarks/long_doc.py --config radix
    python benchmarks/long_doc.py --config kvtier_cpu          # and hicache, kvtier_cpu_disk, ...
    python benchmarks/long_doc.py --variant spill16:spill_max_programs=16   # kvtier_cpu, one setting changed
    python benchmarks/plot_results.py benchmarks/results/long_doc.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Mapping, Sequence

import aiohttp
import numpy as np

from bench_common import (
    add_commit_option,
    LLAMA3_8B,
    BenchError,
    ServerSetup,
    counter_delta,
    kvtier_summary,
    merge_result,
    model_shape,
    parse_variant,
    run_facts,
    scrape_metrics,
    setups,
    summarize,
    write_dummy_model,
)
from sglang_server import prefill_batches, profiled, request_stages, sglang_server

Pass = tuple[str, list[list[int]]]
WORKLOADS = ("rag", "chat", "noreuse")


def token_range(config: Mapping) -> tuple[int, int]:
    """Ids drawn for prompts: ``[1000, min(vocab, 120000))``, clear of Llama-3's and Qwen's special tokens."""
    low, high = 1000, min(int(config["vocab_size"]), 120_000)
    if high - low < 1000:
        raise BenchError(f"vocab_size {config['vocab_size']} is too small for random prompts (needs > 2000)")
    return low, high


def _bos(config: Mapping) -> list[int]:
    bos = config.get("bos_token_id")
    return [bos] if isinstance(bos, int) else []


def rag_passes(docs: int, doc_len: int, seed: int, ids: tuple[int, int], bos: Sequence[int],
               warm_passes: int = 1) -> list[Pass]:
    """``cold``: every document once, each with its own question; ``warm``: the same documents in another
    order; ``warm2``, ``warm3``, ... (``warm_passes`` > 1): again, each in an order of its own. The
    passes of ``warm_passes=1`` are the same whatever ``warm_passes``: the later ones are drawn after."""
    if docs < 2:
        raise BenchError("--docs must be at least 2 (the warm pass reorders the documents)")
    if warm_passes < 1:
        raise BenchError(f"--warm-passes must be at least 1, got {warm_passes}")
    rng = np.random.default_rng(seed)
    documents = rng.integers(*ids, size=(docs, doc_len)).tolist()

    def shuffled() -> list[int]:
        order = list(range(docs))
        while order == list(range(docs)):
            order = rng.permutation(docs).tolist()
        return order

    def ask(doc: list[int]) -> list[int]:
        return [*bos, *doc, *rng.integers(*ids, size=int(rng.integers(20, 51))).tolist()]

    order = shuffled()
    passes = [("cold", [ask(documents[i]) for i in range(docs)]), ("warm", [ask(documents[i]) for i in order])]
    for n in range(2, warm_passes + 1):
        order = shuffled()
        passes.append((f"warm{n}", [ask(documents[i]) for i in order]))
    return passes


def chat_passes(users: int, turns: int, first_len: int, turn_len: int, reply_len: int, seed: int,
                ids: tuple[int, int], bos: Sequence[int]) -> list[Pass]:
    """Pass ``turnK`` holds every user's K-th turn; turn K+1 is turn K, a reply and a new user message.

    The replies are fixed random tokens rather than the server's output, so the prompts do not
    depend on the model and every configuration sends the same bytes.
    """
    if turns < 2:
        raise BenchError("--turns must be at least 2 (turn 1 is cold, later turns reuse it)")
    rng = np.random.default_rng(seed)
    prompts = [[*bos, *rng.integers(*ids, size=first_len).tolist()] for _ in range(users)]
    passes = [("turn1", [list(p) for p in prompts])]
    for turn in range(2, turns + 1):
        for p in prompts:
            p.extend(rng.integers(*ids, size=reply_len + turn_len).tolist())
        passes.append((f"turn{turn}", [list(p) for p in prompts]))
    return passes


def noreuse_passes(docs: int, doc_len: int, seed: int, ids: tuple[int, int], bos: Sequence[int]) -> list[Pass]:
    """Two passes of ``docs`` prompts each, no two sharing a token after the BOS."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(*ids, size=(2 * docs, doc_len))
    prompts[:, 0] = rng.choice(np.arange(*ids), size=2 * docs, replace=False)
    rows = [[*bos, *row] for row in prompts.tolist()]
    return [("pass1", rows[:docs]), ("pass2", rows[docs:])]


@dataclass
class RequestResult:
    """One streamed request as the client saw it, with SGLang's cache report for its prompt."""

    ttft_s: float
    latency_s: float
    prompt_tokens: int
    output_tokens: int
    cached_device: int
    cached_host: int
    cached_storage: int
    sent_s: float = 0.0  # time.monotonic() when it was sent: one clock with the server's processes (gc_pauses)
    rid: str = ""  # the request id it was sent with, if any


async def sse_events(session: aiohttp.ClientSession, url: str, ids: list[int], output_len: int,
                     timeout_s: float, rid: str = "") -> AsyncIterator[dict]:
    """POST one streaming greedy ``/generate`` (``ignore_eos``; request id ``rid`` if given) and yield each
    ``data:`` event until ``[DONE]``; an HTTP error, a streamed error, a timeout or a broken connection
    raise ``BenchError``."""
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": output_len, "temperature": 0, "ignore_eos": True}}
    if rid:
        body["rid"] = rid
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=10)) as resp:
            if resp.status != 200:
                raise BenchError(f"{url} answered HTTP {resp.status}: {(await resp.text())[:300]}")
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise BenchError(f"{url} streamed an error: {event['error']}")
                yield event
    except asyncio.TimeoutError as exc:
        raise BenchError(f"{url} did not finish a request within {timeout_s:g} s (raise --request-timeout?)") from exc
    except aiohttp.ClientError as exc:
        raise BenchError(f"request to {url} failed: {exc}") from exc


async def stream_generate(session: aiohttp.ClientSession, url: str, ids: list[int], output_len: int,
                          timeout_s: float, rid: str = "") -> RequestResult:
    """One streaming ``/generate``, timed: TTFT at the first ``data:`` event, latency at ``[DONE]``."""
    sent = time.monotonic()
    start = time.perf_counter()
    ttft = None
    last: dict | None = None
    async for last in sse_events(session, url, ids, output_len, timeout_s, rid):
        if ttft is None:
            ttft = time.perf_counter() - start
    latency = time.perf_counter() - start
    if last is None or ttft is None:
        raise BenchError(f"{url} closed the stream without any output")
    meta = last.get("meta_info", {})
    details = meta.get("cached_tokens_details") or {}
    cached = int(meta.get("cached_tokens", 0))
    host, storage = int(details.get("host", 0)), int(details.get("storage", 0))
    return RequestResult(
        ttft_s=ttft,
        latency_s=latency,
        prompt_tokens=int(meta.get("prompt_tokens", len(ids))),
        output_tokens=int(meta.get("completion_tokens", len(last.get("output_ids", [])))),
        cached_device=int(details.get("device", cached - host - storage)),
        cached_host=host,
        cached_storage=storage,
        sent_s=sent,
        rid=rid,
    )


async def run_pass(url: str, prompts: Sequence[list[int]], concurrency: int, output_len: int,
                   timeout_s: float = 300.0,
                   on_done: Callable[[int, int, float], None] | None = None,
                   rid_prefix: str = "") -> tuple[list[RequestResult], float]:
    """Send ``prompts`` in order with ``concurrency`` users (each sends its next prompt when its last ends).

    Returns the results in prompt order and the wall time of the pass; ``on_done(done, total,
    elapsed_s)`` is called after every request. With ``rid_prefix``, prompt ``i`` is sent as request
    id ``f"{rid_prefix}{i}"``. The first failure cancels the pass.
    """
    results: list[RequestResult | None] = [None] * len(prompts)
    queue = iter(enumerate(prompts))
    done = 0
    start = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, read_bufsize=1 << 22) as session:

        async def user() -> None:
            nonlocal done
            for i, ids in queue:
                rid = f"{rid_prefix}{i}" if rid_prefix else ""
                results[i] = await stream_generate(session, url, ids, output_len, timeout_s, rid)
                done += 1
                if on_done is not None:
                    on_done(done, len(prompts), time.perf_counter() - start)

        tasks = [asyncio.create_task(user()) for _ in range(min(concurrency, len(prompts)))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
    return [r for r in results if r is not None], time.perf_counter() - start


def pass_report(results: Sequence[RequestResult], wall_s: float) -> dict:
    """TTFT and latency summaries, throughput and the share of prompt tokens served per cache level;
    per request (in prompt order) TTFT, latency and when it was sent after the pass's first request."""
    prompt = sum(r.prompt_tokens for r in results)
    first_sent = min((r.sent_s for r in results), default=0.0)
    out = sum(r.output_tokens for r in results)

    def share(attr: str) -> float:
        return round(sum(getattr(r, attr) for r in results) / prompt, 4) if prompt else 0.0

    return {
        "requests": len(results),
        "wall_s": round(wall_s, 3),
        "ttft": summarize([r.ttft_s for r in results]),
        "latency": summarize([r.latency_s for r in results]),
        "output_tokens": out,
        "throughput_tok_s": round(out / wall_s, 1),
        "prompt_tokens": prompt,
        "hit_rate": {"gpu": share("cached_device"), "host": share("cached_host"), "storage": share("cached_storage")},
        "ttft_all_s": [round(r.ttft_s, 4) for r in results],
        "latency_all_s": [round(r.latency_s, 4) for r in results],
        "sent_all_s": [round(r.sent_s - first_sent, 4) for r in results],
    }


@dataclass(frozen=True)
class RunOptions:
    """How every server of one invocation is started and driven."""

    port: int
    pool_tokens: int
    concurrency: int
    output_len: int
    request_timeout_s: float
    log_dir: str
    metrics_port: int
    cuda_graph_max_bs: int
    profile_requests: int = 0
    profile_dir: str = ""
    profile_stack: bool = False
    attention_backend: str = "triton"
    gc_log_dir: str = ""  # with a folder: log every server process's GC pauses there (gc_pauses/)


def _progress(name: str, pass_name: str) -> Callable[[int, int, float], None]:
    last = [0.0]

    def show(done: int, total: int, elapsed: float) -> None:
        if done == total or elapsed - last[0] >= 10:
            last[0] = elapsed
            print(f"[{name}] {pass_name}: {done}/{total} requests, {elapsed:.1f} s", flush=True)

    return show


GC_PAUSES_PATH = Path(__file__).resolve().parent / "gc_pauses"


def gc_pause_env(folder: Path) -> dict[str, str]:
    """The environment that makes a server's Python processes log their GC pauses into ``folder``
    (emptied first), through ``gc_pauses/sitecustomize.py``."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = os.environ.get("PYTHONPATH")
    return {"GC_PAUSE_LOG": str(folder),
            "PYTHONPATH": f"{GC_PAUSES_PATH}{os.pathsep}{path}" if path else str(GC_PAUSES_PATH)}


def gc_pauses(folder: Path, start: float, end: float, origin: float) -> list[dict]:
    """The GC pauses logged in ``folder`` that began between ``start`` and ``end`` (time.monotonic), in
    order, each at its start after ``origin``, by process title."""
    pauses = []
    for log in folder.glob("gc-*.jsonl"):
        for line in log.read_text().splitlines():
            p = json.loads(line)
            if start <= p["t"] <= end:
                pauses.append({"at_s": round(p["t"] - origin, 4), "ms": round(p["s"] * 1e3, 2), "gen": p["gen"],
                               "proc": p["proc"]})
    return sorted(pauses, key=lambda p: p["at_s"])


def _prepare_disk(setup: ServerSetup) -> None:
    """An empty disk tier folder, so no run serves what an earlier one wrote, with room for the slab."""
    if not setup.disk_dir:
        return
    shutil.rmtree(setup.disk_dir, ignore_errors=True)
    Path(setup.disk_dir).mkdir(parents=True)
    free_gb = shutil.disk_usage(setup.disk_dir).free / 1e9
    if free_gb < setup.disk_gb + 2:
        raise BenchError(f"{setup.disk_dir} has {free_gb:.0f} GB free, the disk tier needs {setup.disk_gb:g} GB: "
                         "lower --disk-gb / --cpu-disk-gb or point --disk-root elsewhere")


def measure_config(name: str, setup: ServerSetup, passes: Sequence[Pass], opts: RunOptions, model_dir: str,
                   server_args: Sequence[str] = ()) -> dict:
    """Start ``setup``'s server, warm it up off the record, run every pass and return the per-pass report."""
    _prepare_disk(setup)
    url = f"http://127.0.0.1:{opts.port}/generate"
    metrics_url = f"http://127.0.0.1:{opts.metrics_port}/metrics"
    args = [*server_args, "--max-total-tokens", str(opts.pool_tokens), *setup.args]
    log = Path(opts.log_dir) / f"server-{name}.log"
    env = dict(setup.env)
    gc_log = Path(opts.gc_log_dir) / name if opts.gc_log_dir else None
    if gc_log is not None:
        env.update(gc_pause_env(gc_log))
    other_ports = (opts.metrics_port,) if setup.is_kvtier else ()
    result: dict = {"description": setup.description, "pool_tokens": opts.pool_tokens, "server_args": args,
                    "cuda_graph_max_bs": opts.cuda_graph_max_bs, "env": dict(setup.env), "passes": {}}
    try:
        with sglang_server(model_dir, opts.port, args, env, log, other_ports=other_ports,
                           cuda_graph_max_bs=opts.cuda_graph_max_bs, attention_backend=opts.attention_backend) as startup:
            print(f"[{name}] server ready after {startup:.0f} s ({setup.description})", flush=True)
            result["startup_s"] = round(startup, 1)
            result["passes"] = measure_passes(name, url, metrics_url if setup.is_kvtier else None, passes, opts, log,
                                              gc_log)
            if opts.profile_requests:
                result["profiled"] = profile_pass(name, url, passes[-1][1][: opts.profile_requests], opts)
    finally:
        if setup.disk_dir:
            shutil.rmtree(setup.disk_dir, ignore_errors=True)
    return result


def measure_passes(name: str, url: str, metrics_url: str | None, passes: Sequence[Pass], opts: RunOptions,
                   server_log: Path | None = None, gc_log: Path | None = None) -> dict:
    """Warm the server at ``url`` up off the record, then run every pass; kvtier's counters come from
    ``metrics_url``, the sizes of SGLang's prefill batches from ``server_log`` and its processes' GC
    pauses from ``gc_log`` when given. Returns the report of each pass by name."""
    rng = np.random.default_rng(12345)
    warmup = [rng.integers(1000, 2000, size=1000).tolist() for _ in range(opts.concurrency)]
    asyncio.run(run_pass(url, warmup, opts.concurrency, 8, opts.request_timeout_s))
    reports = {}
    for pass_name, prompts in passes:
        before = scrape_metrics(metrics_url) if metrics_url else None
        log_start = server_log.stat().st_size if server_log else 0
        began = time.monotonic()
        results, wall = asyncio.run(run_pass(url, prompts, opts.concurrency, opts.output_len,
                                             opts.request_timeout_s, _progress(name, pass_name),
                                             rid_prefix=f"{pass_name}-"))
        report = pass_report(results, wall)
        first_sent = min(r.sent_s for r in results)  # the origin of sent_all_s
        if gc_log is not None:
            report["gc_pauses"] = gc_pauses(gc_log, began, time.monotonic(), first_sent)
        report["kvtier"] = kvtier_summary(counter_delta(before, scrape_metrics(metrics_url))) if before is not None else "n/a"
        if server_log:
            # How the scheduler grouped the pass's requests: rounds split over batches move TTFT.
            with open(server_log, "rb") as f:
                f.seek(log_start)
                text = f.read().decode(errors="replace")
            report["prefill_batches"] = prefill_batches(text)
            stages = server_stages(request_stages(text), results, first_sent + time.time() - time.monotonic())
            if stages:
                report["server_stages"] = stages
        reports[pass_name] = report
        print(f"[{name}] {pass_name}: {describe_pass(report)}", flush=True)
    return reports


def profile_pass(name: str, url: str, prompts: Sequence[list[int]], opts: RunOptions) -> dict:
    """Send ``prompts`` once more under SGLang's torch profiler (CPU and GPU, traces in
    ``opts.profile_dir``), after the measured passes so that their times carry no profiler. With the
    first prompts of the warm pass, which its later ones pushed out of the GPU, these are tier hits
    again: a round of ``--concurrency`` users shows the request scheduled alone and the batch after it."""
    with profiled(opts.port, opts.profile_dir, f"{name}-profiled", with_stack=opts.profile_stack) as answers:
        results, wall = asyncio.run(run_pass(url, prompts, opts.concurrency, opts.output_len, opts.request_timeout_s))
    report = pass_report(results, wall)
    print(f"[{name}] profiled ({len(prompts)} requests, traces in {opts.profile_dir}): {describe_pass(report)}",
          flush=True)
    return {"requests": len(prompts), "trace_dir": opts.profile_dir, "profiler": answers, "report": report}


def server_stages(stages: Mapping[str, Mapping], results: Sequence[RequestResult], origin_wall_s: float) -> dict:
    """Per request in prompt order, from SGLang's time-stats log lines (``stages`` by request id): when it
    entered the scheduler's queue after ``origin_wall_s`` (``time.time()`` of the pass's first send,
    the origin of ``sent_all_s``), how long it waited there (ms) and SGLang's prefill attempts; empty
    unless every request has a line (the server ran with ``--enable-request-time-stats-logging``)."""
    if not results or not all(r.rid in stages for r in results):
        return {}
    got = [stages[r.rid] for r in results]
    report = {"queue_ms": [s["queue"] for s in got]}
    if all("entry" in s for s in got):
        report["queued_at_s"] = [round(s["entry"] - origin_wall_s, 4) for s in got]
    if all("attempts" in s for s in got):
        report["attempts"] = [s["attempts"] for s in got]
    return report


def describe_pass(p: Mapping) -> str:
    """One line: TTFT and latency mean/p50/p99, throughput, hit shares, prefill batch sizes, GC pauses
    and the mean wait in SGLang's scheduler queue if known."""
    t, lat, h = p["ttft"], p["latency"], p["hit_rate"]
    batches, pauses = p.get("prefill_batches"), p.get("gc_pauses")
    queued = p.get("server_stages", {}).get("queue_ms")
    return (f"TTFT {t['mean_s']:.3f}/{t['p50_s']:.3f}/{t['p99_s']:.3f} s, latency {lat['mean_s']:.2f}/"
            f"{lat['p50_s']:.2f}/{lat['p99_s']:.2f} s (mean/p50/p99), {p['throughput_tok_s']:.0f} out tok/s, "
            f"cached gpu {h['gpu']:.0%} host {h['host']:.0%} storage {h['storage']:.0%}"
            + (", prefill batches by size " + " ".join(f"{k}x{v}" for k, v in batches.items()) if batches else "")
            + (f", GC pauses {len(pauses)} ({sum(g['ms'] for g in pauses):.0f} ms, longest "
               f"{max(g['ms'] for g in pauses):.0f} ms)" if pauses else "")
            + (f", scheduler queue wait mean {sum(queued) / len(queued):.1f} ms" if queued else ""))


def build_passes(workload: str, args: argparse.Namespace, config: Mapping) -> list[Pass]:
    """The passes of ``workload`` with the sizes in ``args`` and the token ids ``config`` allows."""
    ids, bos = token_range(config), _bos(config)
    if workload == "rag":
        return rag_passes(args.docs, args.doc_len, args.seed, ids, bos, args.warm_passes)
    if workload == "chat":
        return chat_passes(args.users, args.turns, args.doc_len, args.turn_len, args.output_len, args.seed, ids, bos)
    return noreuse_passes(args.docs, args.doc_len, args.seed, ids, bos)


def describe_workload(kind: str, args: argparse.Namespace, source: str, passes: Sequence[Pass]) -> dict:
    """What a result file's runs must share: workload, sizes, seed, GPU pool, model, requests per pass,
    decode CUDA graphs, and what else every server was given: another attention backend, Triton's KV
    splits, ``--server-arg``s (each moves decode or scheduling for every config alike)."""
    workload = {"kind": kind, "docs": args.docs, "doc_len": args.doc_len, "concurrency": args.concurrency,
                "output_len": args.output_len, "pool_tokens": args.pool_tokens, "seed": args.seed,
                "model": source, "passes": {name: len(p) for name, p in passes},
                "cuda_graph_max_bs": args.cuda_graph_max_bs}
    if kind == "chat":
        workload.update(users=args.users, turns=args.turns, turn_len=args.turn_len)
    if args.attention_backend != "triton":  # results of other backends never merge into a triton file
        workload["attention_backend"] = args.attention_backend
    if kv_split_args(args):  # absent: SGLang's default 8, as every file before --triton-kv-splits
        workload["triton_kv_splits"] = args.triton_kv_splits
    if args.server_arg:
        workload["server_args"] = list(args.server_arg)
    return workload


def load_model(model_path: str | None, model_dir: str) -> tuple[str, dict, list[str], str]:
    """(folder, config.json, SGLang load arguments, description): a local model, or the dummy Llama-3-8B shape."""
    if model_path is None:
        return str(write_dummy_model(model_dir)), LLAMA3_8B, ["--load-format", "dummy"], "Llama-3-8B shape, dummy weights"
    cfg = Path(model_path) / "config.json"
    if not cfg.is_file():
        raise BenchError(f"--model-path {model_path} has no config.json: give a local model folder (no downloads here)")
    return model_path, json.loads(cfg.read_text()), [], model_path


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """Sizes, server and tier knobs shared by this script and ``examples/demo.py``."""
    ap.add_argument("--docs", type=int, default=46, help="documents per pass (rag, noreuse)")
    ap.add_argument("--doc-len", type=int, default=10_000, help="tokens per document (chat: first turn)")
    ap.add_argument("--concurrency", type=int, default=4, help="users sending at the same time")
    ap.add_argument("--warm-passes", type=int, default=1,
                    help="rag: warm passes after the cold one, each in another order (warm, warm2, ...): more "
                         "samples of the warm ratios per server start")
    ap.add_argument("--output-len", type=int, default=100, help="tokens decoded per request (ignore_eos)")
    ap.add_argument("--pool-tokens", type=int, default=100_000, help="GPU KV pool (--max-total-tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--users", type=int, default=16, help="chat: users")
    ap.add_argument("--turns", type=int, default=4, help="chat: turns per user")
    ap.add_argument("--turn-len", type=int, default=1000, help="chat: tokens of each new user message")
    ap.add_argument("--host-gb", type=float, default=64, help="HiCache host pool and kvtier_cpu's CPU tier")
    ap.add_argument("--cpu-disk-cpu-gb", type=float, default=30, help="kvtier_cpu_disk: CPU tier")
    ap.add_argument("--cpu-disk-gb", type=float, default=32, help="kvtier_cpu_disk: disk tier")
    ap.add_argument("--disk-cpu-gb", type=float, default=2, help="kvtier_disk: CPU tier staging the disk tier")
    ap.add_argument("--disk-gb", type=float, default=40, help="kvtier_disk: disk tier")
    ap.add_argument("--disk-root", default="/tmp/kvtier-bench", help="disk tiers live (and are wiped) under here")
    ap.add_argument("--model-path", help="a local model folder; default: the dummy-weight Llama-3-8B shape")
    ap.add_argument("--model-dir", default="/tmp/llama3-8b-dummy", help="where the dummy model's config.json goes")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--metrics-port", type=int, default=9400, help="kvtier's Prometheus port")
    ap.add_argument("--request-timeout", type=float, default=300, help="seconds one request may take")
    ap.add_argument("--log-dir", default=os.environ.get("OUT", "/tmp"), help="server logs go here")
    ap.add_argument("--profile-requests", type=int, default=0, metavar="N",
                    help="after the passes, send the last pass's first N prompts again under SGLang's torch "
                         "profiler (e.g. 8: two rounds of 4 users); the measured passes run without it")
    ap.add_argument("--profile-dir", default=os.path.join(os.environ.get("OUT", "/tmp"), "traces"))
    ap.add_argument("--profile-stack", action="store_true",
                    help="record Python stacks too (at 55e2843 they slowed the profiled scheduler: extend launches "
                         "took 24 ms of CPU; without them kvtier's hooks are still kvtier.<op> spans)")
    ap.add_argument("--cuda-graph-max-bs", type=int, default=8,
                    help="decode CUDA graphs up to this batch size, for every config (0: --disable-cuda-graph, "
                         "as in the results before session 7)")
    ap.add_argument("--triton-kv-splits", type=int, default=32,
                    help="with Triton attention, every config's --triton-attention-num-kv-splits: the most splits "
                         "of a decode's KV (SGLang's default 8; its own heuristic asks for 31 for 4 requests over "
                         "10K tokens on an H100, and 32 took a warm decode step from 10.4 to 9.2 ms in every "
                         "config; results without it in their server_args ran with 8; 0: SGLang's default)")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="an SGLang argument for every config (e.g. --server-arg=--triton-attention-num-kv-splits=32)")
    ap.add_argument("--gc-log", metavar="DIR",
                    help="log every server process's garbage-collection pauses of 2 ms or more into DIR/<config> "
                         "(gc_pauses/sitecustomize.py) and list those of each pass in its report (gc_pauses, on "
                         "the clock of sent_all_s)")
    ap.add_argument("--attention-backend", default="triton", choices=["triton", "flashinfer", "fa3"],
                    help="SGLang's attention backend for every config (triton: what the carried GPU bundle has always "
                         "run; flashinfer JIT-compiles its kernels at the first start, needs nvcc)")


def kv_split_args(args: argparse.Namespace) -> list[str]:
    """``--triton-attention-num-kv-splits`` for every server when they run Triton attention and a count is set."""
    if args.attention_backend != "triton" or args.triton_kv_splits <= 0:
        return []
    return ["--triton-attention-num-kv-splits", str(args.triton_kv_splits)]


def common_server_args(args: argparse.Namespace, load_args: Sequence[str]) -> list[str]:
    """Every server's SGLang arguments before its pool size and its config's own: the model's loading,
    Triton's KV splits and each ``--server-arg``."""
    return [*load_args, *kv_split_args(args), *args.server_arg]


def options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(args.port, args.pool_tokens, args.concurrency, args.output_len, args.request_timeout,
                      args.log_dir, args.metrics_port, args.cuda_graph_max_bs, args.profile_requests, args.profile_dir,
                      args.profile_stack, args.attention_backend, args.gc_log or "")


def setups_from(args: argparse.Namespace) -> dict[str, ServerSetup]:
    return setups(args.host_gb, args.disk_root, args.cpu_disk_cpu_gb, args.cpu_disk_gb, args.disk_cpu_gb,
                  args.disk_gb, args.metrics_port)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = list(setups(1, "/tmp", 1, 1, 1, 1))
    ap.add_argument("--config", action="append", choices=names, default=[], help="one server per config, in turn")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                    help="after the configs, kvtier_cpu with these kvtier settings changed, named NAME")
    ap.add_argument("--workload", choices=WORKLOADS, default="rag")
    ap.add_argument("--out", help="JSON file (default benchmarks/results/long_doc[_chat|_noreuse].json)")
    add_commit_option(ap)
    add_arguments(ap)
    args = ap.parse_args()
    if not args.config and not args.variant:
        ap.error("give at least one --config or --variant")
    out = args.out or f"benchmarks/results/long_doc{'' if args.workload == 'rag' else '_' + args.workload}.json"
    try:
        model_dir, config, load_args, source = load_model(args.model_path, args.model_dir)
        passes = build_passes(args.workload, args, config)
        workload = describe_workload(args.workload, args, source, passes)
        table, names = setups_from(args), list(args.config)
        for spec in args.variant:
            name, env = parse_variant(spec)
            base = table["kvtier_cpu"]
            table[name] = ServerSetup(f"{base.description}, {spec.partition(':')[2]}", base.args, {**base.env, **env})
            names.append(name)
        for name in names:
            facts = run_facts(args.commit)
            result = measure_config(name, table[name], passes, options(args), model_dir,
                                    common_server_args(args, load_args))
            result.update(facts, model=model_shape(config, source))
            report = merge_result(out, "long_doc", workload, name, result)
            for pass_name, ratio in report["configs"][name].get("vs_radix", {}).items():
                print(f"[{name}] {pass_name} vs radix: {ratio}", flush=True)
    except BenchError as exc:
        sys.exit(f"long_doc: {exc}")
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
