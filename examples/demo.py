"""kvtier in five minutes on one GPU: a small RAG workload on radix-only SGLang, then on SGLang with kvtier.

    pip install -e . && python examples/demo.py [--model-path /path/to/local/model]

Starts SGLang 0.5.17 twice on the same GPU (the dummy-weight Llama-3-8B shape unless
``--model-path``), each time with a GPU KV pool too small for the documents: 12 documents of 8,000
tokens, 4 users at a time, each request one document plus a short question and 100 decoded tokens,
a cold pass and then a warm pass over the same documents in another order. Radix-only must
recompute what it evicted; kvtier loads it back from its CPU tier. Prints progress, then TTFT and
latency per pass with kvtier's speed-up. The workload, client and server handling are
``benchmarks/long_doc.py``'s; every knob of it applies here.

``--pd`` also runs the workload through a PD cluster on two GPUs (``launch.prefill`` with kvtier's
CPU tier on the first, ``launch.decode`` on the second, kvtier's router in front; the cluster of
``benchmarks/pd_serving.py``) and prints its row against radix-only.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_common import BenchError, add_commit_option, merge_result, model_shape, run_facts  # noqa: E402
from long_doc import (  # noqa: E402
    add_arguments,
    build_passes,
    common_server_args,
    describe_workload,
    load_model,
    measure_config,
    measure_passes,
    options,
    setups_from,
)
from pd_serving import PDPorts, pd_cluster  # noqa: E402

CONFIGS = ("radix", "kvtier_cpu")


def table(results: dict[str, dict], other: str = "kvtier_cpu") -> str:
    """TTFT and latency means per pass, radix-only against ``other``, with ``other``'s speed-up."""
    radix, kv = results["radix"]["passes"], results[other]["passes"]
    rows = [f"radix-only against {other}:",
            "pass  | TTFT radix | TTFT kvtier | speed-up | latency radix | latency kvtier | speed-up | kvtier prompt tokens from GPU / CPU tier",
            "------|------------|-------------|----------|---------------|----------------|----------|------------------------------------------"]
    for name in radix:
        r, k = radix[name], kv[name]
        rt, kt = r["ttft"]["mean_s"], k["ttft"]["mean_s"]
        rl, kl = r["latency"]["mean_s"], k["latency"]["mean_s"]
        rows.append(f"{name:5} | {rt:8.3f} s | {kt:9.3f} s | {rt / kt:7.2f}x | {rl:11.2f} s | {kl:12.2f} s | "
                    f"{rl / kl:7.2f}x | {k['hit_rate']['gpu']:.0%} / {k['hit_rate']['host']:.0%}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.set_defaults(docs=12, doc_len=8000, pool_tokens=40_000, host_gb=16)
    ap.add_argument("--out", help="also merge both results into this JSON file (plot it with benchmarks/plot_results.py)")
    ap.add_argument("--pd", action="store_true", help="also run the workload through a PD cluster on two GPUs")
    ap.add_argument("--pd-gpus", default="0,1", help="--pd: the prefill's and the decode's GPU (default 0,1)")
    add_commit_option(ap)
    args = ap.parse_args()
    try:
        model_dir, config, load_args, source = load_model(args.model_path, args.model_dir)
        passes = build_passes("rag", args, config)
        print(f"demo: {args.docs} documents x {args.doc_len:,} tokens, {args.concurrency} users, {args.output_len} "
              f"output tokens, {args.pool_tokens:,}-token GPU pool, model {source}", flush=True)
        table_of = setups_from(args)
        workload = describe_workload("rag", args, source, passes)
        results = {}
        for name in [*CONFIGS, *(["kvtier_pd"] if args.pd else [])]:
            facts = run_facts(args.commit)
            if name == "kvtier_pd":
                results[name] = measure_pd(args, passes, model_dir, common_server_args(args, load_args))
            else:
                results[name] = measure_config(name, table_of[name], passes, options(args), model_dir,
                                               common_server_args(args, load_args))
            if args.out:
                merge_result(args.out, "long_doc", workload, name,
                             {**results[name], **facts, "model": model_shape(config, source)})
    except BenchError as exc:
        sys.exit(f"demo: {exc}")
    print()
    print(table(results))
    if args.pd:
        print()
        print(table(results, "kvtier_pd"))


def measure_pd(args: argparse.Namespace, passes, model_dir: str, common_args: list[str]) -> dict:
    """The workload through prefill (kvtier's CPU tier) + decode + router, on two GPUs; ``common_args``:
    ``long_doc.common_server_args``."""
    prefill_gpu, decode_gpu = (int(g) for g in args.pd_gpus.split(","))
    ports = PDPorts(prefill_metrics=args.metrics_port, decode_metrics=args.metrics_port + 1)
    server_args = [*common_args, "--max-total-tokens", str(args.pool_tokens)]
    env = {"KVTIER_CPU_SIZE_GB": str(args.host_gb)}
    opts = replace(options(args), metrics_port=ports.prefill_metrics)
    with pd_cluster(model_dir, server_args, env, ports, prefill_gpu, decode_gpu, Path(opts.log_dir),
                    timeout_s=900, cuda_graph_max_bs=opts.cuda_graph_max_bs,
                    attention_backend=opts.attention_backend) as startup:
        print(f"[kvtier_pd] cluster ready after {startup:.0f} s (prefill on GPU {prefill_gpu} with kvtier's "
              f"CPU tier, decode on GPU {decode_gpu}, router on port {ports.router})", flush=True)
        reports = measure_passes("kvtier_pd", f"http://127.0.0.1:{ports.router}/generate",
                                 f"http://127.0.0.1:{ports.prefill_metrics}/metrics", passes, opts)
    return {"description": "PD: launch.prefill (kvtier CPU tier) + launch.decode + launch.router",
            "pool_tokens": args.pool_tokens, "server_args": server_args, "cuda_graph_max_bs": opts.cuda_graph_max_bs,
            "env": env, "startup_s": round(startup, 1),
            "passes": reports}


if __name__ == "__main__":
    main()
