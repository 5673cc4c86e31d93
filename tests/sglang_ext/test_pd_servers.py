"""kvtier PD between real SGLang 0.5.17 servers on one GPU (skipped without CUDA).

A prefill and a decode server with ``--disaggregation-transfer-backend kvtier`` (default
``pd_transport: auto``) answer greedy requests, sent as a PD router sends them (both servers at
once, same bootstrap room), with the same tokens as a plain server over the same dummy weights.
A second decode server with another ``--page-size`` gets its request failed with kvtier's message
on both sides, and every server keeps serving.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

_spec = importlib.util.spec_from_file_location("kvtier_test_sglang_objects_pd",
                                               Path(__file__).with_name("sglang_objects.py"))
sglang_objects = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sglang_objects)

HOST = "127.0.0.1"
BASE_ARGS = ["--load-format", "dummy", "--skip-tokenizer-init", "--attention-backend", "triton", "--sampling-backend",
             "pytorch", "--disable-cuda-graph", "--grammar-backend", "none", "--enable-deterministic-inference",
             "--mem-fraction-static", "0.12", "--host", HOST]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, log: Path, *args: str):
        self.port = free_port()
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
        env.update(SGLANG_HOST_IP=HOST, KVTIER_CONFIG="")
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "sglang.launch_server", "--model-path", model,
                                          "--port", str(self.port), *BASE_ARGS, *args],
                                         stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout_s: float = 400) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(f"http://{HOST}:{self.port}/health", timeout=2)
                return
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        raise TimeoutError(f"server on {self.port} not healthy:\n{self.log.read_text()[-4000:]}")

    def generate(self, body: dict, out: dict, key: str) -> None:
        req = urllib.request.Request(f"http://{HOST}:{self.port}/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                out[key] = (r.status, json.loads(r.read()))
        except urllib.error.HTTPError as e:
            out[key] = (e.code, e.read().decode(errors="replace"))

    def healthy(self) -> bool:
        try:
            return urllib.request.urlopen(f"http://{HOST}:{self.port}/health", timeout=5).status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def pd_generate(prefill: Server, decode: Server, bootstrap_port: int, ids: list[int], room: int, n: int) -> dict:
    """What a PD router does: the same body, plus the bootstrap fields, to both servers at once."""
    body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": n},
            "bootstrap_host": HOST, "bootstrap_port": bootstrap_port, "bootstrap_room": room}
    out: dict = {}
    threads = [threading.Thread(target=s.generate, args=(body, out, k)) for s, k in ((prefill, "p"), (decode, "d"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.timeout(580)  # four servers start one after another on one GPU
def test_pd_servers_match_a_single_server_and_refuse_a_mismatched_decode(tmp_path):
    model = sglang_objects.tiny_llama(str(tmp_path / "model"))
    bootstrap = free_port()
    pd_args = ["--disaggregation-transfer-backend", "kvtier", "--disaggregation-bootstrap-port", str(bootstrap)]
    plan = {
        "reference": (),
        "prefill": ("--disaggregation-mode", "prefill", *pd_args),
        "decode": ("--disaggregation-mode", "decode", *pd_args),
        "decode_page16": ("--disaggregation-mode", "decode", "--page-size", "16", *pd_args),
    }
    servers: dict[str, Server] = {}
    try:
        # One at a time: SGLang sizes its pool from the GPU memory that other processes leave free
        # while it loads, which servers allocating at the same moment make unpredictable.
        for name, args in plan.items():
            servers[name] = Server(model, tmp_path / f"{name}.log", *args)
            servers[name].wait_ready()
        prefill, decode, reference = servers["prefill"], servers["decode"], servers["reference"]
        gen = torch.Generator().manual_seed(0)
        for i, length in enumerate((5, 300, 1500)):
            ids = torch.randint(10, 900, (length,), generator=gen).tolist()
            ref: dict = {}
            body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 12}}
            reference.generate(body, ref, "r")
            got = pd_generate(prefill, decode, bootstrap, ids, room=1000 + i, n=12)
            assert got["d"][0] == 200, got
            assert got["d"][1]["output_ids"] == ref["r"][1]["output_ids"], (length, got["d"][1], ref["r"][1])

        bad = pd_generate(prefill, servers["decode_page16"], bootstrap, list(range(10, 60)), room=77, n=4)
        for side, says in (("d", "has page_size=1, this decode has 16"), ("p", "has page_size=16, this prefill has 1")):
            status, answer = bad[side]
            assert status != 200 or "abort" in str(answer).lower(), bad  # SGLang aborts it with HTTP 500
            assert says in str(answer), bad
        assert all(s.healthy() for s in servers.values())
        again = pd_generate(prefill, decode, bootstrap, list(range(10, 60)), room=78, n=4)
        assert again["d"][0] == 200 and len(again["d"][1]["output_ids"]) == 4, again
    finally:
        for s in servers.values():
            s.stop()
