"""The ZMQ transport over real loopback sockets and processes: the shared transport contract
(``contract.py``) plus what is particular to ZMQ (batches travel in pieces)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kvtier.transfer.zmq_transport import PIECE_BYTES

_spec = importlib.util.spec_from_file_location("kvtier_transport_contract", Path(__file__).with_name("contract.py"))
_contract = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_contract)
globals().update({k: v for k, v in vars(_contract).items() if k.startswith("test_")})


@pytest.fixture
def backend() -> str:
    return "zmq"


def test_ranges_larger_than_a_piece_are_split_and_reassembled(pair, pattern):
    sender, receiver = pair
    region = torch.zeros(3 * PIECE_BYTES + 8, dtype=torch.uint8)
    receiver.register("kv", region)
    peer = sender.connect(receiver.descriptor())
    data = pattern(7, 2 * PIECE_BYTES + 5)
    sender.write(peer, [(data, "kv", PIECE_BYTES - 3)], timeout_s=10)
    assert torch.equal(region[PIECE_BYTES - 3 : 3 * PIECE_BYTES + 2], data)
    back = torch.empty(data.numel(), dtype=torch.uint8)
    sender.read(peer, [("kv", PIECE_BYTES - 3, back)], timeout_s=10)
    assert torch.equal(back, data)
