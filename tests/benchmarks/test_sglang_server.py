"""The benchmarks' SGLang server: reading SGLang 0.5.17's per-request time log (against the line its own
``Req`` writes), its start and stop."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
import time
from array import array

import pytest
from sglang_server import request_stages, session_process, sglang_server


def test_request_stages_reads_the_line_sglang_logs(caplog):
    from sglang.srt.disaggregation.utils import DisaggregationMode
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    lines = []
    for rid, queue_s, forward_s in (("a1b2", 0.003, 0.047), ("c3", 0.0, 0.0125)):
        req = Req(rid, "", array("q", [5, 6, 7]), SamplingParams(max_new_tokens=1))
        stats, t = req.time_stats, time.perf_counter()
        stats.disagg_mode = DisaggregationMode.NULL  # the scheduler sets it; a colocated server logs NULL's durations
        stats.wait_queue_entry_time, stats.forward_entry_time = t, t + queue_s
        stats.completion_time = t + queue_s + forward_s
        with caplog.at_level(logging.INFO, logger="sglang.srt.managers.schedule_batch"):
            req.log_time_stats()
        lines.append(f"[2026-11-23 17:52:22] {caplog.records[-1].getMessage()}")
    log = "\n".join(["[2026-11-23 17:52:21] Prefill batch, #new-seq: 1, #new-token: 1", *lines, "SIGTERM received."])
    stages = request_stages(log)
    assert set(stages) == {"a1b2", "c3"}
    assert abs(stages["a1b2"]["queue"] - 3.0) < 0.01 and abs(stages["a1b2"]["forward"] - 47.0) < 0.01
    assert stages["c3"]["queue"] == 0.0 and abs(stages["c3"]["forward"] - 12.5) < 0.01
    # When it entered the queue, on the wall clock (SGLang converts its perf_counter stamps), to the ms.
    assert abs(stages["a1b2"]["entry"] - time.time()) < 5 and stages["a1b2"]["attempts"] == 0
    assert request_stages("no such lines") == {}


def test_wait_healthy_reads_garbage_as_not_up_yet(tmp_path, echo_then_ok_server):
    """The benchmarks' server start treats a garbled answer (TCP self-connect) as not up yet."""
    import subprocess
    import sys

    from sglang_server import wait_healthy

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert wait_healthy(echo_then_ok_server(1), proc, tmp_path / "log", timeout_s=20) >= 0
    finally:
        proc.kill()
        proc.wait()


def test_base_args_swap_the_attention_backend_and_turn_on_decode_graphs():
    from sglang_server import BASE_ARGS, base_args

    assert base_args() == BASE_ARGS
    args = base_args(8, "flashinfer")
    assert args[args.index("--attention-backend") + 1] == "flashinfer" and "triton" not in args
    assert "--disable-cuda-graph" not in args and args[-2:] == ["--cuda-graph-max-bs", "8"]


def test_prefill_batches_reads_sglangs_own_log_lines():
    """Lines as SGLang 0.5.17's scheduler wrote them on the H100 (greedy_equality at 29d9357)."""
    from sglang_server import prefill_batches

    log = "\n".join([
        "[2026-11-24 02:49:15] Prefill batch, #new-seq: 1, #new-token: 3, #cached-token: 0, token usage: 0.00, "
        "#running-req: 0, #queue-req: 0, #pending-token: 0, cuda graph: False, input throughput (token/s): 2.07",
        "[2026-11-24 02:49:20] Prefill batch, #new-seq: 2, #new-token: 160, #cached-token: 15872, token usage: 0.89, "
        "#running-req: 0, #queue-req: 0, #pending-token: 0, cuda graph: False, input throughput (token/s): 622.62",
        "[2026-11-24 02:49:20] Decode batch, #running-req: 2, #token: 16192, token usage: 0.90, cuda graph: False",
    ])
    assert prefill_batches(log) == {"1": 1, "2": 1}
    assert prefill_batches(log, hits_only=True) == {"2": 1}
    assert prefill_batches("") == {}


def test_a_server_that_dies_at_start_is_reported_with_its_log(tmp_path):
    """Real SGLang 0.5.17 refusing to start (here: no accelerator): the benchmark exits naming the
    server and the end of its log, not with an error from stopping a process that is gone."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SystemExit) as exit_info:
        with sglang_server(tmp_path / "no-model", port, [], {}, tmp_path / "server.log", ready_timeout_s=120):
            pass
    message = str(exit_info.value.code)
    assert "exited with 1" in message and "server.log" in message and "Error" in message


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_session_process_is_stopped_with_its_signal_or_killed_after_the_grace(tmp_path, stop):
    """The block's end sends ``stop`` to the process's group; one that ignores it is killed after
    ``grace_s``, and so is the child it started (same group), not left running."""
    script = ("import os, signal, subprocess, sys, time\n"
              f"signal.signal({int(stop)}, signal.SIG_IGN)\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
              f"signal.signal({int(stop)}, signal.SIG_IGN); time.sleep(60)'])\n"
              "print('pid=%d' % child.pid, flush=True)\n"
              "time.sleep(60)\n")
    log = tmp_path / "p.log"
    t0 = time.monotonic()
    with session_process([sys.executable, "-c", script], log, stop=stop, grace_s=1) as proc:
        while not re.search(r"^pid=\d+$", log.read_text(), re.M):  # the command line holds the script
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
    assert proc.returncode == -signal.SIGKILL and time.monotonic() - t0 < 30
    assert log.read_text().startswith(f"$ {sys.executable} -c ")
    child = int(re.search(r"^pid=(\d+)$", log.read_text(), re.M)[1])
    for _ in range(100):  # the group's SIGKILL reaches the child too; init reaps it
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the child {child} outlived its session")


def test_a_session_process_that_obeys_stops_at_once(tmp_path):
    t0 = time.monotonic()
    with session_process([sys.executable, "-c", "import time; print('u' + 'p', flush=True); time.sleep(60)"],
                         tmp_path / "p.log") as proc:
        while not re.search("^up$", (tmp_path / "p.log").read_text(), re.M):
            time.sleep(0.05)
    assert proc.returncode == -signal.SIGTERM and time.monotonic() - t0 < 30
