"""``launch.router`` as a real process in front of real stand-in worker processes, over loopback."""

from __future__ import annotations

import http.client
import json
import random
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

import pytest

from kvtier.launch.router import MAX_ROOM, PrefixIndex, batch_size, merge_logprobs, routing_prompt

PREFILL_LP = [[-0.5, 11, None], [-0.25, 12, None], [-0.125, 13, None]]
DECODE_LP = [[-1.0, 14, None]]


def paired(p_rec: dict, d_rec: dict, port: int = 9123) -> list[int]:
    """Both sides got the same bootstrap fields; the rooms (a list, one per item)."""
    for key in ("bootstrap_host", "bootstrap_port", "bootstrap_room"):
        assert p_rec[key] == d_rec[key], key
    rooms = d_rec["bootstrap_room"] if isinstance(d_rec["bootstrap_room"], list) else [d_rec["bootstrap_room"]]
    hosts = d_rec["bootstrap_host"] if isinstance(d_rec["bootstrap_host"], list) else [d_rec["bootstrap_host"]]
    ports = d_rec["bootstrap_port"] if isinstance(d_rec["bootstrap_port"], list) else [d_rec["bootstrap_port"]]
    assert all(isinstance(r, int) and 0 < r <= MAX_ROOM for r in rooms), rooms
    assert hosts == ["127.0.0.1"] * len(rooms) and ports == [port] * len(rooms)
    return rooms


def test_pairs_both_workers_and_returns_decode_answer(spawn):
    p, d = spawn("prefill"), spawn("decode")
    router = spawn.router([p], [d])
    bodies = {
        "generate": {"text": "hello", "sampling_params": {"max_new_tokens": 4}},
        "v1/completions": {"model": "m", "prompt": "hello", "max_tokens": 4},
        "v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }
    rooms = []
    for n, (endpoint, body) in enumerate(bodies.items(), 1):
        status, out = router.post(endpoint, body)
        assert status == 200, out
        p_rec, d_rec = p.records(n)[-1], d.records()[-1]
        assert p_rec["path"] == d_rec["path"] == f"/{endpoint}"
        assert p_rec["prompt"] == d_rec["prompt"] == body.get("text", body.get("prompt", body.get("messages")))
        (room,) = paired(p_rec, d_rec)
        assert out == {"text": f"decode {d.port} room {room} item 0",
                       "meta_info": {"input_token_logprobs": DECODE_LP, "worker": d.port, "room": room}}
        rooms.append(room)
    assert len(set(rooms)) == 3


def test_batch_gets_a_room_per_item(spawn):
    p, d = spawn("prefill"), spawn("decode")
    router = spawn.router([p], [d])
    for n, (endpoint, body, items) in enumerate([("generate", {"text": ["a", "b", "c"]}, 3),
                                                 ("generate", {"input_ids": [[1, 2], [3], [4, 5, 6], [7]]}, 4),
                                                 ("v1/completions", {"prompt": ["x", "y"]}, 2)], 1):
        status, out = router.post(endpoint, body)
        assert status == 200, out
        rooms = paired(p.records(n)[-1], d.records()[-1])
        assert len(rooms) == len(set(rooms)) == items == batch_size(endpoint, body)
        assert [o["meta_info"]["room"] for o in out] == rooms
    # A single tokenized prompt is not a batch.
    assert router.post("generate", {"input_ids": [1, 2, 3]})[0] == 200
    assert isinstance(d.records()[-1]["bootstrap_room"], int)


def test_input_logprobs_are_merged(spawn):
    p, d = spawn("prefill"), spawn("decode")
    router = spawn.router([p], [d])
    status, out = router.post("generate", {"text": "q", "return_logprob": True})
    assert status == 200 and out["meta_info"]["input_token_logprobs"] == PREFILL_LP + DECODE_LP
    status, out = router.post("generate", {"text": ["q", "r"], "return_logprob": True})
    assert status == 200 and [o["meta_info"]["input_token_logprobs"] for o in out] == [PREFILL_LP + DECODE_LP] * 2
    # Without return_logprob the decode answer is passed through untouched.
    status, out = router.post("generate", {"text": "q"})
    assert out["meta_info"]["input_token_logprobs"] == DECODE_LP


def read_stream(url: str, body: dict) -> tuple[list[tuple[float, bytes]], int]:
    """POST and read the raw body as it arrives: [(seconds since the request, bytes)], status."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    start = time.monotonic()
    conn.request("POST", u.path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    pieces = []
    while chunk := resp.read1(65536):
        pieces.append((time.monotonic() - start, chunk))
    conn.close()
    return pieces, resp.status


def test_streaming_is_passed_through_as_it_comes(spawn):
    p, d = spawn("prefill"), spawn("decode")
    d.control(gap=0.4)
    router = spawn.router([p], [d])
    pieces, status = read_stream(f"{router.url}/generate", {"text": "s", "stream": True})
    assert status == 200
    (room,) = paired(p.records(1)[-1], d.records()[-1])
    body = b"".join(c for _, c in pieces)
    expected = b"".join(
        b"data: " + json.dumps({"text": f"decode {d.port} room {room} item 0 part {k}",
                                "meta_info": {"input_token_logprobs": DECODE_LP, "worker": d.port,
                                              "room": room}}).encode() + b"\n\n"
        for k in range(3)) + b"data: [DONE]\n\n"
    assert body == expected
    # The first event reached the client long before the decode worker finished (3 x 0.4 s).
    first_at = next(t for t, c in pieces if c)
    assert first_at < 0.6 and pieces[-1][0] > 0.9, [t for t, _ in pieces]


def test_streaming_with_logprobs_merges_each_event(spawn):
    p, d = spawn("prefill"), spawn("decode")
    router = spawn.router([p], [d])
    pieces, status = read_stream(f"{router.url}/generate", {"text": "s", "stream": True, "return_logprob": True})
    lines = b"".join(c for _, c in pieces).split(b"\n")
    events = [json.loads(line[5:]) for line in lines if line.startswith(b"data:") and b"[DONE]" not in line]
    assert status == 200 and len(events) == 3 and lines.count(b"data: [DONE]") == 1
    assert all(e["meta_info"]["input_token_logprobs"] == PREFILL_LP + DECODE_LP for e in events)


def test_round_robin_alternates(spawn):
    ps, ds = [spawn("prefill"), spawn("prefill")], [spawn("decode"), spawn("decode")]
    router = spawn.router(ps, ds, "--policy", "round_robin")
    prompts = ["same prompt every time " * 50 + str(i) for i in range(6)]  # one shared prefix: no cache affinity
    for prompt in prompts:
        assert router.post("generate", {"text": prompt})[0] == 200
    # Order: prefill 0, 1, 0, ...; decode (least loaded, ties in turn) likewise.
    for w in ps + ds:
        assert len(w.records(3)) == 3
    assert [[r["prompt"] for r in w.records()] for w in ps] == [prompts[0::2], prompts[1::2]]
    assert [[r["prompt"] for r in w.records()] for w in ds] == [prompts[0::2], prompts[1::2]]
    state = router.get("workers")[1]
    assert [w["requests"] for w in state["prefill"] + state["decode"]] == [3, 3, 3, 3]


def test_cache_aware_keeps_a_prefix_on_one_prefill(spawn):
    ps, d = [spawn("prefill"), spawn("prefill"), spawn("prefill")], spawn("decode")
    router = spawn.router(ps, [d], "--policy", "cache_aware", "--prefix-block", "16")
    rng = random.Random(0)
    doc_a = [rng.randrange(32000) for _ in range(500)]
    doc_b = [rng.randrange(32000) for _ in range(500)]
    text_c = "".join(rng.choice("abcdefgh ") for _ in range(3000))

    served = [0, 0, 0]

    def served_by(body: dict) -> int:
        assert router.post("generate", body)[0] == 200
        deadline = time.monotonic() + 5
        while sum(now := [len(w.records()) for w in ps]) == sum(served) and time.monotonic() < deadline:
            time.sleep(0.02)
        (owner,) = [i for i in range(len(ps)) if now[i] > served[i]]
        served[owner] += 1
        return owner

    a = served_by({"input_ids": doc_a + [1, 2, 3]})
    b = served_by({"input_ids": doc_b + [4]})
    c = served_by({"text": text_c + " question one"})
    assert len({a, b, c}) == 3  # new prefixes spread over idle workers
    for i in range(4):
        assert served_by({"input_ids": doc_a + [rng.randrange(32000) for _ in range(40)]}) == a
        assert served_by({"input_ids": doc_b + [i]}) == b
        assert served_by({"text": text_c + f" question {i}"}) == c
    # A batch is routed by its first item.
    assert served_by({"input_ids": [doc_b + [9], doc_a]}) == b
    metrics = router.get("metrics")[1]
    assert 'kvtier_router_prefix_total{result="hit"} 13.0' in metrics
    assert 'kvtier_router_prefix_total{result="miss"} 3.0' in metrics


def test_decode_goes_to_the_least_loaded(spawn):
    p, ds = spawn("prefill"), [spawn("decode"), spawn("decode")]
    router = spawn.router([p], ds)
    ds[0].control(delay=2.0)
    slow = threading.Thread(target=router.post, args=("generate", {"text": "slow"}))
    slow.start()
    deadline = time.monotonic() + 5
    while not ds[0].records() and time.monotonic() < deadline:
        time.sleep(0.02)
    for _ in range(3):  # decode 0 is busy: every other request goes to decode 1
        assert router.post("generate", {"text": "fast"})[0] == 200
    assert [len(w.records()) for w in ds] == [1, 3]
    slow.join()


def test_unhealthy_worker_is_taken_out_and_put_back(spawn):
    ps, d = [spawn("prefill"), spawn("prefill")], spawn("decode")
    router = spawn.router(ps, [d], "--policy", "round_robin", "--health-interval", "0.2",
                          "--unhealthy-after", "2")
    ps[1].control(healthy=False)
    router.wait_workers(lambda s: not s["prefill"][1]["healthy"])
    for _ in range(4):
        assert router.post("generate", {"text": "x"})[0] == 200
    assert [len(w.records(n)) for w, n in zip(ps, (4, 0))] == [4, 0]
    assert router.get("health")[0] == 200
    ps[1].control(healthy=True)
    router.wait_workers(lambda s: s["prefill"][1]["healthy"])
    for _ in range(4):
        assert router.post("generate", {"text": "x"})[0] == 200
    assert len(ps[1].records(2)) == 2
    # No healthy decode worker: the router says so at once, and so does its /health.
    d.control(healthy=False)
    router.wait_workers(lambda s: not s["decode"][0]["healthy"])
    started = time.monotonic()
    status, out = router.post("generate", {"text": "x"})
    assert status == 503 and "no healthy decode worker" in out["error"]["message"]
    assert time.monotonic() - started < 1.0
    assert router.get("health")[0] == 503
    assert 'kvtier_router_worker_healthy{role="decode",worker="%s"} 0.0' % d.url in router.get("metrics")[1]


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_dead_worker_gives_502_then_503(spawn, role):
    p, d = spawn("prefill"), spawn("decode")
    router = spawn.router([p], [d], "--health-interval", "60")
    d.control(delay=0.3)  # as a real decode, it answers after the prefill
    assert router.post("generate", {"text": "x"})[0] == 200
    dead = p if role == "prefill" else d
    dead.kill()
    started = time.monotonic()
    status, out = router.post("generate", {"text": "x"}, timeout=30)
    assert time.monotonic() - started < 5.0
    assert status == 502 and f"{role} worker {dead.url}" in out["error"]["message"], out
    # The router took it out without waiting for the next health check.
    status, out = router.post("generate", {"text": "x"}, timeout=30)
    assert status == 503 and f"no healthy {role} worker" in out["error"]["message"]
    state = router.get("workers")[1][role][0]
    assert not state["healthy"] and state["failures"] == 1


def test_hung_and_failing_workers_get_clean_errors(spawn):
    p, d = spawn("prefill"), spawn("decode")
    router = spawn.router([p], [d], "--request-timeout", "1.5")
    d.control(hang=True)
    for stream in (False, True):
        started = time.monotonic()
        status, out = router.post("generate", {"text": "x", "stream": stream}, timeout=30)
        assert 1.4 < time.monotonic() - started < 4.0
        assert status == 504 and "did not answer within 1.5 s" in out["error"]["message"]
    d.control(hang=False, delay=0.5)  # as a real decode, it answers after the prefill
    p.control(status=500)
    status, out = router.post("generate", {"text": "x"})
    assert status == 502 and f"prefill worker {p.url} answered 500" in out["error"]["message"]
    p.control(status=400)  # the request's fault: passed through as the worker said it
    status, out = router.post("generate", {"text": "x"})
    assert status == 400 and out == {"error": {"message": "standin prefill says 400"}}
    p.control(status=200)
    d.control(status=503, delay=0)
    status, out = router.post("generate", {"text": "x", "stream": True})
    assert status == 502 and f"decode worker {d.url} answered 503" in out["error"]["message"]
    assert router.get("workers")[1]["decode"][0]["healthy"]  # a 5xx answer is not a dead worker


def test_prefill_dying_mid_request_ends_it(spawn):
    p, d = spawn("prefill"), spawn("decode")
    router = spawn.router([p], [d], "--health-interval", "60")
    d.control(hang=True)  # decode waits for KV that never comes, as a real one would
    p.control(delay=0.5, exit=None)
    killer = threading.Timer(0.3, p.kill)
    killer.start()
    started = time.monotonic()
    status, out = router.post("generate", {"text": "x"}, timeout=30)
    assert status == 502 and "prefill worker" in out["error"]["message"]
    assert time.monotonic() - started < 3.0
    killer.join()


def test_bad_requests_and_arguments(spawn, client):
    p, d = spawn("prefill"), spawn("decode")
    router = spawn.router([p], [d])
    status, out = client("POST", f"{router.url}/generate", None)
    assert status == 400 and "not valid JSON" in out["error"]["message"]
    status, out = router.post("generate", ["not", "an", "object"])
    assert status == 400 and "JSON object" in out["error"]["message"]
    assert router.get("v1/models") == (200, {"object": "list", "data": [{"id": "standin-decode"}]})
    assert p.records() == [] and d.records() == []


def test_prefix_index_is_bounded_and_matches_the_longest_prefix():
    index = PrefixIndex(block=4, capacity=10)
    a = list(range(40))
    keys_a = index.keys(a)
    assert len(keys_a) == 10 and index.keys(a[:9]) == keys_a[:2]  # chained; partial block ignored
    index.record(keys_a, "w0")
    index.record(index.keys(a[:8]), "w1")  # w1 served the first 2 blocks more recently
    assert index.match(keys_a, ["w0", "w1"]) == ("w0", 10)
    assert index.match(keys_a[:2], ["w0", "w1"]) == ("w1", 2)
    assert index.match(keys_a, ["w1"]) == ("w1", 2)
    assert index.match(index.keys([99] * 40), ["w0", "w1"]) == (None, 0)
    index.record(index.keys([7] * 20), "w2")  # 5 new keys push the 5 oldest out
    assert len(index) == 10
    assert index.match(keys_a, ["w0", "w1"]) == ("w0", 10)
    assert index.match(keys_a[:7], ["w0"]) == (None, 0)  # blocks 2..6 dropped, 0..1 are w1's
    # Text is cut in 4 characters per token; chat is keyed by its messages.
    assert len(index.keys("x" * 33)) == 2
    chat = routing_prompt("v1/chat/completions", {"messages": [{"role": "user", "content": "y" * 64}]})
    assert len(index.keys(chat)) >= 4


def test_merge_logprobs_keeps_decode_fields():
    p = {"meta_info": {"input_token_logprobs": [1], "input_top_logprobs": [2]}}
    d = {"text": "t", "meta_info": {"input_token_logprobs": [3], "output_token_logprobs": [4]}}
    assert merge_logprobs(p, d) == {"text": "t", "meta_info": {"input_token_logprobs": [1, 3],
                                                               "output_token_logprobs": [4]}}


@pytest.mark.parametrize("args, message", [
    (["--prefill", "127.0.0.1:30000", "--decode", "http://127.0.0.1:30001"], "must look like http://HOST:PORT"),
    (["--prefill", "http://127.0.0.1:30000", "x", "--decode", "http://127.0.0.1:30001"], "must be a TCP port"),
    (["--prefill", "http://127.0.0.1:30000"], "--decode"),
])
def test_router_refuses_bad_worker_arguments(args, message):
    out = subprocess.run([sys.executable, "-m", "kvtier.launch.router", *args], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def open_stream(url: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, bytes]:
    """POST a streaming request and read its first piece."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("POST", u.path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return conn, resp, resp.read1(65536)


def test_a_decode_dying_mid_stream_ends_it_with_an_error_event(spawn):
    p, d = spawn("prefill"), spawn("decode")
    d.control(gap=1.0)
    router = spawn.router([p], [d], "--health-interval", "60")
    conn, resp, first = open_stream(f"{router.url}/generate", {"text": "s", "stream": True})
    assert resp.status == 200 and first.startswith(b"data: {")
    d.kill()
    rest = resp.read()
    conn.close()
    event = json.loads(rest.strip().split(b"\n")[-1][5:])
    assert event["error"]["code"] == 502 and f"decode worker {d.url} failed" in event["error"]["message"]


def test_a_client_leaving_a_stream_is_not_a_worker_failure(spawn):
    p, d = spawn("prefill"), spawn("decode")
    d.control(gap=0.3)
    router = spawn.router([p], [d])
    conn, resp, first = open_stream(f"{router.url}/generate", {"text": "s", "stream": True})
    assert resp.status == 200 and first
    conn.close()
    state = router.wait_workers(lambda s: s["decode"][0]["in_flight"] == 0 and s["prefill"][0]["in_flight"] == 0)
    assert state["decode"][0]["healthy"] and state["decode"][0]["failures"] == 0
    assert router.post("generate", {"text": "x"})[0] == 200


def test_a_worker_not_listening_is_out_after_one_check(spawn, free_ports):
    p, d = spawn("prefill"), spawn("decode")
    (nobody,) = free_ports(1)
    router = spawn.router([p], [d], "--decode", f"http://127.0.0.1:{nobody}", "--health-interval", "30")
    state = router.wait_workers(lambda s: not s["decode"][1]["healthy"], timeout=5)
    assert "ClientConnectorError" in state["decode"][1]["last_error"] and state["decode"][0]["healthy"]
    for _ in range(3):
        assert router.post("generate", {"text": "x"})[0] == 200
    assert len(d.records()) == 3


def test_routing_prompt_and_batch_size_read_the_same_prompt_field():
    assert routing_prompt("generate", {"text": None, "input_ids": [[5, 6], [7]]}) == [5, 6]
    assert batch_size("generate", {"text": None, "input_ids": [[5, 6], [7]]}) == 2
    assert routing_prompt("generate", {"text": "abc"}) == "abc" and batch_size("generate", {"text": "abc"}) is None
    assert routing_prompt("v1/completions", {"prompt": ["x", "y"]}) == "x"
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert routing_prompt("v1/chat/completions", chat) == chat["messages"]
    assert batch_size("v1/chat/completions", chat) is None
