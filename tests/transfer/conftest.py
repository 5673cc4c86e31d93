"""Fixtures: endpoints in other processes (``peer.py``), payload patterns, a thread-leak check."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest
import zmq.utils.garbage

from kvtier.transfer.backends import open_transport
from kvtier.transfer.base import Transport

PEER_SCRIPT = Path(__file__).with_name("peer.py")
_spec = importlib.util.spec_from_file_location("kvtier_transfer_test_peer", PEER_SCRIPT)
peer_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer_module)


class PeerProcess:
    """A test peer script in a child process, driven by JSON lines: its first line is its transport's
    descriptor; ``call`` sends one command and returns its reply."""

    def __init__(self, script: Path, arg: Any):
        self.proc = subprocess.Popen(
            [sys.executable, str(script), json.dumps(arg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.descriptor: dict[str, Any] = self.reply()

    def reply(self) -> Any:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer process exited with {self.proc.wait()}; its stderr is above")
        return json.loads(line)

    def send(self, **cmd: Any) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def call(self, **cmd: Any) -> Any:
        self.send(**cmd)
        return self.reply()

    def pause(self) -> None:
        """SIGSTOP: the process hangs with its sockets open, as a wedged peer does. Returns once the
        kernel shows it stopped: a peer still running on another core for a moment after the signal
        could otherwise answer the next request (seen once in CI)."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        proc = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 5
        while proc.status() != psutil.STATUS_STOPPED:
            if time.monotonic() > deadline:
                raise RuntimeError(f"peer {self.proc.pid} did not stop within 5 s of SIGSTOP")
            time.sleep(0.001)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@contextmanager
def _spawner(start: Callable[..., PeerProcess]) -> Iterator[Callable[..., PeerProcess]]:
    started: list[PeerProcess] = []

    def spawn(*args: Any) -> PeerProcess:
        started.append(start(*args))
        return started[-1]

    yield spawn
    for p in started:
        p.kill()
        p.proc.stdin.close()
        p.proc.stdout.close()


@pytest.fixture
def spawn_peer() -> Iterator[Callable[..., PeerProcess]]:
    """``spawn_peer(regions, backend="zmq")``: ``peer.py`` with host regions of those sizes."""
    with _spawner(lambda regions, backend="zmq": PeerProcess(PEER_SCRIPT, {"regions": regions, "backend": backend})) as spawn:
        yield spawn


@pytest.fixture
def spawn_ipc() -> Iterator[Callable[..., PeerProcess]]:
    """``spawn_ipc({name: (bytes, device)})``: ``peer.py`` with a CudaIpcTransport over those regions."""
    with _spawner(lambda regions: PeerProcess(PEER_SCRIPT, {"regions": regions, "backend": "cuda_ipc"})) as spawn:
        yield spawn


@pytest.fixture
def make(backend: str) -> Iterator[Callable[[], Transport]]:
    """Opens transports of the test module's ``backend``; closes any the test left open."""
    opened: list[Transport] = []

    def open_one() -> Transport:
        opened.append(open_transport(backend))
        return opened[-1]

    yield open_one
    for t in opened:
        t.close()


@pytest.fixture
def pair(make: Callable[[], Transport]) -> Iterator[tuple[Transport, Transport]]:
    with make() as sender, make() as receiver:
        yield sender, receiver


@pytest.fixture
def pattern():
    return peer_module.pattern


@pytest.fixture
def digest():
    return peer_module.digest


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    """Every test must stop the threads it started (pyzmq's one process-wide collector aside)."""
    before = set(threading.enumerate())
    yield
    left = [
        t
        for t in threading.enumerate()
        if t not in before
        and t.is_alive()
        and not isinstance(t, zmq.utils.garbage.GarbageCollectorThread)
    ]
    assert not left, f"threads left running: {left}"
