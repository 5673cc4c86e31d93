"""``python -m launch.cluster``: one prefill worker, one decode worker and the router on this host.

Starts ``launch.prefill`` and ``launch.decode`` (GPUs 0 and 1 when there are two, else both on
GPU 0 with ``--mem-fraction-static`` split), waits for their ``/health`` with progress lines and a
deadline, then starts ``launch.router`` in front of them and prints where to send requests. Each
process has its own process group and a log file in the run directory. Ctrl-C or SIGTERM stops
everything, children included, and exits 0; a process that dies stops the cluster with exit code 1
and the tail of its log.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psutil

from kvtier.launch.router import POLICIES
from kvtier.launch.server import DEFAULT_BOOTSTRAP_PORT, LaunchError, check_config, find_option

SHARED_GPU_MEM_FRACTION = 0.35
# Flags the cluster sets itself per worker, so extra SGLang arguments must not repeat them.
CLUSTER_FLAGS = {"--host": "host", "--port": "port", "--base-gpu-id": "base_gpu_id",
                 "--model-path": "model_path", "--model": "model_path", "--kvtier-config": "kvtier_config",
                 "--bootstrap-port": "bootstrap_port", "--disaggregation-bootstrap-port": "bootstrap_port"}
LOG_TAIL_LINES = 40
ROUTER_STARTUP_S = 60.0


@dataclass(frozen=True)
class Service:
    """One process of the cluster: its name, command line, and the URL whose /health says it serves."""

    name: str
    argv: list[str]
    url: str


def gpu_count(env: Optional[dict] = None) -> int:
    """GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``; 0 if none."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m launch.cluster",
        usage="python -m launch.cluster --model-path M [options] [-- extra SGLang arguments for both workers]",
        description=__doc__.split("\n\n")[1].replace("\n", " ").replace("``", ""),
    )
    ap.add_argument("--model-path", required=True, help="model for both workers (SGLang's --model-path)")
    ap.add_argument("--kvtier-config", metavar="PATH", help="kvtier YAML config for both workers")
    ap.add_argument("--prefill-gpu", type=int, help="GPU of the prefill worker (default 0)")
    ap.add_argument("--decode-gpu", type=int, help="GPU of the decode worker (default: another GPU than prefill's if there is one, else the same)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address the router listens on (default 127.0.0.1); workers listen on 127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="router port (default 8000)")
    ap.add_argument("--prefill-port", type=int, default=30000, help="prefill worker HTTP port (default 30000)")
    ap.add_argument("--decode-port", type=int, default=30001, help="decode worker HTTP port (default 30001)")
    ap.add_argument("--bootstrap-port", type=int, default=DEFAULT_BOOTSTRAP_PORT,
                    help=f"PD bootstrap port of the prefill worker (default {DEFAULT_BOOTSTRAP_PORT})")
    ap.add_argument("--policy", default="cache_aware", choices=POLICIES,
                    help="router's prefill policy (default cache_aware)")
    ap.add_argument("--run-dir", help="directory for the logs (default: a new kvtier-cluster-* in the temp dir)")
    ap.add_argument("--startup-timeout", type=float, default=900.0,
                    help="seconds each worker may take to become healthy (default 900: model load and warm-up)")
    ap.add_argument("--stop-timeout", type=float, default=20.0,
                    help="seconds processes get to exit after SIGTERM before SIGKILL (default 20)")
    dev = ap.add_argument_group("developer options")
    dev.add_argument("--prefill-module", default="kvtier.launch.prefill",
                     help="module run as the prefill worker with launch.prefill's arguments (default %(default)s)")
    dev.add_argument("--decode-module", default="kvtier.launch.decode",
                     help="module run as the decode worker with launch.decode's arguments (default %(default)s)")
    return ap


@dataclass(frozen=True)
class Plan:
    """What the cluster will run: prefill, decode and router, and where the workers sit."""

    prefill: Service
    decode: Service
    router: Service
    prefill_gpu: int
    decode_gpu: int
    shared_mem_fraction: Optional[float]


def plan(args: argparse.Namespace, extra: list[str], gpus: int) -> Plan:
    """The processes to start for ``args`` and extra SGLang arguments; ValueError on bad input."""
    for dest in set(CLUSTER_FLAGS.values()):
        found = find_option(extra, dest, CLUSTER_FLAGS)
        if found:
            raise ValueError(f"'{found[0][0]}' after -- would override what the cluster sets for each worker; "
                             "use the cluster's own --model-path, --kvtier-config, --prefill-port/--decode-port, "
                             "--prefill-gpu/--decode-gpu or --bootstrap-port instead")
    ports = {"--port": args.port, "--prefill-port": args.prefill_port, "--decode-port": args.decode_port,
             "--bootstrap-port": args.bootstrap_port}
    if len(set(ports.values())) < len(ports):
        raise ValueError(f"the cluster's ports must differ, got {ports}")
    prefill_gpu = 0 if args.prefill_gpu is None else args.prefill_gpu
    if args.decode_gpu is not None:
        decode_gpu = args.decode_gpu
    else:
        decode_gpu = next((g for g in range(gpus) if g != prefill_gpu), prefill_gpu)
    user_mem = find_option(extra, "mem_fraction_static", {"--mem-fraction-static": "mem_fraction_static"})
    shared = SHARED_GPU_MEM_FRACTION if prefill_gpu == decode_gpu and not user_mem else None
    mem = ["--mem-fraction-static", str(shared)] if shared else []
    config = ["--kvtier-config", str(Path(args.kvtier_config).resolve())] if args.kvtier_config else []

    def worker(role: str, module: str, port: int, gpu: int) -> Service:
        argv = [sys.executable, "-m", module, "--model-path", args.model_path, "--host", "127.0.0.1",
                "--port", str(port), "--bootstrap-port", str(args.bootstrap_port), "--base-gpu-id", str(gpu),
                *mem, *config, *extra]
        return Service(role, argv, f"http://127.0.0.1:{port}")

    # A router listening on every address is still reached on loopback from here.
    router_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    router = Service("router", [sys.executable, "-m", "kvtier.launch.router",
                                "--prefill", f"http://127.0.0.1:{args.prefill_port}", str(args.bootstrap_port),
                                "--decode", f"http://127.0.0.1:{args.decode_port}",
                                "--host", args.host, "--port", str(args.port), "--policy", args.policy],
                     f"http://{router_host}:{args.port}")
    return Plan(worker("prefill", args.prefill_module, args.prefill_port, prefill_gpu),
                worker("decode", args.decode_module, args.decode_port, decode_gpu),
                router, prefill_gpu, decode_gpu, shared)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the cluster dies, even by SIGKILL (Linux)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join("    " + line for line in text[-lines:]) or "    (empty)"


class Cluster:
    """The running processes, started and stopped together."""

    def __init__(self, run_dir: Path, stop_timeout: float):
        self.run_dir = run_dir
        self.stop_timeout = stop_timeout
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.started: dict[str, float] = {}
        self.stopping = threading.Event()

    def say(self, msg: str) -> None:
        print(f"kvtier cluster: {msg}", flush=True)

    def start(self, svc: Service) -> None:
        log = self.run_dir / f"{svc.name}.log"
        with open(log, "ab") as out:
            out.write(f"$ {shlex.join(svc.argv)}\n".encode())
            out.flush()
            self.procs[svc.name] = subprocess.Popen(svc.argv, stdout=out, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self.logs[svc.name] = log
        self.started[svc.name] = time.monotonic()
        self.say(f"started {svc.name} (pid {self.procs[svc.name].pid}), log {log}")

    def dead(self) -> Optional[str]:
        """A message about the first process that exited, with its log's tail; None if all run."""
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                return (f"{name} exited with code {code}; last lines of {self.logs[name]}:\n"
                        f"{log_tail(self.logs[name])}")
        return None

    def wait_healthy(self, svc: Service, deadline_s: float, progress_s: float = 15.0) -> Optional[str]:
        """Poll ``/health`` until 200; an error message if a process died or ``deadline_s`` after its start passed."""
        started = self.started[svc.name]
        next_note = time.monotonic() + progress_s
        while not self.stopping.is_set():
            failure = self.dead()
            if failure:
                return failure
            try:
                with urllib.request.urlopen(f"{svc.url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        self.say(f"{svc.name} is healthy at {svc.url} after {time.monotonic() - started:.0f} s")
                        return None
            except (urllib.error.URLError, OSError):
                pass
            now = time.monotonic()
            if now - started > deadline_s:
                return (f"{svc.name} not healthy at {svc.url} after {deadline_s:g} s (raise --startup-timeout "
                        f"if it is still loading); last lines of {self.logs[svc.name]}:\n"
                        f"{log_tail(self.logs[svc.name])}")
            if now >= next_note:
                self.say(f"waiting for {svc.name} at {svc.url}: {now - started:.0f} s of {deadline_s:g} s "
                         f"(log {self.logs[svc.name]})")
                next_note = now + progress_s
            self.stopping.wait(0.5)
        return None

    def stop(self) -> None:
        """SIGTERM every process group (router first), SIGKILL what is left after the grace period."""
        tree = []
        for proc in self.procs.values():
            try:
                tree += psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for name in reversed(list(self.procs)):
            self._signal_group(self.procs[name], signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        _, alive = psutil.wait_procs(tree, timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs.values():
            self._signal_group(proc, signal.SIGKILL)
            proc.wait()
        for p in alive:  # children that left the worker's process group
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)

    @staticmethod
    def _signal_group(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass


def example_requests(url: str) -> str:
    gen = ('{"text": "The capital of France is", "sampling_params": {"max_new_tokens": 16, "temperature": 0}}')
    chat = ('{"model": "default", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16}')
    return (f"  curl -s {url}/generate -H 'Content-Type: application/json' -d '{gen}'\n"
            f"  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{chat}'")


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    ap = arg_parser()
    args, extra = ap.parse_args(argv[:split]), argv[split + 1:]
    try:
        p = plan(args, extra, gpu_count() if args.decode_gpu is None else 0)
    except ValueError as exc:
        ap.error(str(exc))
    try:
        check_config(args.kvtier_config, os.environ)  # here, not in two worker logs
    except LaunchError as exc:
        ap.error(str(exc))
    for flag, port, host in (("--prefill-port", args.prefill_port, "127.0.0.1"),
                             ("--decode-port", args.decode_port, "127.0.0.1"),
                             ("--bootstrap-port", args.bootstrap_port, "127.0.0.1"),
                             ("--port", args.port, args.host)):
        if port_in_use(port, host):
            ap.error(f"port {port} on {host} is in use; pick another with {flag}")
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="kvtier-cluster-"))
    run_dir.mkdir(parents=True, exist_ok=True)

    cluster = Cluster(run_dir, args.stop_timeout)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: cluster.stopping.set())
    shared = f" (one GPU: --mem-fraction-static {p.shared_mem_fraction} each)" if p.shared_mem_fraction else ""
    cluster.say(f"prefill on GPU {p.prefill_gpu}, decode on GPU {p.decode_gpu}{shared}; logs in {run_dir}")
    failure = None
    try:
        cluster.start(p.prefill)
        if p.shared_mem_fraction:
            # One GPU: SGLang sizes its pool from the memory that others leave free while it
            # loads, so the decode starts once the prefill has taken its share.
            failure = cluster.wait_healthy(p.prefill, args.startup_timeout)
        if not failure and not cluster.stopping.is_set():
            cluster.start(p.decode)
        for svc in (p.decode,) if p.shared_mem_fraction else (p.prefill, p.decode):
            if not failure and svc.name in cluster.started:
                failure = cluster.wait_healthy(svc, args.startup_timeout)
        if not failure and not cluster.stopping.is_set():
            cluster.start(p.router)
            failure = cluster.wait_healthy(p.router, ROUTER_STARTUP_S)
        if not failure and not cluster.stopping.is_set():
            url = p.router.url
            cluster.say(f"ready. Send requests to {url} (the router), for example:\n{example_requests(url)}\n"
                        f"  Router state: {url}/workers, metrics: {url}/metrics. Ctrl-C stops all.")
            while not cluster.stopping.is_set() and not failure:
                failure = cluster.dead()
                cluster.stopping.wait(0.5)
    finally:
        if failure:
            cluster.say(f"stopping: {failure}")
        cluster.say("stopping all processes")
        cluster.stop()
        cluster.say("stopped")
    sys.exit(1 if failure else 0)


if __name__ == "__main__":
    main()
