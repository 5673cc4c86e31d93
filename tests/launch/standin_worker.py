"""A stand-in for an SGLang PD server, speaking just what ``launch.router`` and ``launch.cluster`` use.

It records every generation request it gets (path, bootstrap fields, prompt) and answers like
SGLang in its role: a prefill returns input logprobs, a decode returns text naming itself and the
room, streamed as SSE events when asked. ``POST /control`` changes its behaviour (unhealthy,
delay, hang, an error status, exit). Run ``python standin_worker.py --role ROLE --port 0`` (it
prints its port), or through ``standin_prefill`` / ``standin_decode`` with a launcher's arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys

from aiohttp import web

PREFILL_LOGPROBS = [[-0.5, 11, None], [-0.25, 12, None], [-0.125, 13, None]]
DECODE_LOGPROBS = [[-1.0, 14, None]]


class Standin:
    def __init__(self, role: str, port: int, argv: list[str]):
        self.role = role
        self.port = port
        self.argv = argv
        self.records: list[dict] = []
        self.state = {"healthy": not os.environ.get("STANDIN_UNHEALTHY"), "delay": 0.0, "hang": False, "status": 200, "gap": 0.0, "exit": None}
        self.child = None
        if os.environ.get("STANDIN_CHILD"):
            # A grandchild of the cluster, to check that stopping reaches a worker's children too.
            self.child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])

    def answer(self, body: dict, room, i: int = 0) -> dict:
        if self.role == "prefill":
            return {"text": "", "meta_info": {"input_token_logprobs": PREFILL_LOGPROBS, "worker": self.port}}
        return {"text": f"decode {self.port} room {room} item {i}",
                "meta_info": {"input_token_logprobs": DECODE_LOGPROBS, "worker": self.port, "room": room}}

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.records.append({
            "path": request.path,
            "bootstrap_host": body.get("bootstrap_host"),
            "bootstrap_port": body.get("bootstrap_port"),
            "bootstrap_room": body.get("bootstrap_room"),
            "prompt": body.get("text", body.get("input_ids", body.get("prompt", body.get("messages")))),
            "stream": bool(body.get("stream")),
        })
        if self.state["hang"]:
            await asyncio.sleep(3600)
        await asyncio.sleep(self.state["delay"])
        if self.state["status"] != 200:
            return web.json_response({"error": {"message": f"standin {self.role} says {self.state['status']}"}},
                                     status=self.state["status"])
        rooms = body.get("bootstrap_room")
        if not body.get("stream"):
            if isinstance(rooms, list):
                return web.json_response([self.answer(body, r, i) for i, r in enumerate(rooms)])
            return web.json_response(self.answer(body, rooms))
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        events = 1 if self.role == "prefill" else 3
        for k in range(events):
            event = self.answer(body, rooms)
            event["text"] += f" part {k}"
            await out.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            await asyncio.sleep(self.state["gap"])
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(status=200 if self.state["healthy"] else 503)

    async def control(self, request: web.Request) -> web.Response:
        self.state.update(await request.json())
        if self.state["exit"] is not None:
            print(f"standin {self.role}: exiting with {self.state['exit']} as asked", flush=True)
            asyncio.get_running_loop().call_later(0.1, os._exit, int(self.state["exit"]))
        return web.json_response(self.state)

    async def records_(self, _: web.Request) -> web.Response:
        return web.json_response(self.records)

    async def info(self, _: web.Request) -> web.Response:
        return web.json_response({
            "role": self.role, "pid": os.getpid(), "argv": self.argv,
            "child_pid": self.child.pid if self.child else None,
            "env": {k: os.environ.get(k) for k in ("SGLANG_HOST_IP", "KVTIER_CONFIG", "KVTIER_METRICS_PORT")},
        })

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": f"standin-{self.role}"}]})

    def app(self) -> web.Application:
        app = web.Application()
        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            app.router.add_post(path, self.generate)
        app.router.add_get("/health", self.health)
        app.router.add_post("/control", self.control)
        app.router.add_get("/records", self.records_)
        app.router.add_get("/info", self.info)
        app.router.add_get("/v1/models", self.models)
        return app


async def serve(standin: Standin, host: str) -> None:
    runner = web.AppRunner(standin.app())
    await runner.setup()
    site = web.TCPSite(runner, host, standin.port)
    await site.start()
    standin.port = site._server.sockets[0].getsockname()[1]
    print(f"standin {standin.role} listening on {standin.port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    if standin.child:
        standin.child.terminate()
        standin.child.wait()
    await runner.cleanup()


def main(role: str | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", default=role)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    args, _ = ap.parse_known_args()
    asyncio.run(serve(Standin(args.role, args.port, sys.argv[1:]), args.host))


if __name__ == "__main__":
    main()
