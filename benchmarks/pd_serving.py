"""PD disaggregation against one colocated server on two GPUs: greedy equality, KV transfer GB/s, TTFT and ITL.

One invocation runs two configurations one after another with the same SGLang arguments
(``--enable-deterministic-inference`` and the rest of ``--extra-args``), over the dummy-weight
Llama-3-8B shape unless ``--model-path``:

- ``colocated``: one plain SGLang server on ``--colocated-gpu``;
- ``pd``: ``launch.prefill`` on ``--prefill-gpu`` and ``launch.decode`` on ``--decode-gpu``
  (kvtier's PD backend, ``pd_transport`` auto: CUDA IPC between the GPUs), ``launch.router`` in
  front, each worker with its own ``KVTIER_METRICS_PORT`` so the PD counters can be read. With
  ``--cluster "ARGS"`` the PD workers are ``python -m launch.cluster ARGS`` instead (e.g.
  ``--prefill-gpus 0,1 --decode-gpus 2,3``: two prefill and two decode workers; ``--prefill-tp 2``:
  TP-2 prefill workers), the cluster users run, with every worker's PD counters summed per role.

``--colocated-args "ARGS"`` adds SGLang arguments to the colocated server only: on four GPUs
``--tp-size 2 --dp-size 2`` makes it two TP-2 replicas that SGLang balances, the colocated
counterpart of two prefill and two decode workers (issue 7's comparison).

For each: greedy outputs of ``--equality-lens`` prompts (compared token for token between the two),
a transfer probe (``--probe-len``-token prompts, one output token; on PD the prefill's
``kvtier_pd_bytes_total`` and ``kvtier_pd_transfer_seconds`` give GB/s, compared with
``--link-gb-s``), and a mixed load: ``--decode-users`` users streaming ``--decode-output-len``
tokens each, one request after another, while ``--prefills`` long prompts arrive every
``--prefill-interval-s``; TTFT and inter-token latency (from stream chunk times) per class,
also for decode tokens produced while the long prefills were in the system. The JSON goes to
``--out`` with the command, GPUs, commit and date. ``--configs pd`` (or ``colocated``) runs one: ``--out``
keeps an earlier invocation's other configuration (with its own commit and date under
``measured``) when it measured the same workload, server arguments and model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import aiohttp
import numpy as np

from bench_common import (
    add_commit_option,
    BenchError,
    counter_delta,
    gpu_names,
    metric_label,
    model_shape,
    run_facts,
    scrape_metrics,
    summarize,
)
from long_doc import load_model, sse_events, token_range
from sglang_server import BASE_ARGS, base_args, port_in_use, session_process, sglang_server, wait_healthy

from kvtier.launch.cluster import Plan as ClusterPlan
from kvtier.launch.cluster import arg_parser as cluster_arg_parser
from kvtier.launch.cluster import gpu_count
from kvtier.launch.cluster import plan as cluster_plan
from kvtier.sglang_ext.config import KVTierConfig

DEFAULT_EXTRA = "--enable-deterministic-inference --chunked-prefill-size 16384"


@dataclass
class StreamResult:
    """One streamed request: when each chunk came (seconds after the request was sent) and how many
    output tokens the request had by then, and the output token ids."""

    sent_at: float
    chunks: list[tuple[float, int]] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)

    @property
    def ttft_s(self) -> float:
        return self.chunks[0][0]

    @property
    def latency_s(self) -> float:
        return self.chunks[-1][0]


def itl_gaps(chunks: Sequence[tuple[float, int]]) -> list[tuple[float, float]]:
    """Inter-token latencies of one stream as ``(time of the token, seconds since the previous one)``.

    ``chunks`` are ``(time, output tokens so far)``. A chunk that brings ``k`` new tokens gives
    ``k`` latencies of ``gap / k`` (as SGLang's ``bench_serving`` splits them); chunks that bring
    no token are skipped, and tokens of the first chunk have no gap (their time is the TTFT).
    """
    gaps = []
    prev_t, prev_n = None, 0
    for t, n in chunks:
        if n <= prev_n:
            continue
        if prev_t is not None:
            k = n - prev_n
            gaps += [(t, (t - prev_t) / k)] * k
        prev_t, prev_n = t, n
    return gaps


def class_report(results: Sequence[StreamResult], window: Optional[tuple[float, float]] = None) -> dict:
    """TTFT and ITL summaries of one class of requests; with ``window`` (absolute times, as
    ``sent_at``) also the ITL of tokens that arrived within it."""
    itl = [(r.sent_at + t, g) for r in results for t, g in itl_gaps(r.chunks)]
    out = {"requests": len(results), "output_tokens": sum(r.chunks[-1][1] for r in results),
           "ttft": summarize([r.ttft_s for r in results]),
           "itl": summarize([g for _, g in itl]) if itl else None,
           "ttft_all_s": [round(r.ttft_s, 4) for r in results]}
    if window is not None:
        inside = [g for t, g in itl if window[0] <= t <= window[1]]
        out["itl_during_prefills"] = summarize(inside) if inside else None
        out["tokens_during_prefills"] = len(inside)
    return out


def ratios(colocated: Mapping, pd: Mapping) -> dict:
    """``colocated / pd`` for every TTFT and ITL statistic both have (> 1: PD is faster)."""
    out = {}
    for cls in ("decode", "prefill"):
        for metric in ("ttft", "itl", "itl_during_prefills"):
            a, b = colocated.get(cls, {}).get(metric), pd.get(cls, {}).get(metric)
            if not a or not b:
                continue
            for stat in ("mean_s", "p50_s", "p99_s"):
                if b[stat] > 0:
                    out[f"{cls}_{metric}_{stat.removesuffix('_s')}"] = round(a[stat] / b[stat], 3)
    return out


def equality(colocated: Sequence[Sequence[int]], pd: Sequence[Sequence[int]], lens: Sequence[int]) -> list[dict]:
    """Per prompt: equal or not, and the first output position where the two differ."""
    rows = []
    for n, a, b in zip(lens, colocated, pd):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is None and len(a) != len(b):
            first = min(len(a), len(b))
        rows.append({"prompt_len": n, "equal": first is None, "first_difference": first, "tokens": len(a)})
    return rows


def transfer_report(before: Mapping[str, float], after: Mapping[str, float], role: str, expected_bytes: int,
                    link_gb_s: float) -> dict:
    """One request's KV transfer from two scrapes of a PD worker's metrics page: bytes, per-request
    transfer time, GB/s and its share of ``link_gb_s``; the busy time of the copying thread too,
    and the copies' own time within it (``kvtier_pd_copy_seconds_total``, every path): ``copy_gb_s``
    is the copy alone, ``busy_gb_s`` the copy with the protocol around it."""
    d = counter_delta(before, after)
    nbytes = d.get(f"kvtier_pd_bytes_total{{role={role}}}", 0.0)
    seconds = d.get(f"kvtier_pd_transfer_seconds_sum{{role={role}}}", 0.0)
    busy = d.get(f"kvtier_pd_busy_seconds_total{{role={role}}}", 0.0)
    copy = sum(v for k, v in d.items()
               if k.startswith("kvtier_pd_copy_seconds_total{") and metric_label(k, "role") == role)
    gb_s = nbytes / seconds / 1e9 if seconds > 0 else 0.0
    return {"bytes": int(nbytes), "expected_bytes": expected_bytes, "bytes_match": int(nbytes) == expected_bytes,
            "requests": int(d.get(f"kvtier_pd_transfer_seconds_count{{role={role}}}", 0.0)),
            "transfer_s": round(seconds, 5), "gb_s": round(gb_s, 2),
            "link_fraction": round(gb_s / link_gb_s, 3) if link_gb_s > 0 else None,
            "busy_s": round(busy, 5), "busy_gb_s": round(nbytes / busy / 1e9, 2) if busy > 0 else 0.0,
            "copy_s": round(copy, 5), "copy_gb_s": round(nbytes / copy / 1e9, 2) if copy > 0 else 0.0,
            "not_copy_s": round(busy - copy, 5)}


async def stream(session: aiohttp.ClientSession, url: str, ids: list[int], max_new_tokens: int,
                 timeout_s: float) -> StreamResult:
    """One streaming greedy ``/generate`` (``ignore_eos``), every chunk timed."""
    result = StreamResult(sent_at=time.perf_counter())
    async for event in sse_events(session, url, ids, max_new_tokens, timeout_s):
        ids_now = event.get("output_ids", [])
        n = int(event.get("meta_info", {}).get("completion_tokens", len(result.output_ids) + len(ids_now)))
        # SGLang streams cumulative output_ids unless --incremental-streaming-output.
        result.output_ids = list(ids_now) if len(ids_now) == n else result.output_ids + list(ids_now)
        result.chunks.append((time.perf_counter() - result.sent_at, n))
    if not result.chunks or result.chunks[-1][1] == 0:
        raise BenchError(f"{url} closed the stream without any output token")
    return result


@dataclass(frozen=True)
class MixedLoad:
    """The mixed load's sizes: decode users streaming long outputs, long prefills at a fixed rate."""

    decode_users: int = 8
    decode_prompt_len: int = 256
    decode_output_len: int = 256
    prefills: int = 8
    prefill_len: int = 8192
    prefill_output_len: int = 16
    prefill_start_s: float = 1.0
    prefill_interval_s: float = 0.5
    seed: int = 7


async def mixed_load(url: str, load: MixedLoad, ids: tuple[int, int], timeout_s: float) -> dict:
    """Decode users stream one request after another until the last long prefill has finished;
    the long prefills start ``prefill_start_s`` after the users, one every ``prefill_interval_s``.
    Returns per class TTFT/ITL summaries, and the decode ITL within the prefills' window."""
    rng = np.random.default_rng(load.seed)
    long_prompts = rng.integers(*ids, size=(load.prefills, load.prefill_len)).tolist()
    decode_out: list[StreamResult] = []
    prefill_out: list[StreamResult] = []
    prefills_done = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=load.decode_users + load.prefills)
    async with aiohttp.ClientSession(connector=connector, read_bufsize=1 << 22) as session:

        async def decode_user(user: int) -> None:
            users_rng = np.random.default_rng([load.seed, user])
            while not prefills_done.is_set():
                prompt = users_rng.integers(*ids, size=load.decode_prompt_len).tolist()
                decode_out.append(await stream(session, url, prompt, load.decode_output_len, timeout_s))

        async def long_prefill(i: int, at: float) -> None:
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            prefill_out.append(await stream(session, url, long_prompts[i], load.prefill_output_len, timeout_s))

        start = time.perf_counter()
        users = [asyncio.create_task(decode_user(u)) for u in range(load.decode_users)]
        first = start + load.prefill_start_s
        arrivals = [asyncio.create_task(long_prefill(i, first + i * load.prefill_interval_s))
                    for i in range(load.prefills)]
        try:
            await asyncio.gather(*arrivals)
            window = (first, time.perf_counter())
            prefills_done.set()
            await asyncio.gather(*users)
        except BaseException:
            for t in users + arrivals:
                t.cancel()
            await asyncio.gather(*users, *arrivals, return_exceptions=True)
            raise
    return {"wall_s": round(time.perf_counter() - start, 3), "prefill_window_s": round(window[1] - window[0], 3),
            "decode": class_report(decode_out, window), "prefill": class_report(prefill_out)}


def run_requests(url: str, prompts: Sequence[list[int]], max_new_tokens: int, timeout_s: float,
                 concurrency: int = 1) -> list[StreamResult]:
    """Stream ``prompts``, ``concurrency`` at a time, in order."""

    async def go() -> list[StreamResult]:
        sem = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(read_bufsize=1 << 22) as session:
            async def one(p: list[int]) -> StreamResult:
                async with sem:
                    return await stream(session, url, p, max_new_tokens, timeout_s)

            return list(await asyncio.gather(*(one(p) for p in prompts)))

    return asyncio.run(go())


@dataclass(frozen=True)
class PDPorts:
    """The PD configuration's ports (``--pd-ports``); spaced so that ``--cluster`` layouts, which
    count up from each, fit several workers per role."""

    prefill: int = 30100
    decode: int = 30200
    router: int = 8100
    bootstrap: int = 8998
    prefill_metrics: int = 9400
    decode_metrics: int = 9480


@contextmanager
def pd_cluster(model_dir: str, args: Sequence[str], env: Mapping[str, str], ports: PDPorts, prefill_gpu: int,
               decode_gpu: int, log_dir: Path, timeout_s: float, prefill_cache: str = "kvtier",
               cuda_graph_max_bs: int = 0, attention_backend: str = "triton") -> Iterator[float]:
    """``launch.prefill`` and ``launch.decode`` (started together: different GPUs), then the router;
    yields the seconds until all three were healthy, and stops every process group at the end.
    ``prefill_cache="radix"`` starts the prefill with ``sglang.launch_server`` and SGLang's radix
    cache instead of ``launch.prefill`` (which always adds kvtier's cache)."""
    for p in (ports.prefill, ports.decode, ports.router, ports.bootstrap, ports.prefill_metrics, ports.decode_metrics):
        if port_in_use(p):
            raise BenchError(f"port {p} is already in use (a server left running?); stop it or pick other ports")
    sglang = ["--model-path", model_dir, "--host", "127.0.0.1", *base_args(cuda_graph_max_bs, attention_backend), *args]
    bootstrap = ["--bootstrap-port", str(ports.bootstrap)]
    prefill = (["-m", "kvtier.launch.prefill", *bootstrap] if prefill_cache == "kvtier" else
               ["-m", "sglang.launch_server", "--disaggregation-mode", "prefill", "--disaggregation-transfer-backend",
                "kvtier", "--disaggregation-bootstrap-port", str(ports.bootstrap)])
    plan = [
        ("prefill", [*prefill, *sglang, "--port", str(ports.prefill), "--base-gpu-id", str(prefill_gpu)],
         ports.prefill, ports.prefill_metrics),
        ("decode", ["-m", "kvtier.launch.decode", *bootstrap, *sglang, "--port", str(ports.decode),
                    "--base-gpu-id", str(decode_gpu)], ports.decode, ports.decode_metrics),
        ("router", ["-m", "kvtier.launch.router", "--prefill", f"http://127.0.0.1:{ports.prefill}",
                    str(ports.bootstrap), "--decode", f"http://127.0.0.1:{ports.decode}", "--port",
                    str(ports.router), "--policy", "round_robin",
                    # SGLang's /health runs a generation: keep the router's checks out of the measurement.
                    "--health-interval", "60"], ports.router, None),
    ]
    start = time.monotonic()
    with ExitStack() as running:  # stopped in reverse: the router first
        procs: list[tuple[str, subprocess.Popen, Path, int]] = []
        for name, argv, port, metrics_port in plan:
            if name == "router":
                for n, proc, log, p in procs:
                    wait_healthy(f"http://127.0.0.1:{p}", proc, log, timeout_s)
                    print(f"[pd] {n} healthy after {time.monotonic() - start:.0f} s", flush=True)
            log = log_dir / f"pd-{name}.log"
            worker_env = {"SGLANG_HOST_IP": "127.0.0.1", **env}
            if metrics_port is not None:
                worker_env["KVTIER_METRICS_PORT"] = str(metrics_port)
            procs.append((name, running.enter_context(session_process([sys.executable, *argv], log, worker_env)),
                          log, port))
        wait_healthy(f"http://127.0.0.1:{ports.router}", procs[-1][1], procs[-1][2], 60)
        yield time.monotonic() - start


def cluster_layout(cluster_args: Sequence[str], model_dir: str, sglang_args: Sequence[str], ports: PDPorts,
                   timeout_s: float, run_dir: Path) -> tuple[list[str], ClusterPlan]:
    """``launch.cluster``'s command line for ``cluster_args`` (the workers' layout) with the ports of
    ``ports`` (consecutive from each; kvtier metrics from ``ports.prefill_metrics``), and the plan it
    will run: the same ``plan()`` with the same GPU count, so the probe knows every worker's metrics
    ports."""
    own = ["--model-path", model_dir, "--port", str(ports.router), "--prefill-port", str(ports.prefill),
           "--decode-port", str(ports.decode), "--bootstrap-port", str(ports.bootstrap), "--policy", "round_robin",
           # SGLang's /health runs a generation: keep the router's checks out of the measurement.
           "--health-interval", "60", "--startup-timeout", f"{timeout_s:g}", "--run-dir", str(run_dir),
           *cluster_args]
    try:
        layout = cluster_plan(cluster_arg_parser().parse_args(own), [*BASE_ARGS, *sglang_args], gpu_count(),
                              ports.prefill_metrics)
    except (ValueError, SystemExit) as exc:
        raise BenchError(f"--cluster {shlex.join(cluster_args)!r}: {exc}") from exc
    return [sys.executable, "-m", "kvtier.launch.cluster", *own, "--", *BASE_ARGS, *sglang_args], layout


@contextmanager
def launched_cluster(argv: Sequence[str], layout: ClusterPlan, env: Mapping[str, str], log: Path,
                     timeout_s: float) -> Iterator[float]:
    """Runs ``launch.cluster`` (``argv``) until the block ends; yields the seconds until its router
    answered. Ctrl-C's path stops it: SIGINT, after which the cluster stops every worker itself. A
    port already taken: the cluster refuses it before starting anything, naming it and whose it is."""
    start = time.monotonic()
    with session_process(list(argv), log, {"SGLANG_HOST_IP": "127.0.0.1", **env}, stop=signal.SIGINT,
                         grace_s=120) as proc:
        wait_healthy(layout.router.url, proc, log, timeout_s * 2 + 60)  # workers start one after another at worst
        print(f"[pd] launch.cluster ready after {time.monotonic() - start:.0f} s: {layout.placement()}", flush=True)
        yield time.monotonic() - start


@dataclass(frozen=True)
class Plan:
    """Prompts and sizes shared by both configurations."""

    equality_prompts: list[list[int]]
    equality_tokens: int
    probe_prompts: list[list[int]]
    load: MixedLoad
    ids: tuple[int, int]
    timeout_s: float


def make_plan(args: argparse.Namespace, config: Mapping) -> Plan:
    ids = token_range(config)
    rng = np.random.default_rng(args.seed)
    lens = [int(x) for x in args.equality_lens.split(",") if x]
    load = MixedLoad(args.decode_users, args.decode_prompt_len, args.decode_output_len, args.prefills,
                     args.prefill_len, args.prefill_output_len, args.prefill_start_s, args.prefill_interval_s,
                     args.seed + 1)
    return Plan([rng.integers(*ids, size=n).tolist() for n in lens], args.equality_tokens,
                [rng.integers(*ids, size=args.probe_len).tolist() for _ in range(args.probe_repeats)],
                load, ids, args.request_timeout)


def warm_up(url: str, plan: Plan) -> None:
    """Off the record: a long prompt and a batch of short ones, so kernels are compiled and the PD
    pair has registered before anything is timed."""
    rng = np.random.default_rng(999)
    run_requests(url, [rng.integers(*plan.ids, size=plan.load.prefill_len).tolist()], 4, plan.timeout_s)
    short = [rng.integers(*plan.ids, size=plan.load.decode_prompt_len).tolist() for _ in range(plan.load.decode_users)]
    run_requests(url, short, 16, plan.timeout_s, concurrency=len(short))


class PDProbe:
    """Reads the PD workers' metrics pages around one request and reports its KV transfer; ``urls``
    lists each role's pages (one per worker rank), whose counters are added up (with TP ranks the
    transfer seconds add up too: GB/s is then per rank). ``ranks``: each role's ranks per worker
    (default 1), every one of which counts a request that its worker served."""

    def __init__(self, urls: Mapping[str, Sequence[str]], expected_bytes: int, link_gb_s: float,
                 settle_s: float = 10.0, ranks: Optional[Mapping[str, int]] = None):
        self.urls = {role: list(pages) for role, pages in urls.items()}
        self.expected_bytes, self.link_gb_s, self.settle_s = expected_bytes, link_gb_s, settle_s
        self.ranks = dict(ranks or {})

    def scrape(self, role: str) -> dict[str, float]:
        total: dict[str, float] = {}
        for url in self.urls[role]:
            for key, value in scrape_metrics(url).items():
                total[key] = total.get(key, 0.0) + value
        return total

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {role: self.scrape(role) for role in self.urls}

    def report(self, before: Mapping[str, Mapping[str, float]]) -> dict[str, dict]:
        return {role: transfer_report(before[role], self.settle(role, before[role]), role, self.expected_bytes,
                                      self.link_gb_s) for role in self.urls}

    def settle(self, role: str, before: Mapping[str, float]) -> dict[str, float]:
        """Scrape until the transfer histogram counted one more request on every rank of a worker, at
        most ``settle_s`` (the prefill observes it at the decode's last acknowledgement, which may
        come after the answer; each TP rank observes its own share)."""
        key = f"kvtier_pd_transfer_seconds_count{{role={role}}}"
        want = before.get(key, 0.0) + self.ranks.get(role, 1)
        deadline = time.monotonic() + self.settle_s
        while True:
            after = self.scrape(role)
            if after.get(key, 0.0) >= want or time.monotonic() > deadline:
                return after
            time.sleep(0.05)


def measure(name: str, url: str, plan: Plan, probe: Optional[PDProbe] = None) -> dict:
    """Equality outputs, the probe and the mixed load against one running configuration."""
    warm_up(url, plan)
    out: dict = {}
    eq = run_requests(url, plan.equality_prompts, plan.equality_tokens, plan.timeout_s)
    out["equality_output_ids"] = [r.output_ids for r in eq]
    probes = []
    for prompt in plan.probe_prompts:
        before = probe.snapshot() if probe else None
        (r,) = run_requests(url, [prompt], 1, plan.timeout_s)
        row = {"prompt_len": len(prompt), "ttft_s": round(r.ttft_s, 4)}
        if probe:
            row["metrics"] = probe.report(before)
        probes.append(row)
        print(f"[{name}] probe {len(prompt)} tokens: TTFT {r.ttft_s:.3f} s"
              + (f", {describe_transfer(row['metrics'])}" if probe else ""), flush=True)
    out["probe"] = probes
    mixed = asyncio.run(mixed_load(url, plan.load, plan.ids, plan.timeout_s))
    out["mixed"] = mixed
    print(f"[{name}] mixed load: {describe_mixed(mixed)}", flush=True)
    return out


def describe_transfer(m: Mapping) -> str:
    p = m["prefill"]
    return (f"PD moved {p['bytes'] / 1e9:.3f} GB in {p['transfer_s'] * 1e3:.1f} ms = {p['gb_s']:.1f} GB/s "
            f"({p['link_fraction']:.0%} of the link), busy {p['busy_gb_s']:.1f} GB/s, copy {p['copy_gb_s']:.1f} GB/s "
            f"({p['copy_s'] * 1e3:.2f} of {p['busy_s'] * 1e3:.2f} busy ms)")


def describe_mixed(m: Mapping) -> str:
    d, p = m["decode"], m["prefill"]
    during = d.get("itl_during_prefills") or {}
    return (f"decode TTFT p50 {d['ttft']['p50_s'] * 1e3:.0f} ms, ITL mean/p50/p99 {d['itl']['mean_s'] * 1e3:.1f}/"
            f"{d['itl']['p50_s'] * 1e3:.1f}/{d['itl']['p99_s'] * 1e3:.1f} ms (during prefills p99 "
            f"{during.get('p99_s', 0) * 1e3:.1f} ms); prefill TTFT mean/p99 {p['ttft']['mean_s']:.3f}/"
            f"{p['ttft']['p99_s']:.3f} s")


def wait_gpu_released(gpu: int, timeout_s: float = 90.0, below_mib: int = 4096) -> None:
    """Wait until ``gpu`` has less than ``below_mib`` in use: a stopped server's scheduler process may
    still hold its memory for a moment, and the next server sizes its pool from what is free."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            used = subprocess.run(["nvidia-smi", "-i", str(gpu), "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return  # no nvidia-smi: nothing to wait for
        if not used.isdigit() or int(used) < below_mib:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"GPU {gpu} still has {used} MiB in use {timeout_s:g} s after the last server stopped; "
                             "stop whatever holds it")
        time.sleep(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", help="a local model folder; default: the dummy-weight Llama-3-8B shape")
    ap.add_argument("--model-dir", default="/tmp/llama3-8b-dummy", help="where the dummy model's config.json goes")
    ap.add_argument("--extra-args", default=DEFAULT_EXTRA, help=f"SGLang arguments for every server ({DEFAULT_EXTRA!r})")
    ap.add_argument("--colocated-gpu", type=int, default=0)
    ap.add_argument("--colocated-args", default="",
                    help="SGLang arguments for the colocated server only, e.g. '--tp-size 2 --dp-size 2'")
    ap.add_argument("--cluster", default="", metavar="ARGS",
                    help="run the PD workers as 'python -m launch.cluster ARGS' (e.g. '--prefill-gpus 0,1 "
                         "--decode-gpus 2,3'; each role's ports count up from its --pd-ports one, so leave room); "
                         "default: one prefill on --prefill-gpu, one decode on --decode-gpu")
    ap.add_argument("--prefill-gpu", type=int, default=0)
    ap.add_argument("--decode-gpu", type=int, default=1)
    ap.add_argument("--port", type=int, default=30000, help="colocated server port")
    ap.add_argument("--pd-ports", default=",".join(str(p) for p in astuple(PDPorts())),
                    help="prefill, decode, router, bootstrap, prefill metrics, decode metrics (with --cluster the "
                         "workers count up from the first of each, every rank's metrics from the prefill's)")
    ap.add_argument("--pd-transport", default="auto", help="kvtier pd_transport for the PD workers")
    ap.add_argument("--pd-direct", choices=("true", "false"), default="true", help="kvtier pd_direct")
    ap.add_argument("--pd-switch-interval-ms", type=float, default=KVTierConfig().pd_switch_interval_ms,
                    help="kvtier pd_switch_interval_ms (default: kvtier's)")
    ap.add_argument("--pd-stage-slots", type=int, default=4, help="kvtier pd_stage_slots")
    ap.add_argument("--pd-stage-slot-mb", type=float, default=128, help="kvtier pd_stage_slot_mb")
    ap.add_argument("--prefill-cpu-gb", type=float, default=4, help="kvtier CPU tier of the PD prefill worker")
    ap.add_argument("--prefill-cache", choices=("kvtier", "radix"), default="kvtier",
                    help="PD prefill worker's cache: kvtier (launch.prefill) or SGLang's radix cache")
    ap.add_argument("--equality-lens", default="1000,4000,7000,10000", help="greedy equality prompt lengths")
    ap.add_argument("--equality-tokens", type=int, default=16)
    ap.add_argument("--probe-len", type=int, default=10_000, help="tokens of the transfer probe prompt")
    ap.add_argument("--probe-repeats", type=int, default=3)
    ap.add_argument("--link-gb-s", type=float, default=394.0, help="plain torch peer copy between the GPUs, GB/s")
    ap.add_argument("--metrics-settle-s", type=float, default=10.0,
                    help="longest wait for the PD counters to count a probe request")
    ap.add_argument("--decode-users", type=int, default=8)
    ap.add_argument("--decode-prompt-len", type=int, default=256)
    ap.add_argument("--decode-output-len", type=int, default=256)
    ap.add_argument("--prefills", type=int, default=8)
    ap.add_argument("--prefill-len", type=int, default=8192)
    ap.add_argument("--prefill-output-len", type=int, default=16)
    ap.add_argument("--prefill-start-s", type=float, default=1.0, help="first long prefill after the decode users")
    ap.add_argument("--prefill-interval-s", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--startup-timeout", type=float, default=400)
    ap.add_argument("--configs", default="colocated,pd", help="which to run, in order")
    ap.add_argument("--out", default="benchmarks/results/pd_serving.json")
    add_commit_option(ap)
    ap.add_argument("--log-dir", default=os.environ.get("OUT", "/tmp"), help="server logs go here")
    args = ap.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    if not set(configs) <= {"colocated", "pd"}:
        ap.error(f"--configs takes colocated and/or pd, got {args.configs!r}")
    if args.link_gb_s <= 0:
        ap.error(f"--link-gb-s must be the link's measured GB/s (> 0), got {args.link_gb_s:g}")
    for flag in ("--extra-args", "--colocated-args", "--cluster"):
        value = getattr(args, flag[2:].replace("-", "_"))
        try:
            shlex.split(value)
        except ValueError as exc:  # e.g. an unclosed quote
            ap.error(f"{flag} {value!r}: {exc}")
    if args.cluster and args.prefill_cache != "kvtier":
        ap.error("--cluster starts launch.prefill workers, which run kvtier's cache: drop --prefill-cache")
    try:
        ports = PDPorts(*(int(p) for p in args.pd_ports.split(",")))
    except ValueError:
        ports = None
    if ports is None or len(args.pd_ports.split(",")) != 6:
        ap.error(f"--pd-ports needs six ports separated by commas, got {args.pd_ports!r}")
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        model_dir, config, load_args, source = load_model(args.model_path, args.model_dir)
        shape = model_shape(config, source)
        plan = make_plan(args, config)
        server_args = [*load_args, *shlex.split(args.extra_args)]
        if args.cluster and "pd" in configs:  # a bad layout or clashing ports fail now, not after colocated ran
            cluster_layout(shlex.split(args.cluster), model_dir, server_args, ports, args.startup_timeout,
                           log_dir / "pd-cluster")
        report: dict = {"benchmark": "pd_serving", **run_facts(args.commit), "gpus": gpu_names(), "model": shape,
                        "server_args": [*BASE_ARGS, *server_args], "link_gb_s": args.link_gb_s,
                        "workload": {"equality_lens": [len(p) for p in plan.equality_prompts],
                                     "equality_tokens": plan.equality_tokens, "probe_len": args.probe_len,
                                     "probe_repeats": args.probe_repeats, "mixed": asdict(plan.load)}}
        out = Path(args.out)
        errors = []
        report["configs"] = earlier_configs(out, report, configs)
        for name in configs:
            try:
                for gpu in range(max(1, len(gpu_names()))):  # the other configuration may have used any
                    wait_gpu_released(gpu)
                run = run_colocated if name == "colocated" else run_pd
                report["configs"][name] = {**run(args, model_dir, server_args, plan, shape, ports, log_dir),
                                           "measured": {k: report[k] for k in ("commit", "date", "command")}}
            except (BenchError, SystemExit, OSError) as exc:  # sglang_server exits with its message
                # sglang_server's clean-up of a server that died raises over its message: keep both.
                why = str(exc) + (f" (after: {exc.__context__})" if exc.__context__ else "")
                errors.append(f"{name}: {why}")
                report["configs"][name] = {"error": why}
                print(f"[{name}] failed: {why}", flush=True)
            summarize_report(report, args.link_gb_s)
            write_report(out, report)  # after each configuration: a later failure keeps the earlier one
    except BenchError as exc:
        sys.exit(f"pd_serving: {exc}")
    print(f"wrote {out}", flush=True)
    if errors:
        sys.exit("pd_serving: " + "; ".join(errors))


def run_colocated(args: argparse.Namespace, model_dir: str, server_args: list[str], plan: Plan, shape: Mapping,
                  ports: PDPorts, log_dir: Path) -> dict:
    """One plain SGLang server on ``--colocated-gpu``, measured."""
    cfg_args = [*server_args, "--base-gpu-id", str(args.colocated_gpu), *shlex.split(args.colocated_args)]
    with sglang_server(model_dir, args.port, cfg_args, {}, log_dir / "colocated.log", args.startup_timeout) as startup:
        print(f"[colocated] server ready after {startup:.0f} s on GPU {args.colocated_gpu} "
              f"{args.colocated_args}", flush=True)
        return {"startup_s": round(startup, 1), "gpu": args.colocated_gpu, "colocated_args": args.colocated_args,
                **measure("colocated", f"http://127.0.0.1:{args.port}/generate", plan)}


def run_pd(args: argparse.Namespace, model_dir: str, server_args: list[str], plan: Plan, shape: Mapping,
           ports: PDPorts, log_dir: Path) -> dict:
    """The PD workers and router, measured, with the PD counters' totals over the whole run."""
    env = {"KVTIER_CONFIG": "", "KVTIER_PD_TRANSPORT": args.pd_transport, "KVTIER_PD_DIRECT": args.pd_direct,
           "KVTIER_PD_SWITCH_INTERVAL_MS": f"{args.pd_switch_interval_ms:g}",
           "KVTIER_PD_STAGE_SLOTS": str(args.pd_stage_slots), "KVTIER_PD_STAGE_SLOT_MB": f"{args.pd_stage_slot_mb:g}",
           "KVTIER_CPU_SIZE_GB": f"{args.prefill_cpu_gb:g}"}
    metrics = {"prefill": [ports.prefill_metrics], "decode": [ports.decode_metrics]}
    placement = {"prefill_gpu": args.prefill_gpu, "decode_gpu": args.decode_gpu}
    ranks = {"prefill": 1, "decode": 1}
    router = f"http://127.0.0.1:{ports.router}"
    if args.cluster:
        argv, layout = cluster_layout(shlex.split(args.cluster), model_dir, server_args, ports,
                                      args.startup_timeout, log_dir / "pd-cluster")
        router = layout.router.url  # ARGS may name another --port
        metrics = {role: [p for w in workers for p in w.metrics_ports]
                   for role, workers in (("prefill", layout.prefill), ("decode", layout.decode))}
        placement = {"cluster_args": args.cluster, "placement": layout.placement()}
        ranks = {"prefill": len(layout.prefill[0].gpus), "decode": len(layout.decode[0].gpus)}  # one TP per role
        # launch.cluster hands each worker rank its own metrics port from this one on, as planned.
        running = launched_cluster(argv, layout, {**env, "KVTIER_METRICS_PORT": str(ports.prefill_metrics)},
                                   log_dir / "pd-cluster.log", args.startup_timeout)
    else:
        running = pd_cluster(model_dir, server_args, env, ports, args.prefill_gpu, args.decode_gpu, log_dir,
                             args.startup_timeout, args.prefill_cache)
    probe = PDProbe({role: [f"http://127.0.0.1:{p}/metrics" for p in pages] for role, pages in metrics.items()},
                    args.probe_len * shape["kv_bytes_per_token"], args.link_gb_s, args.metrics_settle_s, ranks)
    with running as startup:
        print(f"[pd] {placement}, router ready after {startup:.0f} s", flush=True)
        before = probe.snapshot()
        measured = measure("pd", f"{router}/generate", plan, probe)
        after = probe.snapshot()
    totals = {role: {k: v for k, v in counter_delta(before[role], after[role]).items() if k.startswith("kvtier_pd_")}
              for role in after}
    return {"startup_s": round(startup, 1), **placement, "metrics_ports": metrics,
            "prefill_cache": args.prefill_cache, "kvtier_env": env, **measured, "pd_metrics_delta": totals}


def summarize_report(report: dict, link_gb_s: float) -> None:
    """Equality, ratios and transfer GB/s from the configurations that ran."""
    ok = {name: r for name, r in report["configs"].items() if "error" not in r}
    if {"colocated", "pd"} <= set(ok):
        c, p = ok["colocated"], ok["pd"]
        rows = equality(c["equality_output_ids"], p["equality_output_ids"], report["workload"]["equality_lens"])
        report["greedy_equality"] = {"all_equal": all(r["equal"] for r in rows), "prompts": rows}
        report["ratios_colocated_over_pd"] = ratios(c["mixed"], p["mixed"])
        print(f"greedy equality: {[r['equal'] for r in rows]}", flush=True)
        print(f"colocated / PD (> 1: PD faster): {report['ratios_colocated_over_pd']}", flush=True)
    if "pd" in ok:
        prefill = [row["metrics"]["prefill"] for row in ok["pd"]["probe"]]
        gb = [m["gb_s"] for m in prefill]
        report["transfer"] = {"gb_s": gb, "best_gb_s": max(gb), "median_gb_s": float(np.median(gb)),
                              "link_gb_s": link_gb_s, "best_link_fraction": round(max(gb) / link_gb_s, 3),
                              "target_fraction": 0.8,
                              "busy_gb_s": [m["busy_gb_s"] for m in prefill],
                              # absent in runs from before the copy counter: None, not a division by zero
                              "copy_gb_s": [m.get("copy_gb_s") for m in prefill],
                              "not_copy_ms": [round(m["not_copy_s"] * 1e3, 3) if "not_copy_s" in m else None
                                              for m in prefill]}
        print(f"PD transfer: {report['transfer']}", flush=True)


def earlier_configs(out: Path, report: Mapping, running: Sequence[str]) -> dict:
    """The configurations of an earlier invocation in ``out`` that this one does not rerun, when it measured
    the same workload with the same server arguments and model: so the two configurations can run in two
    device calls and still be compared. Anything else in ``out`` is replaced."""
    if not out.exists():
        return {}
    try:
        earlier = json.loads(out.read_text())
    except ValueError:
        return {}
    if any(earlier.get(k) != report[k] for k in ("benchmark", "workload", "server_args", "model")):
        print(f"{out} holds another workload or server arguments: replacing it", flush=True)
        return {}
    kept = {name: r for name, r in earlier.get("configs", {}).items() if name not in running and "error" not in r}
    for name, r in kept.items():
        r.setdefault("measured", {k: earlier.get(k) for k in ("commit", "date", "command")})
    return kept


def write_report(out: Path, report: Mapping) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
