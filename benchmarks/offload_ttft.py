"""Cold and warm TTFT of long prompts that no longer fit on the GPU: kvtier vs radix-only vs HiCache.

Each configuration starts its own SGLang 0.5.17 server on the same GPU (dummy-weight
Llama-3-8B shape, 128 KiB of KV per token), sends ``--docs`` prompts of ``--doc-len`` random token
ids one at a time (cold), then the same prompts again in the same order (warm), with
``max_new_tokens=1``: the time of the whole HTTP request is the TTFT. With 8 x 10,000 tokens through
a 40,000-token GPU pool the warm pass finds nothing on the GPU (LRU), so it measures the tier; so
does every further warm pass (``--warm-passes``).

    python benchmarks/offload_ttft.py --config radix_fit --config radix --config hicache \\
        --config kvtier_cpu --out benchmarks/results/offload_ttft.json

Configurations (all with ``--attention-backend triton --disable-cuda-graph``):
  radix_fit    radix cache only, 200,000-token pool: every warm prompt is a GPU hit
  radix_fit_90k  the same with a 90,000-token pool, the smallest that holds the 8 prompts (whether
               the pool's size moves a GPU hit's time)
  radix        radix cache only, 40,000-token pool
  hicache      SGLang HiCache, write_through, 30 GB host, 40,000-token pool
  kvtier_cpu   --radix-cache-backend kvtier, 30 GB CPU tier, 40,000-token pool (write_back)
  kvtier_cpu_wt  the same with write_policy write_through
  kvtier_disk  kvtier with a 2 GB CPU tier over a disk tier, 40,000-token pool
  --variant NAME:key=value,...  kvtier_cpu with kvtier settings changed (an A/B without code changes)
``--server-arg`` adds an SGLang argument to every configuration (e.g.
``--server-arg=--enable-request-time-stats-logging``: SGLang logs each request's queue and forward
time, which land per pass in the result as ``server_stages_ms``); ``--profile-warm I`` records
request I of the last warm pass with SGLang's torch profiler (traces in ``--profile-dir``), so the
passes before it are timed without the profiler; ``--per-request`` records kvtier's counters over
each request as well (``kvtier_per_request``: which request waited for which copy).
Results of several invocations merge into one JSON file (one key per configuration).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
from pathlib import Path

from bench_common import (KVTIER_ARGS, add_commit_option, counter_delta, kvtier_summary, parse_variant, run_facts,
                          scrape_metrics, setups, write_dummy_model)
from kvtier.sglang_ext.config import KVTierConfig
from sglang_server import generate, profiled, request_stages, sglang_server, warm_up_prefix_hits

# The shared table with this benchmark's sizes (its kvtier_disk tier lives in /tmp/kvtier_disk).
_SETUPS = setups(host_gb=30, disk_root="/tmp", cpu_disk_cpu_gb=30, cpu_disk_gb=24, disk_cpu_gb=2, disk_gb=24)

CONFIGS: dict[str, tuple[int, list[str], dict[str, str]]] = {
    "radix_fit": (200_000, [], {}),
    "radix_fit_90k": (90_000, [], {}),
    "radix": (40_000, [], {}),
    "hicache": (40_000, list(_SETUPS["hicache"].args), {}),
    "kvtier_cpu": (40_000, list(KVTIER_ARGS), dict(_SETUPS["kvtier_cpu"].env)),
    "kvtier_cpu_wt": (40_000, list(KVTIER_ARGS), dict(_SETUPS["kvtier_cpu_wt"].env)),
    "kvtier_disk": (40_000, list(KVTIER_ARGS), dict(_SETUPS["kvtier_disk"].env)),
}


def summary(ts: list[float], server_ts: list[float]) -> dict:
    """Client-side times of a pass, with SGLang's own ``e2e_latency`` of each request (from its
    tokenizer manager's receipt to the answer: without HTTP and JSON), which tells a slower server
    from a slower client."""
    return {"mean_s": round(statistics.mean(ts), 4), "p50_s": round(statistics.median(ts), 4), "all_s": [round(t, 4) for t in ts],
            "server_mean_s": round(statistics.mean(server_ts), 4), "server_all_s": [round(t, 4) for t in server_ts]}


def run_config(name: str, args: argparse.Namespace) -> dict:
    pool, extra, env = CONFIGS[name]
    extra = [*extra, *args.server_arg]
    write_dummy_model(args.model_dir)
    server_args = ["--load-format", "dummy", "--max-total-tokens", str(pool), *extra]
    log = Path(args.log_dir) / f"server-{name}.log"
    with sglang_server(args.model_dir, args.port, server_args, env, log) as startup:
        print(f"{name}: ready after {startup:.0f} s", flush=True)
        rnd = random.Random(0)
        prompts = [[rnd.randrange(1000, 120000) for _ in range(args.doc_len)] for _ in range(args.docs)]
        warm_up_prefix_hits(args.port, rnd, extend_tokens=args.doc_len % KVTierConfig.chunk_tokens)
        result = {"pool_tokens": pool, "server_args": extra, "env": env, "startup_s": round(startup, 1)}
        rids: dict[str, list[str]] = {}
        url = f"http://127.0.0.1:{env['KVTIER_METRICS_PORT']}/metrics" if "KVTIER_METRICS_PORT" in env else None
        before = scrape_metrics(url) if url else {}
        phases = ["cold", "warm"] + [f"warm{i}" for i in range(2, args.warm_passes + 1)]
        for phase in phases:
            answers, per_request = [], []
            for i, prompt in enumerate(prompts):
                mark = scrape_metrics(url) if url and args.per_request else None
                if phase == phases[-1] and i in args.profile_warm:
                    with profiled(args.port, args.profile_dir, f"{name}-{phase}-{i}") as answer:
                        answers.append(generate(args.port, prompt))
                    result.setdefault("profiled", []).append({"pass": phase, "request": i, "profiler": answer})
                else:
                    answers.append(generate(args.port, prompt))
                if mark is not None:
                    per_request.append(kvtier_summary(counter_delta(mark, scrape_metrics(url))))
            result[phase] = summary([t for t, _ in answers], [a["meta_info"]["e2e_latency"] for _, a in answers])
            rids[phase] = [a["meta_info"]["id"] for _, a in answers]
            print(f"{name} {phase}: mean {result[phase]['mean_s']:.3f} s (server {result[phase]['server_mean_s']:.3f} s)  "
                  f"{result[phase]['all_s']}", flush=True)
            if url:  # kvtier's counters over this pass alone
                after = scrape_metrics(url)
                result[phase]["kvtier"] = kvtier_summary(counter_delta(before, after))
                before = after
            if per_request:
                result[phase]["kvtier_per_request"] = per_request
    stages = request_stages(log.read_text(errors="replace"))  # the whole log, once the server has stopped
    for phase, ids in rids.items():
        if all(r in stages for r in ids):
            result[phase]["server_stages_ms"] = {k: [stages[r][k] for r in ids] for k in ("queue", "forward")}
            print(f"{name} {phase}: scheduler queue / forward, median ms: " + " / ".join(
                f"{statistics.median(result[phase]['server_stages_ms'][k]):.1f}" for k in ("queue", "forward")), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", choices=list(CONFIGS), default=[])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                    help="after the configs, kvtier_cpu with these kvtier settings changed, named NAME")
    add_commit_option(ap)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--doc-len", type=int, default=10_000)
    ap.add_argument("--warm-passes", type=int, default=1,
                    help="warm passes in the same order (each finds nothing on the GPU): more samples per server")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="an extra SGLang argument for every configuration (write --server-arg=--flag)")
    ap.add_argument("--per-request", action="store_true",
                    help="also kvtier's counters over each request (kvtier configurations): which one copied what")
    ap.add_argument("--profile-warm", type=int, action="append", default=[], metavar="I",
                    help="record request I of the last warm pass with SGLang's torch profiler; may repeat")
    ap.add_argument("--profile-dir", default=os.path.join(os.environ.get("OUT", "/tmp"), "traces"))
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--model-dir", default="/tmp/llama3-8b-dummy")
    ap.add_argument("--log-dir", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--out", default="benchmarks/results/offload_ttft.json")
    args = ap.parse_args()
    if not args.config and not args.variant:
        ap.error("give at least one --config or --variant")
    names = list(args.config)
    for spec in args.variant:
        name, env = parse_variant(spec)
        pool, extra, base_env = CONFIGS["kvtier_cpu"]
        CONFIGS[name] = (pool, extra, {**base_env, **env})
        names.append(name)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {"benchmark": "offload_ttft", "configs": {}}
    for name in names:
        report["configs"][name] = {**run_config(name, args), **run_facts(args.commit)}
        report["workload"] = {"docs": args.docs, "doc_len": args.doc_len, "max_new_tokens": 1, "model": "Llama-3-8B shape, dummy weights"}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
