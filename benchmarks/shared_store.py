"""Two SGLang servers sharing KV through one ``launch.store``: server 1's prefills are server 2's hits (GPU).

Starts ``python -m kvtier.launch.store`` and two SGLang servers on the same GPU (dummy-weight
Llama-3-8B shape, 40,000-token pools), both with ``--radix-cache-backend kvtier`` and
``remote_url: kvtier://...``. Server 1 writes through (every whole chunk it computes goes to its CPU
tier and on to the store); server 2 waits up to ``lower_tier_wait_s`` for chunks the store has.

1. ``--docs`` documents of ``--doc-len`` random tokens go to server 1 (computed there, pushed).
2. The same documents go to server 2: each is a miss on its GPU and CPU tier and a hit in the store.
3. As many new documents go to server 2: misses everywhere, recomputed (the baseline).

TTFT is the whole ``/generate`` time with ``max_new_tokens=1``; one request at a time.

    python benchmarks/shared_store.py --out benchmarks/results/shared_store.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from bench_common import (
    KVTIER_ARGS,
    LLAMA3_8B,
    counter_delta,
    kvtier_summary,
    model_shape,
    run_facts,
    scrape_metrics,
    summarize,
    write_dummy_model,
)
from sglang_server import generate, session_process, sglang_server

CHUNK_BYTES = 256 * model_shape(LLAMA3_8B, "")["kv_bytes_per_token"]  # 256-token chunks of the model served
STORE_PORT, TOKEN = 9600, "shared-store-bench"
SERVERS = ((31001, 9401), (31002, 9402))


def wait_for(predicate, timeout_s: float, what: str, state) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        if time.time() > deadline:
            sys.exit(f"timed out after {timeout_s:.0f} s waiting for {what}; state: {json.dumps(state())}")
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--doc-len", type=int, default=10_000)
    ap.add_argument("--store-gb", type=float, default=24)
    ap.add_argument("--out", default="benchmarks/results/shared_store.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kvtier-shared-"))
    model = write_dummy_model(work / "model")
    remote = f"kvtier://127.0.0.1:{STORE_PORT}?token={TOKEN}"
    store_argv = [sys.executable, "-m", "kvtier.launch.store", "--port", str(STORE_PORT), "--token", TOKEN,
                  "--chunk-bytes", str(CHUNK_BYTES), "--cpu-size-gb", str(args.store_gb)]
    rng = random.Random(0)
    shared = [[rng.randrange(1000, 120_000) for _ in range(args.doc_len)] for _ in range(args.docs)]
    fresh = [[rng.randrange(1000, 120_000) for _ in range(args.doc_len)] for _ in range(args.docs)]
    server_args = ["--load-format", "dummy", "--max-total-tokens", "40000", *KVTIER_ARGS]
    # SGLang keeps (1 - fraction) of the whole GPU free for others, measured after the servers
    # before it took theirs: the first server takes a small fraction, the second a large one.
    args1, args2 = [*server_args, "--mem-fraction-static", "0.35"], [*server_args, "--mem-fraction-static", "0.75"]
    common = {"KVTIER_CPU_SIZE_GB": "16", "KVTIER_REMOTE_URL": remote, "KVTIER_REMOTE_TIMEOUT_S": "10"}
    (p1, m1), (p2, m2) = SERVERS
    env1 = {**common, "KVTIER_WRITE_POLICY": "write_through", "KVTIER_REMOTE_WRITE_QUEUE": "512",
            "KVTIER_METRICS_PORT": str(m1)}
    env2 = {**common, "KVTIER_LOWER_TIER_WAIT_S": "10", "KVTIER_METRICS_PORT": str(m2)}
    chunks_per_doc = args.doc_len // 256
    with session_process(store_argv, work / "store.log"):
        with sglang_server(model, p1, args1, env1, work / "server1.log", other_ports=(m1,)) as up1, \
                sglang_server(model, p2, args2, env2, work / "server2.log", other_ports=(m2,)) as up2:
            print(f"servers up in {up1:.0f} s and {up2:.0f} s", flush=True)
            url1, url2 = f"http://127.0.0.1:{m1}/metrics", f"http://127.0.0.1:{m2}/metrics"
            server1 = [generate(p1, doc)[0] for doc in shared]
            def pushes_ended() -> bool:
                m = scrape_metrics(url1)
                stored = m.get("kvtier_bytes_total{direction=in,tier=remote}", 0) // CHUNK_BYTES
                dropped = m.get("kvtier_dropped_puts_total{reason=remote_busy}", 0)
                return stored + dropped >= args.docs * chunks_per_doc

            wait_for(pushes_ended, 300, "server 1's chunks to reach the store",
                     lambda: {k: v for k, v in scrape_metrics(url1).items() if k.startswith("kvtier") and v})
            server1_metrics = kvtier_summary(counter_delta({}, scrape_metrics(url1)))
            before = scrape_metrics(url2)
            hits = []
            for doc in shared:
                hits.append(generate(p2, doc)[0])
                print(f"server 2, shared document: {hits[-1]:.3f} s", flush=True)
            mid = scrape_metrics(url2)
            misses = [generate(p2, doc)[0] for doc in fresh]
            after = scrape_metrics(url2)

    hit_delta = counter_delta(before, mid)
    fetch = hit_delta.get("kvtier_op_seconds_sum{op=read,tier=remote}", 0.0)
    fetched = hit_delta.get("kvtier_bytes_total{direction=out,tier=remote}", 0.0)
    report = {
        "benchmark": "shared_store",
        **run_facts(),
        "workload": {"docs": args.docs, "doc_len": args.doc_len, "model": "Llama-3-8B shape, dummy weights",
                     "servers": "two on one GPU, 40,000-token pools (--mem-fraction-static 0.35 and 0.75)"},
        "server_env": {"server1": env1, "server2": env2},
        "server1_compute_ttft": summarize(server1),
        "server2_store_hit_ttft": summarize(hits),
        "server2_recompute_ttft": summarize(misses),
        "hit_vs_recompute": round(summarize(hits)["mean_s"] / summarize(misses)["mean_s"], 3),
        "server1_writes": server1_metrics,
        "server2_on_shared_docs": kvtier_summary(hit_delta),
        "server2_on_fresh_docs": kvtier_summary(counter_delta(mid, after)),
        "store_fetch_GBps": round(fetched / fetch / 1e9, 2) if fetch else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
