"""A stand-in for SGLang's streaming ``/generate`` (aiohttp), run as its own process by the client tests.

It answers ``input_ids`` requests the way SGLang 0.5.17 does with ``--skip-tokenizer-init``: without
``stream`` one JSON object (its ``meta_info`` with the request's ``id`` and ``e2e_latency``, and with
``log_stages`` the ``ReqTimeStats`` line SGLang logs under ``--enable-request-time-stats-logging`` on stderr,
for streamed requests too, under the body's ``rid`` when given); with ``stream: true`` ``data: {json}`` events
with cumulative ``output_ids`` and a ``meta_info`` that
carries ``prompt_tokens``, ``completion_tokens``, ``cached_tokens`` and ``cached_tokens_details``,
then ``data: [DONE]``. Its "cache" is every prompt seen so far: a request's cached tokens are its
longest common prefix with an earlier prompt, reported as GPU (``device``) tokens. ``GET /stats``
returns the most requests it ever had in flight at once and the request ids (``rid``) sent with streamed requests. Each request is logged on stderr as
SGLang's scheduler logs a prefill batch (one request per batch here). ``--mode error`` streams
SGLang's error event, ``--mode hang`` sends the headers and then nothing. ``GET /health`` answers 200 once up.
``POST /start_profile`` and ``/stop_profile`` are recorded in ``/stats`` and answered with the path,
the requests so far, the body's ``profile_prefix`` and its ``with_stack`` when given.
With a ``TierMetrics`` (the ``shim`` launcher passes one when ``KVTIER_METRICS_PORT`` is set) every
request counts its cached whole 256-token chunks as CPU-tier hits and the rest as misses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid

from aiohttp import web

from kvtier.sglang_ext.metrics import TierMetrics

CHUNK = 256


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def make_app(mode: str, ttft_s: float, token_s: float, metrics: TierMetrics | None = None,
             log_stages: bool = False) -> web.Application:
    seen: list[list[int]] = []
    state = {"in_flight": 0, "max_in_flight": 0, "requests": 0, "rids": []}

    def log_time_stats(rid: str, ids: list[int], cached: int, n_out: int, entry: float) -> None:
        if log_stages:
            print(f"ReqTimeStats(rid={rid}, input_len={len(ids)}, cached_input_len={cached}, output_len={n_out}, "
                  f"attempts=1, type=unified): queue_duration=0.50ms, forward_duration={ttft_s * 1e3:.2f}ms, "
                  f"entry_time={entry:.3f}", file=sys.stderr, flush=True)

    async def generate(request: web.Request) -> web.StreamResponse:
        entry = time.time()
        body = await request.json()
        rid = body.get("rid") or uuid.uuid4().hex
        ids = body["input_ids"]
        n_out = body["sampling_params"]["max_new_tokens"]
        cached = max((common_prefix(ids, s) for s in seen), default=0)
        seen.append(ids)
        # SGLang's scheduler logs each prefill batch; the stand-in runs every request as its own.
        print(f"Prefill batch, #new-seq: 1, #new-token: {len(ids) - cached}, #cached-token: {cached}, token usage: 0.00",
              file=sys.stderr, flush=True)
        if metrics is not None:
            metrics.hits.labels("cpu").inc(cached // CHUNK)
            metrics.misses.inc(len(ids) // CHUNK - cached // CHUNK)
        state["requests"] += 1
        if not body.get("stream"):  # one JSON answer with every output id, as SGLang without streaming
            start = time.perf_counter()
            await asyncio.sleep(ttft_s + token_s * max(n_out - 1, 0))
            meta = {"id": rid, "prompt_tokens": len(ids), "completion_tokens": n_out, "cached_tokens": cached,
                    "e2e_latency": time.perf_counter() - start}
            log_time_stats(rid, ids, cached, n_out, entry)
            return web.json_response({"text": "", "output_ids": list(range(n_out)), "meta_info": meta})
        if "rid" in body:
            state["rids"].append(body["rid"])
        state["in_flight"] += 1
        state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            if mode == "hang":
                await asyncio.sleep(3600)
            await asyncio.sleep(ttft_s)
            if mode == "error":
                await resp.write(b'data: {"error": {"message": "prompt too long", "code": 400}}\n\n')
            else:
                for i in range(n_out):
                    meta = {"prompt_tokens": len(ids), "completion_tokens": i + 1, "cached_tokens": cached}
                    if cached:
                        meta["cached_tokens_details"] = {"device": cached, "host": 0}
                    out = {"text": "", "output_ids": list(range(i + 1)), "meta_info": meta}
                    await resp.write(b"data: " + json.dumps(out).encode() + b"\n\n")
                    await asyncio.sleep(token_s)
            await resp.write(b"data: [DONE]\n\n")
            log_time_stats(rid, ids, cached, n_out, entry)
        finally:
            state["in_flight"] -= 1
        return resp

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(state)

    async def profile(request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        state.setdefault("profile_calls", []).append([request.path, body, state["requests"]])
        stack = f", stack {body['with_stack']}" if "with_stack" in body else ""
        return web.Response(text=f"{request.path} after {state['requests']} requests, prefix {body.get('profile_prefix')}"
                                 f"{stack}")

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/generate", generate)
    app.router.add_get("/stats", stats)
    app.router.add_post("/start_profile", profile)
    app.router.add_post("/stop_profile", profile)
    app.router.add_get("/health", health)
    return app


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=("ok", "error", "hang"), default="ok")
    ap.add_argument("--ttft-s", type=float, default=0.05)
    ap.add_argument("--token-s", type=float, default=0.002)
    a = ap.parse_args()
    web.run_app(make_app(a.mode, a.ttft_s, a.token_s), host="127.0.0.1", port=a.port, print=None, shutdown_timeout=0.5)
