"""A ``CudaIpcTransport`` endpoint in its own process, driven by JSON lines on stdin.

Started by the ``spawn_ipc`` fixture (conftest.py): ``python ipc_peer.py '{"kv": [4096, "cuda:0"]}'`` registers
one region per entry (size in bytes, device), prints its descriptor, then runs one command per
line (the ``op`` branches of ``main``), printing one JSON reply each.
"""

from __future__ import annotations

import json
import sys

import torch
from peer import digest, pattern  # this script's own folder is first on sys.path

from kvtier.transfer.cuda_ipc import CudaIpcTransport


def memory() -> dict[str, int]:
    """Bytes the caching allocator holds over all GPUs (0 without CUDA)."""
    if not torch.cuda.is_available():
        return {"allocated": 0, "reserved": 0}
    devices = range(torch.cuda.device_count())
    return {
        "allocated": sum(torch.cuda.memory_allocated(d) for d in devices),
        "reserved": sum(torch.cuda.memory_reserved(d) for d in devices),
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    baseline = memory()
    regions = {
        name: torch.zeros(n, dtype=torch.uint8, device=device) for name, (n, device) in spec.items()
    }
    transport = CudaIpcTransport()
    peers: dict[str, str] = {}

    def reply(obj: object) -> None:
        print(json.dumps(obj), flush=True)

    def range_digest(name: str, offset: int, nbytes: int) -> str:
        return digest(regions[name][offset : offset + nbytes].cpu())

    for name in regions:  # no loop variable may keep a region alive after "deregister"
        transport.register(name, regions[name])
    reply(transport.descriptor())
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "connect":
            peers["parent"] = transport.connect(cmd["descriptor"])
            reply("ok")
        elif op == "descriptor":
            reply(transport.descriptor())
        elif op == "digests":
            ranges = cmd.get("ranges") or [[name, 0, t.numel()] for name, t in regions.items()]
            reply([range_digest(*r) for r in ranges])
        elif op == "fill":
            regions[cmd["name"]].copy_(pattern(cmd["seed"], regions[cmd["name"]].numel()))
            reply("ok")
        elif op == "await_notifications":
            # Each message names a range, hashed the moment it arrives: the data must be there.
            seen = []
            for _ in range(cmd["count"]):
                note = transport.recv_notification(cmd["timeout_s"])
                seen.append(range_digest(*json.loads(note.message)))
            reply(seen)
        elif op == "write_then_notify":
            for seed in range(cmd["rounds"]):
                data = pattern(seed, cmd["nbytes"]).to(cmd["device"])
                op = (data, cmd["region"], seed * cmd["nbytes"])
                transport.write(peers["parent"], [op], timeout_s=10)
                transport.notify(peers["parent"], str(seed).encode(), timeout_s=10)
            reply("ok")
        elif op == "write_forever":
            data = pattern(1, cmd["nbytes"]).to(cmd["device"])
            reply("writing")
            while True:
                transport.write(peers["parent"], [(data, cmd["region"], 0)], timeout_s=60)
        elif op == "deregister":
            transport.deregister(cmd["name"])
            if cmd.get("free"):
                del regions[cmd["name"]]
                torch.cuda.empty_cache()
            reply("ok")
        elif op == "memory":
            reply({"baseline": baseline, "now": memory()})
        elif op == "close":
            transport.close()
            reply("closed")
            return


if __name__ == "__main__":
    main()
