"""A transport endpoint in its own process, driven by JSON lines on stdin, answering on stdout.

Started by ``conftest.PeerProcess``: ``python peer.py '{"regions": {"kv": 4096, "g": [4096, "cuda:0"]},
"backend": "zmq"}'`` registers one zeroed region per entry (bytes, or bytes and device), opens that kind
of transport, prints its descriptor, then runs one command per line (the ``op`` branches of ``main``),
printing one JSON reply each.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch

from kvtier.transfer.backends import open_transport
from kvtier.transfer.cuda_ipc import CudaIpcTransport


def pattern(seed: int, nbytes: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest()


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
    args = json.loads(sys.argv[1])
    baseline = memory()
    regions = {}
    for name, spec in args["regions"].items():
        nbytes, device = spec if isinstance(spec, list) else (spec, "cpu")
        regions[name] = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    backend = args.get("backend", "zmq")
    # Built directly: open_transport refuses cuda_ipc without CUDA, and its host regions are tested anyway.
    transport = CudaIpcTransport() if backend == "cuda_ipc" else open_transport(backend)
    peers: dict[str, str] = {}

    def reply(obj: object) -> None:
        print(json.dumps(obj), flush=True)

    def range_digest(name: str, offset: int, nbytes: int) -> str:
        return digest(regions[name][offset : offset + nbytes])

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
        elif op == "digests":  # of the ranges asked for, else of every region by name
            if "ranges" in cmd:
                reply([range_digest(*r) for r in cmd["ranges"]])
            else:
                reply({name: digest(t) for name, t in regions.items()})
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
                data = pattern(seed, cmd["nbytes"]).to(cmd.get("device", "cpu"))
                op = (data, cmd["region"], seed * cmd["nbytes"])
                transport.write(peers["parent"], [op], timeout_s=10)
                transport.notify(peers["parent"], str(seed).encode(), timeout_s=10)
            reply("ok")
        elif op == "write_forever":
            data = pattern(1, cmd["nbytes"]).to(cmd.get("device", "cpu"))
            reply("writing")
            while True:
                transport.write(peers["parent"], [(data, cmd["region"], 0)], timeout_s=60)
        elif op == "read_forever":
            dest = torch.empty(cmd["nbytes"], dtype=torch.uint8)
            reply("reading")
            while True:
                transport.read(peers["parent"], [(cmd["region"], 0, dest)], timeout_s=60)
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
