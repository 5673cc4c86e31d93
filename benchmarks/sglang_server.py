"""One SGLang 0.5.17 server for a benchmark: start it, wait until healthy, send token ids, stop it."""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

# Seen working on the H100/H200 machines with the carried SGLang bundle (see shared/device).
BASE_ARGS = ["--skip-tokenizer-init", "--attention-backend", "triton", "--sampling-backend", "pytorch",
             "--disable-cuda-graph", "--grammar-backend", "none"]


def base_args(cuda_graph_max_bs: int = 0, attention_backend: str = "triton") -> list[str]:
    """``BASE_ARGS``, with decode CUDA graphs captured up to that batch size instead when it is > 0,
    and another ``--attention-backend`` when asked."""
    args = list(BASE_ARGS)
    args[args.index("--attention-backend") + 1] = attention_backend
    if cuda_graph_max_bs <= 0:
        return args
    return [a for a in args if a != "--disable-cuda-graph"] + ["--cuda-graph-max-bs", str(cuda_graph_max_bs)]


def port_in_use(port: int) -> bool:
    """Whether something already accepts connections on ``127.0.0.1:port``."""
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _log_tail(log_path: str | Path, lines: int = 25) -> str:
    try:
        return "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_healthy(url: str, proc: subprocess.Popen, log_path: str | Path, timeout_s: float) -> float:
    """Poll ``{url}/health`` until it answers and return the seconds that took; exits with the tail of
    ``log_path`` if ``proc`` ends or ``timeout_s`` passes first."""
    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            sys.exit(f"{url} exited with {proc.returncode}; {log_path} ends with:\n{_log_tail(log_path)}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=5)
            return time.monotonic() - start
        except (OSError, http.client.HTTPException):  # not up yet, or a TCP self-connect (see launch.cluster)
            pass
        if time.monotonic() - start > timeout_s:
            sys.exit(f"{url} not healthy after {timeout_s:g} s; {log_path} ends with:\n{_log_tail(log_path)}")
        time.sleep(1)


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """While the block runs, SIGTERM (``timeout``'s, a job scheduler's) raises ``SystemExit`` in this
    process, so that the ``finally`` blocks stop the servers started in it: each runs in a session of
    its own, which the signal does not reach, and Python's default on SIGTERM runs no ``finally``
    (a timed-out benchmark left a server holding the GPU and its port). No-op off the main thread
    or where a SIGTERM handler is set already (an enclosing block's)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, lambda sig, _frame: sys.exit(128 + sig))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def session_process(argv: list[str], log_path: str | Path, env: dict[str, str] | None = None,
                    stop: int = signal.SIGTERM, grace_s: float = 60) -> Iterator[subprocess.Popen]:
    """Runs ``argv`` in a session of its own (so a server's children are stopped with it), its output
    in ``log_path`` after its command line, until the block ends; then sends ``stop`` to its process
    group and kills the group after ``grace_s``. A SIGTERM to this process ends the block too
    (``sigterm_exits``): a benchmark cut by ``timeout`` leaves nothing running."""
    with sigterm_exits():
        with open(log_path, "w") as log:
            log.write(f"$ {shlex.join(argv)}\n")
            log.flush()
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, **(env or {})})
        try:
            yield proc
        finally:
            # A process that died already left no process group: its exit, not this, is the error.
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, stop)
                try:
                    proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def sglang_server(model_dir: str | Path, port: int, server_args: list[str], env: dict[str, str],
                  log_path: str | Path, ready_timeout_s: float = 400,
                  other_ports: tuple[int, ...] = (), cuda_graph_max_bs: int = 0,
                  attention_backend: str = "triton") -> Iterator[float]:
    """Runs ``sglang.launch_server`` until the block ends; yields its start-up time in seconds.

    Refuses to start when ``port`` or one of ``other_ports`` (e.g. kvtier's metrics port) is taken,
    since the health check would otherwise talk to whatever already listens there. Stops the server
    on SIGTERM too (``session_process``).
    """
    for p in (port, *other_ports):
        if port_in_use(p):
            sys.exit(f"port {p} is already in use (a server left running?); stop it or pick another port")
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir), "--port", str(port),
           *base_args(cuda_graph_max_bs, attention_backend), *server_args]
    with session_process(cmd, log_path, env) as proc:
        yield wait_healthy(f"http://127.0.0.1:{port}", proc, log_path, ready_timeout_s)


def generate(port: int, ids: list[int] | list[list[int]], max_new_tokens: int = 1,
             return_logprob: bool = False) -> tuple[float, dict | list[dict]]:
    """Greedy ``/generate`` of ``ids``; returns (seconds for the whole request, response). A list of
    prompts is one batch request, which reaches the scheduler at once; its response is a list."""
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}}
    if return_logprob:
        body["return_logprob"] = True
        body["sampling_params"]["ignore_eos"] = True
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    return time.perf_counter() - start, out


# The line SGLang's scheduler logs per finished request with --enable-request-time-stats-logging.
_STAGES = re.compile(r"ReqTimeStats\(rid=([^,)]+),(?:.*?attempts=(\d+))?.*?\): queue_duration=([\d.]+)ms, "
                     r"forward_duration=([\d.]+)ms(?:, entry_time=([\d.]+))?")


def request_stages(log_text: str) -> dict[str, dict[str, float]]:
    """Per request id, the scheduler's own times from a server log written with
    ``--enable-request-time-stats-logging``: ``queue`` (entering the waiting queue to the forward pass
    that runs it) and ``forward`` (from there until its result is processed) in ms, and where the
    line has them ``entry`` (when it entered the queue, ``time.time()`` seconds) and ``attempts``
    (SGLang's count of prefill attempts)."""
    stages = {}
    for m in _STAGES.finditer(log_text):
        stages[m[1]] = {"queue": float(m[3]), "forward": float(m[4])}
        if m[5] is not None:
            stages[m[1]]["entry"] = float(m[5])
        if m[2] is not None:
            stages[m[1]]["attempts"] = int(m[2])
    return stages


# The line SGLang's scheduler logs for each prefill batch it runs.
_PREFILL = re.compile(r"Prefill batch, #new-seq: (\d+), #new-token: \d+, #cached-token: (\d+)")


def prefill_batches(log_text: str, hits_only: bool = False) -> dict[str, int]:
    """How many prefill batches of each size (requests in the batch) SGLang's scheduler logged in
    ``log_text``, by size; with ``hits_only`` only those that reused cached tokens."""
    sizes = Counter(int(m[1]) for m in _PREFILL.finditer(log_text) if not hits_only or int(m[2]) > 0)
    return {str(size): sizes[size] for size in sorted(sizes)}


def post(port: int, path: str, body: dict) -> str:
    """POST ``body`` to SGLang's ``path`` (its profiler controls) and return the answer; an error
    answer raises."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read().decode().strip()


@contextmanager
def profiled(port: int, output_dir: str, prefix: str, with_stack: bool = True) -> Iterator[list[str]]:
    """Record what runs inside with SGLang's torch profiler (``/start_profile``, CPU and GPU
    activity, a trace per process in ``output_dir`` named by ``prefix``); yields the list that gets
    the profiler's two answers. Writing the trace holds up the next request. ``with_stack=False``
    drops the Python call stacks: the scheduler then runs near its unprofiled speed, and SGLang's
    own spans and kvtier's ``kvtier.<hook>`` spans still mark what ran when."""
    answers = [post(port, "/start_profile", {"output_dir": output_dir, "activities": ["CPU", "GPU"],
                                              "profile_prefix": prefix, "with_stack": with_stack})]
    try:
        yield answers
    finally:
        answers.append(post(port, "/stop_profile", {}))


def warm_up_prefix_hits(port: int, rnd: random.Random, extend_tokens: int = 0) -> None:
    """Off the record: a short prompt, then twice again as a prefix hit, so that the kernels of a
    one-token extend over a cached prefix are compiled before anything is timed (the first such
    request paid that compile: 0.146 s against 0.061 for the rest in offload_ttft's radix_fit at 7e35a7d);
    then, with ``extend_tokens`` > 1, an extend of that many tokens over it: what a prompt loaded
    back in whole chunks leaves to compute (its length modulo kvtier's chunk_tokens). CUDA loads a
    kernel's module at its first launch and waits for the GPU to go idle to do so: in a torch
    profile of kvtier's first warm request at 2e583df (10,000 tokens: a 16-token extend), the first
    matmul of that shape started only once every copy in flight had finished (65 ms)."""
    prompt = [rnd.randrange(1000, 120000) for _ in range(256)]
    for _ in range(3):
        generate(port, prompt)
    if extend_tokens > 1:
        generate(port, prompt + [rnd.randrange(1000, 120000) for _ in range(extend_tokens)])
