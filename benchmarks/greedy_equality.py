"""Greedy tokens and logprobs of prompts served from the kvtier CPU tier vs from a GPU radix hit.

Both servers run SGLang 0.5.17 with ``--enable-deterministic-inference`` (triton attention) on a
small Llama whose weights are random but not flat (transformers' default init, saved once). The
reference server has a pool large enough that the second pass is a GPU radix hit; the kvtier
server's pool is too small, so its second pass loads every prompt's prefix back from the CPU tier
(checked in its metrics). Passes when every token and every logprob is identical.

    python benchmarks/greedy_equality.py --out benchmarks/results/greedy_equality.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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


def generate(port: int, ids: list[int], n: int) -> dict:
    body = json.dumps({
        "input_ids": ids, "return_logprob": True,
        "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True},
    }).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    pairs = out["meta_info"]["output_token_logprobs"]
    return {"tokens": [p[1] for p in pairs], "logprobs": [p[0] for p in pairs]}


def serve(name: str, args, pool: int, extra: list[str], env: dict[str, str]):
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(args.model_dir), "--skip-tokenizer-init",
           "--port", str(args.port), "--attention-backend", "triton", "--sampling-backend", "pytorch",
           "--disable-cuda-graph", "--grammar-backend", "none", "--enable-deterministic-inference",
           "--max-total-tokens", str(pool), *extra]
    log = open(Path(args.log_dir) / f"server-{name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **env})
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            sys.exit(f"{name}: server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{args.port}/health", timeout=2)
            return proc
        except OSError:
            if time.time() - t0 > 400:
                sys.exit(f"{name}: not ready after 400 s")
            time.sleep(2)


def two_passes(port: int, prompts: list[list[int]], n: int) -> list[dict]:
    for p in prompts:
        generate(port, p, n)
    return [generate(port, p, n) for p in prompts]


def stop(proc) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=8016)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/small-llama-random"))
    ap.add_argument("--log-dir", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--out", default="benchmarks/results/greedy_equality.json")
    args = ap.parse_args()
    make_model(args.model_dir)
    rnd = random.Random(1)
    prompts = [[rnd.randrange(100, 31000) for _ in range(args.prompt_len)] for _ in range(args.prompts)]
    small_pool = 2 * args.prompt_len + 2000  # holds two prompts: the second pass finds none on the GPU

    ref = serve("reference", args, 200_000, [], {})
    try:
        expected = two_passes(args.port, prompts, args.new_tokens)
    finally:
        stop(ref)
    results = {}
    for policy in ("write_back", "write_through"):
        env = {"KVTIER_CPU_SIZE_GB": "8", "KVTIER_WRITE_POLICY": policy, "KVTIER_METRICS_PORT": "9400"}
        proc = serve(f"kvtier-{policy}", args, small_pool, ["--radix-cache-backend", "kvtier"], env)
        try:
            got = two_passes(args.port, prompts, args.new_tokens)
            metrics = urllib.request.urlopen("http://127.0.0.1:9400/metrics", timeout=5).read().decode()
            cpu_hits = next(float(l.split()[1]) for l in metrics.splitlines() if l.startswith('kvtier_hits_total{tier="cpu"}'))
        finally:
            stop(proc)
        same = [g == e for g, e in zip(got, expected)]
        results[policy] = {
            "identical_prompts": sum(same),
            "prompts": len(prompts),
            "cpu_tier_chunk_hits": cpu_hits,
            "first_difference": next(({"prompt": i, "expected": e, "got": g} for i, (g, e) in enumerate(zip(got, expected)) if g != e), None),
        }
        print(policy, json.dumps(results[policy])[:400], flush=True)
    report = {
        "benchmark": "greedy_equality",
        "model": SMALL_LLAMA,
        "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "reference": "radix-only, 200,000-token pool (second pass = GPU hit)",
        "kvtier_pool_tokens": small_pool,
        "results": results,
        "passed": all(r["identical_prompts"] == r["prompts"] and r["cpu_tier_chunk_hits"] > 0 for r in results.values()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f"python benchmarks/greedy_equality.py --prompts {args.prompts} --prompt-len {args.prompt_len} --new-tokens {args.new_tokens}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("passed" if report["passed"] else "FAILED", flush=True)


if __name__ == "__main__":
    main()
