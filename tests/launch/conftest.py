"""Fixtures: stand-in SGLang workers and the router as real processes on loopback, and an HTTP client."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

HERE = Path(__file__).parent
STANDIN = HERE / "standin_worker.py"


def http(method: str, url: str, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
    """One HTTP call; (status, JSON body or text)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


class Proc:
    """A child process whose output is collected line by line; a ``ready`` line says it is serving."""

    def __init__(self, argv: list[str], ready: str, timeout: float = 30.0, env: Optional[dict] = None):
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, start_new_session=True)
        self.lines: list[str] = []
        self._eof = False
        self._new = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.match = self.wait_for(ready, timeout)

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()
        with self._new:
            self._eof = True
            self._new.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first output line matching ``pattern``, waiting for it; the process is killed if none."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._new:
            while True:
                for line in self.lines[seen:]:
                    if m := re.search(pattern, line):
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    break
                self._new.wait(left)
        self.kill()
        raise RuntimeError(f"{self.argv} did not print {pattern!r} in {timeout} s; output:\n{''.join(self.lines)}")

    def output(self, timeout: float = 30.0) -> str:
        """Everything the process printed, once it has exited."""
        self.proc.wait(timeout)
        self._reader.join(timeout)
        return "".join(self.lines)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        self.proc.wait(10)
        self._reader.join(10)


class Standin(Proc):
    """A stand-in worker process (``standin_worker.py``)."""

    def __init__(self, role: str):
        super().__init__([sys.executable, str(STANDIN), "--role", role, "--port", "0"], r"listening on (\d+)")
        self.role = role
        self.port = int(self.match.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def records(self, at_least: int = 0, timeout: float = 5.0) -> list[dict]:
        """The requests it got, waiting until there are ``at_least`` (a prefill's may lag decode's answer)."""
        deadline = time.monotonic() + timeout
        while len(recs := http("GET", f"{self.url}/records")[1]) < at_least and time.monotonic() < deadline:
            time.sleep(0.02)
        return recs

    def control(self, **state: Any) -> None:
        assert http("POST", f"{self.url}/control", state)[0] == 200


class Router(Proc):
    """``python -m kvtier.launch.router`` in front of the given stand-ins."""

    def __init__(self, prefill: list[Standin], decode: list[Standin], *extra: str, bootstrap_port: int = 9123):
        argv = [sys.executable, "-m", "kvtier.launch.router", "--port", "0"]
        for w in prefill:
            argv += ["--prefill", w.url, str(bootstrap_port)]
        for w in decode:
            argv += ["--decode", w.url]
        super().__init__(argv + list(extra), r"listening on (http://\S+)")
        self.url = self.match.group(1)

    def post(self, endpoint: str, body: Any, timeout: float = 10.0) -> tuple[int, Any]:
        return http("POST", f"{self.url}/{endpoint}", body, timeout)

    def get(self, path: str) -> tuple[int, Any]:
        return http("GET", f"{self.url}/{path}")

    def wait_workers(self, cond: Callable[[dict], bool], timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.get("workers")[1]
            if cond(state):
                return state
            time.sleep(0.05)
        raise AssertionError(f"workers never reached the state; last: {state}")


@pytest.fixture
def spawn() -> Iterator[Callable[..., Proc]]:
    """``spawn("prefill")`` / ``spawn("decode")`` start stand-ins, ``spawn.router(...)`` a router,
    ``spawn.proc(argv, ready_pattern)`` any process; all are killed at the end."""
    started: list[Proc] = []

    def standin(role: str) -> Standin:
        started.append(Standin(role))
        return started[-1]

    def router(prefill: list[Standin], decode: list[Standin], *extra: str, **kw: Any) -> Router:
        started.append(Router(prefill, decode, *extra, **kw))
        return started[-1]

    def proc(argv: list[str], ready: str, **kw: Any) -> Proc:
        started.append(Proc(argv, ready, **kw))
        return started[-1]

    standin.router = router
    standin.proc = proc
    yield standin
    for p in reversed(started):
        p.kill()


def _bound(port: int, host: str) -> socket.socket | None:
    s = socket.socket()
    try:
        s.bind((host, port))
    except OSError:
        s.close()
        return None
    return s


@pytest.fixture
def free_ports() -> Callable[..., list[int]]:
    """``free_ports(n, consecutive=False)``: n distinct TCP ports free right now, none handed out
    before in this test; ``consecutive`` makes them a run free on every address (kvtier's metrics
    ports, one per worker rank from ``metrics_port`` on)."""
    given: set[int] = set()

    def pick(n: int, consecutive: bool = False) -> list[int]:
        held: list[socket.socket] = []  # open until the choice is made, so no port is chosen twice
        chosen: list[int] = []
        try:
            while len(chosen) < n:
                first = _bound(0, "" if consecutive else "127.0.0.1")
                assert first is not None, "the OS gave no free port"
                held.append(first)
                base = first.getsockname()[1]
                run = list(range(base, base + n)) if consecutive else [base]
                if any(port in given or port > 65535 for port in run):
                    continue
                rest = [_bound(port, "") for port in run[1:]]
                held += [s for s in rest if s is not None]
                if all(rest):
                    chosen += run
        finally:
            for s in held:
                s.close()
        given.update(chosen)
        return chosen

    return pick


@pytest.fixture
def client() -> Callable[..., tuple[int, Any]]:
    """``client(method, url, body=None, timeout=10)`` -> (status, JSON or text)."""
    return http
