"""Greedy tokens and logprobs of prompts served from the kvtier CPU tier vs from a GPU radix hit.

Both servers run SGLang 0.5.17 with ``--enable-deterministic-inference`` (triton attention) on a
small Llama whose weights are random but not flat (transformers' default init, saved once). The
reference server has a pool large enough that the second pass is a GPU radix hit; the kvtier
server's pool is too small, so its second pass loads every prompt's prefix back from the CPU tier
(checked in its metrics); a third pass sends ``--batch`` prompts per request, so that one prefill
batch loads several together (checked in the server log); a fourth sends each prompt twice in one
request (one evicted prefix wanted twice in one batch); a fifth continues each prompt with 40 new
tokens (its tokens after the last whole chunk then come back as a tail: checked in the metrics for
the CPU variants). Passes when every token and every logprob is identical and SGLang's idle check found no
leaked KV rows. Variants:
``write_back`` and ``write_through`` (an 8 GB CPU tier) and ``disk``: a 0.1 GB CPU tier (one
prompt's KV) over a disk tier, with ``lower_tier_wait_s`` so the second pass waits for its chunks
to come back from disk instead of recomputing them (checked: disk hits > 0).

    python benchmarks/greedy_equality.py --out benchmarks/results/greedy_equality.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from pathlib import Path

from bench_common import add_commit_option, kvtier_summary, run_facts, scrape_metrics
from sglang_server import generate, prefill_batches, sglang_server

SMALL_LLAMA = dict(
    architectures=["LlamaForCausalLM"], hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=32768,
    torch_dtype="bfloat16",
)


def make_model(path: Path) -> None:
    if (path / "config.json").exists():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL_LLAMA)).to(torch.bfloat16)
    model.save_pretrained(path)


_METRICS = {"KVTIER_METRICS_PORT": "9400"}
VARIANTS = {
    "write_back": {"KVTIER_CPU_SIZE_GB": "8", "KVTIER_WRITE_POLICY": "write_back", **_METRICS},
    "write_through": {"KVTIER_CPU_SIZE_GB": "8", "KVTIER_WRITE_POLICY": "write_through", **_METRICS},
    "disk": {"KVTIER_CPU_SIZE_GB": "0.1", "KVTIER_DISK_SIZE_GB": "2", "KVTIER_WRITE_POLICY": "write_back",
             "KVTIER_LOWER_TIER_WAIT_S": "30", **_METRICS},
}


def _greedy_output(response: dict) -> dict:
    pairs = response["meta_info"]["output_token_logprobs"]
    return {"tokens": [p[1] for p in pairs], "logprobs": [p[0] for p in pairs]}


def greedy(port: int, ids: list[int], n: int) -> dict:
    return _greedy_output(generate(port, ids, n, return_logprob=True)[1])


def _batched(port: int, requests: list[list[list[int]]], n: int) -> list[dict]:
    return [_greedy_output(r) for prompts in requests for r in generate(port, prompts, n, return_logprob=True)[1]]


def passes(port: int, prompts: list[list[int]], n: int, batch: int, more: list[list[int]]) -> list[dict]:
    """A first pass that fills the cache; the outputs of a second pass one prompt at a time, of a
    third in batch requests of ``batch`` prompts (sent apart, concurrent requests reach the scheduler
    a little apart, and it prefills the first alone: one batch request lands in one prefill batch),
    of a fourth that sends each prompt twice in one request (two requests of one prefill batch
    hitting the same evicted prefix: the second must share the first's rows, not load them again),
    and of a fifth that continues each prompt with the tokens ``more`` (as a chat turn continues the
    last: the prompt's tokens after its last whole chunk come back as a tail)."""
    for p in prompts:
        greedy(port, p, n)
    second = [greedy(port, p, n) for p in prompts]
    third = _batched(port, [prompts[i : i + batch] for i in range(0, len(prompts), batch)], n)
    fourth = _batched(port, [[p, p] for p in prompts], n)
    fifth = [greedy(port, p + m, n) for p, m in zip(prompts, more)]
    return second + third + fourth + fifth


def serve(name: str, args, pool: int, extra: list[str], env: dict[str, str]):
    server_args = ["--enable-deterministic-inference", "--max-total-tokens", str(pool), *extra]
    return sglang_server(args.model_dir, args.port, server_args, env, Path(args.log_dir) / f"server-{name}.log")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=8016)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2, help="prompts per request in the third pass")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/small-llama-random"))
    ap.add_argument("--log-dir", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--out", default="benchmarks/results/greedy_equality.json")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"which kvtier servers, of {','.join(VARIANTS)}")
    ap.add_argument("--disk-root", type=Path, default=Path("/tmp/kvtier-greedy-disk"), help="disk variant's tier")
    add_commit_option(ap)
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if not variants or not set(variants) <= set(VARIANTS):
        ap.error(f"--variants takes some of {','.join(VARIANTS)}, got {args.variants!r}")
    make_model(args.model_dir)
    rnd = random.Random(1)
    prompts = [[rnd.randrange(100, 31000) for _ in range(args.prompt_len)] for _ in range(args.prompts)]
    more = [[rnd.randrange(100, 31000) for _ in range(40)] for _ in range(args.prompts)]
    small_pool = 2 * args.prompt_len + 2000  # holds two prompts: the second pass finds none on the GPU

    with serve("reference", args, 200_000, [], {}):
        expected = passes(args.port, prompts, args.new_tokens, args.batch, more)
    results = {}
    for variant in variants:
        env, tier = dict(VARIANTS[variant]), "disk" if variant == "disk" else "cpu"
        if variant == "disk":
            shutil.rmtree(args.disk_root, ignore_errors=True)
            env["KVTIER_DISK_PATH"] = str(args.disk_root)
        with serve(f"kvtier-{variant}", args, small_pool, ["--radix-cache-backend", "kvtier"], env):
            got = passes(args.port, prompts, args.new_tokens, args.batch, more)
            summary = kvtier_summary(scrape_metrics("http://127.0.0.1:9400/metrics"))
            hits = {t: summary["hits"].get(t, 0) for t in ("cpu", "disk")}
        log = (Path(args.log_dir) / f"server-kvtier-{variant}.log").read_text(errors="replace")
        same = [g == e for g, e in zip(got, expected)]
        results[variant] = {
            "identical_outputs": sum(same),
            "outputs": len(expected),  # each prompt once per compared pass
            "chunk_hits": hits,
            "checked_tier": tier,
            "tail_tokens": summary["tail_tokens"],
            "largest_prefill_batch_with_hits": max(map(int, prefill_batches(log, hits_only=True)), default=0),
            "memory_leak_reports": log.count("memory leak detected"),  # SGLang's idle check of the pools
            "kvtier_env": env,
            "first_difference": next(({"output": i, "expected": e, "got": g} for i, (g, e) in enumerate(zip(got, expected)) if g != e), None),
        }
        print(variant, json.dumps(results[variant])[:400], flush=True)
    report = {
        "benchmark": "greedy_equality",
        "model": SMALL_LLAMA,
        "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "passes": "fill, then one prompt per request, then --batch per request, then each prompt twice in one "
                  "request, then each continued by 40 new tokens; the last four compared",
        "batch": args.batch,
        "reference": "radix-only, 200,000-token pool (second pass = GPU hit)",
        "kvtier_pool_tokens": small_pool,
        "results": results,
        "passed": all(r["identical_outputs"] == r["outputs"] and r["chunk_hits"][r["checked_tier"]] > 0
                      and r["largest_prefill_batch_with_hits"] >= min(args.batch, args.prompts)
                      and r["memory_leak_reports"] == 0 and (r["checked_tier"] != "cpu" or r["tail_tokens"] > 0)
                      for r in results.values()),
        **run_facts(args.commit),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("passed" if report["passed"] else "FAILED", flush=True)


if __name__ == "__main__":
    main()
