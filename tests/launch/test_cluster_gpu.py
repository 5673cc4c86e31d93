"""GPU end to end: ``launch.cluster`` with real SGLang 0.5.17 workers and kvtier's PD backend.

A small dummy-weight Llama (SGLang's seeded dummy init, so every process has the same weights)
is served by the cluster (prefill, decode and router on GPU 0 and 1, or both on GPU 0); greedy
tokens of a few prompts through the router must equal those of one plain SGLang server, the
bootstrap fields must have paired the two workers, and SIGINT must leave no process behind.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with SGLang's GPU stack")

SMALL_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024,
    "intermediate_size": 2816, "num_hidden_layers": 4, "num_attention_heads": 8,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32000,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "torch_dtype": "bfloat16", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu",
}
# As the GPU benchmarks run SGLang on these machines (benchmarks/sglang_server.py).
SGLANG_ARGS = ["--load-format", "dummy", "--skip-tokenizer-init", "--attention-backend", "triton",
               "--sampling-backend", "pytorch", "--disable-cuda-graph", "--grammar-backend", "none",
               "--max-total-tokens", "16384"]
PROMPTS = [[(7 * i + 13 * k) % 31000 + 100 for k in range(n)] for i, n in enumerate((40, 700, 1500))]
NEW_TOKENS = 8


def generate(url: str, ids: list[int]) -> list[int]:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0,
                                                   "ignore_eos": True}}
    req = urllib.request.Request(f"{url}/generate", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())["output_ids"]


def reference_tokens(model: str, port: int, log) -> list[list[int]]:
    """Greedy tokens of one plain SGLang server (no PD, no kvtier)."""
    proc = subprocess.Popen([sys.executable, "-m", "sglang.launch_server", "--model-path", model,
                             "--port", str(port), "--mem-fraction-static", "0.35", *SGLANG_ARGS],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, f"reference server failed; see {log.name}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                time.sleep(1)
        return [generate(f"http://127.0.0.1:{port}", p) for p in PROMPTS]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            psutil.Process(proc.pid).kill()


def test_cluster_on_gpu_matches_a_single_server(spawn, free_ports, tmp_path, client):
    model = tmp_path / "small-llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(SMALL_LLAMA))
    router_port, prefill_port, decode_port, bootstrap_port, ref_port = free_ports(5)
    with open(tmp_path / "reference.log", "w") as log:
        expected = reference_tokens(str(model), ref_port, log)

    cluster = spawn.proc([sys.executable, "-m", "kvtier.launch.cluster", "--model-path", str(model),
                          "--port", str(router_port), "--prefill-port", str(prefill_port),
                          "--decode-port", str(decode_port), "--bootstrap-port", str(bootstrap_port),
                          "--run-dir", str(tmp_path / "run"), "--startup-timeout", "400", "--", *SGLANG_ARGS],
                         r"ready. Send requests to (http://\S+)", timeout=480)
    url = cluster.match.group(1)
    got = [generate(url, p) for p in PROMPTS]
    assert got == expected, f"PD through the router {got} != single server {expected}"
    workers = client("GET", f"{url}/workers")[1]
    assert [w["requests"] for w in workers["prefill"] + workers["decode"]] == [len(PROMPTS)] * 2
    assert all(w["failures"] == 0 for w in workers["prefill"] + workers["decode"])

    pids = [cluster.proc.pid] + [c.pid for c in psutil.Process(cluster.proc.pid).children(recursive=True)]
    cluster.proc.send_signal(signal.SIGINT)
    assert cluster.proc.wait(120) == 0
    assert "kvtier cluster: stopped" in cluster.output()
    left = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left after SIGINT: {left}"
