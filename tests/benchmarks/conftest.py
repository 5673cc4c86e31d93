"""The benchmark scripts import their siblings by name (``from bench_common import ...``), as they do when run.

``start_standin`` starts ``standin_server.py`` processes for a test and stops them after it.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
STANDIN = Path(__file__).with_name("standin_server.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def start_standin():
    """``start_standin(*args)``: a ``standin_server.py`` with these arguments, up (``/health`` answers);
    returns its base URL. Every stand-in started is stopped when the test ends."""
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> str:
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, str(STANDIN), "--port", str(port), *args])
        procs.append(proc)
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                return base
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "stand-in server did not start"
                time.sleep(0.1)

    yield start
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
