"""``python -m launch.cluster``: PD prefill and decode workers and the router on this host.

Starts ``launch.prefill`` and ``launch.decode`` workers (by default one of each: GPUs 0 and 1 when
there are two, else both on GPU 0 with ``--mem-fraction-static`` split; ``--prefill-gpus`` and
``--decode-gpus`` with ``--prefill-tp`` / ``--decode-tp`` place several, e.g. two prefill and two
decode workers on four GPUs, or a TP-2 prefill feeding two TP-1 decodes), waits for their
``/health`` with progress lines and a deadline, then starts ``launch.router`` in front of them and
prints where to send requests. Each process has its own process group and a log file in the run
directory. Ctrl-C or SIGTERM stops everything, children included, and exits 0; a process that dies
stops the cluster with exit code 1 and the tail of its log.
"""

from __future__ import annotations

import argparse
import ctypes
import http.client
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psutil

from kvtier.launch.router import POLICIES
from kvtier.launch.server import DEFAULT_BOOTSTRAP_PORT, LaunchError, check_config, find_option
from kvtier.sglang_ext.config import load_config

SHARED_GPU_MEM_FRACTION = 0.35
# Flags the cluster sets itself per worker (a GPU step it leaves at 1: TP ranks on consecutive GPUs),
# so extra SGLang arguments must not repeat them.
CLUSTER_FLAGS = {"--host": "host", "--port": "port", "--base-gpu-id": "base_gpu_id",
                 "--model-path": "model_path", "--model": "model_path", "--kvtier-config": "kvtier_config",
                 "--bootstrap-port": "bootstrap_port", "--disaggregation-bootstrap-port": "bootstrap_port",
                 "--tp-size": "tp_size", "--tensor-parallel-size": "tp_size", "--tp": "tp_size",
                 "--gpu-id-step": "gpu_id_step"}
LOG_TAIL_LINES = 40
METRICS_ENV = "KVTIER_METRICS_PORT"
ROUTER_STARTUP_S = 60.0


@dataclass(frozen=True)
class Service:
    """One process of the cluster: its name, command line, and the URL whose /health says it serves."""

    name: str
    argv: list[str]
    url: str
    env: dict[str, str] = field(default_factory=dict)
    """Set in the process's environment on top of the cluster's."""


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


def int_list(text: str) -> list[int]:
    """``"0,1"`` -> ``[0, 1]`` (argparse type)."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m launch.cluster",
        usage="python -m launch.cluster --model-path M [options] [-- extra SGLang arguments for every worker]",
        description=__doc__.split("\n\n")[1].replace("\n", " ").replace("``", ""),
    )
    ap.add_argument("--model-path", required=True, help="model for every worker (SGLang's --model-path)")
    ap.add_argument("--kvtier-config", metavar="PATH", help="kvtier YAML config for every worker")
    ap.add_argument("--prefill-gpus", "--prefill-gpu", type=int_list, metavar="G[,G...]",
                    help="GPUs of the prefill workers, --prefill-tp consecutive GPUs each (default: one worker on "
                         "GPUs 0 to --prefill-tp - 1)")
    ap.add_argument("--decode-gpus", "--decode-gpu", type=int_list, metavar="G[,G...]",
                    help="GPUs of the decode workers, --decode-tp consecutive GPUs each (default: one worker on "
                         "the first --decode-tp consecutive GPUs the prefill leaves free, else on the prefill's)")
    ap.add_argument("--prefill-tp", type=int, default=1, help="tensor-parallel size of each prefill worker (default 1)")
    ap.add_argument("--decode-tp", type=int, default=1, help="tensor-parallel size of each decode worker (default 1)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address the router listens on (default 127.0.0.1); workers listen on 127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="router port (default 8000)")
    ap.add_argument("--prefill-port", type=int_list, default=[30000], metavar="P[,P...]",
                    help="HTTP ports of the prefill workers: one per worker, or the first of consecutive ones "
                         "(default 30000)")
    ap.add_argument("--decode-port", type=int_list, default=[30100], metavar="P[,P...]",
                    help="HTTP ports of the decode workers, as --prefill-port (default 30100)")
    ap.add_argument("--bootstrap-port", type=int_list, default=[DEFAULT_BOOTSTRAP_PORT], metavar="P[,P...]",
                    help=f"PD bootstrap ports of the prefill workers, as --prefill-port (default {DEFAULT_BOOTSTRAP_PORT})")
    ap.add_argument("--policy", default="cache_aware", choices=POLICIES,
                    help="router's prefill policy (default cache_aware)")
    ap.add_argument("--health-interval", type=float, default=5.0,
                    help="seconds between the router's health checks of each worker (default 5; SGLang answers "
                         "/health with a one-token generation)")
    ap.add_argument("--run-dir", help="directory for the logs (default: a new kvtier-cluster-* in the temp dir)")
    ap.add_argument("--startup-timeout", type=float, default=900.0,
                    help="seconds each worker may take to become healthy (default 900: model load and warm-up)")
    ap.add_argument("--stop-timeout", type=float, default=20.0,
                    help="seconds processes get to exit after SIGTERM before SIGKILL (default 20)")
    dev = ap.add_argument_group("developer options")
    dev.add_argument("--prefill-module", default="kvtier.launch.prefill",
                     help="module run as a prefill worker with launch.prefill's arguments (default %(default)s)")
    dev.add_argument("--decode-module", default="kvtier.launch.decode",
                     help="module run as a decode worker with launch.decode's arguments (default %(default)s)")
    return ap


@dataclass(frozen=True)
class Worker:
    """A prefill or decode worker: its process, GPUs, HTTP port (and a prefill's bootstrap port)."""

    service: Service
    gpus: list[int]
    port: int
    bootstrap_port: Optional[int] = None

    def where(self) -> str:
        gpus = f"GPU {self.gpus[0]}" if len(self.gpus) == 1 else f"GPUs {self.gpus[0]}-{self.gpus[-1]} (TP {len(self.gpus)})"
        return f"{self.service.name} on {gpus}"

    @property
    def metrics_ports(self) -> list[int]:
        """kvtier's metrics ports of this worker's ranks (none where metrics are off)."""
        first = self.service.env.get(METRICS_ENV)
        return [int(first) + rank for rank in range(len(self.gpus))] if first else []


@dataclass(frozen=True)
class Plan:
    """What the cluster will run: the prefill and decode workers, and the router in front."""

    prefill: list[Worker]
    decode: list[Worker]
    router: Service
    shared_mem_fraction: Optional[float]
    """Set when one prefill and one decode worker share their GPUs: each worker's memory share (None
    where the extra SGLang arguments set --mem-fraction-static themselves)."""

    @property
    def workers(self) -> list[Worker]:
        return self.prefill + self.decode

    @property
    def shares_gpus(self) -> bool:
        """One prefill and one decode worker on the same GPUs."""
        return len(self.prefill) == len(self.decode) == 1 and self.prefill[0].gpus == self.decode[0].gpus

    def placement(self) -> str:
        shared = f" (one GPU: --mem-fraction-static {self.shared_mem_fraction} each)" if self.shared_mem_fraction else ""
        return ", ".join(w.where() for w in self.workers) + shared


def _groups(role: str, gpus: list[int], tp: int) -> list[list[int]]:
    """``gpus`` cut into workers of ``tp`` consecutive GPUs (SGLang's --base-gpu-id and --tp-size)."""
    if tp < 1:
        raise ValueError(f"--{role}-tp must be >= 1, got {tp}")
    if not gpus or len(gpus) % tp:
        raise ValueError(f"--{role}-gpus lists {len(gpus)} GPUs, not a multiple of --{role}-tp {tp}")
    groups = [gpus[i : i + tp] for i in range(0, len(gpus), tp)]
    for group in groups:
        if group != list(range(group[0], group[0] + tp)):
            raise ValueError(f"a TP-{tp} {role} worker runs on consecutive GPUs (SGLang's --base-gpu-id and "
                             f"--tp-size), got {','.join(map(str, group))} in --{role}-gpus")
    return groups


def _ports(flag: str, ports: list[int], n: int) -> list[int]:
    """One port per worker: the list as given, or ``n`` consecutive ports from a single one."""
    if len(ports) == 1:
        return [ports[0] + i for i in range(n)]
    if len(ports) != n:
        raise ValueError(f"{flag} lists {len(ports)} ports for {n} workers; give one per worker, or the first alone")
    return ports


def plan(args: argparse.Namespace, extra: list[str], gpus: int, metrics_port: int = 0) -> Plan:
    """The processes to start for ``args`` and extra SGLang arguments (``gpus``: GPUs on this host, 0
    if unknown: where a default decode worker goes, and which GPU ids are refused as missing);
    ValueError on bad input. With kvtier's
    ``metrics_port`` set, each worker gets its own ports from it on (one per rank), where one
    shared config would have them all bind the same."""
    for dest in set(CLUSTER_FLAGS.values()):
        found = find_option(extra, dest, CLUSTER_FLAGS)
        if found:
            raise ValueError(f"'{found[0][0]}' after -- would override what the cluster sets for each worker; "
                             "use the cluster's own --model-path, --kvtier-config, --prefill-port/--decode-port, "
                             "--prefill-gpus/--decode-gpus, --prefill-tp/--decode-tp or --bootstrap-port instead")
    prefill_gpus = args.prefill_gpus if args.prefill_gpus is not None else list(range(args.prefill_tp))
    prefill_groups = _groups("prefill", prefill_gpus, args.prefill_tp)
    if args.decode_gpus is not None:
        decode_groups = _groups("decode", args.decode_gpus, args.decode_tp)
    else:
        # The first --decode-tp consecutive GPUs of this host that the prefill leaves free, else
        # the prefill's first GPU on.
        used = {g for group in prefill_groups for g in group}
        first = next((g for g in range(gpus - args.decode_tp + 1) if used.isdisjoint(range(g, g + args.decode_tp))),
                     prefill_groups[0][0])
        decode_groups = _groups("decode", list(range(first, first + args.decode_tp)), args.decode_tp)
    missing = sorted({g for group in prefill_groups + decode_groups for g in group if gpus and g >= gpus})
    if missing:
        raise ValueError(f"GPU {', '.join(map(str, missing))} is not on this host, which shows {gpus} "
                         "(CUDA_VISIBLE_DEVICES, else nvidia-smi -L); check --prefill-gpus/--decode-gpus and the TP sizes")
    n_prefill, n_decode = len(prefill_groups), len(decode_groups)
    prefill_ports = _ports("--prefill-port", args.prefill_port, n_prefill)
    decode_ports = _ports("--decode-port", args.decode_port, n_decode)
    bootstrap_ports = _ports("--bootstrap-port", args.bootstrap_port, n_prefill)
    ports = [args.port, *prefill_ports, *decode_ports, *bootstrap_ports]
    given = f"router {args.port}, prefill {prefill_ports}, decode {decode_ports}, bootstrap {bootstrap_ports}"
    if not all(0 < port < 65536 for port in ports):  # consecutive ports from one may run past the last
        raise ValueError(f"the cluster's ports must be TCP ports (1-65535), got {given}")
    if len(set(ports)) < len(ports):
        raise ValueError(f"the cluster's ports must differ, got {given}")
    shared = None
    if n_prefill == n_decode == 1 and prefill_groups == decode_groups:
        user_mem = find_option(extra, "mem_fraction_static", {"--mem-fraction-static": "mem_fraction_static"})
        shared = None if user_mem else SHARED_GPU_MEM_FRACTION
    else:
        owner: dict[int, str] = {}
        for role, groups in (("prefill", prefill_groups), ("decode", decode_groups)):
            for group in groups:
                for g in group:
                    if g in owner:
                        raise ValueError(f"GPU {g} is given to two workers ({owner[g]} and {role}); only one "
                                         "prefill and one decode worker on the same GPUs may share them (place "
                                         "the workers with --prefill-gpus and --decode-gpus)")
                    owner[g] = role
    mem = ["--mem-fraction-static", str(shared)] if shared else []
    config = ["--kvtier-config", str(Path(args.kvtier_config).resolve())] if args.kvtier_config else []

    next_metrics = [metrics_port]

    def service(name: str, module: str, port: int, group: list[int], bootstrap: int) -> Service:
        tp = ["--tp-size", str(len(group))] if len(group) > 1 else []
        argv = [sys.executable, "-m", module, "--model-path", args.model_path, "--host", "127.0.0.1",
                "--port", str(port), "--bootstrap-port", str(bootstrap), "--base-gpu-id", str(group[0]),
                *tp, *mem, *config, *extra]
        env = {}
        if metrics_port:
            env[METRICS_ENV] = str(next_metrics[0])
            next_metrics[0] += len(group)
        return Service(name, argv, f"http://127.0.0.1:{port}", env)

    def names(role: str, n: int) -> list[str]:
        return [role] if n == 1 else [f"{role}{i}" for i in range(n)]

    prefill = [Worker(service(name, args.prefill_module, port, group, boot), group, port, boot)
               for name, port, group, boot in zip(names("prefill", n_prefill), prefill_ports, prefill_groups,
                                                  bootstrap_ports)]
    # The router names each request's prefill; a decode falls back to its --bootstrap-port only for
    # requests that name none, so it gets the first prefill's.
    decode = [Worker(service(name, args.decode_module, port, group, bootstrap_ports[0]), group, port)
              for name, port, group in zip(names("decode", n_decode), decode_ports, decode_groups)]
    # A router listening on every address is still reached on loopback from here.
    router_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    targets = [a for w in prefill for a in ("--prefill", w.service.url, str(w.bootstrap_port))]
    targets += [a for w in decode for a in ("--decode", w.service.url)]
    router = Service("router", [sys.executable, "-m", "kvtier.launch.router", *targets,
                                "--host", args.host, "--port", str(args.port), "--policy", args.policy,
                                "--health-interval", f"{args.health_interval:g}"],
                     f"http://{router_host}:{args.port}")
    metrics = [port for w in prefill + decode for port in w.metrics_ports]
    if set(metrics) & set(ports) or max(metrics, default=0) > 65535:
        raise ValueError(f"kvtier's metrics ports {metrics[0]}-{metrics[-1]} (metrics_port, one per worker rank) run "
                         f"into the cluster's other ports or past 65535; set another metrics_port")
    return Plan(prefill, decode, router, shared)


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
                                                    env={**os.environ, **svc.env},
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
            except (urllib.error.URLError, OSError, http.client.HTTPException):
                # HTTPException: not HTTP yet, e.g. a connection to a port in the ephemeral range that
                # nothing listens on yet can land on itself (TCP self-connect) and read back the request.
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


def worker_metrics(p: Plan) -> str:
    """Where each worker's kvtier metrics are, for the ready message ("" where they are off)."""
    where = [f"{w.service.name} :{','.join(map(str, w.metrics_ports))}" for w in p.workers if w.metrics_ports]
    return f" kvtier metrics (/metrics): {', '.join(where)}." if where else ""


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
        check_config(args.kvtier_config, os.environ)  # here, not in every worker's log
    except LaunchError as exc:
        ap.error(str(exc))
    try:
        p = plan(args, extra, gpu_count(),
                 load_config(args.kvtier_config, env=os.environ).metrics_port)
    except ValueError as exc:
        ap.error(str(exc))
    busy = [(f"{w.service.name}'s port", w.port, "127.0.0.1") for w in p.workers]
    busy += [(f"{w.service.name}'s bootstrap port", w.bootstrap_port, "127.0.0.1") for w in p.prefill]
    busy += [(f"{w.service.name}'s kvtier metrics port", port, "") for w in p.workers for port in w.metrics_ports]
    for what, port, host in [*busy, ("the router's port (--port)", args.port, args.host)]:
        if port_in_use(port, host):
            ap.error(f"port {port} on {host or 'every address'} ({what}) is in use; pick other ports with "
                     f"--prefill-port, --decode-port, --bootstrap-port, --port or kvtier's metrics_port")
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="kvtier-cluster-"))
    run_dir.mkdir(parents=True, exist_ok=True)

    cluster = Cluster(run_dir, args.stop_timeout)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: cluster.stopping.set())
    cluster.say(f"{p.placement()}; logs in {run_dir}")
    failure = None
    try:
        waiting = p.workers
        if p.shares_gpus:
            # One GPU: SGLang sizes its pool from the memory that others leave free while it
            # loads, so the decode starts once the prefill has taken its share (whoever set it).
            cluster.start(p.prefill[0].service)
            failure = cluster.wait_healthy(p.prefill[0].service, args.startup_timeout)
            waiting = p.decode
        for w in p.workers:
            if not failure and not cluster.stopping.is_set() and w.service.name not in cluster.started:
                cluster.start(w.service)
        for w in waiting:
            if not failure and w.service.name in cluster.started:
                failure = cluster.wait_healthy(w.service, args.startup_timeout)
        if not failure and not cluster.stopping.is_set():
            cluster.start(p.router)
            failure = cluster.wait_healthy(p.router, ROUTER_STARTUP_S)
        if not failure and not cluster.stopping.is_set():
            url = p.router.url
            cluster.say(f"ready. Send requests to {url} (the router), for example:\n{example_requests(url)}\n"
                        f"  Router state: {url}/workers, metrics: {url}/metrics.{worker_metrics(p)} Ctrl-C stops all.")
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
