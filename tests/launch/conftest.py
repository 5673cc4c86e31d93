"""Fixtures: stand-in SGLang workers and the router as real processes on loopback, and an HTTP client."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
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
    """A child process whose first stdout line matching ``ready`` says it is serving."""

    def __init__(self, argv: list[str], ready: str, timeout: float = 30.0, env: Optional[dict] = None):
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, start_new_session=True)
        self.lines: list[str] = []
        self.match = self.wait_for(ready, timeout)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline()
                if not line and self.proc.poll() is not None:
                    break
                self.lines.append(line)
                if m := re.search(pattern, line):
                    return m
            elif self.proc.poll() is not None:
                break
        self.kill()
        raise RuntimeError(f"{self.argv} did not print {pattern!r} in {timeout} s; output:\n{''.join(self.lines)}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        self.proc.wait(10)


class Standin(Proc):
    """A stand-in worker process (``standin_worker.py``)."""

    def __init__(self, role: str):
        super().__init__([sys.executable, str(STANDIN), "--role", role, "--port", "0"], r"listening on (\d+)")
        self.role = role
        self.port = int(self.match.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def records(self) -> list[dict]:
        return http("GET", f"{self.url}/records")[1]

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
    """``spawn("prefill")`` / ``spawn("decode")`` start stand-ins; ``spawn.router(...)`` a router."""
    started: list[Proc] = []

    def standin(role: str) -> Standin:
        started.append(Standin(role))
        return started[-1]

    def router(prefill: list[Standin], decode: list[Standin], *extra: str, **kw: Any) -> Router:
        started.append(Router(prefill, decode, *extra, **kw))
        return started[-1]

    standin.router = router
    yield standin
    for p in reversed(started):
        p.kill()
        p.proc.stdout.close()


@pytest.fixture
def client() -> Callable[..., tuple[int, Any]]:
    """``client(method, url, body=None, timeout=10)`` -> (status, JSON or text)."""
    return http
