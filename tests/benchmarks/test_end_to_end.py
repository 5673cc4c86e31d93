"""``long_doc.py`` and ``examples/demo.py`` run whole, with the stand-in server launched in SGLang's place.

``tests/benchmarks/shim`` first on ``PYTHONPATH`` makes ``python -m sglang.launch_server`` start the
stand-in (which serves kvtier's real metrics registry for kvtier configurations): the scripts'
server start-up, warm-up, passes, metric scrapes, disk folder handling and JSON merge all run as
they do on a GPU host.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from bench_common import BENCHMARKS_DIR, REPO, BenchError, parse_variant

SHIM = Path(__file__).with_name("shim")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(script: Path, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SHIM), os.environ.get("PYTHONPATH", "")])}
    sizes = ["--docs", "5", "--doc-len", "700", "--output-len", "4", "--concurrency", "2", "--port", str(free_port()),
             "--metrics-port", str(free_port()), "--log-dir", str(tmp_path), "--model-dir", str(tmp_path / "model")]
    return subprocess.run([sys.executable, str(script), *sizes, *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=env)


def test_long_doc_runs_configs_in_turn_and_merges(tmp_path):
    out = tmp_path / "r.json"
    disk_root = tmp_path / "disks"
    first = run(BENCHMARKS_DIR / "long_doc.py", "--config", "kvtier_disk", "--out", str(out),
                "--disk-root", str(disk_root), "--disk-gb", "1", "--disk-cpu-gb", "1", tmp_path=tmp_path)
    assert first.returncode == 0, first.stderr + first.stdout
    second = run(BENCHMARKS_DIR / "long_doc.py", "--config", "radix", "--out", str(out), tmp_path=tmp_path)
    assert second.returncode == 0, second.stderr + second.stdout
    assert "[radix] warm: 5/5 requests" in second.stdout and "[radix] server ready" in second.stdout

    report = json.loads(out.read_text())
    assert report["workload"]["passes"] == {"cold": 5, "warm": 5}
    assert set(report["configs"]) == {"kvtier_disk", "radix"}
    kv, radix = report["configs"]["kvtier_disk"], report["configs"]["radix"]
    assert "--config kvtier_disk" in kv["command"] and kv["model"]["kv_bytes_per_token"] == 131072
    assert kv["env"]["KVTIER_DISK_PATH"] == str(disk_root / "kvtier_disk") and not (disk_root / "kvtier_disk").exists()
    assert kv["server_args"][-2:] == ["--radix-cache-backend", "kvtier"]
    # Decode CUDA graphs are on by default, for every configuration alike.
    assert report["workload"]["cuda_graph_max_bs"] == 8 and kv["cuda_graph_max_bs"] == 8
    launched = (tmp_path / "server-radix.log").read_text().splitlines()[0]
    assert "--cuda-graph-max-bs 8" in launched and "--disable-cuda-graph" not in launched
    assert radix["passes"]["warm"]["kvtier"] == "n/a"
    cold, warm = kv["passes"]["cold"], kv["passes"]["warm"]
    assert cold["requests"] == warm["requests"] == 5 and warm["output_tokens"] == 20
    # The stand-in serves every warm document from its cache: two whole chunks of 256 per 700-token document.
    assert warm["hit_rate"]["gpu"] > 0.9 and cold["hit_rate"]["gpu"] < 0.01
    assert warm["kvtier"]["hits"] == {"cpu": 10} and warm["kvtier"]["misses"] == 0
    assert cold["kvtier"]["hits"].get("cpu", 0) == 0 and cold["kvtier"]["misses"] == 10
    # SGLang's prefill batches of each pass, from the server's log: the stand-in runs one request per batch.
    assert cold["prefill_batches"] == warm["prefill_batches"] == {"1": 5}
    assert "prefill batches by size 1x5" in first.stdout
    assert set(kv["vs_radix"]) == {"cold", "warm"}


def test_another_attention_backend_reaches_the_server_and_never_merges_into_a_triton_file(tmp_path):
    out = tmp_path / "r.json"
    first = run(BENCHMARKS_DIR / "long_doc.py", "--config", "radix", "--attention-backend", "flashinfer", "--out",
                str(out), tmp_path=tmp_path)
    assert first.returncode == 0, first.stderr + first.stdout
    launched = (tmp_path / "server-radix.log").read_text().splitlines()[0]
    assert "--attention-backend flashinfer" in launched and "triton" not in launched
    assert json.loads(out.read_text())["workload"]["attention_backend"] == "flashinfer"
    second = run(BENCHMARKS_DIR / "long_doc.py", "--config", "radix", "--out", str(out), tmp_path=tmp_path)
    assert second.returncode != 0 and "holds results of another workload" in second.stderr


def test_kv_splits_server_args_request_times_and_gc_pauses_reach_the_report(tmp_path, monkeypatch):
    """Triton's 32 KV splits and every --server-arg go to the server and into the workload (a file of
    other settings is refused); the stand-in logs SGLang's per-request time line under the request id
    long_doc sent, which lands per request in server_stages; --gc-log lists the pass's collections."""
    monkeypatch.setenv("GC_PAUSE_MIN_MS", "0")  # every collection, so the stand-in's show up
    out, gc_dir = tmp_path / "r.json", tmp_path / "gc"
    r = run(BENCHMARKS_DIR / "long_doc.py", "--config", "radix", "--server-arg=--enable-request-time-stats-logging",
            "--gc-log", str(gc_dir), "--out", str(out), tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    launched = (tmp_path / "server-radix.log").read_text().splitlines()[0]
    assert "--triton-attention-num-kv-splits 32" in launched and "--enable-request-time-stats-logging" in launched
    report = json.loads(out.read_text())
    assert report["workload"]["triton_kv_splits"] == 32
    assert report["workload"]["server_args"] == ["--enable-request-time-stats-logging"]

    warm = report["configs"]["radix"]["passes"]["warm"]
    stages = warm["server_stages"]
    assert stages["queue_ms"] == [0.5] * 5 and stages["attempts"] == [1] * 5
    # Each request entered the (stand-in's) queue after it was sent and before its first token,
    # to the stand-in's millisecond and the two clocks' read-out.
    for queued, sent, ttft in zip(stages["queued_at_s"], warm["sent_all_s"], warm["ttft_all_s"]):
        assert sent - 0.005 <= queued <= sent + ttft + 0.005
    assert "scheduler queue wait mean 0.5 ms" in r.stdout
    assert list((gc_dir / "radix").glob("gc-*.jsonl"))  # the stand-in process logged its collections
    assert all(-0.1 <= p["at_s"] <= warm["wall_s"] + 0.1 for p in warm["gc_pauses"])

    again = run(BENCHMARKS_DIR / "long_doc.py", "--config", "radix", "--triton-kv-splits", "0",
                "--server-arg=--enable-request-time-stats-logging", "--out", str(out), tmp_path=tmp_path)
    assert again.returncode != 0 and "holds results of another workload" in again.stderr


def test_long_doc_refuses_a_disk_tier_larger_than_the_disk(tmp_path):
    r = run(BENCHMARKS_DIR / "long_doc.py", "--config", "kvtier_disk", "--out", str(tmp_path / "r.json"),
            "--disk-root", str(tmp_path), "--disk-gb", "1e9", tmp_path=tmp_path)
    assert r.returncode != 0 and "lower --disk-gb" in r.stderr


def test_demo_prints_the_speedup_table(tmp_path):
    r = run(REPO / "examples" / "demo.py", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    lines = r.stdout.splitlines()
    assert any(line.startswith("[radix] server ready") for line in lines)
    assert any(line.startswith("[kvtier_cpu] warm: 5/5 requests") for line in lines)
    rows = [line for line in lines if line.startswith(("cold ", "warm "))]
    assert len(rows) == 2 and all(line.count("x |") == 2 for line in rows)
    for name in ("radix", "kvtier_cpu"):  # long_doc's server arguments, Triton's KV splits among them
        assert "--triton-attention-num-kv-splits 32" in (tmp_path / f"server-{name}.log").read_text().splitlines()[0]


def test_demo_with_pd_runs_the_workload_through_prefill_decode_and_the_router(tmp_path):
    """``--pd``: launch.prefill / launch.decode (stand-ins in SGLang's place) behind kvtier's real router."""
    r = run(REPO / "examples" / "demo.py", "--pd", "--out", str(tmp_path / "demo.json"), tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    lines = r.stdout.splitlines()
    assert any(line.startswith("[kvtier_pd] cluster ready") for line in lines)
    assert any(line.startswith("[kvtier_pd] warm: 5/5 requests") for line in lines)
    assert "radix-only against kvtier_pd:" in lines
    rows = [line for line in lines if line.startswith(("cold ", "warm "))]
    assert len(rows) == 4 and all(line.count("x |") == 2 for line in rows)
    report = json.loads((tmp_path / "demo.json").read_text())
    assert set(report["configs"]) == {"radix", "kvtier_cpu", "kvtier_pd"}
    assert report["configs"]["kvtier_pd"]["passes"]["warm"]["requests"] == 5
    assert report["workload"]["triton_kv_splits"] == 32
    assert all("--triton-attention-num-kv-splits" in report["configs"][name]["server_args"] for name in report["configs"])
    assert (tmp_path / "pd-router.log").exists()


def test_a_variant_is_kvtier_cpu_with_settings_changed(tmp_path):
    out = tmp_path / "r.json"
    r = run(BENCHMARKS_DIR / "long_doc.py", "--variant", "lg2:load_layer_groups=2,spill_max_programs=16",
            "--out", str(out), tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    cfg = json.loads(out.read_text())["configs"]["lg2"]
    assert cfg["env"]["KVTIER_LOAD_LAYER_GROUPS"] == "2" and cfg["env"]["KVTIER_SPILL_MAX_PROGRAMS"] == "16"
    assert cfg["env"]["KVTIER_CPU_SIZE_GB"] and cfg["server_args"][-2:] == ["--radix-cache-backend", "kvtier"]
    assert cfg["passes"]["warm"]["requests"] == 5

    bad = run(BENCHMARKS_DIR / "long_doc.py", "--variant", "x:load_layer_group=2", "--out", str(out), tmp_path=tmp_path)
    assert bad.returncode != 0 and "load_layer_group" in bad.stderr and "load_layer_groups" in bad.stderr


def test_parse_variant_maps_settings_to_kvtier_env_and_refuses_what_kvtier_would():
    assert parse_variant("lg4: load_layer_groups = 4 ,load_max_programs=32") == (
        "lg4", {"KVTIER_LOAD_LAYER_GROUPS": "4", "KVTIER_LOAD_MAX_PROGRAMS": "32"})
    for spec, why in (("lg4", "expected NAME:key=value"), (":load_layer_groups=4", "expected NAME:key=value"),
                      ("lg4:", "expected NAME:key=value"), ("lg4:load_layer_groups", "is not key=value"),
                      ("lg4:=4", "is not key=value"), ("lgneg:load_layer_groups=-1", "load_layer_groups"),
                      ("lgx:load_layer_groups=four", "load_layer_groups")):
        with pytest.raises(BenchError, match=why):
            parse_variant(spec)


def test_offload_ttft_runs_a_config_and_a_variant_into_one_file(tmp_path):
    out = tmp_path / "offload.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SHIM), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(BENCHMARKS_DIR / "offload_ttft.py"), "--config", "radix_fit",
                        "--variant", "wt:write_policy=write_through", "--docs", "3", "--doc-len", "600", "--warm-passes", "2",
                        "--server-arg=--enable-request-time-stats-logging", "--profile-warm", "1", "--per-request",
                        "--profile-dir", str(tmp_path / "traces"),
                        "--port", str(free_port()), "--model-dir", str(tmp_path / "model"), "--log-dir", str(tmp_path),
                        "--out", str(out), "--commit", "abc"],
                       capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    report = json.loads(out.read_text())
    fit, wt = report["configs"]["radix_fit"], report["configs"]["wt"]
    assert fit["pool_tokens"] == 200_000 and fit["commit"] == "abc"
    assert fit["server_args"] == ["--enable-request-time-stats-logging"]
    assert wt["env"]["KVTIER_WRITE_POLICY"] == "write_through"
    assert wt["server_args"] == ["--radix-cache-backend", "kvtier", "--enable-request-time-stats-logging"]
    # Request 1 of the last warm pass alone is profiled: the 12th request (4 warm-up, 3 cold, 3 warm, warm2 #0).
    for cfg, name in ((fit, "radix_fit"), (wt, "wt")):
        assert cfg["profiled"] == [{"pass": "warm2", "request": 1, "profiler": [
            f"/start_profile after 11 requests, prefix {name}-warm2-1, stack True",
            "/stop_profile after 12 requests, prefix None"]}]
    for cfg in (fit, wt):
        for p in ("cold", "warm", "warm2"):
            client, server = cfg[p]["all_s"], cfg[p]["server_all_s"]
            assert len(client) == len(server) == 3
            # The server's own time of a request lies within the client's, which adds HTTP and JSON.
            assert all(0 < s <= c for s, c in zip(server, client))
    # The stand-in serves kvtier's metrics registry and counts a prompt's cached whole chunks as
    # CPU-tier hits: the cold pass (3 new prompts) has none, the warm pass finds each prompt's two
    # whole 256-token chunks; radix_fit has no kvtier counters.
    assert [wt[p]["kvtier"]["hits"].get("cpu", 0) for p in ("cold", "warm", "warm2")] == [0, 6, 6]
    # --per-request: the same counters over each request, which add up to the pass's.
    assert [[x["hits"].get("cpu", 0) for x in wt[p]["kvtier_per_request"]] for p in ("cold", "warm", "warm2")] == [
        [0] * 3, [2] * 3, [2] * 3]
    # The scheduler's per-request times from the server log (the stand-in logs SGLang's line: forward = its TTFT).
    for cfg in (fit, wt):
        for p in ("cold", "warm", "warm2"):
            assert cfg[p]["server_stages_ms"] == {"queue": [0.5] * 3, "forward": [20.0] * 3}
    assert not any(k in fit[p] for p in ("cold", "warm", "warm2") for k in ("kvtier", "kvtier_per_request"))


def test_long_doc_profiles_extra_requests_after_the_measured_passes(tmp_path):
    """--profile-requests N: the measured passes run without the profiler, then the warm pass's first
    N prompts go again between /start_profile and /stop_profile and are reported apart."""
    out = tmp_path / "r.json"
    r = run(BENCHMARKS_DIR / "long_doc.py", "--config", "radix", "--profile-requests", "2", "--profile-dir",
            str(tmp_path / "traces"), "--out", str(out), tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    radix = json.loads(out.read_text())["configs"]["radix"]
    # 2 warm-up, 5 cold and 5 warm requests came before the profiler started; no Python stacks by default.
    assert radix["profiled"]["profiler"] == ["/start_profile after 12 requests, prefix radix-profiled, stack False",
                                             "/stop_profile after 14 requests, prefix None"]
    assert radix["profiled"]["requests"] == 2 and radix["profiled"]["report"]["requests"] == 2
    assert radix["profiled"]["trace_dir"] == str(tmp_path / "traces")
    assert set(radix["passes"]) == {"cold", "warm"} and "[radix] profiled (2 requests" in r.stdout


def test_a_benchmark_stopped_by_sigterm_stops_its_server(tmp_path):
    """``timeout`` SIGTERMs long_doc.py while it measures: the script exits 143 and its server, in a
    session of its own which the signal does not reach, is stopped (its port free) instead of being
    left holding the GPU (as a timed-out run on the H100 once did)."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(SHIM), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, str(BENCHMARKS_DIR / "long_doc.py"), "--config", "radix", "--docs", "400", "--doc-len", "700",
         "--output-len", "4", "--concurrency", "1", "--port", str(port), "--metrics-port", str(free_port()),
         "--log-dir", str(tmp_path), "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "r.json")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "server ready" in line:
                break
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the server listens
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM, "".join(seen) + proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert not (tmp_path / "r.json").exists()


def test_long_doc_runs_more_warm_passes_on_one_server_start(tmp_path):
    out = tmp_path / "r.json"
    r = run(BENCHMARKS_DIR / "long_doc.py", "--config", "radix", "--warm-passes", "2", "--out", str(out),
            tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    report = json.loads(out.read_text())
    assert report["workload"]["passes"] == {"cold": 5, "warm": 5, "warm2": 5}
    radix = report["configs"]["radix"]
    assert list(radix["passes"]) == ["cold", "warm", "warm2"] and r.stdout.count("server ready") == 1
    assert radix["vs_radix"]["warm2"]["latency_mean"] == 1.0
    # A file of one warm pass is another workload: no merge.
    other = run(BENCHMARKS_DIR / "long_doc.py", "--config", "radix", "--out", str(out), tmp_path=tmp_path)
    assert other.returncode != 0 and "another workload" in other.stderr + other.stdout
