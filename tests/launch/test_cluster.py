"""``launch.cluster`` in a subprocess, its workers being stand-in processes (``--prefill-module``, ``--decode-module``)."""

from __future__ import annotations

import os
import re
import signal
import socket
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

    def start(*args: str, ready: str = r"ready. Send requests to (http://\S+)", workers: tuple[int, int] = (1, 1),
              **env: str):
        """``workers``: how many prefill and decode workers ``args`` place; each gets a free port
        (``ports["prefill"]`` etc. are then lists)."""
        n_prefill, n_decode = workers
        free = iter(free_ports(1 + 2 * n_prefill + n_decode))
        ports = {"router": next(free), **{role: [next(free) for _ in range(n)] for role, n in
                                          (("prefill", n_prefill), ("decode", n_decode), ("bootstrap", n_prefill))}}
        joined = {role: ",".join(map(str, ports[role])) for role in ("prefill", "decode", "bootstrap")}
        argv = [sys.executable, "-m", "kvtier.launch.cluster", "--model-path", "dummy-model",
                "--port", str(ports["router"]), "--prefill-port", joined["prefill"],
                "--decode-port", joined["decode"], "--bootstrap-port", joined["bootstrap"],
                "--run-dir", str(tmp_path / "run"), "--prefill-module", "standin_prefill",
                "--decode-module", "standin_decode", *args]
        if workers == (1, 1):
            ports.update({role: ports[role][0] for role in ("prefill", "decode", "bootstrap")})
        # No GPUs known (the stand-ins need none): the placement the tests assert is the same on a GPU
        # host, where nvidia-smi's count would move a default decode and refuse GPUs it lacks.
        environ = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
                       STANDIN_CHILD="1", CUDA_VISIBLE_DEVICES="", **env)
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
    assert [w.gpus for w in two.workers] == [[0], [1]] and two.shared_mem_fraction is None
    assert "--mem-fraction-static" not in two.prefill[0].service.argv
    assert two.placement() == "prefill on GPU 0, decode on GPU 1"
    one = plan(args, ["--chunked-prefill-size", "4096"], gpus=1)
    assert [w.gpus for w in one.workers] == [[0], [0]] and one.shared_mem_fraction == 0.35
    assert one.decode[0].service.argv[2:] == [
        "kvtier.launch.decode", "--model-path", "m", "--host", "127.0.0.1", "--port", "30100",
        "--bootstrap-port", "8998", "--base-gpu-id", "0", "--mem-fraction-static", "0.35", "--chunked-prefill-size", "4096"]
    assert one.router.argv[2:] == ["kvtier.launch.router", "--prefill", "http://127.0.0.1:30000", "8998",
                                   "--decode", "http://127.0.0.1:30100", "--host", "127.0.0.1", "--port", "8000",
                                   "--policy", "cache_aware", "--health-interval", "5"]
    mine = plan(args, ["--mem-fraction-static=0.3"], gpus=1)  # the user's split wins
    assert mine.shared_mem_fraction is None and mine.prefill[0].service.argv[-1] == "--mem-fraction-static=0.3"
    assert one.shares_gpus and mine.shares_gpus and not two.shares_gpus
    with pytest.raises(ValueError, match="'--port' after -- would override"):
        plan(args, ["--port", "1"], gpus=1)
    with pytest.raises(ValueError, match="ports must differ"):
        plan(arg_parser().parse_args(["--model-path", "m", "--decode-port", "30000"]), [], gpus=1)
    assert gpu_count({"CUDA_VISIBLE_DEVICES": "2,3"}) == 2 and gpu_count({"CUDA_VISIBLE_DEVICES": ""}) == 0


def parsed(*argv: str):
    return arg_parser().parse_args(["--model-path", "m", *argv])


def test_plan_places_two_prefill_and_two_decode_workers_on_four_gpus():
    p = plan(parsed("--prefill-gpus", "0,1", "--decode-gpus", "2,3"), [], gpus=4)
    assert [(w.service.name, w.gpus, w.port, w.bootstrap_port) for w in p.workers] == [
        ("prefill0", [0], 30000, 8998), ("prefill1", [1], 30001, 8999),
        ("decode0", [2], 30100, None), ("decode1", [3], 30101, None)]
    for w in p.workers:  # each worker on its own GPU; a decode falls back to the first prefill's bootstrap
        argv = w.service.argv
        assert argv[argv.index("--base-gpu-id") + 1] == str(w.gpus[0]) and "--tp-size" not in argv
        assert argv[argv.index("--bootstrap-port") + 1] == str(w.bootstrap_port or 8998)
        assert "--mem-fraction-static" not in argv
    assert p.router.argv[3:13] == ["--prefill", "http://127.0.0.1:30000", "8998", "--prefill", "http://127.0.0.1:30001",
                                   "8999", "--decode", "http://127.0.0.1:30100", "--decode", "http://127.0.0.1:30101"]
    assert p.placement() == "prefill0 on GPU 0, prefill1 on GPU 1, decode0 on GPU 2, decode1 on GPU 3"
    given = plan(parsed("--prefill-gpus", "0,1", "--decode-gpus", "2,3", "--prefill-port", "7001,7005",
                        "--decode-port", "7002", "--bootstrap-port", "7100,7200"), [], gpus=4)
    assert [(w.port, w.bootstrap_port) for w in given.workers] == [(7001, 7100), (7005, 7200), (7002, None),
                                                                   (7003, None)]


def test_plan_runs_a_tp2_prefill_on_consecutive_gpus_beside_tp1_decodes():
    p = plan(parsed("--prefill-gpus", "2,3", "--prefill-tp", "2", "--decode-gpus", "0,1"), ["--dtype", "bfloat16"],
             gpus=4)
    assert [(w.service.name, w.gpus) for w in p.workers] == [("prefill", [2, 3]), ("decode0", [0]), ("decode1", [1])]
    argv = p.prefill[0].service.argv
    assert argv[argv.index("--base-gpu-id") + 1 : argv.index("--base-gpu-id") + 4] == ["2", "--tp-size", "2"]
    assert argv[-2:] == ["--dtype", "bfloat16"]
    assert p.placement() == "prefill on GPUs 2-3 (TP 2), decode0 on GPU 0, decode1 on GPU 1"
    # Without --decode-gpus one decode goes on the first GPU the prefill leaves free.
    default = plan(parsed("--prefill-gpus", "0,1", "--prefill-tp", "2"), [], gpus=4)
    assert [w.gpus for w in default.decode] == [[2]]
    # Without --prefill-gpus a TP-N prefill takes GPUs 0 to N-1; a default TP-N decode the first N
    # consecutive GPUs of the host left free, else the prefill's.
    assert [w.gpus for w in plan(parsed("--prefill-tp", "2"), [], gpus=4).workers] == [[0, 1], [2]]
    assert [w.gpus for w in plan(parsed("--prefill-gpus", "1", "--decode-tp", "2"), [], gpus=4).workers] == [[1], [2, 3]]
    shared = plan(parsed("--prefill-tp", "2", "--decode-tp", "2"), [], gpus=2)
    assert [w.gpus for w in shared.workers] == [[0, 1], [0, 1]] and shared.shared_mem_fraction == 0.35
    with pytest.raises(ValueError, match="GPU 0 is given to two workers"):  # not GPUs 1-2 of a 2-GPU host
        plan(parsed("--decode-tp", "2"), [], gpus=2)


def test_plan_gives_each_worker_rank_its_own_metrics_port():
    p = plan(parsed("--prefill-gpus", "0,1", "--prefill-tp", "2", "--decode-gpus", "2,3"), [], gpus=4, metrics_port=9100)
    assert [w.metrics_ports for w in p.workers] == [[9100, 9101], [9102], [9103]]
    assert [w.service.env for w in p.workers] == [{"KVTIER_METRICS_PORT": str(port)} for port in (9100, 9102, 9103)]
    assert all(not w.metrics_ports and not w.service.env for w in plan(parsed(), [], gpus=2).workers)
    with pytest.raises(ValueError, match="metrics ports 29999-30002 .* run into the cluster's other ports"):
        plan(parsed("--prefill-gpus", "0,1", "--decode-gpus", "2,3"), [], gpus=4, metrics_port=29999)


@pytest.mark.parametrize("argv,extra,message", [
    (["--prefill-gpus", "0,1", "--prefill-tp", "2", "--decode-gpus", "4"], [],
     "GPU 4 is not on this host, which shows 4"),
    (["--prefill-gpus", "3,4", "--prefill-tp", "2", "--decode-gpus", "0"], [], "GPU 4 is not on this host"),
    (["--prefill-gpus", "0,2", "--prefill-tp", "2"], [], "a TP-2 prefill worker runs on consecutive GPUs"),
    (["--prefill-gpus", "0,1,2", "--prefill-tp", "2"], [], "--prefill-gpus lists 3 GPUs, not a multiple of --prefill-tp 2"),
    (["--decode-gpus", "1", "--decode-tp", "0"], [], "--decode-tp must be >= 1"),
    (["--prefill-gpus", "0,1", "--decode-gpus", "1,2"], [], "GPU 1 is given to two workers"),
    (["--prefill-gpus", "0,1", "--decode-gpus", "2", "--prefill-port", "7001,7002,7003"], [],
     "--prefill-port lists 3 ports for 2 workers"),
    (["--prefill-gpus", "0,1", "--decode-gpus", "2", "--bootstrap-port", "30100"], [], "ports must differ"),
    (["--prefill-gpus", "0,1", "--decode-gpus", "2", "--prefill-port", "65535"], [],
     "ports must be TCP ports (1-65535), got router 8000, prefill [65535, 65536]"),
    (["--decode-port", "0"], [], "ports must be TCP ports (1-65535)"),
    ([], ["--tp", "2"], "'--tp' after -- would override"),
    ([], ["--tensor-parallel-size", "2"], "'--tensor-parallel-size' after -- would override"),
    ([], ["--gpu-id-step=2"], "'--gpu-id-step' after -- would override"),
])
def test_plan_refuses_layouts_it_cannot_start(argv, extra, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        plan(parsed(*argv), extra, gpus=4)


@pytest.mark.parametrize("value,message", [("0,x", "expected integers separated by commas, got '0,x'"),
                                           ("0,-1", "expected non-negative integers, got '0,-1'")])
def test_gpu_and_port_lists_must_be_non_negative_integers(capsys, value, message):
    for flag in ("--prefill-gpus", "--decode-port"):
        with pytest.raises(SystemExit):
            parsed(flag, value)
        assert message in capsys.readouterr().err
    assert parsed("--decode-gpus", "2,3", "--prefill-port", "7000").decode_gpus == [2, 3]


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


def test_two_prefill_and_two_decode_workers_serve_through_the_router(start_cluster, client, free_ports, tmp_path):
    config = tmp_path / "kvtier.yaml"
    metrics = free_ports(4, consecutive=True)[0]  # one per worker
    config.write_text(f"metrics_port: {metrics}\n")
    cluster, ports = start_cluster("--prefill-gpus", "0,1", "--decode-gpus", "2,3", "--policy", "round_robin",
                                   "--kvtier-config", str(config), workers=(2, 2))
    cluster.wait_for(r"Ctrl-C stops all", 5)
    out = "".join(cluster.lines)
    assert "prefill0 on GPU 0, prefill1 on GPU 1, decode0 on GPU 2, decode1 on GPU 3" in out
    assert (f"kvtier metrics (/metrics): prefill0 :{metrics}, prefill1 :{metrics + 1}, decode0 :{metrics + 2}, "
            f"decode1 :{metrics + 3}.") in out
    for i, port in enumerate(ports["prefill"] + ports["decode"]):  # one shared config, a metrics port each
        assert client("GET", f"http://127.0.0.1:{port}/info")[1]["env"]["KVTIER_METRICS_PORT"] == str(metrics + i)
    url = f"http://127.0.0.1:{ports['router']}"
    answers = [client("POST", f"{url}/generate", {"text": f"hello {i}"}) for i in range(4)]
    assert all(status == 200 for status, _ in answers)
    served = {int(answer["text"].split()[1]) for _, answer in answers}
    assert served == set(ports["decode"])  # both decode workers take requests
    for prefill, bootstrap in zip(ports["prefill"], ports["bootstrap"]):
        info = client("GET", f"http://127.0.0.1:{prefill}/info")[1]
        assert info["argv"][info["argv"].index("--bootstrap-port") + 1] == str(bootstrap)
    # Every decode request names the bootstrap port of the prefill worker that got its prompt.
    prefill_of = {}
    for prefill, bootstrap in zip(ports["prefill"], ports["bootstrap"]):
        for record in client("GET", f"http://127.0.0.1:{prefill}/records")[1]:
            prefill_of[record["prompt"]] = bootstrap
    assert len(prefill_of) == 4 and set(prefill_of.values()) == set(ports["bootstrap"])
    for decode in ports["decode"]:
        for record in client("GET", f"http://127.0.0.1:{decode}/records")[1]:
            assert record["bootstrap_port"] == prefill_of[record["prompt"]]
    pids = family(cluster.proc.pid)
    assert len(pids) == 10  # cluster, router, four workers and a child of each
    cluster.proc.send_signal(signal.SIGINT)
    assert cluster.proc.wait(30) == 0
    deadline = time.monotonic() + 10
    while not gone(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(pids)


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
    assert "started decode" not in cluster.output()  # one GPU: the decode waits for the prefill's share
    cluster, _ = start_cluster("--startup-timeout", "2", "--", "--mem-fraction-static", "0.3",
                               ready=r"stopping: prefill not healthy", STANDIN_UNHEALTHY="1")
    assert cluster.proc.wait(20) == 1
    assert "started decode" not in cluster.output()  # also where the user's arguments split the GPU
    cluster, _ = start_cluster("--decode-gpus", "1", "--startup-timeout", "2", ready=r"stopping: prefill not healthy",
                               STANDIN_UNHEALTHY="1")
    assert cluster.proc.wait(20) == 1
    assert "started decode" in cluster.output()  # own GPUs: every worker loads at once
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


@pytest.mark.parametrize("taken,what", [("metrics", "prefill's kvtier metrics port"),
                                         ("decode", "decode's port"), ("bootstrap", "prefill's bootstrap port")])
def test_a_taken_port_is_refused_before_anything_starts(tmp_path, free_ports, taken, what):
    ports = dict(zip(("metrics", "router", "prefill", "decode", "bootstrap"),
                     free_ports(2, consecutive=True)[:1] + free_ports(4)))  # metrics: prefill's, decode's
    config = tmp_path / "kvtier.yaml"
    config.write_text(f"metrics_port: {ports['metrics']}\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               CUDA_VISIBLE_DEVICES="")  # no GPU count: --decode-gpus 1 is not refused on a one-GPU host
    with socket.socket() as busy:
        busy.bind(("" if taken == "metrics" else "127.0.0.1", ports[taken]))
        out = subprocess.run([sys.executable, "-m", "kvtier.launch.cluster", "--model-path", "m", "--kvtier-config",
                              str(config), "--run-dir", str(tmp_path / "run"), "--decode-gpus", "1",
                              *(a for role, flag in (("router", "--port"), ("prefill", "--prefill-port"),
                                                     ("decode", "--decode-port"), ("bootstrap", "--bootstrap-port"))
                                for a in (flag, str(ports[role]))),
                              "--prefill-module", "standin_prefill", "--decode-module", "standin_decode"],
                             capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2, out.stderr
    assert f"port {ports[taken]} on {'every address' if taken == 'metrics' else '127.0.0.1'} ({what}) is in use" \
        in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()


def test_a_health_poll_that_reads_garbage_keeps_waiting(tmp_path, echo_then_ok_server):
    """A poll that reads back its own request line (a TCP self-connect to a port nothing listens on
    yet, seen once in CI as ``BadStatusLine: GET /health HTTP/1.1``) is "not healthy yet", not a crash."""
    from kvtier.launch.cluster import Cluster, Service

    cluster = Cluster(tmp_path, stop_timeout=1.0)
    svc = Service("worker", ["true"], echo_then_ok_server(2))
    cluster.started[svc.name] = time.monotonic()
    assert cluster.wait_healthy(svc, deadline_s=20, progress_s=60) is None
