"""``benchmarks/pd_serving.py`` on CPU: its arithmetic, and its mixed-load client against stand-in servers.

The pure parts (inter-token latencies from chunk times, summaries, ratios, equality, the transfer
report from two scrapes of a real PD metrics page) are checked against numbers computed here. The
mixed load runs end to end against two ``standin_server.py`` processes that stream like SGLang's
``/generate``, one slow ("colocated") and one fast ("pd"), so the ratios must favour the fast one.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from bench_common import LLAMA3_8B, REPO, scrape_metrics
from long_doc import token_range
from pd_serving import (
    MixedLoad,
    PDProbe,
    StreamResult,
    class_report,
    earlier_configs,
    equality,
    itl_gaps,
    mixed_load,
    ratios,
    run_requests,
    transfer_report,
)

from kvtier.sglang_ext.metrics import pd_metrics_on

SHIM = Path(__file__).with_name("shim")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_itl_splits_multi_token_chunks_and_skips_empty_ones():
    chunks = [(0.10, 1), (0.15, 2), (0.15, 2), (0.35, 5), (0.40, 6)]
    gaps = itl_gaps(chunks)
    assert [t for t, _ in gaps] == [0.15, 0.35, 0.35, 0.35, 0.40]
    assert [g for _, g in gaps] == pytest.approx([0.05, 0.2 / 3, 0.2 / 3, 0.2 / 3, 0.05])
    # Tokens of the first chunk have no gap: their time is the TTFT.
    assert itl_gaps([(0.1, 2), (0.3, 3)]) == [(0.3, pytest.approx(0.2))]
    assert itl_gaps([(0.1, 1)]) == []


def test_class_report_matches_numpy_and_windows_by_arrival_time():
    rng = np.random.default_rng(3)
    results, all_gaps, arrivals = [], [], []
    for i in range(20):
        sent = 100.0 + i * 0.3
        times = np.cumsum(rng.uniform(0.005, 0.05, size=int(rng.integers(2, 30))))
        chunks = [(float(t), n + 1) for n, t in enumerate(times)]
        results.append(StreamResult(sent, chunks, list(range(len(chunks)))))
        all_gaps += list(np.diff(times))
        arrivals += [sent + t for t in times[1:]]
    report = class_report(results, window=(101.0, 103.0))
    assert report["requests"] == 20 and report["output_tokens"] == sum(len(r.chunks) for r in results)
    ttft = [r.chunks[0][0] for r in results]
    assert report["ttft"] == {"mean_s": round(float(np.mean(ttft)), 4), "p50_s": round(float(np.percentile(ttft, 50)), 4),
                              "p99_s": round(float(np.percentile(ttft, 99)), 4)}
    assert report["itl"]["mean_s"] == round(float(np.mean(all_gaps)), 4)
    assert report["itl"]["p99_s"] == round(float(np.percentile(all_gaps, 99)), 4)
    inside = [g for g, t in zip(all_gaps, arrivals) if 101.0 <= t <= 103.0]
    assert report["tokens_during_prefills"] == len(inside) > 0
    assert report["itl_during_prefills"]["p50_s"] == round(float(np.percentile(inside, 50)), 4)


def test_ratios_and_equality():
    slow = {"decode": {"ttft": {"mean_s": 0.4, "p50_s": 0.3, "p99_s": 1.0}, "itl": {"mean_s": 0.05, "p50_s": 0.02,
                                                                                    "p99_s": 0.5}},
            "prefill": {"ttft": {"mean_s": 0.9, "p50_s": 0.8, "p99_s": 2.0}, "itl": None}}
    fast = {"decode": {"ttft": {"mean_s": 0.2, "p50_s": 0.3, "p99_s": 0.25}, "itl": {"mean_s": 0.025, "p50_s": 0.02,
                                                                                     "p99_s": 0.05}},
            "prefill": {"ttft": {"mean_s": 0.3, "p50_s": 0.4, "p99_s": 1.0}, "itl": {"mean_s": 0.01, "p50_s": 0.01,
                                                                                     "p99_s": 0.01}}}
    r = ratios(slow, fast)
    assert r["decode_ttft_mean"] == 2.0 and r["decode_ttft_p99"] == 4.0 and r["decode_itl_p99"] == 10.0
    assert r["prefill_ttft_p50"] == 2.0 and r["decode_itl_p50"] == 1.0
    assert not any(k.startswith("prefill_itl") for k in r)  # one side has no ITL for that class
    rows = equality([[1, 2, 3], [4, 5, 6], [7, 8]], [[1, 2, 3], [4, 9, 6], [7, 8, 9]], [10, 20, 30])
    assert [(x["equal"], x["first_difference"]) for x in rows] == [(True, None), (False, 1), (False, 2)]
    assert [x["prompt_len"] for x in rows] == [10, 20, 30]


def test_transfer_report_from_two_scrapes_of_a_pd_metrics_page():
    port = free_port()
    pd = pd_metrics_on(port)
    url = f"http://127.0.0.1:{port}/metrics"
    pd.bytes.labels("prefill").inc(1000)  # an earlier request
    pd.transfer.labels("prefill").observe(1.0)
    before = scrape_metrics(url)
    nbytes = 10_000 * 131072  # a 10K-token Llama-3-8B KV
    pd.bytes.labels("prefill").inc(nbytes)
    pd.transfer.labels("prefill").observe(0.004)
    pd.busy.labels("prefill").inc(0.0035)
    pd.copy.labels("prefill", "direct").inc(0.002)  # the copy's GPU time, one path or both
    pd.copy.labels("prefill", "staged").inc(0.0005)
    pd.copy.labels("decode", "staged").inc(0.25)  # the other role's: not this report's
    report = transfer_report(before, scrape_metrics(url), "prefill", nbytes, 394.0)
    assert report["bytes"] == nbytes and report["bytes_match"] and report["requests"] == 1
    assert report["transfer_s"] == 0.004
    assert report["gb_s"] == round(nbytes / 0.004 / 1e9, 2)
    assert report["link_fraction"] == round(nbytes / 0.004 / 1e9 / 394.0, 3)
    assert report["busy_gb_s"] == round(nbytes / 0.0035 / 1e9, 2)
    assert report["copy_s"] == 0.0025 and report["copy_gb_s"] == round(nbytes / 0.0025 / 1e9, 2)
    assert report["not_copy_s"] == 0.001
    assert not transfer_report(before, scrape_metrics(url), "prefill", nbytes + 1, 394.0)["bytes_match"]


def test_pd_probe_adds_up_every_rank_page_and_waits_for_each_rank_of_the_worker():
    """A TP-2 prefill worker: each rank serves its own page and counts its share of the request; the
    probe adds both pages up and waits until both ranks counted it (the second one late here)."""
    import threading

    ports = [free_port(), free_port()]
    ranks = [pd_metrics_on(p) for p in ports]
    probe = PDProbe({"prefill": [f"http://127.0.0.1:{p}/metrics" for p in ports]}, 2000, 100.0, settle_s=10,
                    ranks={"prefill": 2})
    ranks[1].bytes.labels("prefill").inc(7)  # an earlier request on one rank only
    before = probe.snapshot()
    assert before["prefill"]["kvtier_pd_bytes_total{role=prefill}"] == 7

    def rank(m, seconds: float) -> None:
        m.bytes.labels("prefill").inc(1000)
        m.transfer.labels("prefill").observe(seconds)

    rank(ranks[0], 0.01)
    late = threading.Timer(0.5, rank, (ranks[1], 0.03))
    late.start()
    try:
        report = probe.report(before)["prefill"]
    finally:
        late.join()
    assert report["bytes"] == 2000 and report["bytes_match"] and report["requests"] == 2
    assert report["transfer_s"] == 0.04


@pytest.fixture
def standins(start_standin):
    """Two stand-ins: ``colocated`` slow (TTFT 0.2 s, 20 ms a token), ``pd`` fast (0.05 s, 5 ms)."""
    return {name: start_standin("--ttft-s", ttft, "--token-s", token) + "/generate"
            for name, ttft, token in (("colocated", "0.2", "0.02"), ("pd", "0.05", "0.005"))}


def test_mixed_load_end_to_end_against_two_standins(standins):
    load = MixedLoad(decode_users=3, decode_prompt_len=50, decode_output_len=12, prefills=3, prefill_len=400,
                     prefill_output_len=4, prefill_start_s=0.2, prefill_interval_s=0.15, seed=1)
    ids = token_range(LLAMA3_8B)
    reports = {name: asyncio.run(mixed_load(url, load, ids, timeout_s=30)) for name, url in standins.items()}
    for name, token_s, ttft_s in (("colocated", 0.02, 0.2), ("pd", 0.005, 0.05)):
        r = reports[name]
        d, p = r["decode"], r["prefill"]
        assert p["requests"] == 3 and p["output_tokens"] == 3 * 4
        assert d["requests"] >= 3 and d["output_tokens"] == d["requests"] * 12
        assert p["ttft"]["p50_s"] >= ttft_s and d["ttft"]["p50_s"] >= ttft_s
        assert token_s * 0.8 <= d["itl"]["mean_s"] <= token_s * 4, (name, d["itl"])
        # Decode users kept streaming while the long prefills were in the system.
        assert d["tokens_during_prefills"] > 0
        assert r["prefill_window_s"] >= 2 * 0.15 + ttft_s
    r = ratios(reports["colocated"], reports["pd"])
    assert r["decode_ttft_mean"] > 1.5 and r["prefill_ttft_mean"] > 1.5 and r["decode_itl_mean"] > 1.5, r

    prompts = [list(range(1000, 1000 + n)) for n in (30, 200)]
    outs = {name: run_requests(url, prompts, 6, timeout_s=30) for name, url in standins.items()}
    for res in outs.values():
        assert [x.output_ids for x in res] == [list(range(6))] * 2
        assert all(x.chunks[-1][1] == 6 for x in res)
    rows = equality(*[[x.output_ids for x in outs[n]] for n in ("colocated", "pd")], [30, 200])
    assert all(row["equal"] for row in rows)


SIZES = ["--equality-lens", "20,300", "--equality-tokens", "5", "--probe-len", "500", "--probe-repeats", "1",
         "--decode-users", "2", "--decode-prompt-len", "30", "--decode-output-len", "10", "--prefills", "2",
         "--prefill-len", "300", "--prefill-output-len", "3", "--prefill-start-s", "0.1", "--prefill-interval-s", "0.1",
         "--metrics-settle-s", "0.2"]


def standin_env() -> dict[str, str]:
    """The environment of a pd_serving run with stand-ins: ``tests/benchmarks/shim`` first on
    ``PYTHONPATH``, no inherited kvtier metrics port, and ``CUDA_VISIBLE_DEVICES=''`` so that
    launch.cluster's plan counts no GPUs and checks no GPU ids (on a host with GPUs it would refuse
    the stand-ins' GPU 2 or 3 where nvidia-smi shows fewer)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SHIM), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": ""}
    env.pop("KVTIER_METRICS_PORT", None)
    return env


def free_block(n: int) -> int:
    """The first of ``n`` consecutive ports free on loopback right now (launch.cluster counts up from one)."""
    rng = np.random.default_rng()
    while True:
        base = int(rng.integers(20_000, 60_000))
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()


def test_the_pd_workers_can_be_a_launch_cluster_of_two_prefill_and_two_decode_workers(tmp_path):
    """--cluster: the PD configuration is launch.cluster's 2P2D layout (stand-in workers on CPU), the
    probe reads all four workers' metrics pages, requests go to the router ARGS names (its --port
    over --pd-ports'), the colocated server gets --colocated-args, and the cluster and every worker
    are gone afterwards."""
    base = free_block(40)
    pd_ports = [base, base + 10, base + 20, base + 25, base + 30, base + 38]  # prefill, decode, router, bootstrap, metrics
    env = standin_env()
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pd_serving.py"), *SIZES, "--port", str(base + 39),
                        "--pd-ports", ",".join(map(str, pd_ports)), "--cluster", f"--prefill-gpus 0,1 --decode-gpus 2,3 --port {base + 21}",
                        "--colocated-args", "--tp-size 2 --dp-size 2", "--log-dir", str(tmp_path),
                        "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "pd.json"), "--commit", "abc"],
                       capture_output=True, text=True, timeout=180, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    report = json.loads((tmp_path / "pd.json").read_text())
    pd, colocated = report["configs"]["pd"], report["configs"]["colocated"]
    assert pd["placement"] == "prefill0 on GPU 0, prefill1 on GPU 1, decode0 on GPU 2, decode1 on GPU 3"
    assert pd["metrics_ports"] == {"prefill": [base + 30, base + 31], "decode": [base + 32, base + 33]}
    assert pd["mixed"]["prefill"]["requests"] == 2 and report["greedy_equality"]["all_equal"]
    assert colocated["colocated_args"] == "--tp-size 2 --dp-size 2"
    assert "--tp-size 2 --dp-size 2" in (tmp_path / "colocated.log").read_text().splitlines()[0]
    cluster_log = (tmp_path / "pd-cluster.log").read_text()
    assert "kvtier.launch.cluster" in cluster_log.splitlines()[0] and "kvtier cluster: stopped" in cluster_log
    assert {p.name for p in (tmp_path / "pd-cluster").glob("*.log")} == {
        "prefill0.log", "prefill1.log", "decode0.log", "decode1.log", "router.log"}
    for port in [base, base + 1, base + 10, base + 11, base + 21, base + 30, base + 33]:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0


def test_bad_cluster_or_server_arguments_are_refused_before_any_configuration_runs(tmp_path):
    """The PD side runs second: a --cluster whose ports clash (each role counts up from its port, so
    consecutive --pd-ports collide with two workers per role) must fail before the colocated run, and
    an unclosed quote is a usage error, not a traceback."""
    env = standin_env()
    base = free_block(8)
    common = [sys.executable, str(REPO / "benchmarks" / "pd_serving.py"), *SIZES, "--port", str(base + 7),
              "--pd-ports", ",".join(str(base + i) for i in range(6)), "--log-dir", str(tmp_path),
              "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "pd.json"), "--commit", "abc"]
    for extra, code, says in ((["--cluster", "--prefill-gpus 0,1 --decode-gpus 2,3"], 1, "ports must differ"),
                              (["--colocated-args", "--tp-size '2"], 2, "--colocated-args"),
                              (["--cluster", "--prefill-gpus 0", "--prefill-cache", "radix"], 2, "drop --prefill-cache")):
        r = subprocess.run([*common, *extra], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
        assert r.returncode == code and says in r.stderr and "Traceback" not in r.stderr, r.stderr + r.stdout
        assert not (tmp_path / "colocated.log").exists() and not (tmp_path / "pd.json").exists()


def test_a_cluster_port_already_taken_fails_the_pd_configuration_naming_it(tmp_path):
    """launch.cluster refuses a taken port before it starts a worker; pd_serving records that as the
    PD configuration's error with the cluster's message (which port, whose) and nothing is left running."""
    env = standin_env()
    base = free_block(8)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 5))  # the decode's kvtier metrics port (every rank's count up from base + 4)
        taken.listen()
        r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pd_serving.py"), *SIZES, "--configs", "pd",
                            "--pd-ports", ",".join(str(base + i) for i in range(6)),
                            "--cluster", "--prefill-gpus 0 --decode-gpus 1", "--log-dir", str(tmp_path),
                            "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "pd.json"),
                            "--commit", "abc"], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr + r.stdout
    error = json.loads((tmp_path / "pd.json").read_text())["configs"]["pd"]["error"]
    assert f"port {base + 5}" in error and "(decode's kvtier metrics port)" in error and "in use" in error, error
    for port in [base, base + 1, base + 2, base + 3, base + 4]:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0


def run_script(tmp_path: Path, port: int, pd_ports: list[int]) -> subprocess.CompletedProcess:
    """The whole script with ``tests/benchmarks/shim`` first on ``PYTHONPATH``: ``sglang.launch_server``
    (colocated) and the ``launch.prefill`` / ``launch.decode`` workers (which import it) become
    stand-ins; the router is kvtier's own."""
    env = standin_env()
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "pd_serving.py"), *SIZES, "--port", str(port),
                           "--pd-ports", ",".join(map(str, pd_ports)), "--log-dir", str(tmp_path), "--model-dir",
                           str(tmp_path / "model"), "--out", str(tmp_path / "pd.json"), "--commit", "abc123"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)


def test_the_script_runs_both_configurations_with_standins_in_sglangs_place(tmp_path):
    """The stand-ins have no PD counters, so the probe reports zero bytes."""
    ports = [free_port() for _ in range(6)]
    r = run_script(tmp_path, free_port(), ports)
    assert r.returncode == 0, r.stderr + r.stdout
    report = json.loads((tmp_path / "pd.json").read_text())
    assert report["commit"] == "abc123" and "pd_serving.py" in report["command"] and report["date"]
    assert set(report["configs"]) == {"colocated", "pd"}
    assert report["greedy_equality"]["all_equal"] and len(report["greedy_equality"]["prompts"]) == 2
    assert "--enable-deterministic-inference" in report["server_args"]
    pd = report["configs"]["pd"]
    assert pd["probe"][0]["metrics"]["prefill"]["expected_bytes"] == 500 * 131072
    assert pd["probe"][0]["metrics"]["prefill"]["bytes"] == 0 and report["transfer"]["best_gb_s"] == 0
    assert report["transfer"]["copy_gb_s"] == [0.0] and report["transfer"]["not_copy_ms"] == [0.0]
    for name in ("colocated", "pd"):
        mixed = report["configs"][name]["mixed"]
        assert mixed["prefill"]["requests"] == 2 and mixed["decode"]["requests"] >= 2
    assert set(report["ratios_colocated_over_pd"]) >= {"decode_ttft_mean", "decode_itl_p99", "prefill_ttft_p50"}
    assert {p.name for p in tmp_path.glob("*.log")} >= {"colocated.log", "pd-prefill.log", "pd-decode.log",
                                                        "pd-router.log"}
    assert "kvtier.launch.prefill" in (tmp_path / "pd-prefill.log").read_text().splitlines()[0]
    for port in ports[:3]:  # every worker and the router were stopped
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0


def test_a_failed_configuration_is_reported_and_the_other_still_measured(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = run_script(tmp_path, taken.getsockname()[1], [free_port() for _ in range(6)])
    assert r.returncode != 0 and "colocated: port" in r.stderr, r.stderr + r.stdout
    report = json.loads((tmp_path / "pd.json").read_text())
    assert "already in use" in report["configs"]["colocated"]["error"]
    assert report["configs"]["pd"]["mixed"]["prefill"]["requests"] == 2
    assert "greedy_equality" not in report and report["transfer"]["gb_s"] == [0.0]


def test_two_invocations_of_one_configuration_each_merge_into_one_comparison(tmp_path):
    """The device runs the two configurations in two calls: the second keeps the first's result."""
    def one(config: str) -> subprocess.CompletedProcess:
        env = standin_env()
        return subprocess.run([sys.executable, str(REPO / "benchmarks" / "pd_serving.py"), *SIZES, "--configs", config,
                               "--port", str(free_port()), "--pd-ports", ",".join(str(free_port()) for _ in range(6)),
                               "--log-dir", str(tmp_path), "--model-dir", str(tmp_path / "model"),
                               "--out", str(tmp_path / "pd.json"), "--commit", config],
                              capture_output=True, text=True, timeout=120, cwd=REPO, env=env)

    for config in ("pd", "colocated"):
        r = one(config)
        assert r.returncode == 0, r.stderr + r.stdout
    report = json.loads((tmp_path / "pd.json").read_text())
    assert set(report["configs"]) == {"colocated", "pd"}
    assert report["configs"]["pd"]["measured"]["commit"] == "pd"
    assert report["configs"]["colocated"]["measured"]["commit"] == "colocated"
    assert report["greedy_equality"]["all_equal"] and "ratios_colocated_over_pd" in report


def test_wait_healthy_stops_at_a_dead_server_or_the_deadline_with_its_log(tmp_path):
    from sglang_server import wait_healthy

    log = tmp_path / "server.log"
    log.write_text("loading\nCUDA out of memory\n")
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    with pytest.raises(SystemExit, match=r"(?s)exited with 3; .*server.log ends with:\nloading\nCUDA out of memory"):
        wait_healthy(f"http://127.0.0.1:{free_port()}", dead, log, 30)
    silent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = time.monotonic()
        with pytest.raises(SystemExit, match="not healthy after 1 s"):
            wait_healthy(f"http://127.0.0.1:{free_port()}", silent, log, 1)
        assert time.monotonic() - start < 10
    finally:
        silent.kill()
        silent.wait()


def test_earlier_configs_keeps_only_other_successful_configurations_of_the_same_workload(tmp_path):
    out = tmp_path / "pd.json"
    assert earlier_configs(out, {}, ["pd"]) == {}  # nothing there yet
    same = {"benchmark": "pd_serving", "workload": {"probe_len": 8}, "server_args": ["--x"], "model": {"layers": 2}}
    earlier = {**same, "commit": "c0", "date": "d0", "command": "cmd0",
               "configs": {"colocated": {"ttft": 1.0}, "pd": {"ttft": 2.0}, "other": {"error": "died"},
                           "kept": {"ttft": 3.0, "measured": {"commit": "c-1"}}}}
    out.write_text(json.dumps(earlier))
    kept = earlier_configs(out, {**same, "commit": "c1"}, ["pd"])
    assert set(kept) == {"colocated", "kept"}  # not the one rerun, not a failed one
    assert kept["colocated"]["measured"] == {"commit": "c0", "date": "d0", "command": "cmd0"}
    assert kept["kept"]["measured"] == {"commit": "c-1"}  # measured even earlier: left as it was
    for key, other in (("workload", {"probe_len": 9}), ("server_args", ["--y"]), ("model", {"layers": 3}),
                       ("benchmark", "long_doc")):
        assert earlier_configs(out, {**same, key: other}, ["pd"]) == {}, key
    out.write_text("{not json")
    assert earlier_configs(out, same, ["pd"]) == {}
