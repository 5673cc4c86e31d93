"""The shared transport contract (``contract.py``) for CudaIpcTransport's host-memory path.

The endpoint under test is always a ``CudaIpcTransport``; its peer processes open ``cuda_ipc``
where CUDA is available and plain ``zmq`` elsewhere, which speaks the same protocol, so most of
the contract runs on any machine (the two tests where a peer connects to us need CUDA). GPU
regions have their own tests in ``test_cuda_ipc.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from kvtier.transfer.cuda_ipc import CudaIpcTransport

_spec = importlib.util.spec_from_file_location("kvtier_transport_contract", Path(__file__).with_name("contract.py"))
_contract = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_contract)
globals().update({k: v for k, v in vars(_contract).items() if k.startswith("test_")})

# In these the peer process connects to us; a plain zmq peer refuses a cuda_ipc descriptor.
for _name in ("test_notification_arrives_only_after_the_data_it_follows",
              "test_peer_killed_mid_transfer_leaves_the_survivor_serving"):
    globals()[_name] = pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs cuda_ipc peer processes, which need CUDA"
    )(globals()[_name])


@pytest.fixture
def backend() -> str:
    """The kind the peer processes open."""
    return "cuda_ipc" if torch.cuda.is_available() else "zmq"


@pytest.fixture
def make() -> Iterator[Callable[[], CudaIpcTransport]]:
    opened: list[CudaIpcTransport] = []

    def open_one() -> CudaIpcTransport:
        opened.append(CudaIpcTransport())
        return opened[-1]

    yield open_one
    for t in opened:
        t.close()
