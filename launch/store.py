"""``python -m launch.store``: the shared remote tier as a server process on the transfer layer.

Serves one ``TierStore`` (CPU tier, optionally over a disk tier that makes it persistent) to kvtier
clients configured with ``remote_url: kvtier://HOST:PORT?token=TOKEN``. Chunks of every model whose
chunk size matches can share it (chunk keys never collide across models). Stops cleanly on
SIGINT/SIGTERM: what clients still hold is released and the CPU tier is written to disk.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from kvtier.sglang_ext.chunk_keys import KVNamespace
from kvtier.sglang_ext.config import load_config
from kvtier.sglang_ext.tiers.store import TierStore
from kvtier.sglang_ext.tiers.store_server import StoreServer
from kvtier.transfer.zmq_transport import ZmqTransport


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m launch.store", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=9500)
    ap.add_argument("--token", default=os.environ.get("KVTIER_STORE_TOKEN", ""),
                    help="clients must present it (default: $KVTIER_STORE_TOKEN); required")
    ap.add_argument("--chunk-bytes", type=int, required=True,
                    help="bytes per chunk of the models served, e.g. 33554432 for Llama-3-8B with 256-token chunks")
    ap.add_argument("--cpu-size-gb", type=float, default=8.0)
    ap.add_argument("--disk-path", default="", help="directory of a disk tier that keeps chunks across restarts")
    ap.add_argument("--disk-size-gb", type=float, default=0.0)
    ap.add_argument("--metrics-port", type=int, default=0, help="HTTP port of Prometheus /metrics and a JSON /health; 0 disables")
    args = ap.parse_args(argv)
    if not args.token:
        ap.error("--token (or KVTIER_STORE_TOKEN) is required: without it anyone on the network could read the KV")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(env={}, cpu_size_gb=args.cpu_size_gb, disk_path=args.disk_path,
                      disk_size_gb=args.disk_size_gb, metrics_port=args.metrics_port)
    # The server's own namespace only names its slab file; clients' chunk keys carry theirs.
    ns = KVNamespace("kvtier-store", "bytes", f"chunk{args.chunk_bytes}", 1, 0, 1, 1)
    store = TierStore(cfg, ns, args.chunk_bytes)
    server = StoreServer(store, ZmqTransport(host=args.host, port=args.port), args.token)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    print(f"kvtier store: listening on {server.transport.descriptor()['address']}; "
          f"clients: remote_url: kvtier://{args.host}:{args.port}?token=...", flush=True)
    stop.wait()
    server.close()
    print("kvtier store: stopped", flush=True)


if __name__ == "__main__":
    main()
