"""The streaming client against a real aiohttp server process that streams like SGLang's ``/generate``.

The client is under test; the server (``standin_server.py``) only reproduces SGLang's event
format and reports a request's longest common prefix with earlier prompts as cached GPU tokens.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request

import pytest
from bench_common import LLAMA3_8B, BenchError
from long_doc import RequestResult, describe_pass, pass_report, rag_passes, run_pass, server_stages, token_range
from sglang_server import request_stages

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def standin(request, start_standin):
    """The stand-in started with the test's arguments; its base URL."""
    return start_standin(*getattr(request, "param", []))


def stats(base: str) -> dict:
    return json.loads(urllib.request.urlopen(base + "/stats", timeout=2).read())


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@pytest.mark.parametrize("standin", [["--ttft-s", "0.15", "--token-s", "0.01"]], indirect=True)
def test_passes_time_every_request_and_count_reuse(standin):
    docs, doc_len, out_len = 10, 400, 6
    (_, cold), (_, warm) = rag_passes(docs, doc_len, 1, token_range(LLAMA3_8B), [LLAMA3_8B["bos_token_id"]])
    progress = []
    results, wall = asyncio.run(run_pass(standin + "/generate", cold, 4, out_len,
                                         on_done=lambda d, t, e: progress.append((d, t))))
    assert stats(standin)["max_in_flight"] == 4
    assert progress == [(i, docs) for i in range(1, docs + 1)]
    assert len(results) == docs
    for r, prompt in zip(results, cold):
        assert r.prompt_tokens == len(prompt) and r.output_tokens == out_len
        assert 0.15 <= r.ttft_s < r.latency_s
        assert r.latency_s - r.ttft_s >= (out_len - 1) * 0.01
    # 10 requests, 4 at a time: three waves of at least 0.15 + 6 x 0.01 s each.
    assert wall >= 3 * 0.21

    warm_results, warm_wall = asyncio.run(run_pass(standin + "/generate", warm, 4, out_len))
    expected = [max(common_prefix(p, c) for c in cold) for p in warm]
    assert [r.cached_device for r in warm_results] == expected
    assert all(e >= 1 + doc_len for e in expected)

    report = pass_report(warm_results, warm_wall)
    assert report["requests"] == docs and report["output_tokens"] == docs * out_len
    assert report["throughput_tok_s"] == round(docs * out_len / warm_wall, 1)
    assert report["hit_rate"]["gpu"] == round(sum(expected) / sum(map(len, warm)), 4)
    assert report["hit_rate"]["host"] == 0
    assert report["ttft_all_s"] == [round(r.ttft_s, 4) for r in warm_results]
    # Four users: the first four requests go at once, each later one when a user's last one ended.
    sent = report["sent_all_s"]
    assert min(sent) == 0 and max(sent[:4]) < 0.1
    assert all(s >= 0.21 for s in sent[4:8]) and all(s >= 0.42 for s in sent[8:])
    assert report["ttft"]["p99_s"] <= max(report["ttft_all_s"])


@pytest.mark.parametrize("standin", [["--ttft-s", "0.01", "--token-s", "0.001"]], indirect=True)
def test_requests_carry_their_pass_and_index_as_request_id(standin):
    results, _ = asyncio.run(run_pass(standin + "/generate", [[1, 2, 3]] * 5, 2, 3, rid_prefix="warm-"))
    assert sorted(stats(standin)["rids"]) == [f"warm-{i}" for i in range(5)]
    assert [r.rid for r in results] == [f"warm-{i}" for i in range(5)]
    asyncio.run(run_pass(standin + "/generate", [[1, 2, 3]], 1, 3))
    assert len(stats(standin)["rids"]) == 5  # no prefix: no request id, SGLang picks one


def test_server_stages_line_up_with_the_client_clock():
    # SGLang's lines for two of a pass's requests; the client sent them at monotonic 100.0 and 100.5,
    # when the wall clock read 1000 s more.
    log = "\n".join(
        f"[2026-11-24 16:00:00] ReqTimeStats(rid={rid}, input_len=10, cached_input_len=0, output_len=1, "
        f"attempts={attempts}, type=unified): queue_duration={queue}ms, forward_duration=40.00ms, entry_time={entry}"
        for rid, attempts, queue, entry in (("warm-0", 1, "3.50", "1100.004"), ("warm-1", 2, "51.25", "1100.512")))
    results = [RequestResult(0.05, 1.0, 10, 1, 0, 0, 0, sent_s=100.0, rid="warm-0"),
               RequestResult(0.09, 1.0, 10, 1, 0, 0, 0, sent_s=100.5, rid="warm-1")]
    stages = server_stages(request_stages(log), results, origin_wall_s=1100.0)
    assert stages == {"queue_ms": [3.5, 51.25], "queued_at_s": [0.004, 0.512], "attempts": [1, 2]}
    # A request without its line (a server without the flag): nothing rather than a partial list.
    assert server_stages(request_stages(log), [*results, RequestResult(0.1, 1.0, 10, 1, 0, 0, 0, rid="warm-2")],
                         1100.0) == {}


def test_a_pass_s_line_names_its_gc_pauses_and_queue_wait_when_recorded():
    results = [RequestResult(0.05, 1.0, 10, 2, 0, 0, 0, sent_s=1.0, rid="warm-0"),
               RequestResult(0.09, 1.2, 10, 2, 0, 0, 0, sent_s=1.1, rid="warm-1")]
    report = pass_report(results, wall_s=2.0)
    assert "GC pauses" not in describe_pass(report) and "queue wait" not in describe_pass(report)
    report["gc_pauses"] = [{"at_s": 0.5, "ms": 2.0, "gen": 1, "proc": "p"},
                           {"at_s": 0.9, "ms": 4.0, "gen": 0, "proc": "p"}]
    report["server_stages"] = {"queue_ms": [5.0, 10.0]}
    line = describe_pass(report)
    assert "GC pauses 2 (6 ms, longest 4 ms)" in line and line.endswith("scheduler queue wait mean 7.5 ms")


@pytest.mark.parametrize("standin", [["--mode", "error"]], indirect=True)
def test_streamed_error_fails_the_pass(standin):
    with pytest.raises(BenchError, match="streamed an error: .*prompt too long"):
        asyncio.run(run_pass(standin + "/generate", [[1, 2, 3]] * 3, 2, 4))


@pytest.mark.parametrize("standin", [["--mode", "hang"]], indirect=True)
def test_hung_server_fails_within_the_deadline(standin):
    start = time.monotonic()
    with pytest.raises(BenchError, match="within 1 s"):
        asyncio.run(run_pass(standin + "/generate", [[1, 2, 3]] * 4, 4, 4, timeout_s=1))
    assert time.monotonic() - start < 5


def test_dead_server_fails_fast():
    start = time.monotonic()
    with pytest.raises(BenchError, match="failed"):
        asyncio.run(run_pass(f"http://127.0.0.1:{free_port()}/generate", [[1, 2, 3]], 1, 4))
    assert time.monotonic() - start < 5
