"""A transport endpoint in its own process, driven by JSON lines on stdin, answering on stdout.

Started by ``conftest.PeerProcess``: ``python peer.py '{"regions": {"kv": 4096}, "backend": "zmq"}'``
opens that kind of transport (``backends.open_transport``), prints its descriptor, then runs one command per
line (the ``op`` branches of ``main``), printing one JSON reply each.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch

from kvtier.transfer.backends import open_transport


def pattern(seed: int, nbytes: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def main() -> None:
    args = json.loads(sys.argv[1])
    regions = {name: torch.zeros(n, dtype=torch.uint8) for name, n in args["regions"].items()}
    transport = open_transport(args.get("backend", "zmq"))
    peers: dict[str, str] = {}

    def reply(obj: object) -> None:
        print(json.dumps(obj), flush=True)

    def digests() -> dict[str, str]:
        return {name: digest(t) for name, t in regions.items()}

    for name, t in regions.items():
        transport.register(name, t)
    reply(transport.descriptor())
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "connect":
            peers["parent"] = transport.connect(cmd["descriptor"])
            reply("ok")
        elif op == "digests":
            reply(digests())
        elif op == "await_notifications":
            # Each message names a range, hashed the moment it arrives: the data must be there.
            seen = []
            for _ in range(cmd["count"]):
                note = transport.recv_notification(cmd["timeout_s"])
                name, offset, nbytes = json.loads(note.message)
                seen.append(digest(regions[name][offset : offset + nbytes]))
            reply(seen)
        elif op == "write_then_notify":
            for seed in range(cmd["rounds"]):
                data = pattern(seed, cmd["nbytes"])
                op = (data, cmd["region"], seed * cmd["nbytes"])
                transport.write(peers["parent"], [op], timeout_s=10)
                transport.notify(peers["parent"], str(seed).encode(), timeout_s=10)
            reply("ok")
        elif op == "write_forever":
            data = pattern(1, cmd["nbytes"])
            reply("writing")
            while True:
                transport.write(peers["parent"], [(data, cmd["region"], 0)], timeout_s=60)
        elif op == "read_forever":
            dest = torch.empty(cmd["nbytes"], dtype=torch.uint8)
            reply("reading")
            while True:
                transport.read(peers["parent"], [(cmd["region"], 0, dest)], timeout_s=60)
        elif op == "close":
            transport.close()
            reply("closed")
            return


if __name__ == "__main__":
    main()
