"""``launch.cluster`` in a subprocess, its workers being stand-in processes (``--prefill-module``, ``--decode-module``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from kvtier.launch.cluster import arg_parser, gpu_count, plan

HERE = Path(__file__).parent


@pytest.fixture
def start_cluster(spawn, tmp_path, free_ports):
    """``start_cluster(*args, ready=..., **env)``: launch.cluster with stand-in workers, ports free."""

    def start(*args: str, ready: str = r"ready. Send requests to (http://\S+)", **env: str):
        ports = dict(zip(("router", "prefill", "decode", "bootstrap"), free_ports(4)))
        argv = [sys.executable, "-m", "kvtier.launch.cluster", "--model-path", "dummy-model",
                "--port", str(ports["router"]), "--prefill-port", str(ports["prefill"]),
                "--decode-port", str(ports["decode"]), "--bootstrap-port", str(ports["bootstrap"]),
                "--run-dir", str(tmp_path / "run"), "--prefill-module", "standin_prefill",
                "--decode-module", "standin_decode", *args]
        environ = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
                       STANDIN_CHILD="1", **env)
        environ.pop("CUDA_VISIBLE_DEVICES", None)
        return spawn.proc(argv, ready, env=environ, timeout=60), ports

    return start


def gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def test_plan_places_workers_and_splits_one_gpu():
    args = arg_parser().parse_args(["--model-path", "m"])
    two = plan(args, [], gpus=2)
    assert (two.prefill_gpu, two.decode_gpu, two.shared_mem_fraction) == (0, 1, None)
    assert "--mem-fraction-static" not in two.prefill.argv
    one = plan(args, ["--tp", "1"], gpus=1)
    assert (one.prefill_gpu, one.decode_gpu, one.shared_mem_fraction) == (0, 0, 0.35)
    assert one.decode.argv[2:] == ["kvtier.launch.decode", "--model-path", "m", "--host", "127.0.0.1",
                                   "--port", "30001", "--bootstrap-port", "8998", "--base-gpu-id", "0",
                                   "--mem-fraction-static", "0.35", "--tp", "1"]
    assert one.router.argv[2:] == ["kvtier.launch.router", "--prefill", "http://127.0.0.1:30000", "8998",
                                   "--decode", "http://127.0.0.1:30001", "--host", "127.0.0.1", "--port", "8000",
                                   "--policy", "cache_aware"]
    mine = plan(args, ["--mem-fraction-static=0.3"], gpus=1)  # the user's split wins
    assert mine.shared_mem_fraction is None and mine.prefill.argv[-1] == "--mem-fraction-static=0.3"
    with pytest.raises(ValueError, match="'--port' after -- would override"):
        plan(args, ["--port", "1"], gpus=1)
    with pytest.raises(ValueError, match="ports must differ"):
        plan(arg_parser().parse_args(["--model-path", "m", "--decode-port", "30000"]), [], gpus=1)
    assert gpu_count({"CUDA_VISIBLE_DEVICES": "2,3"}) == 2 and gpu_count({"CUDA_VISIBLE_DEVICES": ""}) == 0


def family(pid: int) -> list[int]:
    return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]


def test_cluster_serves_through_the_router_and_stops_everything_on_sigint(start_cluster, client, tmp_path):
    config = tmp_path / "kvtier.yaml"
    config.write_text("cpu_size_gb: 1\n")
    cluster, ports = start_cluster("--kvtier-config", str(config), "--", "--chunked-prefill-size", "4096")
    url = f"http://127.0.0.1:{ports['router']}"
    assert cluster.match.group(1) == url
    cluster.wait_for(r"Ctrl-C stops all", 5)
    out = "".join(cluster.lines)
    assert f"curl -s {url}/generate -H 'Content-Type: application/json'" in out
    assert "prefill on GPU 0, decode on GPU 0 (one GPU: --mem-fraction-static 0.35 each)" in out

    status, answer = client("POST", f"{url}/generate", {"text": "hello"})
    assert status == 200 and answer["text"].startswith(f"decode {ports['decode']} room ")
    infos = {role: client("GET", f"http://127.0.0.1:{ports[role]}/info")[1] for role in ("prefill", "decode")}
    for role, info in infos.items():
        assert info["argv"] == ["--model-path", "dummy-model", "--host", "127.0.0.1", "--port", str(ports[role]),
                                "--bootstrap-port", str(ports["bootstrap"]), "--base-gpu-id", "0",
                                "--mem-fraction-static", "0.35", "--kvtier-config", str(config),
                                "--chunked-prefill-size", "4096"]
    pids = family(cluster.proc.pid)
    assert {infos["prefill"]["child_pid"], infos["decode"]["child_pid"], infos["prefill"]["pid"]} <= set(pids)
    assert len(pids) == 6  # cluster, prefill, decode, router, and a child of each worker

    cluster.proc.send_signal(signal.SIGINT)
    assert cluster.proc.wait(30) == 0
    rest = cluster.output()
    assert "kvtier cluster: stopped" in rest
    deadline = time.monotonic() + 10
    while not gone(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(pids)
    assert "standin prefill listening on" in (tmp_path / "run" / "prefill.log").read_text()
    assert "kvtier router: listening on" in (tmp_path / "run" / "router.log").read_text()


def test_a_dying_worker_stops_the_cluster_with_its_log(start_cluster, client):
    cluster, ports = start_cluster()
    pids = family(cluster.proc.pid)
    client("POST", f"http://127.0.0.1:{ports['decode']}/control", {"exit": 3})
    assert cluster.proc.wait(20) == 1
    rest = cluster.output()
    assert "stopping: decode exited with code 3; last lines of" in rest
    assert "standin decode: exiting with 3 as asked" in rest
    deadline = time.monotonic() + 10
    while not gone(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(pids)


def test_a_worker_failing_at_start_is_reported(start_cluster):
    cluster, _ = start_cluster("--prefill-module", "no_such_module", ready=r"stopping: prefill exited")
    assert cluster.proc.wait(20) == 1
    assert "No module named no_such_module" in cluster.output()


def test_startup_deadline_and_sigterm_while_starting(start_cluster):
    cluster, _ = start_cluster("--startup-timeout", "2", ready=r"stopping: prefill not healthy", STANDIN_UNHEALTHY="1")
    assert "after 2 s (raise --startup-timeout" in cluster.match.string
    assert cluster.proc.wait(20) == 1
    cluster, _ = start_cluster(ready=r"started prefill", STANDIN_UNHEALTHY="1")
    pids = family(cluster.proc.pid)
    cluster.proc.send_signal(signal.SIGTERM)
    assert cluster.proc.wait(20) == 0
    assert "ready" not in cluster.output()
    assert gone(pids)


def test_bad_arguments_are_refused_before_anything_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cpu_size_gb: 0\n")
    for args, message in ((["--kvtier-config", str(bad)], "cpu_size_gb=0.0: must be > 0"),
                          (["--", "--base-gpu-id", "3"], "'--base-gpu-id' after -- would override")):
        out = subprocess.run([sys.executable, "-m", "kvtier.launch.cluster", "--model-path", "m",
                              "--run-dir", str(tmp_path / "run"), *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert not (tmp_path / "run").exists()
