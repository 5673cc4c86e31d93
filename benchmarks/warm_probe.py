"""Per-request TTFT of kvtier warm loads with the kvtier metric deltas of each request (GPU diagnostic).

Starts one SGLang server (Llama-3-8B shape, dummy weights, 40K-token pool, --radix-cache-backend kvtier,
30 GB CPU tier), sends 8 x 10K-token prompts cold then warm, one at a time, and prints each request's time
with the change of every kvtier_op_seconds series over it (GPU load/spill time, hook CPU time).
Extra kvtier settings come from the environment (KVTIER_*).

    python benchmarks/warm_probe.py write_through
"""
import json, os, random, re, signal, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "torch_dtype": "bfloat16", "tie_word_embeddings": False, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu",
}
policy = sys.argv[1]
d = Path(tempfile.mkdtemp()); (d / "config.json").write_text(json.dumps(LLAMA3_8B))
port = 31000
env = {**os.environ, "KVTIER_CPU_SIZE_GB": "30", "KVTIER_METRICS_PORT": "9400", "KVTIER_WRITE_POLICY": policy}
cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(d), "--load-format", "dummy", "--port", str(port),
       "--skip-tokenizer-init", "--attention-backend", "triton", "--sampling-backend", "pytorch", "--disable-cuda-graph",
       "--grammar-backend", "none", "--max-total-tokens", "40000", "--radix-cache-backend", "kvtier"] + sys.argv[2:]
log = open(f"/tmp/server_{policy}.log", "w")
p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
t0 = time.time()
while True:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2); break
    except OSError:
        if p.poll() is not None: print(open(log.name).read()[-3000:]); sys.exit(1)
        time.sleep(2)
print("ready", round(time.time() - t0, 1), flush=True)
def metrics():
    txt = urllib.request.urlopen("http://127.0.0.1:9400/metrics").read().decode()
    out = {}
    for line in txt.splitlines():
        if line.startswith("kvtier_op_seconds_sum") or line.startswith("kvtier_op_seconds_count"):
            k, v = line.rsplit(" ", 1); out[k] = float(v)
    return out
def gen(ids):
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    r = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    s = time.perf_counter(); urllib.request.urlopen(r, timeout=600).read(); return time.perf_counter() - s
rng = random.Random(0)
docs = [[rng.randrange(1000, 120000) for _ in range(10000)] for _ in range(8)]
for pas in ("cold", "warm"):
    for i, doc in enumerate(docs):
        m0 = metrics(); t = gen(doc); m1 = metrics()
        delta = {re.sub(r'kvtier_op_seconds_', '', k): round((m1[k] - m0.get(k, 0)) * (1e3 if "_sum" in k else 1), 2) for k in m1 if m1[k] != m0.get(k, 0)}
        print(pas, i, round(t * 1e3, 1), "ms", json.dumps(delta), flush=True)
os.killpg(p.pid, signal.SIGTERM); p.wait(60)
