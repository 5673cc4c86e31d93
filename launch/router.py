"""``python -m launch.router``: an HTTP router in front of SGLang prefill and decode workers (PD).

For each request it picks a prefill and a decode worker, adds ``bootstrap_host``,
``bootstrap_port`` and a fresh nonzero ``bootstrap_room`` (one per item of a batch) to the JSON
body, POSTs it to both at once and answers with the decode worker's response, streamed or not,
with the prefill's input logprobs put in front of the decode's (as sglang-router's mini_lb does).
Serves ``/generate``, ``/v1/completions`` and ``/v1/chat/completions``. Workers are checked on
``/health`` at an interval; an unhealthy one gets no requests until it answers again. A failed or
unreachable worker gives the client a JSON error (502 bad gateway, 503 no healthy worker, 504
timeout), never a hang. Prefill choice: ``round_robin``, or ``cache_aware`` (the worker that most
recently served the longest prefix of the prompt, else the least loaded); decode: least loaded.
``/workers`` shows the workers' state and ``/metrics`` the router's Prometheus counters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import random
import signal
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Iterable, Iterator, Optional, TypeVar
from urllib.parse import urlparse

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvtier.launch.server import DEFAULT_BOOTSTRAP_PORT

logger = logging.getLogger("kvtier.router")
T = TypeVar("T")

ENDPOINTS = ("generate", "v1/completions", "v1/chat/completions")
POLICIES = ("round_robin", "cache_aware")
# SGLang gives the items of a batch sent with one scalar room the rooms room+i, and a room must
# fit in int64; leave that headroom. Room 0 never passes decode's metadata check.
MAX_ROOM = 2**63 - 1 - 2**20
LOGPROB_KEYS = ("input_token_logprobs", "input_top_logprobs", "input_token_ids_logprobs")
STREAM_READ_BYTES = 64 * 1024


def new_room() -> int:
    """A bootstrap room: random, nonzero, with room for SGLang's per-item offsets."""
    return random.randint(1, MAX_ROOM)


@dataclass
class Worker:
    """One SGLang server as the router sees it."""

    role: str
    url: str
    bootstrap_port: Optional[int] = None
    healthy: bool = True
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    failed_checks: int = 0
    last_error: str = ""
    last_check: float = 0.0

    @property
    def host(self) -> str:
        """The URL's host as a bootstrap address (IPv6 in brackets)."""
        host = urlparse(self.url).hostname or ""
        try:
            return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
        except ValueError:
            return host

    def state(self) -> dict[str, Any]:
        return {
            "role": self.role, "url": self.url, "bootstrap_port": self.bootstrap_port,
            "healthy": self.healthy, "in_flight": self.in_flight, "requests": self.requests,
            "failures": self.failures, "last_error": self.last_error, "last_check": self.last_check,
        }


class PrefixIndex:
    """Which worker most recently served each prompt prefix, approximately and in bounded memory.

    A prompt is cut into blocks (``block`` token ids, or ``4 * block`` characters of text, about
    as many tokens) and block i is named by a hash chained over blocks 0..i, so one key stands for
    a whole prefix. The index maps keys to the worker that last served them, least recently used
    keys dropped beyond ``capacity``. Only whole blocks count.
    """

    def __init__(self, block: int = 64, capacity: int = 100_000):
        if block < 1 or capacity < 1:
            raise ValueError("prefix block and capacity must be >= 1")
        self.block = block
        self.capacity = capacity
        self._owner: OrderedDict[bytes, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def keys(self, prompt: Any) -> list[bytes]:
        """Chained block keys of a prompt: a str, a list of token ids, or anything JSON (chat)."""
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            data, step, tag = array("q", prompt).tobytes(), self.block * 8, b"t"
        else:
            text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)
            data, step, tag = text.encode(), self.block * 4, b"s"
        keys, prev = [], tag
        for start in range(0, len(data) - step + 1, step):
            prev = hashlib.blake2b(prev + data[start:start + step], digest_size=16).digest()
            keys.append(prev)
        return keys

    def match(self, keys: list[bytes], eligible: Iterable[str]) -> tuple[Optional[str], int]:
        """The eligible worker that served the longest of these prefixes, and its length in blocks."""
        allowed = set(eligible)
        for n in range(len(keys), 0, -1):
            owner = self._owner.get(keys[n - 1])
            if owner in allowed:
                return owner, n
        return None, 0

    def record(self, keys: list[bytes], worker: str) -> None:
        """Note that ``worker`` now holds these prefixes."""
        for key in keys:
            self._owner[key] = worker
            self._owner.move_to_end(key)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)


def _prompt(endpoint: str, body: dict[str, Any]) -> Any:
    """A request's prompt field: chat messages, a completion's prompt, or /generate's text else input_ids."""
    if endpoint == "v1/chat/completions":
        return body.get("messages")
    if endpoint == "v1/completions":
        return body.get("prompt")
    return body.get("text") if body.get("text") is not None else body.get("input_ids")


def _is_batch(value: Any) -> bool:
    """SGLang's rule: a list of prompts (strings or token lists) is a batch; chat messages never are."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], (str, list))


def routing_prompt(endpoint: str, body: dict[str, Any]) -> Any:
    """The part of a request that decides prefix reuse (the first item of a batch)."""
    value = _prompt(endpoint, body)
    return value[0] if _is_batch(value) else value


def batch_size(endpoint: str, body: dict[str, Any]) -> Optional[int]:
    """Items in a batch request, or None for a single prompt."""
    value = _prompt(endpoint, body)
    return len(value) if _is_batch(value) else None


def with_bootstrap(endpoint: str, body: dict[str, Any], prefill: Worker) -> dict[str, Any]:
    """The body with the bootstrap fields that pair the two servers on this request."""
    out = dict(body)
    n = batch_size(endpoint, body)
    if n is None:
        out.update(bootstrap_host=prefill.host, bootstrap_port=prefill.bootstrap_port, bootstrap_room=new_room())
    else:
        out.update(bootstrap_host=[prefill.host] * n, bootstrap_port=[prefill.bootstrap_port] * n,
                   bootstrap_room=[new_room() for _ in range(n)])
    return out


def merge_logprobs(prefill: Any, decode: Any) -> Any:
    """Decode's response with prefill's input logprobs in front of its own (item-wise for batches)."""
    if isinstance(prefill, list) and isinstance(decode, list):
        return [merge_logprobs(p, d) for p, d in zip(prefill, decode)]
    if not (isinstance(prefill, dict) and isinstance(decode, dict)):
        return decode
    pm, dm = prefill.get("meta_info"), decode.get("meta_info")
    if isinstance(pm, dict) and isinstance(dm, dict):
        for key in LOGPROB_KEYS:
            if isinstance(pm.get(key), list) and isinstance(dm.get(key), list):
                dm[key] = pm[key] + dm[key]
    return decode


class UpstreamError(Exception):
    """A worker failed a request; ``status`` is what the client gets."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "code": status}}


def error_response(status: int, message: str) -> web.Response:
    return web.json_response(error_body(status, message), status=status)


class RouterMetrics:
    """The router's Prometheus series, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kvtier_router_requests_total", "Requests received",
                                ["endpoint"], registry=self.registry)
        self.responses = Counter("kvtier_router_responses_total", "Responses sent, by HTTP status",
                                 ["endpoint", "status"], registry=self.registry)
        self.worker_requests = Counter("kvtier_router_worker_requests_total", "Requests sent to a worker",
                                       ["role", "worker"], registry=self.registry)
        self.worker_failures = Counter("kvtier_router_worker_failures_total",
                                       "Requests a worker failed (unreachable, 5xx, timeout)",
                                       ["role", "worker"], registry=self.registry)
        self.prefix = Counter("kvtier_router_prefix_total",
                              "cache_aware prefill choices: hit (a prefix owner chosen) or miss",
                              ["result"], registry=self.registry)
        self.healthy = Gauge("kvtier_router_worker_healthy", "1 if the worker is in rotation",
                             ["role", "worker"], registry=self.registry)
        self.in_flight = Gauge("kvtier_router_worker_in_flight", "Requests in flight at the worker",
                               ["role", "worker"], registry=self.registry)
        self.latency = Histogram("kvtier_router_request_seconds", "Time to the end of the response",
                                 ["endpoint"], registry=self.registry)


class Router:
    """The routing state and the aiohttp application around it."""

    def __init__(
        self,
        prefill: list[tuple[str, Optional[int]]],
        decode: list[str],
        policy: str = "cache_aware",
        health_interval: float = 5.0,
        health_timeout: float = 10.0,
        unhealthy_after: int = 2,
        request_timeout: float = 600.0,
        connect_timeout: float = 5.0,
        prefix_block: int = 64,
        prefix_capacity: int = 100_000,
        max_imbalance: int = 8,
    ):
        if not prefill or not decode:
            raise ValueError("the router needs at least one prefill and one decode worker")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.prefill = [Worker("prefill", url.rstrip("/"), port) for url, port in prefill]
        self.decode = [Worker("decode", url.rstrip("/")) for url in decode]
        self.policy = policy
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.unhealthy_after = unhealthy_after
        self.timeout = aiohttp.ClientTimeout(total=request_timeout, sock_connect=connect_timeout)
        self.request_timeout = request_timeout
        self.index = PrefixIndex(prefix_block, prefix_capacity)
        self.max_imbalance = max_imbalance
        self.metrics = RouterMetrics()
        self._turn = {"prefill": 0, "decode": 0}
        self._session: Optional[aiohttp.ClientSession] = None
        self._health_task: Optional[asyncio.Task] = None
        for w in self.prefill + self.decode:
            self._publish(w)

    # ----------------------------------------------------------------- choosing workers
    def _rotate(self, role: str, candidates: list[Worker]) -> Worker:
        """The next of ``candidates`` in this role's rotation."""
        pool = self.prefill if role == "prefill" else self.decode
        n = len(pool)
        for step in range(n):
            w = pool[(self._turn[role] + step) % n]
            if w in candidates:
                self._turn[role] = (pool.index(w) + 1) % n
                return w
        raise AssertionError("candidates must come from the pool")

    def _least_loaded(self, role: str, healthy: list[Worker]) -> Worker:
        low = min(w.in_flight for w in healthy)
        return self._rotate(role, [w for w in healthy if w.in_flight == low])

    def pick(self, endpoint: str, body: dict[str, Any]) -> tuple[Worker, Worker]:
        """A (prefill, decode) pair of healthy workers for this request; UpstreamError 503 if none."""
        prefill = [w for w in self.prefill if w.healthy]
        decode = [w for w in self.decode if w.healthy]
        for role, healthy in (("prefill", prefill), ("decode", decode)):
            if not healthy:
                raise UpstreamError(503, f"no healthy {role} worker (GET /workers for their state)")
        if self.policy == "round_robin":
            p = self._rotate("prefill", prefill)
        else:
            keys = self.index.keys(routing_prompt(endpoint, body))
            owner, _ = self.index.match(keys, (w.url for w in prefill))
            low = min(w.in_flight for w in prefill)
            p = next((w for w in prefill if w.url == owner), None)
            if p is not None and p.in_flight - low <= self.max_imbalance:
                self.metrics.prefix.labels("hit").inc()
            else:
                self.metrics.prefix.labels("miss").inc()
                p = self._least_loaded("prefill", prefill)
            self.index.record(keys, p.url)
        return p, self._least_loaded("decode", decode)

    # ----------------------------------------------------------------- worker state
    def _publish(self, w: Worker) -> None:
        self.metrics.healthy.labels(w.role, w.url).set(1 if w.healthy else 0)
        self.metrics.in_flight.labels(w.role, w.url).set(w.in_flight)

    def _set_health(self, w: Worker, ok: bool, why: str = "", at_once: bool = False) -> None:
        """Record a check; ``unhealthy_after`` failures in a row (or one, ``at_once``) take ``w`` out."""
        if ok:
            w.failed_checks = 0
            if not w.healthy:
                logger.info("%s worker %s is healthy again", w.role, w.url)
            w.healthy = True
        else:
            w.failed_checks += 1
            w.last_error = why
            if w.healthy and (at_once or w.failed_checks >= self.unhealthy_after):
                logger.warning("%s worker %s taken out: %s", w.role, w.url, why)
                w.healthy = False
        self._publish(w)

    def _fail(self, w: Worker, why: str, unreachable: bool) -> None:
        w.failures += 1
        w.last_error = why
        self.metrics.worker_failures.labels(w.role, w.url).inc()
        if unreachable and w.healthy:
            # No point sending more requests until a health check reaches it again.
            logger.warning("%s worker %s taken out: %s", w.role, w.url, why)
            w.healthy = False
            self._publish(w)

    async def check(self, w: Worker) -> None:
        """One health check of ``w``."""
        try:
            async with self._session.get(f"{w.url}/health",
                                         timeout=aiohttp.ClientTimeout(total=self.health_timeout)) as resp:
                ok, why, refused = resp.status == 200, f"/health answered {resp.status}", False
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            # Nothing listening is certain; a slow or failed answer may pass, so it needs a streak.
            ok, why = False, f"/health failed: {type(exc).__name__}: {exc}"
            refused = isinstance(exc, aiohttp.ClientConnectorError)
        w.last_check = time.time()
        self._set_health(w, ok, why, at_once=refused)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.gather(*(self.check(w) for w in self.prefill + self.decode))
            await asyncio.sleep(self.health_interval)

    # ----------------------------------------------------------------- talking to workers
    def _upstream_error(self, w: Worker, exc: BaseException) -> UpstreamError:
        if isinstance(exc, UpstreamError):
            return exc
        if isinstance(exc, asyncio.TimeoutError):
            msg = f"{w.role} worker {w.url} did not answer within {self.request_timeout:g} s"
            self._fail(w, msg, unreachable=False)
            return UpstreamError(504, msg)
        msg = f"{w.role} worker {w.url} failed: {type(exc).__name__}: {exc}"
        self._fail(w, msg, unreachable=isinstance(exc, (aiohttp.ClientConnectionError, OSError)))
        return UpstreamError(502, msg)

    async def _check_status(self, w: Worker, resp: aiohttp.ClientResponse) -> None:
        """Turn a worker's 5xx into a 502 naming it; 4xx pass through as the client's answer."""
        if resp.status >= 500:
            text = (await resp.text(errors="replace"))[:2000]
            msg = f"{w.role} worker {w.url} answered {resp.status}: {text}"
            self._fail(w, msg, unreachable=False)
            raise UpstreamError(502, msg)

    @contextlib.contextmanager
    def _busy(self, w: Worker) -> Iterator[None]:
        """Count a request at ``w`` for as long as it is outstanding there."""
        w.in_flight += 1
        w.requests += 1
        self.metrics.worker_requests.labels(w.role, w.url).inc()
        self._publish(w)
        try:
            yield
        finally:
            w.in_flight -= 1
            self._publish(w)

    async def _post(self, w: Worker, endpoint: str, data: bytes) -> tuple[int, bytes, str]:
        """POST and read the whole answer: (status, body, content type)."""
        with self._busy(w):
            try:
                async with self._session.post(f"{w.url}/{endpoint}", data=data, headers=JSON_HEADERS,
                                              timeout=self.timeout) as resp:
                    await self._check_status(w, resp)
                    return resp.status, await resp.read(), resp.content_type
            except Exception as exc:  # noqa: BLE001 - every failure becomes a client-facing error
                raise self._upstream_error(w, exc) from exc

    async def _first_event(self, w: Worker, endpoint: str, data: bytes) -> Optional[dict]:
        """POST a streaming request and read it to the end; its first JSON event (None if none)."""
        first = None
        with self._busy(w):
            try:
                async with self._session.post(f"{w.url}/{endpoint}", data=data, headers=JSON_HEADERS,
                                              timeout=self.timeout) as resp:
                    await self._check_status(w, resp)
                    async for line in resp.content:
                        if first is None and line.startswith(b"data:") and b"[DONE]" not in line:
                            first = json.loads(line[5:])
                return first
            except Exception as exc:  # noqa: BLE001
                raise self._upstream_error(w, exc) from exc

    async def _open(self, w: Worker, endpoint: str, data: bytes) -> aiohttp.ClientResponse:
        """POST and return the response once its headers are in (a 5xx raises)."""
        try:
            resp = await self._session.post(f"{w.url}/{endpoint}", data=data, headers=JSON_HEADERS,
                                            timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001
            raise self._upstream_error(w, exc) from exc
        try:
            await self._check_status(w, resp)
        except BaseException:
            resp.close()
            raise
        return resp

    @staticmethod
    async def _race(main: Awaitable[T], side: asyncio.Task) -> T:
        """``main``'s result, unless ``side`` fails first: then cancel ``main`` and raise that."""
        main = asyncio.ensure_future(main)
        try:
            while not main.done():
                await asyncio.wait({main} if side.done() else {main, side}, return_when=asyncio.FIRST_COMPLETED)
                if not main.done() and side.done() and not side.cancelled() and side.exception() is not None:
                    raise side.exception()
            return main.result()
        finally:
            main.cancel()

    async def _read(self, w: Worker, read: Awaitable[bytes], prefill: asyncio.Task) -> bytes:
        """The next piece of ``w``'s stream; its failures, or prefill's, as UpstreamError."""
        try:
            return await self._race(read, prefill)
        except UpstreamError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._upstream_error(w, exc) from exc

    async def _generate(self, endpoint: str, data: bytes, p: Worker, d: Worker, logprobs: bool) -> web.Response:
        prefill = _task(self._post(p, endpoint, data))
        decode = _task(self._post(d, endpoint, data))
        answered = False
        try:
            while not decode.done():
                await asyncio.wait({decode} if prefill.done() else {prefill, decode},
                                   return_when=asyncio.FIRST_COMPLETED)
                if prefill.done() and not decode.done():
                    p_status, p_body, p_type = prefill.result()  # a failed prefill raises here
                    if p_status >= 400:  # the request itself is bad; decode would wait for KV in vain
                        return web.Response(body=p_body, status=p_status, content_type=p_type)
            status, body, ctype = decode.result()
            answered = status < 400
            if logprobs and answered:
                p_status, p_body, _ = await prefill
                try:
                    merged = merge_logprobs(json.loads(p_body), json.loads(body)) if p_status < 400 else json.loads(body)
                except ValueError as exc:
                    raise UpstreamError(502, f"prefill {p.url} or decode {d.url} answered invalid JSON: {exc}") from exc
                return web.json_response(merged, status=status)
            return web.Response(body=body, status=status, content_type=ctype)
        finally:
            # After decode's answer prefill's is only a formality: let it finish on its own.
            for t in (prefill, decode) if not answered else ():
                t.cancel()

    async def _stream(self, request: web.Request, endpoint: str, data: bytes, p: Worker, d: Worker,
                      logprobs: bool) -> web.StreamResponse:
        prefill = _task(self._first_event(p, endpoint, data))
        resp: Optional[aiohttp.ClientResponse] = None
        complete = False
        with self._busy(d):
            try:
                resp = await self._race(self._open(d, endpoint, data), prefill)
                if resp.status >= 400:
                    return web.Response(body=await resp.read(), status=resp.status, content_type=resp.content_type)
                first = await prefill if logprobs else None
                out = web.StreamResponse(status=resp.status, headers={"Content-Type": resp.headers.get(
                    "Content-Type", "text/event-stream")})
                await out.prepare(request)
                try:
                    while True:
                        read = resp.content.readline() if first else resp.content.read(STREAM_READ_BYTES)
                        piece = await self._read(d, read, prefill)
                        if not piece:
                            break
                        await out.write(_merge_event(first, piece) if first else piece)
                    complete = True
                except UpstreamError as err:
                    # Headers are gone; tell the client in the stream, as SGLang does for its own errors.
                    await out.write(b"data: " + json.dumps(error_body(err.status, str(err))).encode() + b"\n\n")
                await out.write_eof()
                return out
            except UpstreamError:
                prefill.cancel()
                raise
            finally:
                if not complete:
                    prefill.cancel()
                if resp is not None:
                    resp.release() if complete else resp.close()

    # ----------------------------------------------------------------- HTTP handlers
    def _handler(self, endpoint: str):
        async def handle(request: web.Request) -> web.StreamResponse:
            started = time.perf_counter()
            self.metrics.requests.labels(endpoint).inc()
            try:
                body = await _json_object(request)
                p, d = self.pick(endpoint, body)
                data = json.dumps(with_bootstrap(endpoint, body, p)).encode()
                stream = bool(body.get("stream"))
                # A batch's stream interleaves its items, so only single streams are merged.
                logprobs = bool(body.get("return_logprob")) and not (stream and batch_size(endpoint, body))
                if stream:
                    resp = await self._stream(request, endpoint, data, p, d, logprobs)
                else:
                    resp = await self._generate(endpoint, data, p, d, logprobs)
            except UpstreamError as exc:
                resp = error_response(exc.status, str(exc))
            self.metrics.responses.labels(endpoint, str(resp.status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
            return resp

        return handle

    async def _health(self, _: web.Request) -> web.Response:
        counts = {role: sum(w.healthy for w in pool) for role, pool in (("prefill", self.prefill), ("decode", self.decode))}
        ok = all(counts.values())
        return web.json_response({"status": "ok" if ok else "no healthy worker", "healthy": counts},
                                 status=200 if ok else 503)

    async def _workers(self, _: web.Request) -> web.Response:
        return web.json_response({"policy": self.policy, "prefill": [w.state() for w in self.prefill],
                                  "decode": [w.state() for w in self.decode]})

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _model_info(self, request: web.Request) -> web.Response:
        """Read-only model queries go to one healthy decode worker (all serve the same model)."""
        healthy = [w for w in self.decode if w.healthy]
        if not healthy:
            return error_response(503, "no healthy decode worker (GET /workers for their state)")
        w = healthy[0]
        try:
            async with self._session.get(f"{w.url}{request.path}", timeout=self.timeout) as resp:
                return web.Response(body=await resp.read(), status=resp.status, content_type=resp.content_type)
        except Exception as exc:  # noqa: BLE001
            err = self._upstream_error(w, exc)
            return error_response(err.status, str(err))

    async def _start(self, _: web.Application) -> None:
        # No keep-alive: a pooled connection to a worker that restarted would fail the next request.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
        self._health_task = asyncio.create_task(self._health_loop())

    async def _stop(self, _: web.Application) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def app(self) -> web.Application:
        """The aiohttp application serving this router."""
        app = web.Application(client_max_size=1 << 30)
        for endpoint in ENDPOINTS:
            app.router.add_post(f"/{endpoint}", self._handler(endpoint))
        app.router.add_get("/health", self._health)
        app.router.add_get("/workers", self._workers)
        app.router.add_get("/metrics", self._metrics)
        for path in ("/v1/models", "/model_info", "/get_model_info"):
            app.router.add_get(path, self._model_info)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app


JSON_HEADERS = {"Content-Type": "application/json"}


def _task(coro: Awaitable[T]) -> asyncio.Task:
    """A task whose failure is retrieved even when nobody awaits it (no 'never retrieved' noise)."""
    t = asyncio.ensure_future(coro)
    t.add_done_callback(lambda f: f.cancelled() or f.exception())
    return t


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise UpstreamError(400, f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise UpstreamError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _merge_event(first: dict, line: bytes) -> bytes:
    """One SSE line of decode's stream with prefill's input logprobs merged into its event."""
    if not line.startswith(b"data:") or b"[DONE]" in line:
        return line
    try:
        event = json.loads(line[5:])
    except ValueError:
        return line  # not an event we understand: the client gets it as the worker sent it
    return b"data: " + json.dumps(merge_logprobs(first, event)).encode() + b"\n"


def parse_workers(prefill: list[list[str]], decode: list[str]) -> tuple[list[tuple[str, int]], list[str]]:
    """Check ``--prefill URL [PORT]`` and ``--decode URL`` values; errors say what to write."""
    def url_ok(url: str) -> str:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.port is None:
            raise ValueError(f"worker URL {url!r} must look like http://HOST:PORT")
        return url.rstrip("/")

    out = []
    for values in prefill:
        if len(values) > 2:
            raise ValueError(f"--prefill takes URL [BOOTSTRAP_PORT], got {values}")
        port = values[1] if len(values) == 2 else str(DEFAULT_BOOTSTRAP_PORT)
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--prefill {values[0]} {port}: the bootstrap port must be a TCP port")
        out.append((url_ok(values[0]), int(port)))
    return out, [url_ok(u) for u in decode]


def arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m launch.router", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefill", nargs="+", action="append", required=True, metavar=("URL", "BOOTSTRAP_PORT"),
                    help=f"a prefill worker and its bootstrap port (default {DEFAULT_BOOTSTRAP_PORT}); repeat for more")
    ap.add_argument("--decode", action="append", required=True, metavar="URL", help="a decode worker; repeat for more")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default 8000)")
    ap.add_argument("--policy", choices=POLICIES, default="cache_aware",
                    help="prefill choice: cache_aware (the worker that served the longest prefix of the prompt, "
                         "else the least loaded; default) or round_robin; decode is always least loaded")
    ap.add_argument("--health-interval", type=float, default=5.0, help="seconds between health checks (default 5)")
    ap.add_argument("--health-timeout", type=float, default=10.0,
                    help="a /health slower than this fails (default 10; SGLang's runs a 1-token generation)")
    ap.add_argument("--unhealthy-after", type=int, default=2,
                    help="failed checks in a row that take a worker out (default 2; one if nothing listens; "
                         "it is back after one success)")
    ap.add_argument("--request-timeout", type=float, default=600.0,
                    help="longest a request may take, streams included, before the client gets 504 (default 600)")
    ap.add_argument("--connect-timeout", type=float, default=5.0, help="TCP connect timeout to workers (default 5)")
    ap.add_argument("--prefix-block", type=int, default=64,
                    help="cache_aware granularity in tokens (text: 4 characters per token) (default 64)")
    ap.add_argument("--prefix-capacity", type=int, default=100_000,
                    help="prefix blocks remembered, least recently used dropped (default 100000)")
    ap.add_argument("--max-imbalance", type=int, default=8,
                    help="cache_aware leaves a prefix's worker when it has this many more requests in flight "
                         "than the least loaded one (default 8)")
    return ap


async def serve(router: Router, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM."""
    runner = web.AppRunner(router.app(), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    print(f"kvtier router: listening on http://{host}:{bound} (policy {router.policy}; prefill "
          f"{', '.join(f'{w.url} [{w.bootstrap_port}]' for w in router.prefill)}; decode "
          f"{', '.join(w.url for w in router.decode)})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    print("kvtier router: stopped", flush=True)


def main(argv: Optional[list[str]] = None) -> None:
    ap = arg_parser()
    args = ap.parse_args(argv)
    try:
        prefill, decode = parse_workers(args.prefill, args.decode)
        router = Router(prefill, decode, policy=args.policy, health_interval=args.health_interval,
                        health_timeout=args.health_timeout, unhealthy_after=args.unhealthy_after,
                        request_timeout=args.request_timeout, connect_timeout=args.connect_timeout,
                        prefix_block=args.prefix_block, prefix_capacity=args.prefix_capacity,
                        max_imbalance=args.max_imbalance)
    except ValueError as exc:
        ap.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(router, args.host, args.port))


if __name__ == "__main__":
    main()
