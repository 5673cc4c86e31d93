"""Choosing a transport backend by name: ``open_transport("auto" | "zmq" | "cuda_ipc" | "ucx")``.

``auto`` takes the fastest backend this process can run: CUDA IPC when a GPU is visible (it
moves GPU regions directly and host regions over ZMQ), else ZMQ/TCP. Both speak the same ZMQ
control protocol, so a ``cuda_ipc`` endpoint also talks to a ``zmq`` one (host regions only).
``ucx`` (host regions over UCX, needs the ``ucx`` extra) is only chosen by name: it does not speak
that ZMQ protocol, so ``auto`` keeps every endpoint of a cluster able to talk to every other. Over
loopback on a shared 2-core host it moved 1.3-4.9 GB/s against ZMQ's 1.3-3.8, run to run
(``benchmarks/results/transfer_loopback_ucx.json``).
"""

from __future__ import annotations

from typing import Callable

import torch

from kvtier.transfer.base import TransferError, Transport


def _zmq(host: str, port: int) -> Transport:
    from kvtier.transfer.zmq_transport import ZmqTransport

    return ZmqTransport(host, port)


def _cuda_ipc(host: str, port: int) -> Transport:
    if not torch.cuda.is_available():
        raise TransferError(
            "transport kind 'cuda_ipc' needs a GPU, and torch.cuda.is_available() is False in "
            "this process; use kind 'zmq' (or 'auto', which picks it here)"
        )
    from kvtier.transfer.cuda_ipc import CudaIpcTransport

    return CudaIpcTransport(host, port)


def _ucx(host: str, port: int) -> Transport:
    from kvtier.transfer.ucx_transport import UcxTransport

    return UcxTransport(host, port)


KINDS: dict[str, Callable[[str, int], Transport]] = {
    "zmq": _zmq,
    "cuda_ipc": _cuda_ipc,
    "ucx": _ucx,
}
"""Transport constructors by kind, each taking (host, port)."""


def open_transport(kind: str = "auto", host: str = "127.0.0.1", port: int = 0) -> Transport:
    """A new transport of ``kind`` bound to ``host:port`` (port 0: the OS picks one)."""
    if kind == "auto":
        kind = "cuda_ipc" if torch.cuda.is_available() else "zmq"
    make = KINDS.get(kind)
    if make is None:
        raise TransferError(
            f"unknown transport kind {kind!r}; choose one of {['auto', *KINDS]}"
        )
    return make(host, port)
