"""Per-request TTFT of kvtier warm loads with the kvtier metric deltas of each request (GPU diagnostic).

Starts one SGLang server (Llama-3-8B shape, dummy weights, 40K-token pool, --radix-cache-backend
kvtier, 30 GB CPU tier), sends 8 x 10K-token prompts cold then warm, one at a time (offload_ttft's
workload and warm-up), and prints each request's time with kvtier's counters over it
(``kvtier_summary``: chunks copied out by what started the copy, GPU copy times, hook CPU time);
with ``--out`` the same as JSON. Extra kvtier settings come from the environment (``KVTIER_*``), extra SGLang
arguments after ``--``. ``--profile-warm I`` wraps warm request I in SGLang's ``/start_profile``
and ``/stop_profile`` (torch profiler, CPU and GPU activity), whose trace shows every stream's
kernels and copies: where a warm request waits.

    python benchmarks/warm_probe.py --policy write_through --out /tmp/probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path

from bench_common import KVTIER_ARGS, counter_delta, kvtier_summary, run_facts, scrape_metrics, write_dummy_model
from kvtier.sglang_ext.config import KVTierConfig
from sglang_server import generate, profiled, sglang_server, warm_up_prefix_hits

DOC_TOKENS = 10_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", choices=["write_back", "write_through"], default="write_back")
    ap.add_argument("--out", help="JSON file for the per-request records")
    ap.add_argument("--commit", help="git commit to record where the checkout has no .git")
    ap.add_argument("--port", type=int, default=31000)
    ap.add_argument("--metrics-port", type=int, default=9400, help="kvtier's Prometheus port")
    ap.add_argument("--profile-warm", type=int, action="append", default=[], metavar="I",
                    help="record warm request I with SGLang's torch profiler (CPU and GPU activity; "
                         "traces go to --profile-dir); may repeat. Writing the trace holds up the next "
                         "request: take timings from a run without it")
    ap.add_argument("--profile-dir", default="/tmp/kvtier-probe-traces")
    ap.add_argument("sglang_args", nargs="*", help="extra SGLang arguments (after --)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="kvtier-probe-")
    model = write_dummy_model(f"{work}/model")
    # KVTIER_* settings of the caller's environment reach the server anyway; named here, the JSON records them.
    env = {**{k: v for k, v in os.environ.items() if k.startswith("KVTIER_")},
           "KVTIER_CPU_SIZE_GB": "30", "KVTIER_METRICS_PORT": str(args.metrics_port), "KVTIER_WRITE_POLICY": args.policy}
    server_args = ["--load-format", "dummy", "--max-total-tokens", "40000", *KVTIER_ARGS, *args.sglang_args]
    rng = random.Random(0)
    docs = [[rng.randrange(1000, 120_000) for _ in range(DOC_TOKENS)] for _ in range(8)]
    url = f"http://127.0.0.1:{args.metrics_port}/metrics"
    records = []
    with sglang_server(model, args.port, server_args, env, f"{work}/server.log", other_ports=(args.metrics_port,)) as up:
        print(f"ready after {up:.0f} s", flush=True)
        warm_up_prefix_hits(args.port, rng, extend_tokens=DOC_TOKENS % KVTierConfig.chunk_tokens)
        for phase in ("cold", "warm"):
            for i, doc in enumerate(docs):
                before = scrape_metrics(url)
                profile: list[str] = []  # the profiler's answers, when this request is recorded
                if phase == "warm" and i in args.profile_warm:
                    with profiled(args.port, args.profile_dir, f"warm{i}") as profile:
                        seconds, _ = generate(args.port, doc)
                else:
                    seconds, _ = generate(args.port, doc)
                kvtier = kvtier_summary(counter_delta(before, scrape_metrics(url)))
                records.append({"phase": phase, "request": i, "ms": round(seconds * 1e3, 1), "kvtier": kvtier,
                                "profile": profile})
                print(phase, i, f"{seconds * 1e3:.1f} ms", json.dumps({k: kvtier[k] for k in (
                    "spilled_chunks", "gpu_copies", "hook_seconds")}), flush=True)
    if args.out:
        report = {"benchmark": "warm_probe", "policy": args.policy, "env": env, "server_args": server_args,
                  "requests": records, **run_facts(args.commit)}
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
