"""Per-request TTFT of kvtier warm loads with the kvtier metric deltas of each request (GPU diagnostic).

Starts one SGLang server (Llama-3-8B shape, dummy weights, 40K-token pool, --radix-cache-backend
kvtier, 30 GB CPU tier), sends 8 x 10K-token prompts cold then warm, one at a time, and prints each
request's time with the change of every ``kvtier_op_seconds`` series over it (GPU load and spill
time, hook CPU time). Extra kvtier settings come from the environment (``KVTIER_*``).

    python benchmarks/warm_probe.py write_through
"""

from __future__ import annotations

import json
import random
import sys
import tempfile

from bench_common import KVTIER_ARGS, counter_delta, scrape_metrics, write_dummy_model
from sglang_server import generate, sglang_server

PORT, METRICS_PORT = 31000, 9400


def main() -> None:
    policy = sys.argv[1] if len(sys.argv) > 1 else "write_back"
    work = tempfile.mkdtemp(prefix="kvtier-probe-")
    model = write_dummy_model(f"{work}/model")
    env = {"KVTIER_CPU_SIZE_GB": "30", "KVTIER_METRICS_PORT": str(METRICS_PORT), "KVTIER_WRITE_POLICY": policy}
    args = ["--load-format", "dummy", "--max-total-tokens", "40000", *KVTIER_ARGS, *sys.argv[2:]]
    rng = random.Random(0)
    docs = [[rng.randrange(1000, 120_000) for _ in range(10_000)] for _ in range(8)]
    url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    with sglang_server(model, PORT, args, env, f"{work}/server.log", other_ports=(METRICS_PORT,)) as up:
        print(f"ready after {up:.0f} s", flush=True)
        for name in ("cold", "warm"):
            for i, doc in enumerate(docs):
                before = scrape_metrics(url)
                seconds, _ = generate(PORT, doc)
                delta = {k.removeprefix("kvtier_op_seconds_"): round(v * 1e3, 2) if "_sum" in k else v
                         for k, v in counter_delta(before, scrape_metrics(url)).items()
                         if k.startswith("kvtier_op_seconds_") and v}
                print(name, i, f"{seconds * 1e3:.1f} ms", json.dumps(delta), flush=True)


if __name__ == "__main__":
    main()
